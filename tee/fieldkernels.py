"""The blinded mode's C field kernels (tee/csrc/field.c), built for this host on first use and called with ctypes.

Each kernel does in one pass what its numpy reference (tee/fieldmath.py, tee/blinded.py) does in several;
tests check that both give identical bits. Arguments are checked here, so a wrong shape or dtype is an
error, never a read out of bounds.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
from pathlib import Path

import numpy as np

from base import cbuild
from base.errors import TinyshieldError
from tee.fieldmath import MAX_DOT, P

SOURCE = Path(__file__).resolve().parent / "csrc" / "field.c"
# -march=native: the library is built on the machine that runs it; no fused multiply-add, so the float
# dequantisation rounds exactly like numpy's separate multiply and add.
FLAGS = ["-std=c99", "-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-math-errno",
         "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror"]


def _cpu() -> str:
    """The host CPU's feature flags, part of the cache key because of -march=native."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def lib() -> ctypes.CDLL:
    key = hashlib.sha256(_cpu().encode()).hexdigest()[:12]
    path = cbuild.build_shared([SOURCE], FLAGS + [f"-DTSH_P={P}", f"-DTSH_CPU_KEY={key}"], "libtsh_field")
    dll = ctypes.CDLL(str(path))
    cbuild.bind(dll, cbuild.c_prototypes(SOURCE.read_text()))     # argtypes as field.c declares them
    return dll


def _terms(n: int) -> int:
    if n > MAX_DOT:
        raise TinyshieldError(f"a blinded layer has at most {MAX_DOT} inputs and outputs, this one {n}")
    return n


def _arr(a: np.ndarray, dtype, shape: tuple, what: str) -> int:
    if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
        raise TinyshieldError(f"{what}: expected a contiguous {np.dtype(dtype).name} array of shape {shape}, "
                              f"got {a.dtype} {a.shape}")
    return a.ctypes.data


def blind(x: np.ndarray, fx: int, r: np.ndarray, v: np.ndarray, out: np.ndarray) -> tuple[bool, np.ndarray]:
    """x~ = round(x 2^fx) + r mod p written to `out` as its digit planes (uint8 (3 rows, k), as `digits(x~,
    unsigned=True)`), and the Freivalds right-hand side x~ v mod p per row.
    Returns (in range, rhs); out of range means an activation left the fixed-point field."""
    rows, k = x.shape
    rhs = np.empty(rows, np.uint64)
    bad = lib().tsh_blind(_arr(x, np.float32, (rows, k), "x"), rows, _terms(k), float(2.0 ** fx),
                          _arr(r, np.uint32, (rows, k), "mask"), _arr(v, np.uint32, (k,), "v"),
                          _arr(out, np.uint8, (3 * rows, k), "out"), rhs.ctypes.data)
    return bad == 0, rhs


def unblind(y: np.ndarray, u: np.ndarray, s: np.ndarray, scale: np.ndarray, bias: np.ndarray,
            out: np.ndarray) -> tuple[bool, np.ndarray]:
    """out = bias + centre(y~ - u) * scale, and the Freivalds left-hand side y~ s mod p per row; each entry of y~
    (untrusted memory) is read once. Returns (every entry a field element, lhs)."""
    rows, m = u.shape
    lhs = np.empty(rows, np.uint64)
    bad = lib().tsh_unblind(_arr(y, np.uint32, (rows, m), "answer"), _arr(u, np.uint32, (rows, m), "u"),
                            _arr(s, np.uint32, (m,), "s"), _arr(scale, np.float32, (m,), "scale"),
                            _arr(bias, np.float32, (m,), "bias"), rows, _terms(m),
                            _arr(out, np.float32, (rows, m), "out"), lhs.ctypes.data)
    return bad == 0, lhs


def digits(x: np.ndarray, out: np.ndarray | None = None, unsigned: bool = False) -> np.ndarray:
    """Field elements (rows, k) -> (3 rows, k): the digit planes d0, d1, d2 stacked by rows, as int8 (centre(x) =
    d0 + 256 d1 + 65536 d2), or `unsigned` as uint8 bytes b_i = d_i + 128 (zero point 128)."""
    rows, k = x.shape
    dtype = np.uint8 if unsigned else np.int8
    out = np.empty((3 * rows, k), dtype) if out is None else out
    lib().tsh_digits(_arr(x, np.uint32, (rows, k), "x"), rows * k, _arr(out, dtype, (3 * rows, k), "out"),
                     0 if unsigned else 0x80)
    return out


def recombine(y: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """(3 rows, m) digit products, int32 or float32 holding exact integers -> (y0 + 256 y1 + 65536 y2) mod p as
    uint32 (rows, m); `accumulate` (float32 only) adds to `out` mod p."""
    rows, m = y.shape[0] // 3, y.shape[1]
    out = np.empty((rows, m), np.uint32) if out is None else out
    o = _arr(out, np.uint32, (rows, m), "out")
    if y.dtype == np.float32:
        lib().tsh_recombine_f32(_arr(y, np.float32, (3 * rows, m), "digit products"), rows * m, o, int(accumulate))
    elif accumulate:
        raise TinyshieldError("recombine: accumulate needs float32 digit products")
    else:
        lib().tsh_recombine(_arr(y, np.int32, (3 * rows, m), "digit products"), rows * m, o)
    return out


def prefetch(a: np.ndarray) -> None:
    """Start bringing a contiguous array into the cache and return at once."""
    if not a.flags.c_contiguous:
        raise TinyshieldError("prefetch: the array must be contiguous")
    lib().tsh_prefetch(a.ctypes.data, a.nbytes)
