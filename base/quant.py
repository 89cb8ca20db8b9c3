"""Int8 fixed-point numerics: the one convention every int8 path of tinyshield follows.

The convention is TFLite's (gemmlowp's):

- activations: int8, per-tensor affine, real = scale * (q - zero_point), zero_point in [-128, 127];
- weights: int8, symmetric (zero_point 0), per output channel, values in [-127, 127];
- bias: int32 with scale s_in * s_w[c], zero point 0;
- requantisation of an int32 accumulator by a real factor M: M = m * 2^(shift - 31) with a 32-bit
  multiplier m in [2^30, 2^31), then
      x' = SaturatingRoundingDoublingHighMul(x << max(shift, 0), m)
      y  = RoundingDivideByPOT(x', max(-shift, 0))
  (round half away from zero in the high-mul, round half away from zero in the divide) — the
  "double rounding" reference of TFLite. One deliberate definition where TFLite has undefined
  behaviour: the left shift saturates to int32 instead of overflowing.
- quantisation of reals: q = clamp(round_half_away(x / scale) + zero_point).

Everything here is numpy, vectorised and exact: products are formed in int64, so the C kernels
(which do the same in int64/int32) agree bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from base.errors import TinyshieldError

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT8_MIN, INT8_MAX = -128, 127

_LIMITS = {np.int8: (-128, 127), np.uint8: (0, 255), np.int16: (-(1 << 15), (1 << 15) - 1),
           np.int32: (INT32_MIN, INT32_MAX)}


# ---------------------------------------------------------------- saturating casts and rounding

def saturate(x, dtype=np.int8) -> np.ndarray:
    """Clamp to the range of `dtype` and cast (never wraps)."""
    lo, hi = _LIMITS[np.dtype(dtype).type]
    return np.clip(np.asarray(x, dtype=np.int64), lo, hi).astype(dtype)


def round_half_away(x) -> np.ndarray:
    """Round to nearest, ties away from zero (C's `round`, TFLite's `TfLiteRound`), as int64."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _tdiv_pow2_31(x: np.ndarray) -> np.ndarray:
    """Integer division by 2^31 truncating toward zero (C semantics), int64 in and out."""
    q = np.abs(x) >> 31
    return np.where(x < 0, -q, q)


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values: (2*a*b + 2^31 rounding) >> 32.

    The only overflow case, a == b == INT32_MIN, saturates to INT32_MAX. Returns int64 holding int32 values.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b                                  # |ab| <= 2^62: exact in int64
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    r = _tdiv_pow2_31(ab + nudge)
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, r)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero (0 <= exponent <= 31)."""
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


# ---------------------------------------------------------------- quantised multipliers

def quantize_multiplier(real: float) -> tuple[int, int]:
    """real -> (m, shift) with real ~= m * 2^(shift - 31), m in [2^30, 2^31) (0 -> (0, 0)).

    Same as TFLite's QuantizeMultiplier. Shifts are clamped to [-31, 30]: a smaller factor becomes
    0, a larger one is refused (it cannot be represented by any sane layer)."""
    real = float(real)
    if not math.isfinite(real) or real < 0:
        raise TinyshieldError(f"cannot quantise multiplier {real!r}: it must be finite and >= 0 "
                              "(check the calibration ranges and scales)")
    if real == 0.0:
        return 0, 0
    mant, shift = math.frexp(real)              # real = mant * 2^shift, mant in [0.5, 1)
    m = int(round_half_away(mant * (1 << 31)))
    if m == (1 << 31):                          # rounding carried into the next power of two
        m //= 2
        shift += 1
    if shift < -31:                             # below 2^-32: rounds to zero anyway
        return 0, 0
    if shift > 30:
        raise TinyshieldError(f"multiplier {real:g} is too large to requantise (> 2^30): "
                              "the calibration ranges or scales are degenerate")
    return m, shift


def quantize_multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `quantize_multiplier`: arrays (int32 m, int32 shift)."""
    pairs = [quantize_multiplier(r) for r in np.ravel(np.asarray(reals, dtype=np.float64))]
    m = np.array([p[0] for p in pairs], dtype=np.int64).astype(np.int32)
    s = np.array([p[1] for p in pairs], dtype=np.int32)
    return m, s


