"""The numpy reference executor: runs a `Schedule` call by call, exactly as the generated C does.

With an `ArenaPlan` every buffer lives at its planned offset inside ONE arena (as on the device),
so a wrong plan corrupts results here too; without one each buffer gets its own memory.
"""
from __future__ import annotations

import numpy as np

from base.errors import TinyshieldError
from mcu.graph import DTYPES, Const, Graph, Ref, Schedule
from mcu.kernels import KERNELS, PTYPES


def _resolve(arg, ptype: str, mem: dict[str, np.ndarray], graph: Graph):
    if ptype == "int":
        if not isinstance(arg, (int, np.integer)):
            raise TinyshieldError(f"expected an integer argument, got {arg!r}")
        return int(arg)
    dt = np.dtype(PTYPES[ptype])
    if isinstance(arg, Ref):
        raw = mem[arg.buffer][arg.offset:]
    elif isinstance(arg, Const):
        t = graph.tensors[arg.tensor]
        raw = t.data.reshape(-1).view(np.uint8)[arg.offset:]
        if np.dtype(DTYPES[t.dtype]) != dt:
            raise TinyshieldError(f"constant {arg.tensor} is {t.dtype}, the kernel expects {dt.name}")
    else:
        raise TinyshieldError(f"expected a Ref or Const for a {ptype} parameter, got {arg!r}")
    n = raw.size // dt.itemsize
    return raw[:n * dt.itemsize].view(dt)


def _memory(schedule: Schedule, plan) -> dict[str, np.ndarray]:
    if plan is None:
        return {name: np.zeros(b.nbytes, dtype=np.uint8) for name, b in schedule.buffers.items()}
    arena = np.zeros(plan.arena_bytes, dtype=np.uint8)
    return {name: arena[plan.offsets[name]:plan.offsets[name] + b.nbytes] for name, b in schedule.buffers.items()}


def run(schedule: Schedule, inputs: dict[str, np.ndarray], plan=None, kernels=None,
        after_call=None) -> dict[str, np.ndarray]:
    """Execute; `inputs` maps graph input names to arrays; returns the graph outputs (typed, shaped).
    `kernels` maps kernel names to implementations (default: the numpy KERNELS; e.g. the C kernels
    of `mcu.hostlib.HostKernels`), called with the same resolved arguments. `after_call(i, mem)` sees
    the buffers (name -> uint8 view, in the arena when a plan is given) after call i."""
    g = schedule.graph
    mem = _memory(schedule, plan)
    for name in g.inputs:
        if name not in inputs:
            raise TinyshieldError(f"missing input {name!r} for graph {g.name}")
        t = g.tensors[name]
        x = np.asarray(inputs[name])
        if x.size != int(np.prod(t.shape)):
            raise TinyshieldError(f"input {name!r} has {x.size} elements, the graph expects shape {t.shape}")
        mem[name][:t.nbytes] = np.ascontiguousarray(x.astype(DTYPES[t.dtype])).view(np.uint8).ravel()
    for i, call in enumerate(schedule.calls):
        k = KERNELS.get(call.kernel)
        if k is None:
            raise TinyshieldError(f"kernel {call.kernel!r} (op {call.op}) is not registered in mcu.kernels")
        if len(call.args) != len(k.params):
            raise TinyshieldError(f"call of {call.kernel} (op {call.op}) has {len(call.args)} arguments, "
                                  f"the kernel takes {len(k.params)}")
        impl = k if kernels is None else kernels[call.kernel]
        impl(*(_resolve(a, pt, mem, g) for a, (_, pt) in zip(call.args, k.params)))
        if after_call is not None:
            after_call(i, mem)
    out = {}
    for name in g.outputs:
        t = g.tensors[name]
        out[name] = mem[name][:t.nbytes].view(DTYPES[t.dtype]).reshape(t.shape).copy()
    return out


def reference(graph: Graph, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The int8 reference result of a graph (layerwise schedule, separate buffers)."""
    from mcu.schedules import layerwise  # schedules builds on this module's kernels: import late

    return run(layerwise(graph), inputs)
