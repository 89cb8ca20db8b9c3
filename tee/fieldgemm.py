"""The blinded accelerator's exact GEMM over digit planes, and which kernel for it this process may use.

A masked input reaches the accelerator as three digit planes (uint8 bytes d, zero point 128; see
fieldkernels.digits), so y~ = x~ w_q^T mod p is one GEMM of the centred digits d - 128 with the int8 weights
(|w_q| <= 127), then a recombination of the planes mod p (fieldkernels.recombine).

That GEMM must be exact, and the fast kernels are not exact everywhere: oneDNN's u8 x s8 GEMM on AVX2 or
AVX-512 without VNNI adds each pair of products in a saturating int16 (vpmaddubsw; 2 x 255 x 127 > 2^15 - 1),
so it is wrong for large bytes there and right with VNNI or AMX. Its float32 output is the sum over the raw
bytes (0..255), converted, less the zero point's share: exact while 255 x sum |w| stays within 2^24
(`digit_bound`; with the centred digits' bound of 128 instead it fails the self-test on an AMX Xeon). No kernel
is trusted on reputation: at first use a process runs the candidates in KERNELS order (fastest first, as
measured in tools/bench/tee.py) on adversarial planes against exact integer arithmetic (`self_test`, well
under a second) and keeps the first that passes. `float32` is exact by construction and comes last.
TINYSHIELD_FIELD_GEMM=<name> forces a kernel; one that fails the self-test here is refused, never used. The
enclave's Freivalds check still guards every answer, whatever kernel produced it.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from base.errors import TinyshieldError
from tee import fieldkernels
from tee.fieldmath import MAX_K_INT8, planes_matmul_mod

ENV = "TINYSHIELD_FIELD_GEMM"
MAX_W = 127           # |w_q|; -128 is never produced (blinded.quantize_weights) and would break onednn-u8-halves
F32_EXACT = 2 ** 24   # float32 holds every integer up to this
MAX_DIGIT = 128       # |digit - zero point| for the uint8 digits with zero point 128
MAX_BYTE = 255        # the largest raw digit byte
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def exact_parts(w: np.ndarray, digit: int = MAX_DIGIT) -> list[slice]:
    """Consecutive input ranges of w (out, in) over which a digit GEMM's float32 sums are exact whatever the
    digits: digit * sum_j |w[o, j]| <= 2^24 for every output o, `digit` the largest factor a kernel sums (its
    `digit_bound`). A real layer's weights are far from all +-127 (MiniLM's widest rows reach 37% of the bound
    over 1536 inputs at 128, 74% at 255), so this is one range for every MiniLM and ViT layer; the worst case (all
    +-127) allows 1032 inputs per range at 128, 518 at 255."""
    acc = np.zeros(w.shape[0], np.int64)
    parts, start = [], 0
    for j, col in enumerate(np.abs(w.astype(np.int64)).T):
        if digit * int((acc + col).max(initial=0)) > F32_EXACT:
            parts.append(slice(start, j))
            start, acc = j, np.zeros_like(acc)
        acc += col
    return parts + [slice(start, w.shape[1])]


# ---- kernels: each takes one input range's weights w (int8 (m, k)) and maps planes d (uint8 (rows, k)) to the
# exact integers (d - 128) w^T, as float32 (`f32_sums`: exact only within an `exact_parts` range for the kernel's
# `digit_bound`) or int32 ----
class OnednnU8:
    """oneDNN's quantised linear with the weights packed once: uint8 bytes with zero point 128 (VNNI or AMX where
    the CPU has them), float32 output -- of the raw bytes' sums, so its ranges are bounded by 255, not 128."""
    name, f32_sums, digit_bound = "onednn-u8", True, MAX_BYTE
    available = _ONEDNN

    def __init__(self, w: torch.Tensor):
        self.packed = torch.ops.onednn.qlinear_prepack(w, None)
        self.one, self.zero = torch.ones(w.shape[0]), torch.zeros(w.shape[0], dtype=torch.int64)

    def __call__(self, d: np.ndarray) -> np.ndarray:
        return torch.ops.onednn.qlinear_pointwise(torch.from_numpy(d), 1.0, 128, self.packed, self.one, self.zero,
                                                  None, 1.0, 0, torch.float32, "none", [], "").numpy()


