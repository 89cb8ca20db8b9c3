"""The numpy reference kernels: the numerics spec of the int8 runtime, one function per C kernel.

Every kernel works on flat buffers with explicit dimensions and strides, exactly like its C twin
`tsh_<name>` in `mcu/firmware/kernels/` (same parameter order, same integer results). Pointer
parameters arrive as flat numpy arrays (views into the arena, or constant data); outputs are
written in place. Arithmetic is exact (int64 in numpy); the C kernels use int32 accumulators, which
is the same thing because the lowering guarantees every accumulator fits in int32 (|bias| <= 2^30,
K * 255 * 127 < 2^30 for the layer sizes we accept).

Parameter types, used by the executor to view arena bytes and by codegen to declare/cast:
  "i8*", "i16*", "i32*"            mutable pointers (outputs, or scratch)
  "const i8*", "const i16*", ...   read-only pointers (inputs, constants)
  "int"                            a 32-bit integer scalar

Numerics (see also base.quant):
- requantisation: base.quant.multiply_by_quantized_multiplier (TFLite double rounding), + zero
  point, clamp to [act_min, act_max] (or the int8 range);
- softmax: integer, tile-friendly. Per row over the unmasked keys: m = max s_j;
  e_j = lut[m - s_j] (lut[d] = round(2^15 * exp(-d * scale_s)), int32, 256 entries);
  S = sum e_j; p_j = min(32767, (e_j * 2^15 + S/2) / S) as int16 (probabilities in units of 2^-15);
  masked keys get p_j = 0, a row with no key gets all zeros;
- LayerNorm (fused with the residual add): x = (a - za) * ca + (b - zb) * cb (ca, cb integers
  carrying the ratio of the two scales); mu = round(sum x / d); var = floor(sum (x - mu)^2 / d) + eps;
  sigma = isqrt(var) (at least 1); inv = round(2^40 / sigma); n = RDBPOT64((x - mu) * inv, 28)
  (the normalised value in units of 2^-12); y = sat(MBQM(n, gm[c], gs[c]) + beta[c] + zy), where
  gm may be negative (gamma < 0);
- GELU and other pointwise functions: a 256-entry int8 table indexed by x + 128;
- mean pooling: avg = round((sum_i (x_i - zx)) * 2^8 / n) over the n unmasked rows, then MBQM;
- elementwise add (TFLite's int8 ADD, left shift 20): sa = MBQM((a - za) << 20, ma, sha), sb likewise,
  y = clamp(MBQM(sa + sb, my, shy) + zy), with sa + sb saturated to int32 (never reached with the
  multipliers of add_params, which are what TFLite computes); b may be a row broadcast over a;
- elementwise mul (TFLite's int8 MUL): y = clamp(MBQM((a - za)(b - zb), my, shy) + zy);
- requantising copy (concatenation, slices, rescaling): y = sat8(MBQM(x - zx, m, sh) + zy), an exact
  copy for m = 2^30, sh = 1, zx = zy;
- permutation: a pure gather (no arithmetic) over up to 6 dimensions with arbitrary input strides.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from base.errors import TinyshieldError
from base.quant import (INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier as mbqm, quantize_multiplier,
                        rounding_divide_by_pot, saturate)

PTYPES = {"i8*": np.int8, "i16*": np.int16, "i32*": np.int32,
          "const i8*": np.int8, "const i16*": np.int16, "const u16*": np.uint16, "const i32*": np.int32}

EXP_ONE = 1 << 15        # softmax: lut[0]; probabilities are in units of 2^-15
LN_IN_BITS = 12          # add_layernorm: |ca|, |cb| <= 2^12
LN_INV_BITS = 40         # inv = 2^40 / sigma
LN_OUT_BITS = 12         # normalised values in units of 2^-12
POOL_BITS = 8            # mean_pool keeps 8 fractional bits of the average
CONV_PATCH_MAX = 256     # longest conv2d patch row (k*k*Cin rounded up to 4) the C kernel takes
ADD_LEFT_SHIFT = 20      # add_s8: TFLite's int8 ADD headroom; |a - za| << 20 < 2^28 fits int32
PERMUTE_DIMS = 6         # permute_s8: most dimensions of one gather


@dataclass(frozen=True)
class Kernel:
    name: str
    fn: Callable
    params: tuple[tuple[str, str], ...]   # (parameter name, type)

    def __call__(self, *args):
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        return self.fn(*args)


KERNELS: dict[str, Kernel] = {}


def kernel(**types):
    """Register a numpy kernel; keyword arguments give each parameter's type, in order."""
    def wrap(fn):
        names = list(inspect.signature(fn).parameters)
        if names != list(types):
            raise AssertionError(f"{fn.__name__}: parameter types {list(types)} do not match {names}")
        KERNELS[fn.__name__] = Kernel(fn.__name__, fn, tuple(types.items()))
        return fn
    return wrap


