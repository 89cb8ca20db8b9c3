"""base.quant: the fixed-point helpers against a plain Python big-integer model of gemmlowp."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from base import quant as Q
from base.errors import TinyshieldError

i32 = st.integers(-(1 << 31), (1 << 31) - 1)


def srdhm_ref(a, b):
    if a == b == -(1 << 31):
        return (1 << 31) - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    v = ab + nudge
    return int(v / (1 << 31)) if abs(v) < (1 << 52) else (abs(v) >> 31) * (1 if v >= 0 else -1)


def rdbpot_ref(x, e):
    mask = (1 << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if rem > thr else 0)


@settings(max_examples=300, deadline=None)
@given(i32, i32)
def test_srdhm_matches_bigint(a, b):
    assert int(Q.saturating_rounding_doubling_high_mul(a, b)) == srdhm_ref(a, b)


@settings(max_examples=300, deadline=None)
@given(i32, st.integers(0, 31))
def test_rdbpot_rounds_half_away(x, e):
    assert int(Q.rounding_divide_by_pot(x, e)) == rdbpot_ref(x, e)
    # half away from zero, against exact rationals
    from fractions import Fraction
    f = Fraction(x, 1 << e)
    want = math.floor(abs(f) + Fraction(1, 2)) * (1 if f >= 0 else -1)
    assert int(Q.rounding_divide_by_pot(x, e)) == want


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-9, 1e9, allow_nan=False))
def test_quantize_multiplier_represents_real(r):
    m, s = Q.quantize_multiplier(r)
    if m == 0:
        assert r < 2 ** -31
        return
    assert (1 << 30) <= m < (1 << 31)
    assert abs(m * 2.0 ** (s - 31) - r) <= r * 2 ** -30


@settings(max_examples=300, deadline=None)
@given(i32, st.floats(1e-6, 4.0))
def test_mbqm_vectorised_equals_scalar_and_is_close(x, r):
    m, s = Q.quantize_multiplier(r)
    xs = np.array([x, -x if x != -(1 << 31) else 0, 0], dtype=np.int64)
    got = Q.multiply_by_quantized_multiplier(xs, m, s)
    left = max(s, 0)
    for v, g in zip(xs, got):
        xv = max(min(int(v) << left, (1 << 31) - 1), -(1 << 31))
        assert int(g) == rdbpot_ref(srdhm_ref(xv, m), max(-s, 0))
    if abs(x * r) < 2 ** 30 and s <= 0:
        assert abs(int(got[0]) - x * r) <= 1 + abs(x * r) * 2 ** -29


def test_mbqm_per_channel_broadcast():
    acc = np.arange(-600, 600, 7, dtype=np.int64).reshape(-1, 4)
    m, s = Q.quantize_multipliers([0.01, 0.5, 1.5, 3e-5])
    got = Q.multiply_by_quantized_multiplier(acc, m, s)
    for c in range(4):
        assert np.array_equal(got[:, c], Q.multiply_by_quantized_multiplier(acc[:, c], m[c], s[c]))


def test_saturate_and_quantize():
    assert Q.saturate([300, -300, 5], np.int8).tolist() == [127, -128, 5]
    assert Q.round_half_away([0.5, -0.5, 1.5, -2.5]).tolist() == [1, -1, 2, -3]
    aq = Q.choose_activation_qparams(-1.0, 3.0)
    q = Q.quantize([-1.0, 0.0, 3.0, 100.0], aq.scale, aq.zero_point)
    assert q[1] == aq.zero_point and q[0] == -128 and q[2] == 127 and q[3] == 127


def test_weights_symmetric_per_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 5)) * np.arange(1, 9)[:, None]
    w[3] = 0
    q, s = Q.quantize_weights_per_channel(w, axis=0)
    assert q.dtype == np.int8 and q.min() >= -127 and np.abs(q).max(axis=1)[[0, 1, 2, 4]].min() == 127
    assert s[3] == 1.0 and not q[3].any()
    assert np.abs(q * s[:, None] - w).max() <= s.max() / 2 + 1e-12


def test_bad_inputs_are_refused():
    with pytest.raises(TinyshieldError, match="multiplier"):
        Q.quantize_multiplier(float("nan"))
    with pytest.raises(TinyshieldError, match="too large"):
        Q.quantize_multiplier(2.0 ** 40)
    with pytest.raises(TinyshieldError, match="not finite"):
        Q.choose_activation_qparams(-np.inf, 1.0)
    with pytest.raises(TinyshieldError, match="calibration"):
        Q.RangeObserver().range()


def _torch_rule(x, dim):
    """The torch code the CLR factors and MoE experts were first quantised with (recorded outputs)."""
    import torch

    scale = x.abs().amax(dim).clamp_min(1e-12) / 127.0
    return torch.round(x / scale.unsqueeze(dim)).clamp(-127, 127).to(torch.int8), scale.float()


def test_edge_weight_rule_is_the_recorded_torch_rule():
    """quantize_weights_f32 (CLR factors of the shipped model, MoE experts, blinded layers) gives the very
    bits of the torch code it replaced: ties to even, float32 arithmetic, zero rows, both axes."""
    import torch

    from edge.compress.clr import _quant_rows
    from edge.moe.store import quantize_int8
    from tee.blinded import quantize_weights

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 48)).astype(np.float32)
    x[3] = 0.0                                              # an all-zero channel
    x[5, :4] = [127.0, 0.5, -1.5, 2.5]                      # exact ties after the division (scale 1)
    x[:, 7] = np.linspace(-1, 1, 64, dtype=np.float32)
    t = torch.from_numpy(x)
    for got, (want_q, want_s) in ((_quant_rows(t), _torch_rule(t, 1)), (quantize_int8(t), _torch_rule(t, 0))):
        assert torch.equal(got[0], want_q) and torch.equal(got[1], want_s)
    q, s = quantize_weights(x)
    want_q, want_s = _torch_rule(t, 1)
    assert q.dtype == np.int32 and np.array_equal(q, want_q.numpy()) and np.array_equal(s, want_s.numpy())
    assert list(q[5, :4]) == [127, 0, -2, 2]                # ties to even


def test_edge_and_mcu_weight_rules_differ_only_on_ties():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 40)).astype(np.float32)
    q_mcu, s_mcu = Q.quantize_weights_per_channel(w, axis=0)
    q_edge, s_edge = Q.quantize_weights_f32(w, axis=0)
    assert np.array_equal(q_mcu, q_edge)
    assert np.allclose(s_mcu, s_edge, rtol=1e-6)
    tie = np.array([[127.0, 0.5, 2.5, -0.5]])
    assert list(Q.quantize_weights_per_channel(tie)[0][0]) == [127, 1, 3, -1]
    assert list(Q.quantize_weights_f32(tie)[0][0]) == [127, 0, 2, 0]
