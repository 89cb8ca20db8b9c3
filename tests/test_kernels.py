"""Every C kernel (host build, portable and DSP code paths) equals its numpy reference bit for bit,
on random and adversarial inputs: saturation, extreme zero points, extreme multipliers and shifts."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from base.errors import TinyshieldError
from mcu import kernels as K
from mcu.hostlib import HostKernels

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
zp = st.integers(-128, 127)
mult = st.one_of(st.integers(0, (1 << 31) - 1), st.sampled_from([0, 1, (1 << 30), (1 << 31) - 1]))
smult = st.one_of(mult, st.integers(-(1 << 31) + 1, -1), st.just(-(1 << 31)))
shift = st.integers(-31, 30)


@pytest.fixture(scope="module", params=["portable", "dsp"])
def ck(request):
    return HostKernels(request.param)


def i8(draw, n, extreme=True):
    """int8 data, sometimes all at one rail (saturation) or one of the rails."""
    mode = draw(st.sampled_from(["random", "max", "min", "rails"]) if extreme else st.just("random"))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "max":
        return np.full(n, 127, dtype=np.int8)
    if mode == "min":
        return np.full(n, -128, dtype=np.int8)
    if mode == "rails":
        return rng.choice(np.array([-128, 127], dtype=np.int8), size=n)
    return rng.integers(-128, 128, size=n, dtype=np.int64).astype(np.int8)


def rand(draw, n, lo, hi, dtype):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return rng.integers(lo, hi + 1, size=n, dtype=np.int64).astype(dtype)


def both(ck, name, args, outs):
    """Run numpy and C on copies of the same arguments; every output array must match exactly."""
    a = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    b = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    K.KERNELS[name](*a)
    ck[name](*b)
    for i in outs:
        assert np.array_equal(a[i], b[i]), f"{name}: output {K.KERNELS[name].params[i][0]} differs"
    return a


@SETTINGS
@given(st.data())
def test_fc(ck, data):
    d = data.draw
    M, Kd, N = d(st.integers(1, 5)), d(st.integers(1, 70)), d(st.integers(1, 7))
    xs, ys = Kd + d(st.integers(0, 3)), N + d(st.integers(0, 3))
    lo = d(st.integers(-128, 127))
    hi = d(st.integers(lo, 127))
    args = [i8(d, M * xs), i8(d, N * Kd), rand(d, N, -(1 << 30), 1 << 30, np.int32),
            np.array([d(mult) for _ in range(N)], dtype=np.int32), np.array([d(shift) for _ in range(N)], dtype=np.int32),
            rand(d, M * ys, -128, 127, np.int8), M, Kd, N, xs, ys, d(zp), lo, hi]
    both(ck, "fc_s8", args, [5])


@SETTINGS
@given(st.data())
def test_matmul_qk(ck, data):
    d = data.draw
    Lq, Lk, dh = d(st.integers(1, 5)), d(st.integers(1, 6)), d(st.integers(1, 33))
    qs, ks, ss = dh + d(st.integers(0, 4)), dh + d(st.integers(0, 4)), Lk + d(st.integers(0, 2))
    args = [i8(d, Lq * qs), i8(d, Lk * ks), np.zeros(Lq * ss, np.int8), Lq, Lk, dh, qs, ks, ss,
            d(zp), d(zp), d(mult), d(shift), d(zp)]
    both(ck, "matmul_qk_s8", args, [2])


@SETTINGS
@given(st.data())
def test_matmul_pv(ck, data):
    d = data.draw
    Lq, Lk, dh = d(st.integers(1, 5)), d(st.integers(1, 9)), d(st.integers(1, 17))
    ps, vs, ys = Lk + d(st.integers(0, 3)), dh + d(st.integers(0, 3)), dh + d(st.integers(0, 3))
    args = [rand(d, Lq * ps, -(1 << 15), (1 << 15) - 1, np.int16), i8(d, Lk * vs), np.zeros(Lq * ys, np.int8),
            Lq, Lk, dh, ps, vs, ys, d(zp), d(mult), d(shift), d(zp)]
    both(ck, "matmul_pv_s8", args, [2])


@SETTINGS
@given(st.data())
def test_conv2d(ck, data):
    d = data.draw
    H, W, Cin, Cout = d(st.integers(1, 8)), d(st.integers(1, 8)), d(st.integers(1, 5)), d(st.integers(1, 4))
    k, stride, pad = d(st.sampled_from([1, 3])), d(st.integers(1, 2)), d(st.integers(0, 1))
    Hout, Wout = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    if Hout < 1 or Wout < 1:
        return
    lo = d(st.integers(-128, 127))
    args = [i8(d, H * W * Cin), i8(d, Cout * K.conv_patch_len(k, Cin)), rand(d, Cout, -(1 << 28), 1 << 28, np.int32),
            np.array([d(mult) for _ in range(Cout)], np.int32), np.array([d(shift) for _ in range(Cout)], np.int32),
            np.zeros(Hout * Wout * Cout, np.int8), H, W, Cin, Cout, Hout, Wout, k, stride, pad, d(zp), d(zp), lo, 127]
    both(ck, "conv2d_s8", args, [5])


@SETTINGS
@given(st.data())
def test_softmax(ck, data):
    d = data.draw
    Lq, Lk = d(st.integers(1, 4)), d(st.integers(1, 12))
    ss, ps = Lk + d(st.integers(0, 2)), Lk + d(st.integers(0, 2))
    lut = K.exp_lut(d(st.floats(1e-4, 3.0))) if d(st.booleans()) else rand(d, 256, 0, 1 << 15, np.int32)
    kind = d(st.sampled_from(["random", "ones", "prefix"]))   # prefix: real tokens, then padding
    mask = {"random": lambda: rand(d, Lk, -1, 1, np.int8), "ones": lambda: np.ones(Lk, np.int8),
            "prefix": lambda: (np.arange(Lk) < d(st.integers(0, Lk))).astype(np.int8)}[kind]()
    if d(st.booleans()):   # a lut with an entry beyond 2^15 leaves the short path
        lut = lut.copy()
        lut[d(st.integers(0, 255))] = d(st.integers(1 << 15, 1 << 16))
    args = [i8(d, Lq * ss), mask, lut, np.zeros(Lq * ps, np.int16), Lq, Lk, ss, ps]
    out = both(ck, "softmax_s16", args, [3])
    p = K.view2d(out[3], Lq, Lk, ps)
    assert (p >= 0).all() and (p[:, mask == 0] == 0).all()


@SETTINGS
@given(st.data())
def test_add_layernorm(ck, data):
    d = data.draw
    M, dd = d(st.integers(1, 3)), d(st.integers(1, 40))
    one = 1 << K.LN_IN_BITS
    ca, cb = d(st.sampled_from([(one, d(st.integers(0, one))), (d(st.integers(0, one)), one)]))
    args = [i8(d, M * dd), i8(d, M * dd), np.array([d(smult) for _ in range(dd)], np.int32),
            np.array([d(shift) for _ in range(dd)], np.int32),
            np.array([d(st.one_of(st.integers(-(1 << 31), (1 << 31) - 1), st.sampled_from(
                [-(1 << 31), (1 << 31) - 1, (1 << 31) - 200, -(1 << 31) + 200, 0])))
                for _ in range(dd)], np.int32),
            np.zeros(M * dd, np.int8), M, dd, d(zp), d(zp), ca, cb, d(st.integers(0, (1 << 31) - 1)), d(zp)]
    both(ck, "add_layernorm_s8", args, [5])


@SETTINGS
@given(st.data())
def test_add_layernorm_lowered_shapes(ck, data):
    """Rows of model width (d = 64, 128; 520 beyond the int32 sums) with the parameters the lowering
    makes (|gamma| multipliers, right shifts, small biases): the kernel's short path, and small
    spreads (inv >= 2^31) mixed in."""
    d = data.draw
    M, dd = d(st.integers(1, 20)), d(st.sampled_from([64, 128, 520]))
    one = 1 << K.LN_IN_BITS
    ca, cb = d(st.sampled_from([(one, d(st.integers(0, one))), (d(st.integers(0, one)), one)]))
    spread = d(st.sampled_from([1, 3, 128]))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    a = np.clip(rng.integers(-spread, spread + 1, M * dd) + d(zp), -128, 127).astype(np.int8)
    b = np.clip(rng.integers(-spread, spread + 1, M * dd) + d(zp), -128, 127).astype(np.int8)
    gm = (rng.integers(1 << 30, 1 << 31, dd) * rng.choice([-1, 1], dd)).astype(np.int32)
    gs = rng.integers(-23, 0, dd).astype(np.int32)
    args = [a, b, gm, gs, rng.integers(-300, 300, dd).astype(np.int32), np.zeros(M * dd, np.int8), M, dd,
            d(zp), d(zp), ca, cb, d(st.sampled_from([0, 1, 1000, 1 << 20])), d(zp)]
    both(ck, "add_layernorm_s8", args, [5])


@SETTINGS
@given(st.data())
def test_lut_pool_embedding_mask(ck, data):
    d = data.draw
    n = d(st.integers(1, 50))
    both(ck, "lut_s8", [i8(d, n), i8(d, 256, extreme=False), np.zeros(n, np.int8), n], [2])
    L, dd = d(st.integers(1, 9)), d(st.integers(1, 11))
    mask = rand(d, L, 0, 1, np.int8)
    both(ck, "mean_pool_s8", [i8(d, L * dd), mask, np.zeros(dd, np.int8), L, dd, d(zp), d(mult), d(shift), d(zp)], [2])
    V = d(st.integers(1, 20))
    ids = rand(d, L, -3, V + 3, np.int32)
    both(ck, "embedding_s8", [ids, i8(d, V * dd), np.zeros(L * dd, np.int8), L, dd, V], [2])
    both(ck, "pad_mask", [ids, np.full(L, 7, np.int8), L], [1])


# ---------------------------------------------------------------- the numerics mean what they say

def test_softmax_approximates_float_softmax():
    rng = np.random.default_rng(0)
    scale = 0.08
    s = rng.integers(-128, 128, size=(6, 20)).astype(np.int8)
    p = np.zeros(s.size, np.int16)
    K.softmax_s16(s.ravel(), np.ones(20, np.int8), K.exp_lut(scale), p, 6, 20, 20, 20)
    f = np.exp(s * scale - (s * scale).max(1, keepdims=True))
    f /= f.sum(1, keepdims=True)
    assert np.abs(p.reshape(6, 20) / 2 ** 15 - f).max() < 2e-4


def test_layernorm_approximates_float_layernorm():
    from base import quant as Q
    rng = np.random.default_rng(1)
    d = 64
    a = rng.normal(size=(4, d)) * 3
    b = rng.normal(size=(4, d))
    qa, qb = Q.choose_activation_qparams(a.min(), a.max()), Q.choose_activation_qparams(b.min(), b.max())
    xa, xb = Q.quantize(a, qa.scale, qa.zero_point), Q.quantize(b, qb.scale, qb.zero_point)
    gamma, beta = rng.normal(size=d), rng.normal(size=d) * 0.1
    ys = 4.0 / 127
    r = qb.scale / qa.scale
    one = 1 << K.LN_IN_BITS
    ca, cb = (one, round(r * one)) if r <= 1 else (round(one / r), one)
    m, s = Q.quantize_multipliers(np.abs(gamma) / (ys * 2 ** K.LN_OUT_BITS))
    m = np.where(gamma < 0, -m.astype(np.int64), m).astype(np.int32)
    y = np.zeros(4 * d, np.int8)
    K.add_layernorm_s8(xa.ravel(), xb.ravel(), m, s, Q.round_half_away(beta / ys).astype(np.int32), y, 4, d,
                       qa.zero_point, qb.zero_point, ca, cb, 0, 0)
    x = Q.dequantize(xa, qa.scale, qa.zero_point) + Q.dequantize(xb, qb.scale, qb.zero_point)
    ref = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True) * gamma + beta
    assert np.abs(y.reshape(4, d) * ys - np.clip(ref, -128 * ys, 127 * ys)).max() < 1.5 * ys


def test_gelu_table_is_erf_gelu():
    t = K.gelu_table(0.05, -10, 0.03, -20)
    x = (np.arange(-128, 128) + 10) * 0.05
    g = 0.5 * x * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert np.abs((t.astype(float) + 20) * 0.03 - np.clip(g, -108 * 0.03, 147 * 0.03)).max() <= 0.015 + 1e-9


def test_unknown_kernel_and_bad_argument_are_refused(ck):
    with pytest.raises(TinyshieldError, match="no numpy reference"):
        ck["no_such_kernel"]
    with pytest.raises(TinyshieldError, match="contiguous int8"):
        ck["lut_s8"](np.zeros(4, np.float32), np.zeros(256, np.int8), np.zeros(4, np.int8), 4)


@SETTINGS
@given(st.data())
def test_embedding_clr(ck, data):
    d = data.draw
    dd, k = d(st.integers(1, 9)), d(st.integers(1, 4))
    sizes = [d(st.integers(1, 5)) for _ in range(k)]
    V = sum(sizes)
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    slot = rng.permutation(V).astype(np.uint16)
    rows, u, v, vm, start = [], [], [], [], 0
    for n in sizes:
        dense, r = d(st.booleans()), d(st.integers(1, 6))
        rows += [start, n, dd if dense else r, int(dense), sum(map(len, u)), sum(map(len, v)), sum(map(len, vm)),
                 d(shift), d(shift)]
        u.append(i8(d, n * (dd if dense else r)))
        if not dense:
            v.append(i8(d, r * dd))
            vm.append(np.array([d(mult) for _ in range(dd)], np.int32))
        start += n
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    L = d(st.integers(1, 6))
    ids = rand(d, L, -2, V + 2, np.int32)
    args = [ids, slot, np.array(rows, np.int32), cat(u, np.int8), cat(v, np.int8),
            np.array([d(mult) for _ in range(V)], np.int32), cat(vm, np.int32), np.zeros(L * dd, np.int8), L, dd, V, k]
    both(ck, "embedding_clr_s8", args, [7])


# ---------------------------------------------------------------- elementwise, copies, layout

def act_range(d):
    lo = d(st.integers(-128, 127))
    return d(st.sampled_from([(-128, 127), (lo, d(st.integers(lo, 127)))]))


@SETTINGS
@given(st.data())
def test_add_mul(ck, data):
    d = data.draw
    b_n = d(st.integers(1, 9))
    n = b_n * d(st.integers(1, 6))
    b_n = d(st.sampled_from([b_n, n]))          # a row broadcast over rows, or the plain case
    lo, hi = act_range(d)
    if d(st.booleans()):                        # realistic: TFLite's multipliers for random scales
        p = K.add_params(*(d(st.floats(1e-4, 1.0)) for _ in range(3)))
        add_m = [p[k] for k in ("a_mult", "a_shift", "b_mult", "b_shift", "y_mult", "y_shift")]
    else:                                       # anything, including sums that saturate int32
        add_m = [d(smult), d(shift), d(smult), d(shift), d(smult), d(shift)]
    a, b = i8(d, n), i8(d, b_n)
    both(ck, "add_s8", [a, b, np.zeros(n, np.int8), n, b_n, d(zp), d(zp), *add_m, d(zp), lo, hi], [2])
    both(ck, "mul_s8", [a, b, np.zeros(n, np.int8), n, b_n, d(zp), d(zp), d(smult), d(shift), d(zp), lo, hi], [2])


@SETTINGS
@given(st.data())
def test_requant(ck, data):
    d = data.draw
    rows, cols = d(st.integers(0, 5)), d(st.integers(0, 12))
    xs, ys = cols + d(st.integers(0, 5)), cols + d(st.integers(0, 5))
    z = d(zp)
    q = d(st.sampled_from([(1 << 30, 1, z, z), (1 << 30, 1, d(zp), d(zp)), (d(smult), d(shift), d(zp), d(zp))]))
    m, s, x_zp, y_zp = q
    args = [i8(d, max(rows * xs, 1)), rand(d, max(rows * ys, 1), -128, 127, np.int8), rows, cols, xs, ys,
            x_zp, m, s, y_zp]
    both(ck, "requant_s8", args, [1])        # rows of y outside the copy stay as they were, in both


@SETTINGS
@given(st.data())
def test_permute(ck, data):
    d = data.draw
    nd = d(st.one_of(st.just(6), st.integers(0, 5)))      # all six often: every odometer wheel turns
    shape = [d(st.integers(1, 3)) for _ in range(nd)]
    src = shape[:]
    if d(st.booleans()):                        # a transpose of a contiguous tensor
        perm = d(st.permutations(range(nd)))
        cstr = [int(np.prod(src[k + 1:])) for k in range(nd)]
        shape, strides = [src[p] for p in perm], [cstr[p] for p in perm]
    else:                                       # any strides: slices, overlapping windows, broadcasts
        strides = [d(st.integers(0, 20)) for _ in range(nd)]
    size = sum((n - 1) * t for n, t in zip(shape, strides)) + 1
    out = int(np.prod(shape))
    raw = np.array([1] * (6 - nd) + shape + [0] * (6 - nd) + strides, np.int32)   # as given, unmerged
    dims = d(st.sampled_from([raw, K.permute_dims(shape, strides)]))
    x = i8(d, size)
    a = both(ck, "permute_s8", [x, np.full(out + 3, 55, np.int8), dims, d(st.sampled_from([nd, 6]))], [1])
    ref = np.lib.stride_tricks.as_strided(x, shape, [t * x.strides[0] for t in strides])
    assert np.array_equal(a[1][:out], ref.ravel()) and (a[1][out:] == 55).all()


def test_add_approximates_float_add():
    from base import quant as Q
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(8, 16)) * 2, rng.normal(size=16) * 0.3     # b broadcast over the rows of a
    qa, qb = Q.choose_activation_qparams(a.min(), a.max()), Q.choose_activation_qparams(b.min(), b.max())
    s = a + b
    qy = Q.choose_activation_qparams(s.min(), s.max())
    xa, xb = Q.quantize(a, qa.scale, qa.zero_point), Q.quantize(b, qb.scale, qb.zero_point)
    y = np.zeros(a.size, np.int8)
    K.add_s8(xa.ravel(), xb, y, a.size, b.size, qa.zero_point, qb.zero_point,
             **K.add_params(qa.scale, qb.scale, qy.scale), y_zp=qy.zero_point, act_min=-128, act_max=127)
    exact = Q.dequantize(xa, qa.scale, qa.zero_point) + Q.dequantize(xb, qb.scale, qb.zero_point)
    ref = Q.quantize(exact, qy.scale, qy.zero_point).astype(np.int64)
    assert np.abs(y.reshape(8, 16).astype(np.int64) - ref).max() <= 1


def test_requant_identity_is_a_copy_and_concatenates(ck):
    from base.quant import quantize_multiplier
    rng = np.random.default_rng(3)
    m, s = quantize_multiplier(1.0)
    assert (m, s) == (1 << 30, 1)
    x = rng.integers(-128, 128, size=3 * 5).astype(np.int8)
    y = rng.integers(-128, 128, size=3 * 5).astype(np.int8)
    for run in (K.KERNELS["requant_s8"], ck["requant_s8"]):
        out = np.zeros(3 * 10, np.int8)
        run(x, out, 3, 5, 5, 10, 9, m, s, 9)            # left half of a concatenation along columns
        run(y, out[5:], 3, 5, 5, 10, -4, m, s, -4)      # right half (the slice is a view: same memory)
        assert np.array_equal(out.reshape(3, 10), np.concatenate([x.reshape(3, 5), y.reshape(3, 5)], axis=1))


def test_permute_dims_merges_and_refuses():
    # a (2, 3, 4) contiguous tensor read as is: one row of 24
    assert K.permute_dims([2, 3, 4], [12, 4, 1]).tolist() == [1] * 5 + [24] + [0] * 5 + [1]
    # NCHW -> NHWC of (1, 2, 3, 4): the size-1 batch goes, H and W merge
    assert K.permute_dims([1, 3, 4, 2], [24, 4, 1, 12]).tolist() == [1] * 4 + [12, 2] + [0] * 4 + [1, 12]
    with pytest.raises(TinyshieldError, match="at most 6"):
        K.permute_dims([1] * 7, [0] * 7)
    with pytest.raises(TinyshieldError, match="negative"):
        K.permute_dims([2, 2], [2, -1])
