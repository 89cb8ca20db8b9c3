"""The tiled attention kernel equals the untiled kernels (matmul_qk_s8 + softmax_s16 + matmul_pv_s8)
bit for bit, for any key tile, with masks, zero points and saturating scales."""
import numpy as np
from hypothesis import given, settings, strategies as st

import mcu.tiled  # noqa: F401  (registers the tiled kernels)
from mcu.kernels import KERNELS, exp_lut
from mcu.tiled import attention_scratch


def untiled(q, k, v, mask, lut, Lq, Lk, dh, zp, qk, pv):
    s = np.zeros(Lq * Lk, np.int8)
    p = np.zeros(Lq * Lk, np.int16)
    y = np.zeros(Lq * dh, np.int8)
    KERNELS["matmul_qk_s8"](q, k, s, Lq, Lk, dh, dh, dh, Lk, zp[0], zp[1], *qk)
    KERNELS["softmax_s16"](s, mask, lut, p, Lq, Lk, Lk, Lk)
    KERNELS["matmul_pv_s8"](p, v, y, Lq, Lk, dh, Lk, dh, dh, zp[2], *pv)
    return y


def tiled(q, k, v, mask, lut, Lq, Lk, dh, kt, zp, qk, pv):
    sc = attention_scratch(Lq, min(kt, Lk), dh)
    y = np.zeros(Lq * dh, np.int8)
    KERNELS["attention_s8"](q, k, v, mask, lut, y, np.zeros(sc["s_tile"], np.int8),
                            np.zeros(sc["acc"] // 4, np.int32), np.zeros(sc["stats"] // 4, np.int32),
                            Lq, Lk, dh, kt, dh, dh, dh, dh, zp[0], zp[1], *qk, zp[2], *pv)
    return y


@st.composite
def attention_case(draw):
    Lq, Lk, dh = draw(st.integers(1, 9)), draw(st.integers(1, 17)), draw(st.integers(1, 12))
    kt = draw(st.integers(1, Lk + 3))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    extreme = draw(st.booleans())          # saturating values: all +-127/-128
    gen = (lambda n: rng.choice(np.array([-128, 127], np.int8), n)) if extreme else \
        (lambda n: rng.integers(-128, 128, n).astype(np.int8))
    q, k, v = gen(Lq * dh), gen(Lk * dh), gen(Lk * dh)
    mask = (rng.random(Lk) < draw(st.sampled_from([0.0, 0.5, 1.0]))).astype(np.int8)
    zp = tuple(int(z) for z in rng.integers(-128, 128, 4))
    qk = (int(rng.integers(1 << 30, 1 << 31)), draw(st.integers(-20, 2)), zp[3])
    pv = (int(rng.integers(1 << 30, 1 << 31)), draw(st.integers(-24, -8)), int(rng.integers(-128, 128)))
    lut = exp_lut(draw(st.sampled_from([0.01, 0.1, 0.7])))
    return q, k, v, mask, lut, Lq, Lk, dh, kt, zp, qk, pv


@settings(max_examples=120, deadline=None)
@given(attention_case())
def test_tiled_attention_equals_untiled(case):
    q, k, v, mask, lut, Lq, Lk, dh, kt, zp, qk, pv = case
    want = untiled(q, k, v, mask, lut, Lq, Lk, dh, zp, qk, pv)
    got = tiled(q, k, v, mask, lut, Lq, Lk, dh, kt, zp, qk, pv)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(attention_case(), st.sampled_from(["portable", "dsp"]))
def test_tiled_attention_c_equals_numpy(case, variant):
    q, k, v, mask, lut, Lq, Lk, dh, kt, zp, qk, pv = case
    want = tiled(q, k, v, mask, lut, Lq, Lk, dh, kt, zp, qk, pv)
    c = _host(variant)["attention_s8"]
    sc = attention_scratch(Lq, min(kt, Lk), dh)
    y = np.zeros(Lq * dh, np.int8)
    c(q, k, v, mask, lut, y, np.zeros(sc["s_tile"], np.int8), np.zeros(sc["acc"] // 4, np.int32),
      np.zeros(sc["stats"] // 4, np.int32), Lq, Lk, dh, kt, dh, dh, dh, dh, zp[0], zp[1], *qk, zp[2], *pv)
    np.testing.assert_array_equal(y, want)


_HOST = {}


def _host(variant):
    from mcu.hostlib import HostKernels
    if variant not in _HOST:
        _HOST[variant] = HostKernels(variant)
    return _HOST[variant]
