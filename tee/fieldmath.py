"""Arithmetic in the prime field of the blinded mode, p = 2^23 + 2^21 + 7 (Slalom's choice: every
field element fits a float32 mantissa exactly), and a cryptographic source of uniform field elements."""
from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

P = 2 ** 23 + 2 ** 21 + 7
HALF = P // 2
FLOAT64_EXACT = 2 ** 53


def uniform(shape, key: bytes | None = None) -> np.ndarray:
    """Uniform elements of Z_p (int64) from an AES-CTR keystream: 64-bit words mod p, bias <= p/2^64."""
    n = int(np.prod(shape))
    key = os.urandom(32) if key is None else key
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64)
    return (words % np.uint64(P)).astype(np.int64).reshape(shape)


def center(a: np.ndarray) -> np.ndarray:
    """Field elements (int64 in [0, p)) -> signed representatives in (-p/2, p/2]."""
    return np.where(a > HALF, a - P, a)


def matmul_mod(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """(x @ wt) mod p computed exactly in float64 (the accelerator's kernel, also used to precompute pads).

    Exact because x is centred (|x| <= p/2) and |wt| is small: check_exact_bound proves that every
    partial sum stays below 2^53, whatever order the BLAS adds in.
    """
    y = np.asarray(x, dtype=np.float64) @ np.asarray(wt, dtype=np.float64)
    return np.remainder(y.astype(np.int64), P)


def exact_bound(k: int, max_abs_w: int) -> int:
    """Largest possible |partial sum| of a k-term dot product of a centred field vector with |w| <= max_abs_w."""
    return k * HALF * max_abs_w


def check_exact_bound(k: int, max_abs_w: int) -> None:
    if exact_bound(k, max_abs_w) >= FLOAT64_EXACT:
        raise ValueError(f"float64 matmul would not be exact: {k} x {HALF} x {max_abs_w} >= 2^53")
