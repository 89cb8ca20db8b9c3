"""Past AdapMoE: cache-aware routing, cheap misses from low-precision copies, least-stale eviction,
and errors mid-generation that leave the cache consistent."""
import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from base.errors import TinyshieldError
from edge.moe.cache import replay
from edge.moe.calibrate import calibrate_margin
from edge.moe.policies import Belady, LayerLRU, LeastStale, even_slots
from edge.moe.routing import cache_aware_route, within_margin
from edge.moe.runtime import MoERuntime
from edge.moe.store import ExpertStore, quantize_int4, unpack_int4, write_store
from moe_tiny import CFG, TEXT, model, store  # noqa: F401 (model, store: the shared fixtures)



pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread per module


@settings(max_examples=300, deadline=None)
@given(logits=st.lists(st.integers(-64, 64), min_size=4, max_size=16, unique=True),
       resident_bits=st.integers(0, 2 ** 16 - 1), m=st.integers(-1, 32), k=st.integers(1, 3))
def test_cache_aware_routing_never_leaves_the_margin(logits, resident_bits, m, k):
    # logits on a 1/8 grid and margins off it by 1/16: no ties, so "plain top-k" is well defined
    x = torch.tensor(logits, dtype=torch.float32) / 8
    margin = 0.0 if m < 0 else m / 8 + 1 / 16
    resident = torch.tensor([(resident_bits >> i) & 1 == 1 for i in range(len(logits))])
    idx, w = cache_aware_route(x, k, resident, margin)
    assert len(set(idx)) == k and within_margin(x, idx, k, margin)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and bool((w[:-1] >= w[1:]).all())
    plain = set(x.topk(k).indices.tolist())
    # every swap brings in a resident expert for a non-resident one
    assert all(resident[e] for e in set(idx) - plain) and all(not resident[e] for e in plain - set(idx))
    if margin == 0:
        assert set(idx) == plain


def test_runtime_routing_stays_within_margin_and_raises_hits(store):
    ids = TEXT[:CFG.context]
    budget = store.total_bytes // 3
    with MoERuntime(store, "lru", budget) as rt:
        plain = rt.score(ids)
    seen = []  # what each router said, in order: the runtime's choices are checked against it

    def recorder(module, args, out):
        seen.append(out[0].detach().clone())

    with MoERuntime(store, "lru", budget, route_margin=1.0) as rt:
        for b in rt.model.blocks:
            b.moe.router.register_forward_hook(recorder)
        aware = rt.score(ids)
    assert aware.reroutes > 0 and aware.hit_rate > plain.hit_rate
    chosen = [aware.trace[i:i + CFG.top_k] for i in range(0, len(aware.trace), CFG.top_k)]
    assert len(chosen) == len(seen)
    for logits, pair in zip(seen, chosen):
        assert within_margin(logits, [e for _, e in pair], CFG.top_k, 1.0)


def test_int4_packing_round_trips():
    torch.manual_seed(1)
    w = torch.randn(48, 32)
    q, s = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (24, 32)
    full = unpack_int4(q)
    assert full.dtype == torch.int8 and full.abs().max() <= 7
    assert torch.equal(unpack_int4(q), torch.round(w / s).clamp(-7, 7).to(torch.int8))
    err = ((full.float() * s - w).norm() / w.norm()).item()
    assert err < 0.2  # 15 levels with an MSE-chosen clip: ~0.15 on Gaussian weights


