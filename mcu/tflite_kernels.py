"""TFLite Micro's int8 reference arithmetic, for models imported from .tflite (mcu.from_tflite).

The kernels here reproduce TFLite Micro's *reference* int8 kernels bit for bit (their numerics, not
their code): an imported model computes on the board exactly what TFLite Micro computes. Each is a
numpy reference registered in the `@kernel` table of mcu.kernels, with a C twin in
mcu/firmware/kernels/tsh_tflite.c.

- `binary_s8`: ADD, SUB, MUL, SQUARED_DIFFERENCE with TFLite's 4-d broadcasting (each operand read
  through its own element strides, 0 on a broadcast dimension). ADD/SUB: both inputs shifted left
  (20 bits) and brought to twice the larger input scale, summed, requantised; SQUARED_DIFFERENCE: the
  same with 7 bits, the difference squared; MUL: the product of the offset inputs requantised.
- `softmax_s8`: gemmlowp's fixed-point softmax (int8 in, int8 out with scale 1/256, zero point -128):
  exp of the input difference in Q5.26 on [-32, 0], sum in Q12.19, reciprocal by Newton-Raphson.
- `matmul_kn_s8`: BATCH_MATMUL of one batch whose right operand is (K, N) rows (a head of v read in place).
- `depthwise_s8`: DEPTHWISE_CONV_2D with any depth multiplier, strides, dilation and padding.
- `avg_pool_s8`: AVERAGE_POOL_2D (the window's taps inside the image, rounded half away from zero);
- `mean_s8` (and `mean_s16`): MEAN over the middle axis of (outer, n, inner): the int32 sum minus n x_zp, times
  the output multiplier divided by n with TFLite's shift adjustment (done when building the op).
- Pointwise int8 functions (LOGISTIC, TANH, RSQRT, requantising QUANTIZE) become the existing `lut_s8`:
  their 256-entry tables are computed here with TFLite Micro's integer arithmetic. GELU, which TFLite
  Micro does not have, is LiteRT's table: its float32 GELU of each dequantised int8 value, requantised.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
from functools import cache

import numpy as np

from base.quant import (INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier as mbqm, quantize_multiplier,
                        round_half_away,
                        rounding_divide_by_pot as rdbpot, saturate, saturating_rounding_doubling_high_mul as srdhm)
from mcu.kernels import _out, kernel, view2d

BINARY_OPS = {"ADD": 0, "SUB": 1, "MUL": 2, "SQUARED_DIFFERENCE": 3}
BINARY_PARAMS = ("a_zp", "b_zp", "y_zp", "left_shift", "a_mult", "a_shift", "b_mult", "b_shift", "y_mult", "y_shift",
                 "act_min", "act_max")
SOFTMAX_DIFF_BITS = 5           # the input difference in Q5.26
SOFTMAX_ACC_BITS = 12           # the sum of exps in Q12.19


# ---------------------------------------------------------------- elementwise with broadcasting

def broadcast_dims(shape, a_shape, b_shape) -> np.ndarray:
    """binary_s8's `dims`: 4 output sizes, then a's and b's element strides (0 where broadcast),
    shapes right-aligned to 4 dimensions as TFLite's 4-d broadcast does."""
    def strides(s):
        s = (1,) * (4 - len(s)) + tuple(int(v) for v in s)
        out, acc = [0] * 4, 1
        for i in range(3, -1, -1):
            out[i] = 0 if s[i] == 1 else acc
            acc *= s[i]
        return out
    y = (1,) * (4 - len(shape)) + tuple(int(v) for v in shape)
    return np.array(list(y) + strides(a_shape) + strides(b_shape), dtype=np.int32)


