"""CLR embeddings: exactness, lookup, budgeted search, file round trip, infeasible budgets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.compress.clr import QuantCLR, factorize, layout_from_clusters
from edge.compress.io import load_compressed, save_compressed
from base.sizes import parse_size
from edge.compress.model import compress, embedding_budget, other_params, quantize, relative_error
from edge.compress.search import Cost, allocate, candidates, curve, frequency_bands, search, uniform_rank
from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertConfig

V, D = 600, 16


@pytest.fixture(scope="module")
def table():
    # A table with structure (low-rank core + noise) like real embeddings, not pure noise.
    g = torch.Generator().manual_seed(0)
    core = torch.randn(V, 4, generator=g) @ torch.randn(4, D, generator=g)
    return core + 0.3 * torch.randn(V, D, generator=g)


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return np.sqrt(rng.zipf(1.5, V).clip(max=10_000) + 0.5)


def small_classifier(vocab=V, d=D):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BertClassifier(cfg, 2).eval()


def test_full_rank_reconstruction_is_exact(table, weights):
    cl = frequency_bands(weights, 4, first=32)
    for dense in (False, True):
        lay = layout_from_clusters(cl, [D] * 4, [dense] * 4, D)
        emb = factorize(table, lay, torch.as_tensor(weights))
        torch.testing.assert_close(emb.table(), table, atol=1e-5, rtol=0)


def test_lookup_equals_dense_lookup_of_reconstruction(table, weights):
    lay = layout_from_clusters(frequency_bands(weights, 5, first=20), [D, 7, 3, 2, 1], [True] + [False] * 4, D)
    emb = factorize(table, lay, torch.as_tensor(weights))
    ids = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(emb(ids), emb.table()[ids], atol=1e-6, rtol=0)
    q = QuantCLR.from_float(emb)
    torch.testing.assert_close(q.to_float()(ids), q.table()[ids], atol=1e-5, rtol=1e-5)
    # int8 factors stay close to the float factors they came from
    assert relative_error(emb.table(), q.table()) < 1e-3


def test_rank_allocation_beats_plain_svd_and_uniform_ranks(table, weights):
    budget = 2500
    res = search(table, weights, budget)
    plain = search(table, np.ones(V), budget, cands=candidates(table.numpy(), np.ones(V), bands=(1,), splits=(1,)))
    plain_err = relative_error(table, factorize(table, plain.layout).table(), weights)
    uni_layout, uni_err = uniform_rank(table, weights, frequency_bands(weights, 4, first=32), budget)
    assert res.rel_error < plain_err
    assert res.rel_error <= uni_err + 1e-12
    assert res.cost <= budget and Cost("params").layout(uni_layout) <= budget
    # the reported error is the error of the factors actually built
    emb = factorize(table, res.layout, torch.as_tensor(weights), res.bases)
    assert relative_error(table, emb.table(), weights) == pytest.approx(res.rel_error, rel=1e-6, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(min_value=V + D, max_value=V * D + 100), unit=st.sampled_from(["params", "bytes"]),
       bands=st.integers(1, 6))
def test_search_respects_the_budget_exactly(table, weights, budget, unit, bands):
    cost = Cost(unit)
    if unit == "bytes":
        budget = budget * 2 + cost.fixed(V, bands)
    cands = candidates(table.numpy(), weights, bands=(bands,), splits=(1,))
    try:
        res = search(table, weights, budget, unit, cands)
    except TinyshieldError:
        # only when even rank 1 in every cluster of this assignment does not fit
        k = int(cands[0].cluster_of.max()) + 1
        sizes = np.bincount(cands[0].cluster_of)
        assert cost.fixed(V, k) + sum(min(cost.cluster(n, 1, False, D), cost.cluster(n, D, True, D))
                                      for n in sizes) > budget
        return
    assert res.cost == cost.layout(res.layout) <= budget
    # saturated: no single further step (one more rank, or going dense) fits in what is left
    left = budget - res.cost
    for n, r, dn in zip(res.layout.sizes, res.layout.ranks, res.layout.dense):
        if dn:
            continue
        now = cost.cluster(n, r, False, D)
        nxt = [cost.cluster(n, D, True, D)] + ([cost.cluster(n, r + 1, False, D)] if r + 1 < min(n, D) else [])
        assert all(c - now > left for c in nxt)


def test_allocate_reports_infeasible():
    cv = curve(100, D, np.linspace(10, 1, D - 1) ** 2, 400.0, Cost("params"))
    assert allocate([cv], cv.cost[0] - 1) is None
    assert allocate([cv], cv.cost[0]) == [0]


def test_infeasible_budget_names_the_smallest_feasible_one(table, weights):
    model = small_classifier()
    with pytest.raises(TinyshieldError, match="smallest feasible budget is") as e:
        compress(model, weights, other_params(model) - 1)
    smallest = int(str(e.value).split("smallest feasible budget is ")[1].split()[0].replace(",", ""))
    assert smallest == other_params(model) + V + D  # rest of the model + one rank-1 cluster
    c = compress(model, weights, smallest)  # and that budget works
    assert c.search.cost + other_params(model) <= smallest
    with pytest.raises(TinyshieldError, match="smallest feasible budget is"):
        embedding_budget(model, 10, "bytes")


def test_compressed_model_round_trips(tmp_path, weights):
    model = small_classifier()
    c = compress(model, weights, other_params(model) + 3000)
    ids = torch.randint(1, V, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        save_compressed(c.model, None, tmp_path / "f32")
        f = load_compressed(tmp_path / "f32")
        torch.testing.assert_close(f.model(ids), c.model(ids), atol=0, rtol=0)
        quantize(c)
        save_compressed(c.model, c.quant, tmp_path / "i8")
        q = load_compressed(tmp_path / "i8")
        torch.testing.assert_close(q.model(ids), c.model(ids), atol=0, rtol=0)
    for a, b in zip(q.quant.u + q.quant.v, c.quant.u + c.quant.v):
        assert (a is None and b is None) or torch.equal(a, b)
    cfg = json.loads((tmp_path / "i8" / "config.json").read_text())
    assert cfg["kind"] == "bert-classifier-clr" and cfg["word_embeddings"]["dtype"] == "int8"
    assert sum(cl["rows"] for cl in cfg["word_embeddings"]["clusters"]) == V


def test_damaged_files_give_clear_errors(tmp_path, weights):
    from safetensors.torch import load_file, save_file

    model = small_classifier()
    c = quantize(compress(model, weights, other_params(model) + 3000))
    d = save_compressed(c.model, c.quant, tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    del state["clr.0.u"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(TinyshieldError, match="missing tensor 'clr.0.u'"):
        load_compressed(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["word_embeddings"]["version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TinyshieldError, match="version 99 is not supported"):
        load_compressed(d)
    (d / "config.json").write_text(json.dumps({"kind": "vit", "model": {}}))
    with pytest.raises(TinyshieldError, match="not a CLR-compressed model"):
        load_compressed(d)
    with pytest.raises(TinyshieldError, match="config file not found"):
        load_compressed(tmp_path / "nowhere")


def test_parse_size():
    assert parse_size("0.77M", "params") == 770_000
    assert parse_size("1MB", "bytes") == 1 << 20
    assert parse_size("900KB", "bytes") == 900 * 1024
    for bad in ("", "1GB", "x", "0"):
        with pytest.raises(TinyshieldError):
            parse_size(bad, "bytes")


@pytest.mark.slow
def test_cli_compress_writes_model_and_report(shared_data, tmp_path, build_tmp, capsys):
    """`tinyshield compress DIR --budget ...` on a small classifier with MiniLM's vocabulary."""
    from edge.models.io import save_model
    from tools.cli import main

    model = small_classifier(vocab=30522, d=16)
    src = save_model(model, tmp_path / "src", {"kind": "bert-classifier", "model": model.config.to_dict(),
                                                "num_labels": 2})
    total = sum(p.numel() for p in model.parameters())
    out = tmp_path / "out"
    assert main(["compress", str(src), "--budget", str(total // 6), "--finetune-steps", "3", "--out", str(out),
                 "--quiet", "--max-len", "32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sizes_after"]["total"]["params"] <= total // 6
    assert report["positions"] == {"rows_before": 64, "rows_after": 32}
    assert set(report["quality"]) >= {"original_accuracy", "finetuned_accuracy", "int8_clr_accuracy"}
    loaded = load_compressed(out)
    assert loaded.quant is not None and loaded.config["report"]["budget"] == total // 6
    assert loaded.model.bert.embeddings.position_embeddings.num_embeddings == 32
    # the compressed directory runs like any MODEL, at most as long as its position table by default
    for backend in ("torch", "litert"):
        assert main(["run", str(out), "a fine film", "--backend", backend]) == 0
        assert "'a fine film': class" in capsys.readouterr().out
    # too small: the error names the smallest feasible budget, the CLI exits 2
    assert main(["compress", str(src), "--budget", "1000", "--out", str(tmp_path / "x")]) == 2
    # more position rows than the model has: refused
    assert main(["compress", str(src), "--budget", str(total // 6), "--max-len", "65", "--out", str(tmp_path / "y"),
                 "--quiet"]) == 2


@pytest.mark.slow
def test_minilm_clr_beats_plain_svd(shared_data):
    """Real MiniLM table at 10x fewer parameters: CLR keeps sentence embeddings closer than plain SVD."""
    from base import data
    from edge.compress.model import sentence_fidelity, set_word_embeddings
    from edge.compress.pipeline import sst2_weights
    from edge.models.minilm import load_minilm, load_tokenizer

    ref = load_minilm()
    E = ref.embeddings.word_embeddings.weight.detach()
    w = sst2_weights(E.shape[0])
    budget = E.numel() // 10
    clr = search(E, w, budget, cands=candidates(E.numpy(), w, bands=(16,), splits=(1,)))
    svd = search(E, np.ones(len(E)), budget, cands=candidates(E.numpy(), np.ones(len(E)), bands=(1,), splits=(1,)))
    assert clr.layout.params() <= budget and svd.layout.params() <= budget
    texts = data.sst2("dev").texts[:48]
    tok = load_tokenizer()
    fid = {}
    for name, res, wt in (("clr", clr, w), ("svd", svd, None)):
        m = load_minilm()
        set_word_embeddings(m, factorize(E, res.layout, None if wt is None else torch.as_tensor(wt)))
        fid[name] = sentence_fidelity(m, ref, tok, texts)
    assert fid["clr"] > fid["svd"] + 0.2


def test_registry_loads_a_compressed_model_directory(tmp_path, weights):
    """MODEL arguments accept what `tinyshield compress` writes (kind "...-clr")."""
    from edge.models.registry import resolve

    c = compress(small_classifier(), weights, other_params(small_classifier()) + 3000)
    save_compressed(c.model, None, tmp_path / "m")
    loaded = resolve(str(tmp_path / "m"))
    assert loaded.kind == "bert-classifier-clr"
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), c.model.eval()(ids), atol=0, rtol=0)


def test_position_table_cut_to_max_len(tmp_path, weights):
    """Rows past the deployed length are dropped, counted as freed, and longer inputs are refused clearly."""
    import copy

    from edge.compress.model import set_word_embeddings, size_parts, truncate_positions
    from edge.models.registry import resolve
    from mcu.from_aten import lower_module

    model = small_classifier()
    budget = other_params(model) + 3000
    cut = compress(model, weights, budget, max_len=16)
    full = compress(model, weights, budget)
    bert = cut.model.bert
    assert bert.embeddings.position_embeddings.weight.shape == (16, D) and bert.config.max_position_embeddings == 16
    assert model.bert.embeddings.position_embeddings.num_embeddings == 64  # the original is untouched
    # the 48 freed rows go to the word table, the total stays within the budget
    assert size_parts(cut.model)["total"]["params"] <= budget
    assert cut.search.cost > full.search.cost and cut.search.cost <= full.search.cost + 48 * D
    # up to 16 tokens it computes exactly what the uncut model with the same CLR table computes
    wide = copy.deepcopy(model)
    set_word_embeddings(wide, cut.model.bert.embeddings.word_embeddings)
    ids = torch.randint(1, V, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(cut.model(ids), wide(ids), atol=0, rtol=0)
        with pytest.raises(TinyshieldError, match="longer than this model's 16 positions"):
            cut.model(torch.ones(1, 17, dtype=torch.long))
    assert truncate_positions(wide, 64) == 64 and wide.bert.config.max_position_embeddings == 64  # no-op
    with pytest.raises(TinyshieldError, match="longer than the model's position table"):
        truncate_positions(small_classifier(), 65)
    with pytest.raises(TinyshieldError, match="max_len must be >= 1"):
        truncate_positions(small_classifier(), 0)

    # the saved model keeps the short table: registry and MCU lowering read it, L > 16 is refused
    quantize(cut)
    d = save_compressed(cut.model, cut.quant, tmp_path / "m")
    loaded = resolve(str(d))
    assert loaded.config["model"]["max_position_embeddings"] == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), cut.model(ids), atol=0, rtol=0)
    q = load_compressed(d)
    clr = {"bert.embeddings.word_embeddings": q.quant}
    g = lower_module(q.model, ids.numpy(), clr=clr)
    assert g.tensors["bert.embeddings.LayerNorm.table"].shape[0] == 16     # position + token type rows
    # the flash the compressor budgets is exactly what the board stores
    assert size_parts(q.model)["total"]["int8_bytes"] == g.const_bytes()
    with pytest.raises(TinyshieldError, match="longer than this model's 16 positions"):
        lower_module(q.model, np.ones((3, 32), np.int64), clr=clr)


