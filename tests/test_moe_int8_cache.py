"""The int8 cache: every expert served from its int8 copy, so the same bytes hold four times the experts;
device profiles keep the page cache (the profile times the read), the host drops it."""
import os

import pytest
import torch

from base.errors import TinyshieldError
from edge.moe.calibrate import calibrate_margin
from edge.moe.model import MoEModel
from edge.moe.runtime import MoERuntime
from edge.moe.store import ExpertStore, quantize_int8, write_store
from moe_tiny import CFG, TEXT, model, store  # noqa: F401 (model, store: the shared fixtures)


pytestmark = pytest.mark.usefixtures("one_thread")


def int8_reference(model, store):
    """The same model with every expert replaced by its dequantised int8 copy, all in RAM."""
    ref = MoEModel(CFG)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for l, b in enumerate(ref.blocks):
            for e in range(CFG.experts):
                w1, w2 = store.read((l, e), "int8").weights()
                b.moe.w1[e], b.moe.w2[e] = w1, w2
    return ref.eval()


def test_int8_cache_holds_four_times_the_experts_and_computes_the_int8_model(model, store):
    ids = TEXT[:CFG.context + 1]
    budget = store.total_bytes // 4
    with MoERuntime(store, "lru", budget) as rt:
        full = rt.score(ids)
        full_resident = len(rt.cache.items)
    with MoERuntime(store, "lru", budget, lowp="int8", lowp_max_weight=1.0) as rt:
        s = rt.score(ids)
        assert rt.lowp_only and all(v.precision == "int8" for v in rt.cache.items.values())
        assert rt.cache.used == sum(rt.cache.sizes.values()) <= budget
        # per-layer slots are counted in int8 bytes: about four times the full experts' slots
        assert sum(rt.cache.policy.slots) == budget // store.expert_bytes_of("int8") >= 3 * (budget // store.expert_bytes)
        assert len(rt.cache.items) > 2 * full_resident
    assert s.hits + s.misses == s.accesses and s.upgrades == 0 and s.hit_rate > full.hit_rate
    assert s.lowp_reads == s.misses and s.bytes_read == s.misses * store.entry((0, 0), "int8")["file_bytes"]
    # what it computes is the int8 model, whatever the cache did
    with torch.no_grad():
        logits = int8_reference(model, store)(ids[None, :-1])[0]
    nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
    assert s.nll_sum == pytest.approx(float(nll), rel=1e-4)


def test_int8_copy_is_what_quantising_the_full_expert_gives(store):
    """The copy on storage is the full expert quantised per output channel (one quantiser, no drift)."""
    full, low = store.read((1, 2)), store.read((1, 2), "int8")
    for w, q, s in ((full.w1, low.w1, low.s1), (full.w2, low.w2, low.s2)):
        q2, s2 = quantize_int8(w)
        assert torch.equal(q, q2) and torch.equal(s, s2)


def test_prefetch_reads_int8_copies_within_its_prediction(store):
    ids = TEXT[:CFG.context + 1]
    with MoERuntime(store, "lru", store.total_bytes // 5, lowp="int8", lowp_max_weight=1.0, prefetch=True,
                    prefetch_k=2, route_margin=0.5) as rt:
        s = rt.score(ids)
        cached = dict(rt.cache.items)
    assert all(v.precision == "int8" for v in cached.values())  # prefetched ones too
    assert 0 < s.prefetch_issued <= s.tokens * (CFG.layers - 1) * 2
    assert s.hits + s.late + s.misses == s.accesses


def test_corrupt_int8_copy_mid_generation_is_named_and_cache_stays_consistent(model, tmp_path):
    store = write_store(model, tmp_path)
    with MoERuntime(store, "ram") as rt:
        trace = rt.score(TEXT[:33]).trace
    victim = max(set(trace), key=trace.index)  # first needed last: the failure comes mid-generation
    f = store.root / store.entry(victim, "int8")["file"]
    blob = bytearray(f.read_bytes())
    blob[-5] ^= 0xFF
    f.write_bytes(bytes(blob))
    rt = MoERuntime(ExpertStore(store.root, storage="qspi"), "lru", store.total_bytes // 4, lowp="int8",
                    lowp_max_weight=1.0)
    with pytest.raises(TinyshieldError, match=rf"expert L{victim[0]}E{victim[1]} \(int8 copy\): checksum mismatch"):
        rt.score(TEXT[:33])
    assert rt.stats.tokens >= 1 and rt.stats.trace[-1] == victim and victim not in rt.cache.items
    assert rt.cache.used == sum(rt.cache.sizes.values()) <= rt.cache.budget
    assert all(v.precision == "int8" for v in rt.cache.items.values())
    rt.close()


def test_device_profiles_keep_the_page_cache_and_host_drops_it(store, monkeypatch):
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (calls.append(adv), real(fd, off, n, adv)))
    ExpertStore(store.root, storage="emmc").read((0, 1), "int8")
    assert calls == []
    ExpertStore(store.root).read((0, 1), "int8")
    ExpertStore(store.root, storage="emmc", drop_cache=True).read((0, 1))
    assert calls == [os.POSIX_FADV_DONTNEED] * 2


def test_margin_calibration_is_kept_apart_per_cheap_miss_rule(store):
    kw = dict(candidates=(0.5,), tokens=48, lowp="int8")
    a = calibrate_margin(store, TEXT, "lru", store.total_bytes // 4, lowp_max_weight=1.0, **kw)
    b = calibrate_margin(store, TEXT, "lru", store.total_bytes // 4, lowp_max_weight=0.35, **kw)
    assert a.sweep[0]["hit_rate"] != b.sweep[0]["hit_rate"] or a.sweep[0]["perplexity"] != b.sweep[0]["perplexity"]
    assert len({p.name for p in store.root.glob("margin-*.json")}) >= 2
