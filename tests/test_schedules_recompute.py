"""Recomputed K/V: attention that projects its key/value rows from the layer input per query block
(`attention_kv_s8`) equals the stored-K/V kernels, and a schedule that recomputes them equals the
layerwise schedule bit for bit in a planned arena that passes `planner.check`, in 2 L d + scratch."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from base.errors import TinyshieldError
from edge.models.bert import BertConfig, BertModel
from mcu import execute
from mcu.from_aten import lower_module
from mcu.kernels import KERNELS, exp_lut, pack_fc_weights
from mcu.planner import check, lower_bound, plan
from mcu.schedules import Tiles, layerwise, search_tiles, tiled, tiled_with
from mcu.tiled import attention_scratch, kv_macs

L, D = 24, 128


# ---------------------------------------------------------------- the kernel

@st.composite
def kv_case(draw):
    Lq, Lk, dh, d_in = draw(st.integers(1, 7)), draw(st.integers(1, 19)), draw(st.sampled_from([2, 4, 6, 8])), \
        draw(st.integers(1, 13))
    kt, pt = draw(st.integers(1, Lk + 3)), draw(st.integers(1, Lk + 3))
    x_stride = d_in + draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    i8 = lambda n: rng.integers(-128, 128, n).astype(np.int8)                  # noqa: E731
    proj = lambda: (pack_fc_weights(i8(dh * d_in).reshape(dh, d_in)), rng.integers(-5000, 5000, dh).astype(np.int32),  # noqa: E731
                    rng.integers(1 << 30, 1 << 31, dh).astype(np.int32), rng.integers(-12, -4, dh).astype(np.int32))
    mask = (rng.random(Lk) < draw(st.sampled_from([0.5, 1.0]))).astype(np.int8)
    zp = [int(z) for z in rng.integers(-128, 128, 5)]          # q, k, v, s, y
    lo = draw(st.sampled_from([-128, zp[1]]))                  # a ReLU-fused K projection clamps at its zero point
    return dict(Lq=Lq, Lk=Lk, dh=dh, d_in=d_in, kt=kt, pt=pt, x_stride=x_stride, q=i8(Lq * dh),
                x=i8(Lk * x_stride), k=proj(), v=proj(), mask=mask, lut=exp_lut(draw(st.sampled_from([0.01, 0.1, 0.7]))),
                zp=zp, lo=lo, qk=(int(rng.integers(1 << 30, 1 << 31)), draw(st.integers(-20, 2))),
                pv=(int(rng.integers(1 << 30, 1 << 31)), draw(st.integers(-24, -8))))


def run_kv(c, fn):
    sc = attention_scratch(c["Lq"], min(c["kt"], c["Lk"]), c["dh"])
    y = np.zeros(c["Lq"] * c["dh"], np.int8)
    zq, zk, zv, zs, zy = c["zp"]
    fn(c["q"], c["x"], *c["k"], *c["v"], c["mask"], c["lut"], y, np.zeros(sc["s_tile"], np.int8),
       np.zeros(sc["acc"] // 4, np.int32), np.zeros(sc["stats"] // 4, np.int32),
       np.zeros(min(c["pt"], c["Lk"]) * c["dh"], np.int8), c["Lq"], c["Lk"], c["dh"], c["kt"], c["pt"], c["d_in"],
       c["dh"], c["x_stride"], c["dh"], c["lo"], 127, -128, 127, zq, zk, *c["qk"], zs, zv, *c["pv"], zy)
    return y


def stored_kv(c):
    """The same head from stored K and V: fc_s8 over all rows, then attention_s8."""
    Lk, dh, d_in = c["Lk"], c["dh"], c["d_in"]
    zq, zk, zv, zs, zy = c["zp"]
    k, v = np.zeros(Lk * dh, np.int8), np.zeros(Lk * dh, np.int8)
    KERNELS["fc_s8"](c["x"], *c["k"], k, Lk, d_in, dh, c["x_stride"], dh, zk, c["lo"], 127)
    KERNELS["fc_s8"](c["x"], *c["v"], v, Lk, d_in, dh, c["x_stride"], dh, zv, -128, 127)
    sc = attention_scratch(c["Lq"], Lk, dh)
    y = np.zeros(c["Lq"] * dh, np.int8)
    KERNELS["attention_s8"](c["q"], k, v, c["mask"], c["lut"], y, np.zeros(sc["s_tile"], np.int8),
                            np.zeros(sc["acc"] // 4, np.int32), np.zeros(sc["stats"] // 4, np.int32),
                            c["Lq"], Lk, dh, Lk, dh, dh, dh, dh, zq, zk, *c["qk"], zs, zv, *c["pv"], zy)
    return y


@settings(max_examples=60, deadline=None)
@given(kv_case(), st.sampled_from(["numpy", "portable", "dsp"]))
def test_attention_kv_equals_stored_kv(c, variant):
    from mcu.hostlib import HostKernels
    fn = KERNELS["attention_kv_s8"] if variant == "numpy" else HostKernels(variant).function("attention_kv_s8")
    np.testing.assert_array_equal(run_kv(c, fn), stored_kv(c))


# ---------------------------------------------------------------- the schedule

@pytest.fixture(scope="module")
def bert():
    """A BERT-tiny-shaped encoder (d=128, 2 heads, FFN 512, 2 layers), random weights, int8, padded."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (6, L))
    ids[:, L - 5:] = 0
    g = lower_module(BertModel(BertConfig(vocab_size=300, max_position_embeddings=64)), ids)
    x = ids[0].astype(np.int32)
    return g, x, execute.run(layerwise(g), {"input": x})["output"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, L + 2), kt=st.integers(1, L + 2), recompute=st.sampled_from([(0,), (1,), (0, 1)]))
