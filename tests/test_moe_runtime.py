"""The runtime: every policy computes exactly what the all-in-RAM model computes when gating is off."""
import pytest
import torch

from base.errors import TinyshieldError
from edge.moe.adapmoe import open_runtime, parse_budget
from edge.moe.calibrate import calibrate, full_model
from edge.moe.model import MoEModel, encode
from edge.moe.runtime import Gating, MoERuntime
from edge.moe.store import write_store
from moe_tiny import CFG, TEXT



pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread per module


@pytest.fixture(scope="module")
def stores(one_thread, tmp_path_factory):
    torch.manual_seed(0)
    model = MoEModel(CFG).eval()
    return {dt: write_store(model, tmp_path_factory.mktemp(dt), int8=(dt == "int8")) for dt in ("f32", "int8")}, model


@pytest.fixture(scope="module")
def calib(stores):
    return calibrate(stores[0]["f32"], TEXT, drop_fraction=0.5, trace_tokens=96)


def pairs(trace):
    return [tuple(sorted(trace[i:i + CFG.top_k])) for i in range(0, len(trace), CFG.top_k)]


def logits_of(rt, ids):
    rt.reset()
    return torch.stack([rt.step(int(t)) for t in ids])


def test_runtime_matches_the_batched_model(stores):
    s, model = stores
    with MoERuntime(s["f32"], "ram") as rt:
        got = logits_of(rt, TEXT[:CFG.context])
    with torch.no_grad():
        ref = model(TEXT[None, :CFG.context])[0]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_every_policy_equals_all_in_ram_without_gating(stores, calib, dtype):
    store = stores[0][dtype]
    ids = TEXT[:CFG.context]
    with MoERuntime(store, "ram") as rt:
        ref = logits_of(rt, ids)
        trace = list(rt.stats.trace)
    third = store.total_bytes // 3
    cases = [("on-demand", {}), ("lru", {}), ("lfu", {}), ("belady", {"trace": trace}),
             ("adapmoe", {"gating": False, "prefetch": True, "calibration": calib}),
             ("adapmoe", {"gating": False, "prefetch": False, "calibration": calib})]
    for policy, opts in cases:
        for budget in (0, store.expert_bytes, third):
            with open_runtime(store, policy, budget, **opts) as rt:
                got = logits_of(rt, ids)
                # the same experts per layer pass (resident ones are served first, so the order may differ)
                assert pairs(rt.stats.trace) == pairs(trace)
                assert rt.cache.used <= budget and rt.cache.stats.peak_bytes <= budget
            assert torch.equal(got, ref), (policy, budget)
    if dtype == "int8":  # the int8 store equals the full model rebuilt from the same int8 weights
        with torch.no_grad():
            torch.testing.assert_close(full_model(store)(ids[None])[0], ref, atol=2e-5, rtol=1e-4)


def test_hits_misses_and_bytes_add_up(stores):
    store = stores[0]["f32"]
    with MoERuntime(store, "lru", store.total_bytes // 2) as rt:
        s = rt.score(TEXT[:97])
    assert s.tokens == 96 and s.accesses == 96 * CFG.layers * CFG.top_k
    assert s.hits + s.misses == s.accesses and 0 < s.hits < s.accesses
    file_bytes = store.manifest["experts"]["0/0"]["file_bytes"]
    assert s.bytes_read == s.misses * file_bytes
    with MoERuntime(store, "on-demand", store.total_bytes) as rt:
        assert rt.score(TEXT[:33]).hits == 0


def test_gating_drops_second_experts_by_sensitivity(stores, calib):
    store = stores[0]["f32"]
    assert len(calib.sensitivity) == CFG.layers and all(s > 0 for s in calib.sensitivity)
    with MoERuntime(store, "ram") as rt:
        full = rt.score(TEXT[:97])
    with MoERuntime(store, "ram", gating=calib.gating()) as rt:
        gated = rt.score(TEXT[:97])
    assert gated.experts_activated < full.experts_activated
    with MoERuntime(store, "ram", gating=Gating([1.0] * CFG.layers, 0.0)) as rt:
        assert rt.score(TEXT[:97]).experts_activated == full.experts_activated  # T = 0 keeps everything
    slots = calib.slots(6, gated=True)
    assert sum(slots) <= 6 and min(slots) >= 1


def test_prefetch_counts_and_generation(stores, calib):
    store = stores[0]["f32"]
    with open_runtime(store, "adapmoe", store.total_bytes // 2, calibration=calib) as rt:
        out = rt.generate(encode("It was"), 70, seed=1)  # crosses the 48-token context: slides
        s = rt.stats
    assert len(out) == 6 + 70 and s.prefetch_issued > 0
    assert 0 <= s.prefetch_used <= s.prefetch_issued
    assert s.hits + s.late + s.misses == s.accesses
    assert s.predictions == s.tokens * (CFG.layers - 1) and 0 <= s.predictions_right <= s.predictions
    assert not rt.prefetcher.thread.is_alive()


def test_bad_inputs(stores):
    store = stores[0]["f32"]
    with pytest.raises(TinyshieldError, match="unknown policy 'mru'"):
        open_runtime(store, "mru", 1000)
    with pytest.raises(TinyshieldError, match="belady is offline-only"):
        MoERuntime(store, "belady", 1000)
    with pytest.raises(TinyshieldError, match="prompt is empty"):
        MoERuntime(store, "ram").generate(encode(""), 3)
    with pytest.raises(TinyshieldError, match="cannot read budget"):
        parse_budget("four megabytes", 100)
    with pytest.raises(TinyshieldError, match="more than 100%"):
        parse_budget("120%", 100)
    assert parse_budget("4MB", 0) == 4 << 20 and parse_budget("2KiB", 0) == 2048 and parse_budget("25%", 400) == 100