def test_recipe_max_len_default():
    from edge.compress.pipeline import recipe_max_len

    assert recipe_max_len({"recipe": {"max_len": 64}}) == 64
    assert recipe_max_len({"kind": "bert-classifier"}) is None
    assert recipe_max_len({"recipe": "?"}) is None


def test_substituted_contexts_keep_the_ends_and_change_one_token():
    from edge.compress.model import substitute_tokens

    g = np.random.default_rng(0)
    contexts = [np.array([101, 7, 8, 9, 102]), np.array([101, 5, 6, 102])]
    rare = np.array([500, 501])
    out = substitute_tokens(contexts, rare, 50, g)
    assert len(out) == 50
    for s in out:
        src = next(c for c in contexts if len(c) == len(s))
        assert s[0] == 101 and s[-1] == 102
        changed = np.flatnonzero(s != src)
        assert len(changed) <= 1 and np.isin(s[1:-1], np.concatenate([src[1:-1], rare])).all()
        assert np.isin(rare, s).any()
    assert contexts[0].tolist() == [101, 7, 8, 9, 102]  # the originals are not modified


@pytest.mark.slow
def test_finetune_with_substituted_rare_tokens_moves_towards_the_teacher():
    """The augmentation term makes the compressed model agree more with the original on rare tokens
    than the same fine-tuning without it."""
    from edge.compress.model import _kl, finetune_classifier, substitute_tokens
    from edge.train import pad

    weights = np.where(np.arange(V) < 400, 10.0, 0.1)  # ids >= 400 are rare: poorly reconstructed
    rare = np.arange(400, V)  # and the training sequences never contain them
    g = np.random.default_rng(1)
    seqs = [np.concatenate([[1], g.integers(2, 50, g.integers(4, 12)), [2]]) for _ in range(256)]
    labels = g.integers(0, 2, 256)
    ids, mask = pad(substitute_tokens(seqs, rare, 128, np.random.default_rng(2)))
    kl = {}
    for weight in (0.0, 1.0):
        teacher = small_classifier()
        with torch.no_grad():
            teacher.classifier.weight.mul_(30)  # confident logits, so there is something to match
        c = compress(teacher, weights, other_params(teacher) + 1500)
        info = finetune_classifier(c.model, seqs, labels, teacher=teacher, steps=80, batch_size=32, lr=2e-3,
                                   rare_tokens=rare, augment_weight=weight)
        assert info["augmented"] == bool(weight) and info["steps"] == 80
        with torch.no_grad():
            kl[weight] = float(_kl(c.model(ids, mask), teacher(ids, mask), 2.0))
    assert kl[1.0] < 0.9 * kl[0.0]