class IntMM:
    """torch._int_mm over signed digits (d XOR 0x80 read as int8): int32 sums, so no split along k; it repacks the
    weights on every call. On x86 it is oneDNN's int8 GEMM too, with the same AVX2 saturation."""
    name, f32_sums, digit_bound = "int-mm", False, MAX_DIGIT
    available = hasattr(torch, "_int_mm")

    def __init__(self, w: torch.Tensor):
        self.wt = w.T.contiguous()

    def __call__(self, d: np.ndarray) -> np.ndarray:
        return torch._int_mm(torch.from_numpy((d ^ np.uint8(0x80)).view(np.int8)), self.wt).numpy()


class OnednnU8Halves(OnednnU8):
    """onednn-u8 with w = a + b, a = floor(w / 2): |a|, |b| <= 64 and both have w's sign, so a pair of products
    stays within 2 x 255 x 64 < 2^15 (no int16 saturates without VNNI) and each half's sums within w's float32
    bound. Both halves are packed as one GEMM of 2m outputs: twice the multiplications of onednn-u8."""
    name = "onednn-u8-halves"

    def __init__(self, w: torch.Tensor):
        a = torch.div(w, 2, rounding_mode="floor")
        super().__init__(torch.cat([a, w - a]))
        self.m = w.shape[0]

    def __call__(self, d: np.ndarray) -> np.ndarray:
        y = super().__call__(d)
        return y[:, :self.m] + y[:, self.m:]   # two exact integers whose sum is below 2^24: exact


class Float32:
    """torch.mm in float32 over the centred digits. Operands are integers of at most 8 bits and, within an
    `exact_parts` range, every partial sum in any order is an integer below 2^24: exact on every CPU and for every
    summation order or blocking a BLAS picks (even bf16 or TF32 operand rounding would keep 8-bit integers)."""
    name, f32_sums, digit_bound = "float32", True, MAX_DIGIT
    available = True

    def __init__(self, w: torch.Tensor):
        self.wt = w.T.to(torch.float32).contiguous()

    def __call__(self, d: np.ndarray) -> np.ndarray:
        return (torch.from_numpy(np.subtract(d, np.float32(128), dtype=np.float32)) @ self.wt).numpy()


KERNELS = {k.name: k for k in (OnednnU8, IntMM, OnednnU8Halves, Float32)}   # the order of preference


