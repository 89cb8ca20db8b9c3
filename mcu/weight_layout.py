"""Build-time choice of how the fully connected layers' weights are stored in flash: int8
(`mcu.kernels.pack_fc_weights`, kernel `fc_s8`) or, where the board's flash has room, widened to int16
in the order the Cortex-M4 loop reads them (`pack_fc_weights_s16`, kernel `fc_s8w16`: one LDM per
channel pair and 4 k, no SXTB16). The arithmetic does not change, only the storage: the host
reference runs the rewritten schedule and gets the same integers.
"""
from __future__ import annotations

from dataclasses import replace

from mcu.graph import Call, Const, Schedule, Tensor
from mcu.kernels import pack_fc_weights_s16, unpack_fc_weights

# Flash kept free for the firmware's code and static data besides the weights (the BERT-tiny firmware's
# code is about 23 KB, fc_s8w16's straight-line steps 2 KB); the link still checks the exact sizes.
CODE_RESERVE = 64 * 1024


def const_bytes_used(sched: Schedule) -> int:
    """Bytes of the constants the schedule's calls read: what the firmware puts in flash."""
    names = {a.tensor for c in sched.calls for a in c.args if isinstance(a, Const)}
    return sum(sched.graph.tensors[n].nbytes for n in names)


def widen_fc_weights(sched: Schedule, flash_bytes: int) -> Schedule:
    """The schedule with as many fully connected layers' weights widened to int16 as fit `flash_bytes`
    (the board's flash budget less CODE_RESERVE), the layers that run the most MACs per extra byte first.
    A weight constant widens only when every call reading it is an fc_s8 call reading it whole (not, e.g.,
    a tiled attention kernel that projects K/V itself, or one head's rows) on at least two rows (a single
    row, e.g. a classifier, gains nothing); the int8 copy then leaves the firmware."""
    readers: dict[str, list[Call]] = {}
    for c in sched.calls:
        for a in c.args:
            if isinstance(a, Const):
                readers.setdefault(a.tensor, []).append(c)
    room = flash_bytes - CODE_RESERVE - const_bytes_used(sched)
    candidates = [(sum(c.macs for c in cs) / sched.graph.tensors[n].nbytes, n) for n, cs in readers.items()
                  if all(c.kernel == "fc_s8" and c.args[1] == Const(n) and c.args[6] >= 2 for c in cs)]
    wide: set[str] = set()
    for _, n in sorted(candidates, reverse=True):
        extra = sched.graph.tensors[n].nbytes          # int16 storage doubles the bytes
        if extra <= room:
            wide.add(n)
            room -= extra
    if not wide:
        return sched
    tensors = dict(sched.graph.tensors)
    for n in wide:
        t = tensors[n]
        N, K = t.shape
        tensors[f"{n}.s16"] = Tensor(f"{n}.s16", t.shape, "int16", "const", t.q,
                                     pack_fc_weights_s16(unpack_fc_weights(t.data.reshape(-1), N, K)).reshape(N, K))
    calls = [Call("fc_s8w16", (c.args[0], Const(f"{c.args[1].tensor}.s16"), *c.args[2:]), c.op, c.macs)
             if c.kernel == "fc_s8" and c.args[1].tensor in wide else c for c in sched.calls]
    return replace(sched, graph=replace(sched.graph, tensors=tensors), calls=calls,
                   params={**sched.params, "wide_fc_weights": sorted(wide)})