def test_sensitivity_metric_and_whitened_compression(weights):
    """The metric is a PSD Fisher matrix blind to the direction LayerNorm removes; a table rebuilt in
    it is mapped back exactly (full rank reproduces the table) and keeps the budget."""
    from edge.compress.model import size_parts
    from edge.compress.sensitivity import embedding_metric, whitening

    model = small_classifier()
    g = np.random.default_rng(0)
    seqs = [np.concatenate([[1], g.integers(2, V, g.integers(3, 10)), [2]]) for _ in range(40)]
    m = embedding_metric(model, seqs)
    assert m.shape == (D, D) and np.allclose(m, m.T, atol=1e-12)
    vals = np.linalg.eigvalsh(m)
    assert vals.min() > -1e-9 * vals.max() and vals.max() > 0
    ones = np.ones(D) / np.sqrt(D)
    assert ones @ m @ ones < 1e-6 * vals.max()  # adding c*1 to a word vector is undone by LayerNorm
    s, s_inv = whitening(m)
    torch.testing.assert_close(s @ s_inv, torch.eye(D, dtype=torch.float64), atol=1e-9, rtol=0)

    table = model.bert.embeddings.word_embeddings.weight.detach()
    full = compress(model, weights, V * D, total=False, whiten=(s, s_inv))
    torch.testing.assert_close(full.model.bert.embeddings.word_embeddings.table(), table, atol=1e-4, rtol=0)
    budget = other_params(model) + 3000
    c = compress(model, weights, budget, whiten=(s, s_inv))
    assert size_parts(c.model)["total"]["params"] <= budget