class FieldGemm:
    """The accelerator's exact y~ = x~ w_q^T mod p for one layer, wt = w_q^T (k, m) with |w_q| <= 127, on this
    process's kernel (`chosen`). `kernel` picks one of KERNELS without its self-test: for tests that show what a
    wrong kernel does (the enclave's check refuses its answers)."""

    def __init__(self, wt: torch.Tensor, kernel: type | None = None):
        self.kernel = kernel or chosen().kernel
        self.k, self.m = wt.shape
        w = wt.to(torch.int8).T.contiguous()                    # (m, k), as oneDNN wants it
        if int(w.min()) < -MAX_W or self.k > MAX_K_INT8:
            raise TinyshieldError(f"a blinded layer's weights must lie in -{MAX_W}..{MAX_W} with at most {MAX_K_INT8} "
                                  "inputs; protect the model again")
        ranges = exact_parts(w.numpy(), self.kernel.digit_bound) if self.kernel.f32_sums else [slice(0, self.k)]
        self.parts = [(cols, self.kernel(w[:, cols].contiguous())) for cols in ranges]

    def __call__(self, x_tilde: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """From field elements (uint32 (rows, k))."""
        return self.planes(fieldkernels.digits(x_tilde, unsigned=True), out)

    def planes(self, d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """From digit planes (uint8 (3 rows, k), zero point 128) -> uint32 (rows, m)."""
        for i, (cols, run) in enumerate(self.parts):
            part = d if len(self.parts) == 1 else np.ascontiguousarray(d[:, cols])
            out = fieldkernels.recombine(run(part), out, accumulate=i > 0)
        return out


# ---- the self-test and the choice -----------------------------------------------------------------------
def _cases(seed: int = 0):
    """(planes, wt) pairs at the edges: bytes all 255, all 0, alternating, 128 and random (valid field elements
    or not -- the GEMM must be exact on any bytes); weights all +127, all -127, alternating signs, random; k at
    the layer limits (1536: MiniLM's widest, split 1032 + 504 for float32 sums at all +-127; 1032; 384) and tiny;
    1 to 128 rows (oneDNN picks other code for few rows)."""
    rng = np.random.default_rng(seed)
    for k, rows in ((4, 1), (4, 7), (384, 128), (1032, 2), (1536, 64), (1536, 1)):
        alt = np.arange(k) % 2 == 0
        d = np.concatenate([np.full((1, k), 255), np.zeros((1, k)), np.where(alt, 255, 0)[None],
                            np.where(alt, 0, 255)[None], np.full((1, k), 128), rng.integers(0, 256, (3 * rows, k))])
        d = np.tile(d, (-(-3 * rows // len(d)), 1))[:3 * rows].astype(np.uint8)
        w = np.stack([np.full(k, MAX_W), np.full(k, -MAX_W), np.where(alt, MAX_W, -MAX_W), np.where(alt, -MAX_W, MAX_W),
                      *rng.integers(-MAX_W, MAX_W + 1, (4, k)), *rng.integers(-3, 4, (2, k))], 1)
        yield d, w.astype(np.int8)


def self_test(kernel: type) -> str | None:
    """None when `kernel` gives exactly (planes' centred digits @ wt) mod p on every adversarial case, else the
    first difference found."""
    for d, wt in _cases():
        got = FieldGemm(torch.from_numpy(wt), kernel).planes(d).astype(np.int64)
        want = planes_matmul_mod(d, wt)
        if not np.array_equal(got, want):
            i, j = np.argwhere(got != want)[0]
            return (f"k={wt.shape[0]}, rows={d.shape[0] // 3}: entry ({i}, {j}) is {got[i, j]} where exact arithmetic "
                    f"gives {want[i, j]}")
    return None


@dataclass(frozen=True)
class Choice:
    kernel: type
    rejected: dict[str, str] = field(default_factory=dict)   # faster kernel's name -> why it is not used
    seconds: float = 0.0                                      # the self-tests
    forced: bool = False                                      # by TINYSHIELD_FIELD_GEMM

    @property
    def name(self) -> str:
        return self.kernel.name

    def note(self) -> str:
        """Why the faster kernels were passed over, e.g. 'onednn-u8 failed the self-test (k=4, rows=1: ...)'."""
        if self.forced:
            return f"forced by {ENV}, passed the self-test"
        return "; ".join(f"{n} {why}" for n, why in self.rejected.items())


@functools.cache
def chosen() -> Choice:
    """The fastest kernel that passes the self-test in this process (TINYSHIELD_FIELD_GEMM forces one)."""
    t = time.perf_counter()
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in KERNELS:
            raise TinyshieldError(f"{ENV}={forced!r} names no field GEMM kernel; use one of {', '.join(KERNELS)} "
                                  f"or unset {ENV}")
        if not KERNELS[forced].available:
            raise TinyshieldError(f"{ENV}={forced}: this torch build has no such kernel; unset {ENV}")
        why = self_test(KERNELS[forced])
        if why:
            raise TinyshieldError(f"{ENV}={forced}: the kernel is not exact on this CPU ({why}); unset {ENV} to use "
                                  "the fastest kernel that is")
        return Choice(KERNELS[forced], {}, time.perf_counter() - t, forced=True)
    rejected = {}
    for name, kernel in KERNELS.items():
        if not kernel.available:
            rejected[name] = "is not in this torch build"
            continue
        why = self_test(kernel)
        if why is None:
            return Choice(kernel, rejected, time.perf_counter() - t)
        rejected[name] = f"failed the self-test ({why})"
    # float32 is exact by construction; failing means a broken float GEMM, and nothing here can be trusted
    raise TinyshieldError("no exact field GEMM on this machine: " + Choice(Float32, rejected).note())