def test_low_precision_copies_round_trip_and_are_checksummed(store, model):
    h = torch.randn(1, CFG.dim)
    ref = torch.nn.functional.gelu(h @ model.blocks[2].moe.w1[1]) @ model.blocks[2].moe.w2[1]
    errs = {}
    for prec, bytes_frac in (("int8", 0.3), ("int4", 0.2)):  # 1/4, 1/8 + scales and header
        ent = store.entry((2, 1), prec)
        blob = (store.root / ent["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == ent["sha256"] and len(blob) == ent["file_bytes"]
        assert ent["file_bytes"] < bytes_frac * store.entry((2, 1))["file_bytes"]
        x = store.read((2, 1), prec)
        assert x.precision == prec and x.w1.dtype == (torch.int8 if prec == "int8" else torch.uint8)  # int4: packed
        # the int8 multiply (scales on the outputs) equals multiplying the dequantised weights
        w1, w2 = x.weights()
        torch.testing.assert_close(x.ffn(h), torch.nn.functional.gelu(h @ w1) @ w2, atol=1e-5, rtol=1e-4)
        errs[prec] = ((x.ffn(h) - ref).norm() / ref.norm()).item()
    assert errs["int8"] < 0.03 and errs["int8"] < errs["int4"] < 0.35
    f = store.root / store.entry((0, 3), "int4")["file"]
    good = f.read_bytes()
    try:
        bad = bytearray(good)
        bad[-3] ^= 0x0F
        f.write_bytes(bytes(bad))
        with pytest.raises(TinyshieldError, match=r"expert L0E3 \(int4 copy\): checksum mismatch"):
            store.read((0, 3), "int4")
        store.read((0, 3))  # the full expert is its own file, still good
    finally:
        f.write_bytes(good)


def test_cheap_misses_read_low_precision_copies(store):
    ids = TEXT[:CFG.context]
    budget = store.total_bytes // 3
    with MoERuntime(store, "lru", budget) as rt:
        full = rt.score(ids)
    with MoERuntime(store, "lru", budget, lowp="int4", lowp_max_weight=1.0) as rt:
        cheap = rt.score(ids)
        for v in rt.cache.items.values():  # the cache holds packed int4 and float32 experts, within budget
            assert v.precision in ("float32", "int4")
        assert rt.cache.used == sum(rt.cache.sizes.values()) <= budget
    assert cheap.lowp_reads > 0 and cheap.bytes_read < full.bytes_read
    assert cheap.hits + cheap.misses == cheap.accesses
    assert abs(cheap.perplexity / full.perplexity - 1) < 0.2  # a random model: bounded, not free
    with pytest.raises(TinyshieldError, match="low-precision copy 'int2' is not in the store"):
        MoERuntime(store, "lru", budget, lowp="int2")


def test_least_stale_beats_global_lru_on_the_layer_cycle(store):
    with MoERuntime(store, "ram") as rt:
        trace = list(rt.score(TEXT[:97]).trace)
    for slots in (3, 6, 9):
        ls = replay(trace, slots, LeastStale(CFG.layers)).hits
        assert ls <= replay(trace, slots, Belady(trace)).hits
        assert ls >= replay(trace, slots, LayerLRU(even_slots(CFG.layers, CFG.experts, slots))).hits * 0.9
    with MoERuntime(store, "least-stale", store.total_bytes // 2) as rt:
        s = rt.score(TEXT[:49])
    assert s.hits + s.misses == s.accesses and rt.cache.used <= store.total_bytes // 2


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_expert_file_mid_generation_is_a_clear_error_and_cache_stays_consistent(model, tmp_path, damage):
    store = write_store(model, tmp_path)
    budget = store.total_bytes // 2
    with MoERuntime(store, "ram") as rt:
        trace = rt.score(TEXT[:33]).trace
    victim = max(set(trace), key=trace.index)  # the expert first needed last
    first = trace.index(victim)
    assert first >= 2 * CFG.layers * CFG.top_k
    f = store.root / store.entry(victim)["file"]
    if damage == "corrupt":
        blob = bytearray(f.read_bytes())
        blob[-7] ^= 0xFF
        f.write_bytes(bytes(blob))
        msg = rf"expert L{victim[0]}E{victim[1]}: checksum mismatch"
    else:
        f.unlink()
        msg = rf"expert L{victim[0]}E{victim[1]}: file .* is missing"
    rt = MoERuntime(ExpertStore(store.root), "lru", budget)
    with pytest.raises(TinyshieldError, match=msg):
        rt.score(TEXT[:33])
    # it failed mid-generation, on that expert's first read
    assert rt.stats.tokens >= 2 and rt.stats.trace[-1] == victim and victim not in rt.stats.trace[:-1]
    assert victim not in rt.cache.items
    assert rt.cache.used == sum(rt.cache.sizes.values()) <= budget and set(rt.cache.sizes) == set(rt.cache.items)
    for k, v in rt.cache.items.items():  # what stayed cached is intact and usable
        assert v.w1.shape == (CFG.dim, CFG.ffn)
    rt.close()


def test_margin_calibration_keeps_perplexity(store):
    cal = calibrate_margin(store, TEXT, "lru", store.total_bytes // 3, candidates=(0.5, 1.0, 4.0),
                           max_ppl_increase=0.01, tokens=96)
    assert cal.margin in (0.0, 0.5, 1.0, 4.0)
    ok = [s for s in cal.sweep if s["within_budget"]]
    assert all(s["perplexity"] <= cal.top2_perplexity * 1.01 for s in ok)
    assert (cal.margin == 0.0) == (not ok)
