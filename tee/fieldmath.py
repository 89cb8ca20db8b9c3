"""Arithmetic in the prime field of the blinded mode, p = 2^23 + 2^21 + 7 (Slalom's choice: every
field element fits a float32 mantissa exactly), a cryptographic source of uniform field elements, and the
numpy reference of the accelerator's exact kernel for x~ w^T mod p (|w| <= 127): a field element is three
signed base-256 digits, each an int8 (sent to the accelerator as uint8 bytes with zero point 128); int8 x int8
products accumulate exactly in int32 (|sum| <= k * 128 * 127 < 2^31 for k < 132,000), so it is one int8 GEMM
over the stacked digits plus a recombination mod p (tee/fieldgemm.py: which GEMM kernel is exact on this CPU). The fast one-pass versions are C (tee/fieldkernels.py);
tests hold them to this reference.
"""
from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

P = 2 ** 23 + 2 ** 21 + 7
HALF = P // 2
FLOAT64_EXACT = 2 ** 53   # matmul_mod (offline) is exact below this
MAX_K_INT8 = (2 ** 31 - 1) // (128 * 127)
MAX_DOT = 2 ** 17   # Freivalds' row sums: this many products of field elements (< p^2 each) fit a uint64


def uniform(shape, key: bytes | None = None) -> np.ndarray:
    """Uniform elements of Z_p (int64) from an AES-CTR keystream: 64-bit words mod p, bias <= p/2^64."""
    n = int(np.prod(shape))
    key = os.urandom(32) if key is None else key
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64)
    return (words % np.uint64(P)).astype(np.int64).reshape(shape)


def center(a):
    """Field elements in [0, p) -> signed representatives in (-p/2, p/2]."""
    return np.where(a > HALF, a - P, a)


OFFSET = 128 * (1 + 256 + 65536)   # centre(x) + OFFSET lies in [0, 2^24): three bytes


def digits(x: np.ndarray) -> np.ndarray:
    """Field elements (uint32 in [0, p), shape (rows, k)) -> int8 (3 * rows, k) with x = d0 + 256 d1 + 65536 d2.

    The bytes b_i of centre(x) + OFFSET are the digits shifted by 128, so d_i = b_i - 128 = b_i XOR 0x80 read
    as int8: three cheap passes, no division."""
    rows, k = x.shape
    x = x.astype(np.uint32, copy=False)
    z = np.where(x > HALF, x - np.uint32(P - OFFSET), x + np.uint32(OFFSET)).view(np.uint8).reshape(rows, k, 4)
    out = np.empty((3, rows, k), np.uint8)
    for i in range(3):
        out[i] = z[:, :, i]
    out ^= np.uint8(0x80)
    return out.view(np.int8).reshape(3 * rows, k)


def from_digits(planes: np.ndarray) -> np.ndarray:
    """Digit planes as the accelerator receives them (uint8 bytes b_i = d_i + 128, (3 rows, k)) -> the field
    elements (uint32 (rows, k)): the inverse of `digits`."""
    d = planes.reshape(3, -1, planes.shape[1]).astype(np.int64) - 128
    return np.mod(d[0] + 256 * d[1] + 65536 * d[2], P).astype(np.uint32)


def planes_matmul_mod(planes: np.ndarray, wt) -> np.ndarray:
    """(centred digits @ wt) recombined mod p, in int64 (no float, no int8 GEMM: the reference the accelerator's
    kernels are held to): planes uint8 (3 rows, k) with zero point 128, any bytes; wt integers (k, m), |wt| <= 128.
    Returns int64 in [0, p) (rows, m)."""
    rows = planes.shape[0] // 3
    y = (planes.astype(np.int64) - 128) @ np.asarray(wt, dtype=np.int64)
    return np.mod(y[:rows] + (y[rows:2 * rows] << 8) + (y[2 * rows:] << 16), P)


def int8_matmul_mod(x_tilde: np.ndarray, wt) -> np.ndarray:
    """(x~ @ wt) mod p, exactly: x~ uint32 in [0, p) (rows, k), wt int8 (k, m). Returns uint32 in [0, p)."""
    return planes_matmul_mod(digits(x_tilde).view(np.uint8) ^ np.uint8(0x80), wt).astype(np.uint32)


def matmul_mod(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """(x @ wt) mod p in float64 for centred x and small integer wt (offline: pads); exact, see check_exact_bound."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(wt, dtype=np.float64)
    return np.remainder(y.astype(np.int64), P)


def check_exact_bound(k: int, max_abs_w: int, m: int = 0) -> None:
    """The blinded kernels are exact for a layer with k inputs, m outputs and weights up to max_abs_w."""
    if k * HALF * max_abs_w >= FLOAT64_EXACT:
        raise ValueError(f"float64 matmul would not be exact: {k} x {HALF} x {max_abs_w} >= 2^53")
    if k > MAX_K_INT8:
        raise ValueError(f"int8 digit matmul would overflow int32 for {k} inputs (max {MAX_K_INT8})")
    if max(k, m) > MAX_DOT:
        raise ValueError(f"Freivalds sums would overflow 64 bits for {max(k, m)} terms (max {MAX_DOT})")