@kernel(a="const i8*", b="const i8*", y="i8*", dims="const i32*", p="const i32*", op="int")
def binary_s8(a, b, y, dims, p, op):
    """y = a (op) b over a 4-d output of sizes dims[0:4]; a and b are read at element strides
    dims[4:8] and dims[8:12]; p holds BINARY_PARAMS; op is a BINARY_OPS code."""
    n = [int(v) for v in dims[:4]]
    idx = np.indices(n).reshape(4, -1).astype(np.int64)
    av = a[(idx * dims[4:8, None].astype(np.int64)).sum(0)].astype(np.int64) - int(p[0]) if idx.size else np.zeros(0, np.int64)
    bv = b[(idx * dims[8:12, None].astype(np.int64)).sum(0)].astype(np.int64) - int(p[1]) if idx.size else np.zeros(0, np.int64)
    y_zp, ls, am, ash, bm, bsh, ym, ysh, lo, hi = (int(v) for v in p[2:12])
    if op == BINARY_OPS["MUL"]:
        raw = av * bv
    else:
        sa = mbqm(av << ls, am, ash)
        sb = mbqm(bv << ls, bm, bsh)
        raw = sa + sb if op == BINARY_OPS["ADD"] else sa - sb
        if op == BINARY_OPS["SQUARED_DIFFERENCE"]:
            raw = raw * raw
        raw = np.clip(raw, INT32_MIN, INT32_MAX)
    y[:av.size] = np.clip(mbqm(raw, ym, ysh) + y_zp, lo, hi)


def binary_params(op: str, a_scale: float, b_scale: float, y_scale: float, a_zp: int, b_zp: int, y_zp: int,
                  act_min: int = -128, act_max: int = 127) -> np.ndarray:
    """BINARY_PARAMS as TFLite Micro prepares them from the tensors' float32 scales (the same float32 /
    double steps: SUB does its divisions in float32, ADD and SQUARED_DIFFERENCE in double)."""
    f = np.float32
    a32, b32, y32 = f(a_scale), f(b_scale), f(y_scale)
    if op == "MUL":
        ls, (am, ash), (bm, bsh) = 0, (0, 0), (0, 0)
        ym, ysh = quantize_multiplier(float(a32) * float(b32) / float(y32))
    elif op == "SUB":
        ls = 20
        twice = f(2) * max(a32, b32)
        am, ash = quantize_multiplier(float(a32 / twice))
        bm, bsh = quantize_multiplier(float(b32 / twice))
        ym, ysh = quantize_multiplier(float(twice / (f(1 << ls) * y32)))
    else:
        ls = 20 if op == "ADD" else 7
        twice = 2.0 * float(max(a32, b32))
        am, ash = quantize_multiplier(float(a32) / twice)
        bm, bsh = quantize_multiplier(float(b32) / twice)
        if op == "ADD":
            ym, ysh = quantize_multiplier(twice / ((1 << ls) * float(y32)))
        else:
            ym, ysh = quantize_multiplier(twice * twice / float(f(1 << (2 * ls)) * y32))
    return np.array([a_zp, b_zp, y_zp, ls, am, ash, bm, bsh, ym, ysh, act_min, act_max], dtype=np.int32)


# ---------------------------------------------------------------- gemmlowp fixed point (int64 holding int32)

def _pot(x, e: int):
    """SaturatingRoundingMultiplyByPOT: x * 2^e, saturating for e > 0, rounding for e < 0."""
    x = np.asarray(x, dtype=np.int64)
    if e < 0:
        return rdbpot(x, -e)
    if e == 0:
        return x
    t = (1 << (31 - e)) - 1
    return np.where(x > t, INT32_MAX, np.where(x < -t, INT32_MIN, x << e))


def _exp_quarter(a):
    """exp(a) for a in [-1/4, 0), Q0.31 in and out (a Taylor series around -1/8)."""
    x = a + (1 << 28)
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    poly = _pot(srdhm(_pot(x4, -2) + x3, 715827883) + x2, -1)
    return 1895147668 + srdhm(1895147668, x + poly)


_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401),
               (4, 242))


def exp_on_negative_values(a, int_bits: int):
    """gemmlowp exp_on_negative_values: a <= 0 in Q(int_bits).(31 - int_bits) -> exp(a) in Q0.31."""
    a = np.asarray(a, dtype=np.int64)
    frac = 31 - int_bits
    quarter = 1 << (frac - 2)
    a_mod = (a & (quarter - 1)) - quarter
    r = _exp_quarter(_pot(a_mod, int_bits))
    rem = a_mod - a
    for e, m in _EXP_BARREL:
        if int_bits > e:
            r = np.where(rem & (1 << (frac + e)), srdhm(r, m), r)
    if int_bits > 5:
        r = np.where(a < -(1 << (frac + 5)), 0, r)
    return np.where(a == 0, INT32_MAX, r)


