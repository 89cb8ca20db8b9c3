"""Shared-memory buffers between the enclave and the accelerator, standing in for an accelerator's DMA
windows: the enclave writes (already masked) data into the outbound buffer and reads results from the
inbound one; only a small typed header travels over the pipe. The buffers are untrusted memory, so the
enclave copies a result out before checking it (the accelerator cannot change it after the check).
"""
from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np

from edge.errors import TinyshieldError
from tee.messages import DTYPES


def create(size: int) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(create=True, size=max(size, 1))


def attach(name: str) -> shared_memory.SharedMemory:
    # Spawned children share the creator's resource tracker, whose registry is a set: attaching registers
    # the same name again, and the creator's unlink() clears it once.
    return shared_memory.SharedMemory(name=name)


def view(shm: shared_memory.SharedMemory, dtype_code: str, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) array over the buffer; the header's claims are checked against the buffer size."""
    if dtype_code not in DTYPES or rows < 0 or cols < 0:
        raise TinyshieldError(f"bad buffer header: dtype {dtype_code!r}, shape ({rows}, {cols})")
    n = rows * cols * np.dtype(DTYPES[dtype_code]).itemsize
    if n > shm.size:
        raise TinyshieldError(f"buffer header claims {n} bytes, the shared buffer holds {shm.size}")
    return np.ndarray((rows, cols), dtype=DTYPES[dtype_code], buffer=shm.buf[:n])


def code(dtype) -> str:
    for c, t in DTYPES.items():
        if np.dtype(t) == np.dtype(dtype):
            return c
    raise TinyshieldError(f"dtype {dtype} cannot be sent")