def multiply_by_quantized_multiplier(x, m, shift) -> np.ndarray:
    """TFLite MultiplyByQuantizedMultiplier, exact, broadcasting over x, m and shift. Returns int64
    holding int32 values. The left shift saturates to int32 (TFLite leaves overflow undefined)."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    xs = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(xs, m), right)


def requantize(acc, m, shift, zero_point: int, dtype=np.int8) -> np.ndarray:
    """int32 accumulator -> `dtype` output: MBQM, + zero point, saturate."""
    return saturate(multiply_by_quantized_multiplier(acc, m, shift) + int(zero_point), dtype)


# ---------------------------------------------------------------- quantisation of tensors

@dataclass(frozen=True)
class ActQ:
    """Per-tensor int8 activation quantisation."""
    scale: float
    zero_point: int


def choose_activation_qparams(lo: float, hi: float, symmetric: bool = False) -> ActQ:
    """int8 scale/zero point covering [lo, hi] (widened to contain 0, so zero is exact).

    Asymmetric: the zero point is nudged to an integer in [-128, 127] as TFLite does. A degenerate
    range (lo == hi == 0) gets scale 1/255 rather than a zero scale."""
    lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise TinyshieldError(f"calibration range [{lo}, {hi}] is not finite: the model produced inf/nan "
                              "on the calibration data")
    if symmetric:
        a = max(-lo, hi)
        scale = a / 127.0 if a > 0 else 1.0 / 255.0
        return ActQ(scale, 0)
    if hi - lo <= 0:
        return ActQ(1.0 / 255.0, 0)
    scale = (hi - lo) / 255.0
    zp = int(round_half_away(INT8_MIN - lo / scale))
    return ActQ(scale, int(np.clip(zp, INT8_MIN, INT8_MAX)))


def quantize(x, scale: float, zero_point: int, dtype=np.int8) -> np.ndarray:
    """Reals -> int8 (or `dtype`): round half away from zero, add zero point, saturate."""
    return saturate(round_half_away(np.asarray(x, dtype=np.float64) / scale) + int(zero_point), dtype)


def dequantize(q, scale, zero_point: int = 0) -> np.ndarray:
    return (np.asarray(q, dtype=np.float64) - zero_point) * np.asarray(scale, dtype=np.float64)


def quantize_weights_per_channel(w, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (`axis`): q in [-127, 127], returns (q int8, scales float64).

    An all-zero channel gets scale 1 (its codes are all 0), so requantisation stays finite."""
    w = np.asarray(w, dtype=np.float64)
    red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.max(np.abs(w), axis=red) if red else np.abs(w)
    scales = np.where(amax > 0, amax / 127.0, 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(round_half_away(w / scales.reshape(shape)), -127, 127).astype(np.int8)
    return q, scales


def quantize_weights_f32(w, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel (`axis`) for the edge and enclave weights (MoE experts, CLR factors,
    blinded layers): q in [-127, 127], returns (q int8, scales float32).

    Why not `quantize_weights_per_channel`: that one is TFLite's rule for the MCU lowering (float64,
    ties away from zero, scale 1 for an all-zero channel). This one computes in the input's precision
    (float32 for torch weights), rounds ties to even and floors the channel maximum at 1e-12, as the
    torch code these weights were first made with: the shipped 1 MB BERT's CLR factors and stored MoE
    experts must stay bit-identical, and the blinded C kernel multiplies by float32 scales anyway.
    The two agree on every code but exact ties."""
    w = np.asarray(w)
    red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.max(np.abs(w), axis=red, keepdims=True)
    scale = np.maximum(amax, 1e-12) / 127.0         # python scalars keep w's dtype (NEP 50)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1).astype(np.float32)


def quantize_bias(b, input_scale: float, weight_scales) -> np.ndarray:
    """float bias -> int32 with scale input_scale * weight_scale[c] (saturated)."""
    s = float(input_scale) * np.asarray(weight_scales, dtype=np.float64)
    return saturate(round_half_away(np.asarray(b, dtype=np.float64) / s), np.int32)


# ---------------------------------------------------------------- calibration

class RangeObserver:
    """Running [min, max] of an activation over calibration batches.

    `percentile` < 100 clips outliers: the range becomes the mean over batches of the per-batch
    percentiles (robust for GELU/attention tails); 100 is plain min/max."""

    def __init__(self, percentile: float = 100.0):
        self.percentile = percentile
        self.lo: list[float] = []
        self.hi: list[float] = []

    def update(self, x) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size == 0:
            return
        if self.percentile >= 100.0:
            self.lo.append(float(x.min()))
            self.hi.append(float(x.max()))
        else:
            self.lo.append(float(np.percentile(x, 100.0 - self.percentile)))
            self.hi.append(float(np.percentile(x, self.percentile)))

    def range(self) -> tuple[float, float]:
        if not self.lo:
            raise TinyshieldError("no calibration data reached this tensor: pass at least one calibration batch")
        if self.percentile >= 100.0:
            return min(self.lo), max(self.hi)
        return float(np.mean(self.lo)), float(np.mean(self.hi))

    def qparams(self, symmetric: bool = False) -> ActQ:
        return choose_activation_qparams(*self.range(), symmetric=symmetric)
