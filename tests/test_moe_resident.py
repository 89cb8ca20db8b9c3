"""Every expert resident: packed int4 copies for the least-used experts, placed to fit the budget, read once."""
import hashlib

import pytest
import torch

from base.errors import TinyshieldError
from edge.moe.model import MoEModel
from edge.moe.placement import expert_usage, place
from edge.moe.runtime import MoERuntime
from edge.moe.store import ExpertStore, quantize_int4, unpack_int4, write_store
from moe_tiny import CFG, TEXT, model, store  # noqa: F401 (model, store: the shared fixtures)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_int4_copy_stays_packed_round_trips_and_is_checked_against_the_manifest(model, store):
    x = store.read((1, 2), "int4")
    ent = store.entry((1, 2), "int4")
    assert x.precision == "int4" and x.packed and x.w1.dtype == torch.uint8
    assert x.w1.shape == (CFG.dim // 2, CFG.ffn) and x.w2.shape == (CFG.ffn // 2, CFG.dim)
    assert x.nbytes == ent["ram_bytes"] == store.expert_bytes_of("int4") < store.expert_bytes_of("int8") * 0.6
    blob = (store.root / ent["file"]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == ent["sha256"] and len(blob) == ent["file_bytes"]
    # the copy is the full expert quantised by quantize_int4 (one quantiser)
    for w, q, s in ((model.blocks[1].moe.w1[2], x.w1, x.s1), (model.blocks[1].moe.w2[2], x.w2, x.s2)):
        q2, s2 = quantize_int4(w.detach())
        assert torch.equal(q, q2) and torch.equal(s, s2)
    # multiplying the packed planes is multiplying the unpacked weights
    h = torch.randn(3, CFG.dim)
    w1, w2 = x.weights()
    torch.testing.assert_close(w1, unpack_int4(x.w1).float() * x.s1)
    torch.testing.assert_close(x.ffn(h), torch.nn.functional.gelu(h @ w1) @ w2, atol=1e-5, rtol=1e-4)


def test_placement_demotes_the_least_used_until_the_bytes_fit(store):
    keys = store.keys()
    usage = {k: float(i + 1) for i, k in enumerate(reversed(keys))}  # the last key is the least used
    b8, b4 = store.expert_bytes_of("int8"), store.expert_bytes_of("int4")
    everything = len(keys) * b8
    assert place(store, everything, usage).count("int4") == 0
    p = place(store, everything - 1, usage)
    assert p.count("int4") == 1 and p.precisions[keys[-1]] == "int4" and p.ram_bytes <= everything - 1
    # the count follows the missing bytes, not a fixed number
    short = int(2.5 * (b8 - b4))
    p = place(store, everything - short, usage)
    assert p.count("int4") == 3 and {k for k, v in p.precisions.items() if v == "int4"} == set(keys[-3:])
    assert p.ram_bytes == everything - 3 * (b8 - b4) <= p.budget_bytes
    assert "3 int4" in p.describe()
    with pytest.raises(TinyshieldError, match="do not fit .* even as int4.*use a cache policy"):
        place(store, len(keys) * b4 - 1, usage)


def test_usage_is_the_gate_weight_mass_and_is_cached(store):
    u = expert_usage(store, TEXT)
    for l in range(CFG.layers):
        assert sum(u[(l, e)] for e in range(CFG.experts)) == pytest.approx(1.0)
    assert len(list(store.root.glob("usage-*.json"))) == 1
    assert expert_usage(store, TEXT) == u


def placed_reference(model, store, placement):
    """The model with every expert replaced by its placed copy, dequantised, all in RAM."""
    ref = MoEModel(CFG)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (l, e), prec in placement.precisions.items():
            w1, w2 = store.read((l, e), prec).weights()
            ref.blocks[l].moe.w1[e], ref.blocks[l].moe.w2[e] = w1, w2
    return ref.eval()


def test_resident_runtime_loads_once_never_reads_and_computes_the_placed_model(model, store):
    budget = len(store.keys()) * store.expert_bytes_of("int8") - 1
    placement = place(store, budget, expert_usage(store, TEXT))
    assert placement.count("int4") == 1
    ids = TEXT[:CFG.context + 1]
    dev = ExpertStore(store.root, storage="qspi")
    with MoERuntime(dev, "resident", budget, placement=placement) as rt:
        s = rt.score(ids)
        assert sum(v.nbytes for v in rt.resident.values()) == placement.ram_bytes <= budget
        assert {k: v.precision for k, v in rt.resident.items()} == placement.precisions
    files = sum(store.entry(k, p)["file_bytes"] for k, p in placement.precisions.items())
    assert s.load_bytes == files and s.load_seconds > 0
    assert s.bytes_read == 0 and s.misses == 0 and s.hits == s.accesses > 0 and s.stall_seconds == 0
    with torch.no_grad():
        logits = placed_reference(model, store, placement)(ids[None, :-1])[0]
    nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
    assert s.nll_sum == pytest.approx(float(nll), rel=1e-4)
    with pytest.raises(TinyshieldError, match="over the budget"):
        MoERuntime(store, "resident", budget - store.expert_bytes_of("int8"), placement=placement)
    with pytest.raises(TinyshieldError, match="needs a placement"):
        MoERuntime(store, "resident", budget)


def test_corrupt_or_missing_int4_copy_is_a_clear_error_at_load(model, tmp_path):
    store = write_store(model, tmp_path)
    budget = len(store.keys()) * store.expert_bytes_of("int8") - 1
    placement = place(store, budget, expert_usage(store, TEXT))
    low = next(k for k, p in placement.precisions.items() if p == "int4")
    f = store.root / store.entry(low, "int4")["file"]
    blob = bytearray(f.read_bytes())
    blob[-7] ^= 0x0F
    f.write_bytes(bytes(blob))
    with pytest.raises(TinyshieldError, match=rf"expert L{low[0]}E{low[1]} \(int4 copy\): checksum mismatch"):
        MoERuntime(store, "resident", budget, placement=placement)
    f.unlink()
    with pytest.raises(TinyshieldError, match=rf"expert L{low[0]}E{low[1]} \(int4 copy\): file .* is missing"):
        MoERuntime(store, "resident", budget, placement=placement)
