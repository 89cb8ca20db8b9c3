"""Shared-memory buffers between the enclave and the accelerator, standing in for an accelerator's DMA
windows: the enclave writes (already masked) data into the outbound buffer and reads results from the
inbound one; only a small typed header travels over the pipe. Each buffer has SLOTS equal slots, one per
request in flight. The buffers are untrusted memory, so the enclave copies a result out before checking
it, or reads each entry exactly once (the accelerator cannot change what was checked).
"""
from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np

from base.errors import TinyshieldError
from tee.messages import DTYPES


SLOTS = 2        # requests in flight at once: the encoder's row parts (tee.program.pipelined)
PAGE = 4096


def create(request_bytes: int) -> shared_memory.SharedMemory:
    """A buffer of SLOTS slots, each holding `request_bytes` (rounded up to whole pages)."""
    slot = max(PAGE, -(-request_bytes // PAGE) * PAGE)
    return shared_memory.SharedMemory(create=True, size=SLOTS * slot)


def slot_bytes(shm: shared_memory.SharedMemory) -> int:
    return shm.size // SLOTS // PAGE * PAGE


def attach(name: str) -> shared_memory.SharedMemory:
    # Spawned children share the creator's resource tracker, whose registry is a set: attaching registers
    # the same name again, and the creator's unlink() clears it once.
    return shared_memory.SharedMemory(name=name)


def view(shm: shared_memory.SharedMemory, dtype_code: str, rows: int, cols: int, offset: int = 0,
         limit: int | None = None) -> np.ndarray:
    """A (rows, cols) array at `offset` of the buffer; the header's claims are checked against the `limit`
    bytes available there (default: the rest of the buffer)."""
    if dtype_code not in DTYPES or rows < 0 or cols < 0 or not 0 <= offset <= shm.size:
        raise TinyshieldError(f"bad buffer header: dtype {dtype_code!r}, shape ({rows}, {cols}), offset {offset}")
    room = shm.size - offset if limit is None else min(limit, shm.size - offset)
    n = rows * cols * np.dtype(DTYPES[dtype_code]).itemsize
    if n > room:
        raise TinyshieldError(f"buffer header claims {n} bytes, the shared buffer holds {room} there")
    return np.ndarray((rows, cols), dtype=DTYPES[dtype_code], buffer=shm.buf[offset:offset + n])


class Slots:
    """(rows, cols) views of one buffer's slots, each checked once and then reused: an inference asks for the same
    few shapes over and over, and making a view costs more than the smaller layers' arithmetic."""

    def __init__(self, shm: shared_memory.SharedMemory):
        self.shm, self.size, self.cache = shm, slot_bytes(shm), {}

    def __call__(self, slot: int, dtype_code: str, rows: int, cols: int) -> np.ndarray:
        key = (slot, dtype_code, rows, cols)
        if key not in self.cache:
            if not 0 <= slot < SLOTS:
                raise TinyshieldError(f"bad buffer slot {slot} (0..{SLOTS - 1})")
            self.cache[key] = view(self.shm, dtype_code, rows, cols, offset=slot * self.size, limit=self.size)
        return self.cache[key]