def _half_sum(a, b):
    s = np.asarray(a, dtype=np.int64) + b
    t = s + np.where(s >= 0, 1, -1)
    return np.where(t >= 0, t // 2, -((-t) // 2))


def one_over_one_plus_x(a):
    """gemmlowp one_over_one_plus_x_for_x_in_0_1: Q0.31 in and out (Newton-Raphson in Q2.29)."""
    h = _half_sum(a, INT32_MAX)
    x = 1515870810 + srdhm(h, -1010580540)
    for _ in range(3):
        e = (1 << 29) - srdhm(h, x)
        x = x + _pot(srdhm(x, e), 2)
    return _pot(x, 1)


def logistic_q4(a):
    """gemmlowp logistic of Q4.27 -> Q0.31."""
    a = np.asarray(a, dtype=np.int64)
    pos = one_over_one_plus_x(exp_on_negative_values(-np.abs(a), 4))
    return np.where(a == 0, 1 << 30, np.where(a > 0, pos, INT32_MAX - pos))


def tanh_q4(a):
    """gemmlowp tanh of Q4.27 -> Q0.31: (1 - e)/(1 + e) with e = exp(-2|a|), the sign put back."""
    a = np.asarray(a, dtype=np.int64)
    e = exp_on_negative_values(-np.abs(a), 5)          # -2|a| is the same raw value read as Q5.26
    h = _half_sum(e, INT32_MAX)
    x = 1515870810 + srdhm(h, -1010580540)
    for _ in range(3):
        x = x + _pot(srdhm(x, (1 << 29) - srdhm(h, x)), 2)
    t = _pot(x - (1 << 29), 2)
    return np.where(a == 0, 0, np.where(a < 0, -t, t))


def _clz32(x: int) -> int:
    return 32 - int(x).bit_length() if x > 0 else 32


# ---------------------------------------------------------------- softmax

def softmax_params(x_scale: float, beta: float = 1.0) -> tuple[int, int, int]:
    """(mult, left_shift, diff_min) of TFLite's int8 softmax for an input of scale x_scale."""
    real = min(float(beta) * float(np.float32(x_scale)) * (1 << (31 - SOFTMAX_DIFF_BITS)), (1 << 31) - 1.0)
    m, ls = quantize_multiplier(real)
    radius = math.floor(((1 << SOFTMAX_DIFF_BITS) - 1) * (1 << (31 - SOFTMAX_DIFF_BITS)) / (1 << ls))
    return m, ls, -radius


@kernel(x="const i8*", y="i8*", rows="int", depth="int", mult="int", left_shift="int", diff_min="int")
def softmax_s8(x, y, rows, depth, mult, left_shift, diff_min):
    """TFLite's int8 softmax over each row of `depth` (output scale 1/256, zero point -128)."""
    X = x[:rows * depth].reshape(rows, depth).astype(np.int64)
    d = X - X.max(axis=1, keepdims=True)
    ok = d >= diff_min
    e = exp_on_negative_values(srdhm(d * (1 << left_shift), mult), SOFTMAX_DIFF_BITS)
    total = np.where(ok, rdbpot(e, SOFTMAX_ACC_BITS), 0).sum(axis=1)
    out = np.empty_like(X)
    for r in range(rows):
        s = int(total[r])
        head = _clz32(s)
        bits = SOFTMAX_ACC_BITS - head
        scale = one_over_one_plus_x(np.int64(((s << head) & 0xFFFFFFFF) - (1 << 31)))
        v = rdbpot(srdhm(scale, e[r]), bits + 31 - 8) - 128
        out[r] = np.where(ok[r], np.clip(v, -128, 127), -128)
    y[:rows * depth] = out.ravel()


# ---------------------------------------------------------------- matmul, right operand by rows of K

@kernel(a="const i8*", b="const i8*", y="i8*", M="int", N="int", K="int", a_stride="int", b_stride="int",
        y_stride="int", a_zp="int", b_zp="int", mult="int", shift="int", y_zp="int")
def matmul_kn_s8(a, b, y, M, N, K, a_stride, b_stride, y_stride, a_zp, b_zp, mult, shift, y_zp):
    """TFLite's BATCH_MATMUL arithmetic on one batch with the right operand stored (K, N), rows
    `b_stride` apart: y[i, n] = sat8(MBQM(sum_k (a[i,k]-a_zp)(b[k,n]-b_zp)) + y_zp). Reads a head of
    v (columns of a (L, d) tensor) in place, where matmul_qk_s8 would need it transposed."""
    A = view2d(a, M, K, a_stride).astype(np.int64) - a_zp
    B = view2d(b, K, N, b_stride).astype(np.int64) - b_zp
    _out(view2d(y, M, N, y_stride), mbqm(A @ B, mult, shift) + y_zp, -128, 127)


# ---------------------------------------------------------------- depthwise convolution

@kernel(x="const i8*", w="const i8*", bias="const i32*", mult="const i32*", shift="const i32*", y="i8*",
        H="int", W="int", C="int", dm="int", Hout="int", Wout="int", kh="int", kw="int", sh="int", sw="int",
        dh="int", dw="int", pad_h="int", pad_w="int", x_zp="int", y_zp="int", act_min="int", act_max="int")
def depthwise_s8(x, w, bias, mult, shift, y, H, W, C, dm, Hout, Wout, kh, kw, sh, sw, dh, dw, pad_h, pad_w, x_zp,
                 y_zp, act_min, act_max):
    """TFLite's DEPTHWISE_CONV_2D (per-channel int8): output channel c*dm + m of pixel (oy, ox) sums
    w[ky, kx, c*dm + m] (x[iy, ix, c] - x_zp) over the taps iy = oy*sh - pad_h + ky*dh, ix likewise,
    that fall inside the image (the others count as padding: nothing), adds the bias and requantises
    per channel. Weights (kh, kw, C*dm) as the file stores them; HWC activations."""
    Co = C * dm
    X = x[:H * W * C].reshape(H, W, C).astype(np.int64) - x_zp
    Wt = w[:kh * kw * Co].reshape(kh, kw, Co).astype(np.int64)
    acc = np.zeros((Hout, Wout, Co), np.int64) + bias[:Co]
    for ky in range(kh):
        iy = np.arange(Hout) * sh - pad_h + ky * dh
        vy = (iy >= 0) & (iy < H)
        for kx in range(kw):
            ix = np.arange(Wout) * sw - pad_w + kx * dw
            vx = (ix >= 0) & (ix < W)
            patch = np.zeros((Hout, Wout, C), np.int64)
            patch[np.ix_(vy, vx)] = X[np.ix_(iy[vy], ix[vx])]
            acc += np.repeat(patch, dm, axis=2) * Wt[ky, kx]
    _out(y[:Hout * Wout * Co].reshape(Hout, Wout, Co), mbqm(acc, mult[:Co], shift[:Co]) + y_zp, act_min, act_max)


# ---------------------------------------------------------------- mean

def mean_params(x_scale: float, y_scale: float, n: int) -> tuple[int, int]:
    """TFLite's MEAN multiplier for x_scale / y_scale with 1/n folded in."""
    m, s = quantize_multiplier(float(np.float32(x_scale)) / float(np.float32(y_scale)))
    shift = min(63 - _clz64(n), 32, 31 + s)
    return int((m << shift) // n), s - shift


def _clz64(n: int) -> int:
    return 64 - int(n).bit_length()


@kernel(x="const i8*", y="i8*", outer="int", n="int", inner="int", x_zp="int", mult="int", shift="int", y_zp="int")
def mean_s8(x, y, outer, n, inner, x_zp, mult, shift, y_zp):
    """y[o, i] = sat8(MBQM(sum_k x[o, k, i] - n x_zp, mult, shift) + y_zp)."""
    X = x[:outer * n * inner].reshape(outer, n, inner).astype(np.int64)
    y[:outer * inner] = saturate(mbqm(X.sum(axis=1) - n * x_zp, mult, shift) + y_zp, np.int8).ravel()


# ---------------------------------------------------------------- pooling

@kernel(x="const i8*", y="i8*", H="int", W="int", C="int", Hout="int", Wout="int", kh="int", kw="int", sh="int",
        sw="int", pad_h="int", pad_w="int", act_min="int", act_max="int")
def avg_pool_s8(x, y, H, W, C, Hout, Wout, kh, kw, sh, sw, pad_h, pad_w, act_min, act_max):
    """TFLite's int8 AVERAGE_POOL_2D on HWC: the mean of the window's taps inside the image (padding
    is left out of the count), rounded half away from zero; input and output share one quantisation."""
    X = x[:H * W * C].reshape(H, W, C).astype(np.int64)
    out = y[:Hout * Wout * C].reshape(Hout, Wout, C)
    for oy in range(Hout):
        y0 = oy * sh - pad_h
        ys = slice(max(y0, 0), min(y0 + kh, H))
        for ox in range(Wout):
            x0 = ox * sw - pad_w
            xs = slice(max(x0, 0), min(x0 + kw, W))
            win = X[ys, xs]
            n = win.shape[0] * win.shape[1]
            acc = win.sum(axis=(0, 1))
            avg = np.where(acc > 0, (acc + n // 2) // n, -((-acc + n // 2) // n))
            out[oy, ox] = np.clip(avg, act_min, act_max)


# ---------------------------------------------------------------- int16 activations

@kernel(x="const i16*", y="i16*", outer="int", n="int", inner="int", x_zp="int", mult="int", shift="int", y_zp="int")
def mean_s16(x, y, outer, n, inner, x_zp, mult, shift, y_zp):
    """mean_s8 on int16 activations (TFLite's MEAN for int16: the same arithmetic, the int16 range)."""
    X = x[:outer * n * inner].reshape(outer, n, inner).astype(np.int64)
    y[:outer * inner] = saturate(mbqm(X.sum(axis=1) - n * x_zp, mult, shift) + y_zp, np.int16).ravel()


@kernel(x="const i8*", y="i16*", n="int", x_zp="int", mult="int", shift="int", y_zp="int")
def requant_s8_s16(x, y, n, x_zp, mult, shift, y_zp):
    """TFLite's QUANTIZE int8 -> int16: y = sat16(MBQM(x - x_zp, mult, shift) + y_zp)."""
    y[:n] = saturate(mbqm(x[:n].astype(np.int64) - x_zp, mult, shift) + y_zp, np.int16)


@kernel(x="const i16*", y="i8*", n="int", x_zp="int", mult="int", shift="int", y_zp="int")
def requant_s16_s8(x, y, n, x_zp, mult, shift, y_zp):
    """TFLite's QUANTIZE int16 -> int8: y = sat8(MBQM(x - x_zp, mult, shift) + y_zp)."""
    y[:n] = saturate(mbqm(x[:n].astype(np.int64) - x_zp, mult, shift) + y_zp, np.int8)


def requant_params(x_scale: float, y_scale: float) -> tuple[int, int]:
    """QUANTIZE's multiplier: double(x_scale) / double(y_scale) from the float32 scales."""
    return quantize_multiplier(float(np.float32(x_scale)) / float(np.float32(y_scale)))


# ---------------------------------------------------------------- pointwise tables (run by lut_s8)

def logistic_table(x_scale: float, x_zp: int) -> np.ndarray:
    """TFLite's int8 LOGISTIC (output scale 1/256, zero point -128) as a 256-entry table."""
    m, ls, radius = _q4_input(x_scale)
    v = np.arange(-128, 128, dtype=np.int64) - x_zp
    y = rdbpot(logistic_q4(mbqm(v, m, ls)), 23) - 128
    y = np.where(v <= -radius, -128, np.where(v >= radius, 127, np.clip(y, -128, 127)))
    return y.astype(np.int8)


def _q4_input(x_scale: float) -> tuple[int, int, int]:
    """(multiplier, left shift, input radius) of TFLite's int8 LOGISTIC and TANH (input in Q4.27)."""
    q, ls = math.frexp(float(np.float32(x_scale)) * float(1 << 27))
    m = int(math.floor(abs(q) * (1 << 31) + 0.5)) * (1 if q >= 0 else -1)
    return m, ls, math.floor(15 * (1 << 27) / (1 << ls))


def tanh_table(x_scale: float, x_zp: int) -> np.ndarray:
    """TFLite's int8 TANH (output scale 1/128, zero point 0) as a 256-entry table."""
    m, ls, radius = _q4_input(x_scale)
    v = np.arange(-128, 128, dtype=np.int64) - x_zp
    y = np.clip(rdbpot(tanh_q4(mbqm(v, m, ls)), 24), -128, 127)
    return np.where(v <= -radius, -128, np.where(v >= radius, 127, y)).astype(np.int8)


def _inv_sqrt(v: int) -> tuple[int, int]:
    """TFLite's GetInvSqrtQuantizedMultiplierExp(v, reverse_shift=-1)."""
    if v <= 1:
        return INT32_MAX, 0
    shift = 11
    while v >= (1 << 29):
        v //= 4
        shift += 1
    pairs = (_clz32(v) - 1) // 2 - 1
    shift -= pairs
    v <<= 2 * pairs
    x = 1 << 28                                    # F3 one
    half_in = int(rdbpot(v >> 1, 1))
    three_halves = (1 << 28) + (1 << 27)
    for _ in range(5):
        x3 = int(_pot(srdhm(srdhm(x, x), x), 6))
        x = int(_pot(srdhm(three_halves, x) - srdhm(half_in, x3), 3))
    x = int(srdhm(x, 1518500250))
    if shift < 0:
        x <<= -shift
        shift = 0
    return x, -shift


def rsqrt_table(x_scale: float, x_zp: int, y_scale: float, y_zp: int) -> np.ndarray:
    """TFLite's int8 RSQRT as a 256-entry table (inputs below the zero point, where TFLite refuses to
    run, give 127)."""
    m, s = quantize_multiplier(1.0 / float(np.sqrt(np.float32(x_scale)) * np.float32(y_scale)))
    out = []
    for q in range(-128, 128):
        v = q - x_zp
        if v <= 0:
            out.append(127)
            continue
        im, ish = _inv_sqrt(v)
        data = int(mbqm(1, im, ish + 20))
        out.append(int(np.clip(mbqm(data, m, s - 20) + y_zp, -128, 127)))
    return np.array(out, dtype=np.int8)


@cache
def _libm() -> ctypes.CDLL:
    """The C library's float32 erfcf and tanhf: the functions LiteRT's GELU table calls (numpy has no
    float32 erfc, and its float32 tanh is its own code, not the C library's)."""
    m = ctypes.CDLL(ctypes.util.find_library("m"))
    for f in (m.erfcf, m.tanhf):
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return m


def _gelu_f32(x: np.float32, approximate: bool) -> np.float32:
    """LiteRT's float32 GELU of one value (every step rounded to float32 as its C++ does): exact as
    0.5 x erfc(-x / sqrt 2), approximate as 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    f, m = np.float32, _libm()
    half_x = f(f(0.5) * x)
    if not approximate:
        return f(half_x * f(m.erfcf(f(x * f(-math.sqrt(0.5))))))
    cubic = f(f(f(f(0.044715) * x) * x) * x)
    return f(half_x * f(f(1) + f(m.tanhf(f(f(math.sqrt(2 / math.pi)) * f(x + cubic))))))


def litert_gelu_table(x_scale: float, x_zp: int, y_scale: float, y_zp: int, approximate: bool) -> np.ndarray:
    """LiteRT's int8 GELU as a 256-entry table: each int8 value dequantised in float32, its GELU divided
    by the output scale (times the float32 reciprocal), rounded half away from zero, plus the zero point,
    saturated."""
    f = np.float32
    inv = f(f(1) / f(y_scale))
    g = [f(_gelu_f32(f(f(x_scale) * f(v - x_zp)), approximate) * inv) for v in range(-128, 128)]
    return np.clip(round_half_away(np.array(g, np.float32)) + y_zp, -128, 127).astype(np.int8)


def requant_table(x_scale: float, x_zp: int, y_scale: float, y_zp: int) -> np.ndarray:
    """TFLite's int8 -> int8 QUANTIZE (a rescale) as a 256-entry table."""
    m, s = quantize_multiplier(float(np.float32(x_scale)) / float(np.float32(y_scale)))
    v = np.arange(-128, 128, dtype=np.int64) - x_zp
    return np.clip(mbqm(v, m, s) + y_zp, -128, 127).astype(np.int8)


# ---------------------------------------------------------------- op kinds -> kernel calls

def calls_for(op, loc) -> list:
    """Kernel calls of the `tfl_*` op kinds (mcu.lower.calls_for hands them here)."""
    from mcu.graph import Call

    a, i, o = op.attrs, op.inputs, op.outputs
    if op.kind == "tfl_binary":
        return [Call("binary_s8", (loc(i[0]), loc(i[1]), loc(o[0]), loc(i[2]), loc(i[3]), a["op"]), op.name, 0)]
    if op.kind == "tfl_softmax":
        return [Call("softmax_s8", (loc(i[0]), loc(o[0]), a["rows"], a["depth"], a["mult"], a["left_shift"],
                                    a["diff_min"]), op.name, 0)]
    if op.kind == "tfl_requant":
        k = "requant_s8_s16" if a["to16"] else "requant_s16_s8"
        return [Call(k, (loc(i[0]), loc(o[0]), a["n"], a["x_zp"], a["mult"], a["shift"], a["y_zp"]), op.name, 0)]
    if op.kind == "tfl_avg_pool":
        return [Call("avg_pool_s8", (loc(i[0]), loc(o[0]), a["H"], a["W"], a["C"], a["Hout"], a["Wout"], a["kh"],
                                     a["kw"], a["sh"], a["sw"], a["pad_h"], a["pad_w"], a["act_min"], a["act_max"]),
                     op.name, 0)]
    if op.kind == "tfl_mean":
        return [Call("mean_s16" if a.get("int16") else "mean_s8", (loc(i[0]), loc(o[0]), a["outer"], a["n"], a["inner"], a["x_zp"], a["mult"],
                                 a["shift"], a["y_zp"]), op.name, 0)]
    if op.kind == "tfl_batch_matmul":
        M, Kd, N = a["M"], a["K"], a["N"]
        return [Call("matmul_qk_s8", (loc(i[0], b * a["a_step"]), loc(i[1], b * a["b_step"]), loc(o[0], b * M * N),
                                      M, N, Kd, Kd, Kd, N, a["a_zp"], a["b_zp"], a["mult"], a["shift"], a["y_zp"]),
                     op.name, M * N * Kd) for b in range(a["batches"])]
    if op.kind == "tfl_depthwise":
        return [Call("depthwise_s8", (*(loc(t) for t in i[:5]), loc(o[0]), *(a[k] for k in (
            "H", "W", "C", "dm", "Hout", "Wout", "kh", "kw", "sh", "sw", "dh", "dw", "pad_h", "pad_w", "x_zp", "y_zp",
            "act_min", "act_max"))), op.name, a["Hout"] * a["Wout"] * a["C"] * a["dm"] * a["kh"] * a["kw"])]
    if op.kind == "tfl_matmul":
        return [Call("matmul_kn_s8" if a["b_kn"] else "matmul_qk_s8",
                     (loc(i[0], a["a_off"]), loc(i[1], a["b_off"]), loc(o[0], a["y_off"]), a["M"], a["N"], a["K"],
                      a["a_stride"], a["b_stride"], a["y_stride"], a["a_zp"], a["b_zp"], a["mult"], a["shift"],
                      a["y_zp"]), op.name, a["M"] * a["N"] * a["K"])]
    raise ValueError(f"op kind {op.kind!r} is not a tfl_ kind")