def test_recompute_equals_layerwise_bit_for_bit(bert, rows, kt, recompute):
    g, x, want = bert
    s = tiled_with(g, Tiles(rows, kt, recompute))
    p = plan(s)
    check(p, s)
    # executed inside ONE arena at the planned offsets: a bad plan or alias would corrupt it
    np.testing.assert_array_equal(execute.run(s, {"input": x}, plan=p)["output"], want)


@pytest.mark.parametrize("variant", ["portable", "dsp"])
def test_recompute_in_c_equals_layerwise(bert, variant):
    from mcu.hostlib import HostKernels
    g, x, want = bert
    s = tiled_with(g, Tiles(5, 8, (0, 1)))
    got = execute.run(s, {"input": x}, plan=plan(s), kernels=HostKernels(variant))["output"]
    np.testing.assert_array_equal(got, want)


def test_recompute_memory_and_macs(bert):
    g, _, _ = bert
    for rows, kt in ((4, 8), (6, L)):
        keep, rec = tiled_with(g, Tiles(rows, kt)), tiled_with(g, Tiles(rows, kt, (0, 1)))
        assert not any(b.endswith(("key.out", "value.out")) for b in rec.buffers)     # K and V never stored
        assert any(b.endswith(("key.out", "value.out")) for b in keep.buffers)
        assert 2 * L * D <= lower_bound(rec) < lower_bound(keep)
        assert {c.kernel for c in rec.calls} >= {"attention_kv_s8"} and "attention_s8" not in {c.kernel for c in rec.calls}
        # the K/V projections (2 L d^2 per layer) move into attention, once per pass and query block
        blocks = -(-L // rows)
        extra = 2 * (blocks * 2 * kv_macs(L, D, D // 2, kt) - 2 * L * D * D)
        assert rec.macs() == keep.macs() + extra


def test_search_recomputes_only_when_keeping_does_not_fit(bert):
    g, _, _ = bert
    keep_least = min(c.peak for c in search_tiles(g, kv="keep").candidates)
    roomy = search_tiles(g, budget=keep_least)
    assert roomy.fits and roomy.chosen.recompute == ()
    tight = search_tiles(g, budget=keep_least - 1)
    assert tight.fits and tight.chosen.recompute and tight.chosen.peak < keep_least
    assert search_tiles(g, budget=keep_least - 1, kv="keep").fits is False
    forced = tiled(g, budget=10**6, kv="recompute")
    assert forced.params["recompute"] == [0, 1]
    rec_least = min(c.peak for c in search_tiles(g, kv="recompute").candidates)
    assert not search_tiles(g, budget=rec_least - 1).fits


def test_recompute_of_a_missing_layer_is_refused(bert):
    g, _, _ = bert
    with pytest.raises(TinyshieldError, match="no attention layer 2 .* 0..1"):
        tiled_with(g, Tiles(4, 8, (2,)))
