"""The enclave's side of the accelerator connection: requests in flight, answers checked.

`submit` sends a linear layer's (already transformed or masked) input and returns at once; `collect` waits
for that request's answer. Answers come back in request order (the accelerator serves its pipe first in,
first out), so up to `dma.SLOTS` requests can be in flight -- the enclave works on one part of the rows while
the accelerator computes another (tee.program.pipelined). With shared buffers each request in flight owns
one slot of each buffer; without them the data travels over the pipe.

Every answer's sequence number, shape and dtype is checked. Timing: `blocked` is the time the enclave sat
waiting, `accel` the accelerator's compute, `transfer` the messages' time on the way (request sent -> read
by the accelerator, not counting time it was still busy with earlier requests; answer sent -> read here, not
counting time the enclave was still busy with other work). The accelerator's timestamps are its own claims:
they feed the timing report only, never a decision.
"""
from __future__ import annotations

import select
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from base.errors import TinyshieldError
from tee import dma
from tee.messages import Message, code, recv, send


POLL_S = 0.002   # with overlap: how long a side polls for the other's next message before it sleeps


def spinner(conn):
    """`spin(deadline)`: poll `conn` without sleeping until data is there (True) or `deadline` passes. Inside an
    inference the other side's next message is usually microseconds to a millisecond away, and sleeping and
    being woken is slow on a virtual machine -- but polling keeps a core busy, which pays only where the two
    sides really run on separate cores (tools/bench/tee.py measures both ways)."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)

    def spin(deadline: float) -> bool:
        """True when data is there."""
        while not p.poll(0):
            if time.perf_counter() >= deadline:
                return False
        return True
    return spin


@dataclass
class Request:
    seq: int
    layer: str
    rows: int          # of the answer
    dtype: np.dtype    # of the answer
    slot: int
    sent: float


class AcceleratorLink:
    def __init__(self, conn, out_dims: dict[str, int], buffers=None, poll_s: float = 0.0):
        self.conn, self.out_dims, self.seq = conn, out_dims, 0
        # views of the (outbound, inbound) shared buffers, or None to send data over the pipe
        self.slots = [dma.Slots(b) for b in buffers] if buffers else None
        self.poll_s = poll_s
        self.spin = spinner(conn) if conn is not None and poll_s else None
        self.pending: deque[Request] = deque()
        self.staged: tuple[int, np.ndarray] | None = None   # (slot, view) handed out by `outbound`
        self.reset()

    def reset(self) -> None:
        """Start a new inference: answers still owed by an aborted one are read and dropped."""
        while self.pending:
            self.pending.popleft()
            recv(self.conn)
        self.staged = None
        self.blocked = self.accel = self.accel_cpu = self.transfer = 0.0
        self.calls = 0
        self.accel_free = 0.0      # when the accelerator sent its last answer (its clock = ours: CLOCK_MONOTONIC)

    def _free_slot(self) -> int:
        used = {r.slot for r in self.pending} | ({self.staged[0]} if self.staged else set())
        for s in range(dma.SLOTS):
            if s not in used:
                return s
        raise TinyshieldError(f"more than {dma.SLOTS} accelerator requests in flight")

    def outbound(self, dtype, shape: tuple[int, int]) -> np.ndarray:
        """Where to build the next request: a slot of the outbound shared buffer (no copy later), or a new array."""
        if self.slots is None:
            return np.empty(shape, dtype)
        slot = self._free_slot()
        view = self.slots[0](slot, code(dtype), *shape)
        self.staged = (slot, view)
        return view

    def submit(self, layer: str, x: np.ndarray, answer: tuple[int, np.dtype] | None = None) -> int:
        """Send x for `layer`; the answer has `answer` = (rows, dtype), by default x's (blinded inputs are
        three uint8 digit planes per row, answers one uint32 field element per output)."""
        if self.conn is None:
            raise TinyshieldError("this enclave has no accelerator connection")
        self.seq += 1
        fields = {"layer": layer, "seq": self.seq}
        if self.slots is None:
            slot = -1
            send(self.conn, Message("matmul", fields, [x]))
        else:
            if self.staged is not None and self.staged[1] is x:
                slot = self.staged[0]
            else:
                slot = self._free_slot()
                self.slots[0](slot, code(x.dtype), *x.shape)[...] = x
            self.staged = None
            send(self.conn, Message("matmul_dma", fields | {"dtype": code(x.dtype), "rows": x.shape[0],
                                                             "cols": x.shape[1], "slot": slot}))
        rows, dtype = answer or (x.shape[0], x.dtype)
        self.pending.append(Request(self.seq, layer, rows, np.dtype(dtype), slot, time.perf_counter()))
        return self.seq

    def idle(self) -> None:
        """The inference is over: a polling accelerator goes back to sleep and frees its core at once."""
        if self.conn is not None and self.poll_s:
            send(self.conn, Message("idle"))

    def collect(self, seq: int, copy: bool = True) -> np.ndarray:
        """The answer to request `seq` (requests are collected in the order they were submitted). With copy=False
        it may be a view of untrusted shared memory: the caller must read each entry once (blinded.unblind does)
        or copy it before checking it."""
        if not self.pending or self.pending[0].seq != seq:
            raise TinyshieldError(f"request {seq} is not the oldest in flight: collect answers in request order")
        req = self.pending.popleft()
        t = time.perf_counter()
        if self.spin:
            self.spin(t + self.poll_s)
        reply = recv(self.conn, "result" if self.slots is None else "result_dma")
        got = time.perf_counter()
        f = reply.fields
        if f["seq"] != seq:
            raise TinyshieldError(f"accelerator answered request {f['seq']}, expected {seq}")
        if self.slots is None:
            y = reply.arrays[0]
        else:
            y = self.slots[1](req.slot, f["dtype"], f["rows"], f["cols"])
            y = y.copy() if copy else y
        if y.shape != (req.rows, self.out_dims[req.layer]) or y.dtype != req.dtype:
            raise TinyshieldError(f"accelerator returned a malformed result for {req.layer}: {y.dtype} {y.shape}")
        self.calls += 1
        self.blocked += got - t
        self.accel += max(0.0, f["seconds"])
        self.accel_cpu += max(0.0, f["cpu"])
        self.transfer += max(0.0, f["t_recv"] - max(req.sent, self.accel_free)) + max(0.0, got - max(f["t_send"], t))
        self.accel_free = f["t_send"]
        return y
