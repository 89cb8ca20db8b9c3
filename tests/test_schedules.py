"""Schedules: the tiled schedule computes exactly what the layerwise one does, in far less memory."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from base.errors import TinyshieldError
from edge.models.bert import BertConfig, BertModel
from mcu import execute
from mcu.from_aten import lower_module
from mcu.planner import check, lower_bound, plan
from mcu.profile import check_budget, profile
from mcu.schedules import SLACK, Tiles, layerwise, search_tiles, tiled, tiled_with

L = 24


@pytest.fixture(scope="module")
def bert():
    """A BERT-tiny-shaped encoder (d=128, 2 heads, FFN 512, 2 layers), random weights, int8."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=300, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (6, L))
    ids[:, L - 5:] = 0                       # padding: the masked keys must stay masked when tiled
    g = lower_module(BertModel(cfg), ids)
    x = ids[0].astype(np.int32)
    return g, x, execute.run(layerwise(g), {"input": x})["output"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, L + 2), kt=st.integers(1, L + 2))
def test_tiled_equals_layerwise_bit_for_bit(bert, rows, kt):
    g, x, want = bert
    s = tiled_with(g, Tiles(rows, kt))
    p = plan(s)
    check(p, s)
    assert p.arena_bytes >= lower_bound(s)
    # executed inside ONE arena at the planned offsets: a bad plan or alias would corrupt it
    got = execute.run(s, {"input": x}, plan=p)["output"]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", ["portable", "dsp"])
def test_tiled_in_c_equals_numpy(bert, variant):
    """The C kernels (host build) run the tiled schedule in one planned arena, in-place rows included."""
    from mcu.hostlib import HostKernels
    g, x, want = bert
    s = tiled_with(g, Tiles(5, 8))
    got = execute.run(s, {"input": x}, plan=plan(s), kernels=HostKernels(variant))["output"]
    np.testing.assert_array_equal(got, want)


def test_tiled_structure_and_memory(bert):
    g, _, _ = bert
    lw, t = layerwise(g), tiled_with(g, Tiles(4, 8))
    kernels = {c.kernel for c in t.calls}
    assert "attention_s8" in kernels and not kernels & {"matmul_qk_s8", "softmax_s16", "matmul_pv_s8"}
    assert not any("scores" in b or "probs" in b for b in t.buffers)      # the L x L tensors never exist
    d = 128
    floor = 3 * L * d
    assert lower_bound(t) < lower_bound(lw) / 2
    assert lower_bound(t) >= floor                                        # X, K, V of all tokens
    assert t.macs() > lw.macs()                                           # kt < L: scores recomputed
    assert tiled_with(g, Tiles(4, L)).macs() == lw.macs()                 # one key tile: no recompute


def test_search_respects_budget(bert):
    g, _, _ = bert
    s = search_tiles(g, budget=None)
    small = min(c.peak for c in s.candidates)
    assert s.chosen.peak <= small * SLACK
    assert search_tiles(g, budget=None, slack=1.0).chosen.peak == small
    tight = search_tiles(g, budget=small - 1, kv="keep")   # nothing fits: the smallest peak, to be refused
    assert not tight.fits and tight.chosen.peak == small
    roomy = search_tiles(g, budget=10**6)
    assert roomy.fits and roomy.chosen.macs == min(c.macs for c in roomy.candidates)
    sched = tiled(g, budget=small)
    assert lower_bound(sched) <= small and sched.params["fits"]


def test_budget_refusal_names_peak_op_bytes_and_budget(bert):
    g, _, _ = bert
    prof = profile(layerwise(g))
    with pytest.raises(TinyshieldError) as e:
        check_budget(prof, 4096, "stm32f405")
    msg = str(e.value)
    assert f"{prof.arena_bytes:,} B" in msg and "4,096 B" in msg and "stm32f405" in msg
    assert prof.steps[prof.peak_step].op in msg
    check_budget(prof, prof.arena_bytes, "stm32f405")                    # exactly at the budget is fine


def test_bad_tiles_refused(bert):
    g, _, _ = bert
    with pytest.raises(TinyshieldError, match="tile sizes"):
        tiled_with(g, Tiles(0, 4))


def test_tiled_vit_equals_layerwise():
    """Any BERT-block graph tiles: the ViT (conv stem, constant token mask, 49 tokens, 4 heads)."""
    from edge.models.vit import ViT, ViTConfig
    from base.data import image_batch
    torch.manual_seed(1)
    imgs = np.random.default_rng(1).integers(0, 256, (8, 28, 28)).astype(np.uint8)
    g = lower_module(ViT(ViTConfig(num_hidden_layers=2)), image_batch(imgs))
    x = (imgs[0].astype(np.int16) - 128).astype(np.int8).reshape(28, 28, 1)
    want = execute.run(layerwise(g), {"input": x})["output"]
    for tiles in (Tiles(7, 16), Tiles(3, 5)):
        s = tiled_with(g, tiles)
        np.testing.assert_array_equal(execute.run(s, {"input": x}, plan=plan(s))["output"], want)
        assert lower_bound(s) < lower_bound(layerwise(g))


@settings(max_examples=15, deadline=None)
@given(d_heads=st.sampled_from([(32, 1), (32, 2), (64, 4)]), layers=st.integers(1, 2),
       ffn=st.sampled_from([32, 96]), L_=st.integers(2, 14), rows=st.integers(1, 16), kt=st.integers(1, 16),
       pad=st.integers(0, 3), seed=st.integers(0, 1000))
def test_random_graphs_and_tiles(d_heads, layers, ffn, L_, rows, kt, pad, seed):
    """Random BERT shapes and tile sizes: the plan never overlaps and tiled == layerwise exactly."""
    d, h = d_heads
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=d, num_hidden_layers=layers, num_attention_heads=h,
                     intermediate_size=ffn, max_position_embeddings=16)
    ids = np.random.default_rng(seed).integers(1, 50, (3, L_))
    ids[:, L_ - min(pad, L_ - 1):] = 0
    g = lower_module(BertModel(cfg), ids)
    x = ids[0].astype(np.int32)
    s = tiled_with(g, Tiles(rows, kt))
    p = plan(s, "greedy_by_size")
    check(p, s)
    assert p.arena_bytes >= lower_bound(s)
    want = execute.run(layerwise(g), {"input": x})["output"]
    np.testing.assert_array_equal(execute.run(s, {"input": x}, plan=p)["output"], want)