def register(name: str, fn: Callable, params) -> None:
    """For other modules (e.g. the tiled kernels) adding kernels to the same table."""
    KERNELS[name] = Kernel(name, fn, tuple(params))


def view2d(buf: np.ndarray, rows: int, cols: int, stride: int) -> np.ndarray:
    """A (rows, cols) view of a flat buffer whose rows start `stride` elements apart."""
    if rows == 0 or cols == 0:
        return buf[:0].reshape(0, max(cols, 0))
    need = (rows - 1) * stride + cols
    if need > buf.size:
        raise ValueError(f"buffer of {buf.size} elements too small for {rows}x{cols} (stride {stride})")
    s = buf.strides[0]
    return as_strided(buf, shape=(rows, cols), strides=(stride * s, s))


def div_round(a, b):
    """a / b rounded half away from zero, b > 0 (int64 arrays or ints)."""
    a = np.asarray(a, dtype=np.int64)
    q = (np.abs(a) + b // 2) // b
    return np.where(a < 0, -q, q)


def isqrt(v):
    """Floor square root of non-negative int64 values."""
    v = np.asarray(v, dtype=np.int64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > v, r - 1, r)
    r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


def _out(y: np.ndarray, values, lo, hi):
    y[...] = np.clip(values, lo, hi)


# ---------------------------------------------------------------- linear algebra

def pack_fc_weights(W: np.ndarray) -> np.ndarray:
    """(N, K) int8 -> the flat layout fc_s8 reads: output channels in pairs, each pair's two rows
    interleaved per 4 k (row 2p's 4 bytes, row 2p+1's 4 bytes, ...), then the K % 4 tail of row 2p,
    then of row 2p+1; an odd last row plainly. One pointer walks a pair with 8-byte loads."""
    W = np.asarray(W)
    N, K = W.shape
    P, K4 = N // 2, K // 4
    pairs = W[:2 * P].reshape(P, 2, K)
    main = pairs[:, :, :4 * K4].reshape(P, 2, K4, 4).transpose(0, 2, 1, 3).reshape(P, 8 * K4)
    tail = pairs[:, :, 4 * K4:].reshape(P, 2 * (K - 4 * K4))
    out = np.concatenate([main, tail], axis=1).reshape(-1)
    return np.concatenate([out, W[2 * P:].reshape(-1)]).astype(W.dtype)


def unpack_fc_weights(w: np.ndarray, N: int, K: int) -> np.ndarray:
    """The inverse of `pack_fc_weights`: flat packed -> (N, K)."""
    P, K4 = N // 2, K // 4
    pairs = w[:2 * P * K].reshape(P, 2 * K)
    main = pairs[:, :8 * K4].reshape(P, K4, 2, 4).transpose(0, 2, 1, 3).reshape(P, 2, 4 * K4)
    tail = pairs[:, 8 * K4:].reshape(P, 2, K - 4 * K4)
    W = np.concatenate([main, tail], axis=2).reshape(2 * P, K)
    return np.concatenate([W, w[2 * P * K:N * K].reshape(N - 2 * P, K)], axis=0)


def pack_fc_weights_s16(W: np.ndarray) -> np.ndarray:
    """(N, K) int8 -> the int16 layout fc_s8w16 reads: `pack_fc_weights`' order with every group of 4 k
    of a row stored widened as (k, k+2), (k+1, k+3) halfword pairs, the operands of SMLAD against
    rows sign-extended by SXTB16, so the Cortex-M4 loads a channel pair's 4 k with one LDM and
    extends nothing. Twice the bytes of the int8 layout; the same weight values."""
    W = np.asarray(W)
    N, K = W.shape
    P, K4 = N // 2, K // 4
    pairs = W[:2 * P].reshape(P, 2, K).astype(np.int16)
    main = pairs[:, :, :4 * K4].reshape(P, 2, K4, 4)[..., [0, 2, 1, 3]].transpose(0, 2, 1, 3).reshape(P, 8 * K4)
    tail = pairs[:, :, 4 * K4:].reshape(P, 2 * (K - 4 * K4))
    out = np.concatenate([main, tail], axis=1).reshape(-1)
    return np.concatenate([out, W[2 * P:].reshape(-1).astype(np.int16)])


def unpack_fc_weights_s16(w: np.ndarray, N: int, K: int) -> np.ndarray:
    """The inverse of `pack_fc_weights_s16`: flat int16 packed -> (N, K)."""
    P, K4 = N // 2, K // 4
    pairs = w[:2 * P * K].reshape(P, 2 * K)
    main = pairs[:, :8 * K4].reshape(P, K4, 2, 4)[..., [0, 2, 1, 3]].transpose(0, 2, 1, 3).reshape(P, 2, 4 * K4)
    tail = pairs[:, 8 * K4:].reshape(P, 2, K - 4 * K4)
    W = np.concatenate([main, tail], axis=2).reshape(2 * P, K)
    return np.concatenate([W, w[2 * P * K:N * K].reshape(N - 2 * P, K)], axis=0)


@kernel(x="const i8*", w="const i8*", bias="const i32*", mult="const i32*", shift="const i32*", y="i8*",
        M="int", K="int", N="int", x_stride="int", y_stride="int", y_zp="int", act_min="int", act_max="int")
def fc_s8(x, w, bias, mult, shift, y, M, K, N, x_stride, y_stride, y_zp, act_min, act_max):
    """y[m, n] = clamp(MBQM(bias[n] + sum_k x[m, k] * W[n, k], mult[n], shift[n]) + y_zp).

    W (N, K) is stored packed by `pack_fc_weights` (pairs of channels interleaved for the Cortex-M
    kernel); the input zero point is folded into `bias` by the lowering
    (bias' = bias - x_zp * sum_k W[n, k]), so the kernel needs none."""
    X = view2d(x, M, K, x_stride).astype(np.int64)
    W = unpack_fc_weights(w[:N * K], N, K).astype(np.int64)
    acc = X @ W.T + bias[:N]
    _out(view2d(y, M, N, y_stride), mbqm(acc, mult[:N], shift[:N]) + y_zp, act_min, act_max)


@kernel(x="const i8*", w="const i16*", bias="const i32*", mult="const i32*", shift="const i32*", y="i8*",
        M="int", K="int", N="int", x_stride="int", y_stride="int", y_zp="int", act_min="int", act_max="int")
def fc_s8w16(x, w, bias, mult, shift, y, M, K, N, x_stride, y_stride, y_zp, act_min, act_max):
    """`fc_s8` with the int8 weights stored widened to int16 by `pack_fc_weights_s16`: the same
    arithmetic, only the storage differs (for boards whose flash has room for it)."""
    fc_s8(x, pack_fc_weights(unpack_fc_weights_s16(w[:N * K], N, K)), bias, mult, shift, y, M, K, N,
          x_stride, y_stride, y_zp, act_min, act_max)


@kernel(q="const i8*", k="const i8*", s="i8*", Lq="int", Lk="int", dh="int", q_stride="int",
        k_stride="int", s_stride="int", q_zp="int", k_zp="int", mult="int", shift="int", s_zp="int")
def matmul_qk_s8(q, k, s, Lq, Lk, dh, q_stride, k_stride, s_stride, q_zp, k_zp, mult, shift, s_zp):
    """Attention scores of one head: s[i, j] = sat8(MBQM(sum_t (q[i,t]-q_zp)(k[j,t]-k_zp)) + s_zp)."""
    Q = view2d(q, Lq, dh, q_stride).astype(np.int64) - q_zp
    Kt = view2d(k, Lk, dh, k_stride).astype(np.int64) - k_zp
    _out(view2d(s, Lq, Lk, s_stride), mbqm(Q @ Kt.T, mult, shift) + s_zp, -128, 127)


@kernel(p="const i16*", v="const i8*", y="i8*", Lq="int", Lk="int", dh="int", p_stride="int",
        v_stride="int", y_stride="int", v_zp="int", mult="int", shift="int", y_zp="int")
def matmul_pv_s8(p, v, y, Lq, Lk, dh, p_stride, v_stride, y_stride, v_zp, mult, shift, y_zp):
    """Attention context of one head: y[i, t] = sat8(MBQM(sum_j p[i,j] (v[j,t]-v_zp)) + y_zp)."""
    P = view2d(p, Lq, Lk, p_stride).astype(np.int64)
    V = view2d(v, Lk, dh, v_stride).astype(np.int64) - v_zp
    _out(view2d(y, Lq, dh, y_stride), mbqm(P @ V, mult, shift) + y_zp, -128, 127)


def conv_patch_len(ksize: int, Cin: int) -> int:
    """Length of one conv2d patch row: k*k*Cin rounded up to a multiple of 4 (the tail is zeros)."""
    return (ksize * ksize * Cin + 3) // 4 * 4


@kernel(x="const i8*", w="const i8*", bias="const i32*", mult="const i32*", shift="const i32*", y="i8*",
        H="int", W="int", Cin="int", Cout="int", Hout="int", Wout="int", ksize="int", stride="int",
        pad="int", x_zp="int", y_zp="int", act_min="int", act_max="int")
def conv2d_s8(x, w, bias, mult, shift, y, H, W, Cin, Cout, Hout, Wout, ksize, stride, pad, x_zp, y_zp,
              act_min, act_max):
    """2-D convolution of HWC activations as a fully connected layer over patches: each output
    pixel's patch (kh, kw, ci order, padding = x_zp, i.e. real zero, zero tail up to
    conv_patch_len) times W (Cout, patch) stored like fc_s8's weights; the input zero point is folded
    into `bias` by the lowering (bias' = bias - x_zp * sum W[co]), so padded taps contribute nothing."""
    P, Kp = ksize * ksize * Cin, conv_patch_len(ksize, Cin)
    X = np.full((H + 2 * pad + stride * ksize, W + 2 * pad + stride * ksize, Cin), x_zp, dtype=np.int64)
    X[pad:pad + H, pad:pad + W] = x[:H * W * Cin].reshape(H, W, Cin)
    cols = np.zeros((Hout, Wout, Kp), dtype=np.int64)
    patch = cols[:, :, :P].reshape(Hout, Wout, ksize, ksize, Cin)
    for kh in range(ksize):
        for kw in range(ksize):
            patch[:, :, kh, kw] = X[kh:kh + stride * Hout:stride, kw:kw + stride * Wout:stride]
    cols[:, :, :P] = patch.reshape(Hout, Wout, P)
    Wm = unpack_fc_weights(w[:Cout * Kp], Cout, Kp).astype(np.int64)
    acc = cols.reshape(Hout * Wout, Kp) @ Wm.T + bias[:Cout]
    _out(y[:Hout * Wout * Cout].reshape(Hout * Wout, Cout), mbqm(acc, mult[:Cout], shift[:Cout]) + y_zp,
         act_min, act_max)


# ---------------------------------------------------------------- softmax

def softmax_exp(s_row: np.ndarray, valid: np.ndarray, m, lut: np.ndarray) -> np.ndarray:
    """e_j = lut[m - s_j] for valid keys, 0 otherwise (pass 2 and 3 of a tiled softmax use this too)."""
    d = np.clip(np.asarray(m, dtype=np.int64)[..., None] - s_row.astype(np.int64), 0, 255)
    return np.where(valid, lut[d].astype(np.int64), 0)


def softmax_probs(e: np.ndarray, S) -> np.ndarray:
    """p_j = min(32767, round(e_j * 2^15 / S)); 0 where S == 0."""
    S = np.asarray(S, dtype=np.int64)[..., None]
    safe = np.maximum(S, 1)
    p = np.minimum((e * EXP_ONE + safe // 2) // safe, 32767)
    return np.where(S > 0, p, 0)


def softmax_rowmax(s_rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """m = max over valid keys (-128 when none: then every e_j is 0 anyway)."""
    return np.where(valid, s_rows.astype(np.int64), -128).max(axis=-1)


@kernel(s="const i8*", mask="const i8*", lut="const i32*", p="i16*", Lq="int", Lk="int",
        s_stride="int", p_stride="int")
def softmax_s16(s, mask, lut, p, Lq, Lk, s_stride, p_stride):
    """Integer softmax over each row of int8 scores; keys with mask[j] == 0 are left out."""
    S8 = view2d(s, Lq, Lk, s_stride)
    valid = (mask[:Lk] != 0)[None, :]
    m = softmax_rowmax(S8, valid)
    e = softmax_exp(S8, valid, m, lut)
    view2d(p, Lq, Lk, p_stride)[...] = softmax_probs(e, e.sum(axis=-1))


def exp_lut(score_scale: float) -> np.ndarray:
    """The softmax table for int8 scores of scale `score_scale`: lut[d] = round(2^15 exp(-d scale))."""
    d = np.arange(256, dtype=np.float64)
    return np.floor(EXP_ONE * np.exp(-d * score_scale) + 0.5).astype(np.int32)


# ---------------------------------------------------------------- normalisation, pointwise, pooling

@kernel(a="const i8*", b="const i8*", gm="const i32*", gs="const i32*", beta="const i32*", y="i8*",
        M="int", d="int", a_zp="int", b_zp="int", ca="int", cb="int", eps="int", y_zp="int")
def add_layernorm_s8(a, b, gm, gs, beta, y, M, d, a_zp, b_zp, ca, cb, eps, y_zp):
    """y = LayerNorm(a + b) per row of d, rows contiguous (the residual add and the LayerNorm fused)."""
    x = ((a[:M * d].astype(np.int64) - a_zp) * ca + (b[:M * d].astype(np.int64) - b_zp) * cb).reshape(M, d)
    mu = div_round(x.sum(axis=1), d)[:, None]
    xc = x - mu
    var = (xc * xc).sum(axis=1) // d + eps
    sigma = np.maximum(isqrt(var), 1)[:, None]
    inv = ((1 << LN_INV_BITS) + sigma // 2) // sigma
    n = rounding_divide_by_pot(xc * inv, LN_INV_BITS - LN_OUT_BITS)
    out = mbqm(n, gm[:d], gs[:d]) + beta[:d] + y_zp
    y[:M * d] = saturate(out, np.int8).ravel()


@kernel(x="const i8*", table="const i8*", y="i8*", n="int")
def lut_s8(x, table, y, n):
    """y[i] = table[x[i] + 128]: GELU (or any pointwise int8 -> int8 function)."""
    y[:n] = table[x[:n].astype(np.int64) + 128]


@kernel(x="const i8*", mask="const i8*", y="i8*", L="int", d="int", x_zp="int", mult="int", shift="int",
        y_zp="int")
def mean_pool_s8(x, mask, y, L, d, x_zp, mult, shift, y_zp):
    """Mean over the unmasked rows of x (L, d): the sentence / image embedding."""
    X = x[:L * d].reshape(L, d).astype(np.int64) - x_zp
    valid = mask[:L] != 0
    n = int(valid.sum())
    tot = X[valid].sum(axis=0) if n else np.zeros(d, dtype=np.int64)
    avg = div_round(tot << POOL_BITS, max(n, 1))
    y[:d] = saturate(mbqm(avg, mult, shift) + y_zp, np.int8)


# ---------------------------------------------------------------- elementwise, copies, layout

def _broadcast(b, n, b_n):
    """b[i % b_n] for i < n: b is one row repeated over a (b_n == n: no broadcast)."""
    if b_n < 1:
        raise ValueError(f"broadcast length b_n = {b_n} must be >= 1")
    return b[np.arange(n) % b_n].astype(np.int64)


@kernel(a="const i8*", b="const i8*", y="i8*", n="int", b_n="int", a_zp="int", b_zp="int", a_mult="int",
        a_shift="int", b_mult="int", b_shift="int", y_mult="int", y_shift="int", y_zp="int", act_min="int",
        act_max="int")
def add_s8(a, b, y, n, b_n, a_zp, b_zp, a_mult, a_shift, b_mult, b_shift, y_mult, y_shift, y_zp, act_min, act_max):
    """TFLite's int8 ADD (reference_integer_ops::Add): with bb = b[i % b_n],
    sa = MBQM((a[i] - a_zp) << 20, a_mult, a_shift), sb = MBQM((bb - b_zp) << 20, b_mult, b_shift),
    y[i] = clamp(MBQM(sa + sb, y_mult, y_shift) + y_zp, act_min, act_max).

    Both inputs are first brought to one scale (2 max(a_scale, b_scale) / 2^20, see add_params) so the
    sum is exact; sa + sb saturates to int32 where TFLite would overflow (multipliers from
    add_params never get there). There is no SUB kernel yet: TFLite's differs only in sa - sb."""
    sa = mbqm((a[:n].astype(np.int64) - a_zp) << ADD_LEFT_SHIFT, a_mult, a_shift)
    sb = mbqm((_broadcast(b, n, b_n) - b_zp) << ADD_LEFT_SHIFT, b_mult, b_shift)
    raw = np.clip(sa + sb, INT32_MIN, INT32_MAX)
    _out(y[:n], mbqm(raw, y_mult, y_shift) + y_zp, act_min, act_max)


@kernel(a="const i8*", b="const i8*", y="i8*", n="int", b_n="int", a_zp="int", b_zp="int", y_mult="int",
        y_shift="int", y_zp="int", act_min="int", act_max="int")
def mul_s8(a, b, y, n, b_n, a_zp, b_zp, y_mult, y_shift, y_zp, act_min, act_max):
    """TFLite's int8 MUL: y[i] = clamp(MBQM((a[i] - a_zp)(b[i % b_n] - b_zp), y_mult, y_shift) + y_zp,
    act_min, act_max); the product (|.| <= 255^2) needs no headroom, the multiplier is
    a_scale b_scale / y_scale (mul_params)."""
    prod = (a[:n].astype(np.int64) - a_zp) * (_broadcast(b, n, b_n) - b_zp)
    _out(y[:n], mbqm(prod, y_mult, y_shift) + y_zp, act_min, act_max)


@kernel(x="const i8*", y="i8*", rows="int", cols="int", x_stride="int", y_stride="int", x_zp="int", mult="int",
        shift="int", y_zp="int")
def requant_s8(x, y, rows, cols, x_stride, y_stride, x_zp, mult, shift, y_zp):
    """A strided 2-D copy with requantisation: y[r*y_stride + c] = sat8(MBQM(x[r*x_stride + c] - x_zp,
    mult, shift) + y_zp). Concatenation (y_stride = the joined width), slicing and selection
    (x_stride = the source width), rescaling; mult = 2^30, shift = 1 (real 1.0) with x_zp == y_zp
    is an exact copy."""
    X = view2d(x, rows, cols, x_stride).astype(np.int64) - x_zp
    view2d(y, rows, cols, y_stride)[...] = saturate(mbqm(X, mult, shift) + y_zp, np.int8)


@kernel(x="const i8*", y="i8*", dims="const i32*", nd="int")
def permute_s8(x, y, dims, nd):
    """A strided gather of int8 over 6 dimensions: dims = out sizes s[0..5], then input element
    strides t[0..5] (build it with permute_dims). y is written contiguously in row-major order of s,
    y[flat(i0..i5)] = x[sum_k i_k t[k]]. Only the last nd dimensions are used; the others count as
    size 1. Transposes (NCHW <-> NHWC), head splits, patch extraction, strided slices."""
    idx = permute_index(dims, nd)
    if idx.size and idx.min() < 0:
        raise ValueError("permute_s8 reads before the start of x (negative strides)")
    y[:idx.size] = x[idx]


def permute_index(dims, nd) -> np.ndarray:
    """permute_s8's gather as an index array: y[f] = x[permute_index(dims, nd)[f]]."""
    used = np.arange(PERMUTE_DIMS) >= PERMUTE_DIMS - nd
    s = np.where(used, dims[:PERMUTE_DIMS], 1).astype(np.int64)
    t = np.where(used, dims[PERMUTE_DIMS:2 * PERMUTE_DIMS], 0).astype(np.int64)
    return sum(np.ix_(*[np.arange(sk) * tk for sk, tk in zip(s, t)])).ravel()


# ---------------------------------------------------------------- token inputs

@kernel(ids="const i32*", table="const i8*", y="i8*", L="int", d="int", vocab="int")
def embedding_s8(ids, table, y, L, d, vocab):
    """y[i] = table[ids[i]] (rows of d); an id outside [0, vocab) reads row 0 ([PAD])."""
    idx = ids[:L].astype(np.int64)
    idx = np.where((idx >= 0) & (idx < vocab), idx, 0)
    y[:L * d] = table[:vocab * d].reshape(vocab, d)[idx].ravel()


CLR_FIELDS = ("start", "rows", "rank", "dense", "u_off", "v_off", "vm_off", "u_shift", "v_shift")


@kernel(ids="const i32*", slot="const u16*", clusters="const i32*", u="const i8*", v="const i8*",
        u_mult="const i32*", v_mult="const i32*", y="i8*", L="int", d="int", vocab="int", nclusters="int")
def embedding_clr_s8(ids, slot, clusters, u, v, u_mult, v_mult, y, L, d, vocab, nclusters):
    """Clustered low-rank embedding lookup (the CLR table of edge.compress.clr, int8).

    Token t (an id outside [0, vocab) reads id 0) sits at slot s = slot[t], in the cluster c whose
    [start, start + rows) holds s, at row i = s - start. `clusters` has one row of CLR_FIELDS per
    cluster. Low-rank cluster: acc_j = sum_k u[i, k] v[k, j] (int8 x int8 -> int32), then
    t_j = MBQM(acc_j, v_mult[vm_off + j], v_shift) (the per-column scale), y_j = sat8(MBQM(t_j,
    u_mult[s], u_shift)) (the per-row scale). Dense cluster: y_j = sat8(MBQM(u[i, j], u_mult[s], u_shift))."""
    tab = clusters[:nclusters * len(CLR_FIELDS)].reshape(nclusters, len(CLR_FIELDS)).astype(np.int64)
    out = y[:L * d].reshape(L, d)
    for p in range(L):
        t = int(ids[p])
        s = int(slot[t if 0 <= t < vocab else 0])
        c = next((k for k in range(nclusters) if tab[k, 0] <= s < tab[k, 0] + tab[k, 1]), None)
        if c is None:
            out[p] = 0
            continue
        start, rows, r, dense, uo, vo, mo, ush, vsh = (int(x) for x in tab[c])
        i = s - start
        if dense:
            row = u[uo + i * d: uo + (i + 1) * d].astype(np.int64)
        else:
            acc = u[uo + i * r: uo + (i + 1) * r].astype(np.int64) @ v[vo: vo + r * d].reshape(r, d).astype(np.int64)
            row = mbqm(acc, v_mult[mo: mo + d], vsh)
        out[p] = saturate(mbqm(row, int(u_mult[s]), ush), np.int8)


@kernel(ids="const i32*", mask="i8*", L="int")
def pad_mask(ids, mask, L):
    """mask[i] = 1 for a real token, 0 for [PAD] (id 0)."""
    mask[:L] = (ids[:L] != 0).astype(np.int8)


# ---------------------------------------------------------------- helpers for the lowering

def gelu_table(x_scale: float, x_zp: int, y_scale: float, y_zp: int) -> np.ndarray:
    """256-entry int8 table of exact (erf) GELU from one int8 quantisation to another."""
    q = np.arange(-128, 128, dtype=np.float64)
    xr = (q - x_zp) * x_scale
    g = 0.5 * xr * (1.0 + np.vectorize(math.erf)(xr / math.sqrt(2.0)))
    return saturate(np.sign(g / y_scale) * np.floor(np.abs(g / y_scale) + 0.5) + y_zp, np.int8)




def add_params(a_scale: float, b_scale: float, y_scale: float) -> dict:
    """add_s8's multipliers as TFLite's int8 ADD prepares them (PrepareGeneralSubLike): both inputs
    to the scale 2 max(a_scale, b_scale) / 2^20, the sum to y_scale. Pass TFLite's float32 scales
    to get its exact integers. Keys are add_s8's parameter names."""
    twice_max = 2.0 * max(a_scale, b_scale)
    a_mult, a_shift = quantize_multiplier(a_scale / twice_max)
    b_mult, b_shift = quantize_multiplier(b_scale / twice_max)
    y_mult, y_shift = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * y_scale))
    return dict(a_mult=a_mult, a_shift=a_shift, b_mult=b_mult, b_shift=b_shift, y_mult=y_mult, y_shift=y_shift)


def mul_params(a_scale: float, b_scale: float, y_scale: float) -> dict:
    """mul_s8's multiplier (TFLite: a_scale b_scale / y_scale)."""
    y_mult, y_shift = quantize_multiplier(a_scale * b_scale / y_scale)
    return dict(y_mult=y_mult, y_shift=y_shift)


def permute_dims(shape, strides) -> np.ndarray:
    """permute_s8's `dims` for an output of `shape` gathered with input element `strides` (one per
    output dimension; e.g. a transpose of a contiguous tensor: the permuted contiguous strides).

    Size-1 dimensions are dropped and neighbours that are contiguous in x merged (fewer, longer
    rows: plain copies in C); the rest is right-aligned behind size-1 dimensions, so nd =
    len(shape) (or 6) is always a valid count to pass with it."""
    shape, strides = [int(v) for v in shape], [int(v) for v in strides]
    if len(shape) != len(strides):
        raise TinyshieldError(f"permute: {len(shape)} sizes but {len(strides)} strides")
    if len(shape) > PERMUTE_DIMS:
        raise TinyshieldError(f"permute of {len(shape)} dimensions: the kernel takes at most {PERMUTE_DIMS}")
    if min(shape + strides, default=0) < 0:
        raise TinyshieldError(f"permute: negative size or stride in {shape} / {strides}")
    s, t = [], []
    for sk, tk in zip(shape, strides):
        if sk == 1:
            continue
        if s and t[-1] == sk * tk:        # the previous dimension steps over exactly this one
            s[-1], t[-1] = s[-1] * sk, tk
        else:
            s.append(sk)
            t.append(tk)
    pad = PERMUTE_DIMS - len(s)
    return np.array([1] * pad + s + [0] * pad + t, dtype=np.int32)
