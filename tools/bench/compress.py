"""Compression benchmark: BERT-tiny accuracy vs size, MiniLM sentence-embedding fidelity vs size.

    python -m tools.bench.compress [--quick] [--skip-bert] [--skip-minilm] [--finetune-steps N]

BERT-tiny (recipe bert-tiny-sst2): total parameters at 3x, 5.7x, 8x fewer and at a 1 MB int8 flash
budget; SST-2 dev accuracy after brief recovery training, with float and int8 CLR factors. By default
as `tinyshield compress` does it: position table cut to the recipe's max_len (64 rows), table rebuilt
in the classifier's sensitivity metric, fine-tuning with rare-token substituted sentences.
MiniLM (all-MiniLM-L6-v2, real weights): mean cosine between compressed and original sentence
embeddings over the SST-2 dev sentences (token statistics from SST-2 train only) at 5x/10x/20x fewer
word-table parameters and at 10x fewer bytes than the fp32 table; baselines: plain truncated SVD at
equal size, uniform-rank clustering (same frequency bands, one rank everywhere), and int8/int4
quantisation of the whole table. Prints a table and writes build/bench/compress.json.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from base.paths import build_dir


def minilm_rows(ratios=(5, 10, 20), bytes_ratio=10, dev_limit=None, quick=False) -> list[dict]:
    from base import data
    from edge.compress.clr import QuantCLR, factorize, layout_bytes
    from edge.compress.model import relative_error
    from edge.compress.pipeline import sst2_weights
    from edge.compress.search import Cost, candidates, frequency_bands, search, uniform_rank
    from edge.models.bert import mean_pool
    from edge.models.minilm import load_minilm, load_tokenizer, tokenize

    m, tok = load_minilm(), load_tokenizer()
    E = m.embeddings.word_embeddings.weight.detach()
    V, d = E.shape
    w = sst2_weights(V)
    texts = data.sst2("dev").texts[:dev_limit]
    order = np.argsort([len(t) for t in texts])
    batches = [tokenize(tok, [texts[j] for j in order[i:i + 128]]) for i in range(0, len(texts), 128)]

    @torch.no_grad()
    def sentences(table=None):
        out = []
        for b in batches:
            we = None if table is None else table[b.input_ids]
            h = m(b.input_ids, b.attention_mask, word_embeds=we)
            out.append(torch.nn.functional.normalize(mean_pool(h, b.attention_mask), dim=-1))
        return torch.cat(out)

    ref = sentences()

    def fidelity(table):
        return float((sentences(table) * ref).sum(-1).mean())

    rows = []

    def add(size, method, params, nbytes, table, t0, **extra):
        rows.append({"model": "minilm", "size": size, "method": method, "params": int(params), "bytes": int(nbytes),
                     "params_ratio": V * d / params, "bytes_ratio": 4 * V * d / nbytes,
                     "fidelity": fidelity(table), "weighted_rel_error": relative_error(E, table, w),
                     "seconds": round(time.time() - t0, 1), **extra})

    bands = frequency_bands(w, 16)
    # The cluster assignments do not depend on the budget: build them (k-means included) once.
    cands = candidates(E.numpy(), w) if not quick else candidates(E.numpy(), w, bands=(16,), splits=(1,))
    for ratio in ratios:
        budget = V * d // ratio
        t0 = time.time()
        res = search(E, w, budget, "params", cands)
        emb = factorize(E, res.layout, torch.as_tensor(w), res.bases)
        add(f"{ratio}x params", "CLR (searched)", res.layout.params(), layout_bytes(res.layout)["total"],
            emb.table(), t0, candidate=res.candidate, ranks=list(res.layout.ranks), dense=list(res.layout.dense))
        t0 = time.time()
        r = budget // (V + d)
        svd = search(E, np.ones(V), r * (V + d), "params", candidates(E.numpy(), np.ones(V), bands=(1,), splits=(1,)))
        t = factorize(E, svd.layout).table()
        add(f"{ratio}x params", "plain SVD", svd.layout.params(), layout_bytes(svd.layout)["total"], t, t0, rank=r)
        t0 = time.time()
        lay, _ = uniform_rank(E, w, bands, budget)
        t = factorize(E, lay, torch.as_tensor(w)).table()
        add(f"{ratio}x params", "uniform-rank clusters", lay.params(), layout_bytes(lay)["total"], t, t0,
            rank=int(max(lay.ranks)))

    # 10x fewer bytes than the fp32 table: int8 factors, scales and index all counted.
    budget = 4 * V * d // bytes_ratio
    size = f"{bytes_ratio}x bytes"
    t0 = time.time()
    res = search(E, w, budget, "bytes", cands)
    emb = factorize(E, res.layout, torch.as_tensor(w), res.bases)
    q = QuantCLR.from_float(emb)
    add(size, "CLR int8 (searched)", res.layout.params(), Cost("bytes").layout(res.layout), q.table(), t0,
        candidate=res.candidate, ranks=list(res.layout.ranks), dense=list(res.layout.dense))
    t0 = time.time()
    one = candidates(E.numpy(), np.ones(V), bands=(1,), splits=(1,))
    svd = search(E, np.ones(V), budget, "bytes", one)
    add(size, "plain SVD int8", svd.layout.params(), Cost("bytes").layout(svd.layout),
        QuantCLR.from_float(factorize(E, svd.layout)).table(), t0, rank=int(svd.layout.ranks[0]))
    for bits in (8, 4):
        t0 = time.time()
        qmax = 2 ** (bits - 1) - 1
        scale = E.abs().amax(1, keepdim=True) / qmax
        t = torch.round(E / scale).clamp(-qmax, qmax) * scale
        add(f"int{bits} table", f"int{bits} per-row, full table", V * d, V * d * bits // 8 + 4 * V, t, t0)
    return rows


def bert_rows(ratios=(3, 5.7, 8), flash: int | None = 1 << 20, finetune_steps=800, quick=False,
              trained=None, max_len: int | None = -1, augment: float = 1.0, sensitivity: bool = True) -> list[dict]:
    """`max_len` -1: the recipe's max_len (position rows past it are cut); None: keep every row."""
    from edge.compress.model import other_params, size_parts
    from edge.compress.pipeline import classifier_whitening, compress_model, recipe_max_len, sst2_weights
    from edge.compress.search import candidates
    from edge.models.registry import load_dir
    from edge.recipes import recipes

    trained = trained or recipes()["bert-tiny-sst2"]()
    loaded = load_dir(trained.path)
    model = loaded.model
    if max_len == -1:
        max_len = recipe_max_len(loaded.config)
    total = size_parts(model)["total"]["params"]
    rows = []
    w = sst2_weights(model.config.vocab_size)
    table = model.bert.embeddings.word_embeddings.weight.detach()
    # shared by every budget: the sensitivity metric and the cluster assignments built in it
    whiten = classifier_whitening(model, min(64, max_len or 512)) if sensitivity else None
    table = (table.double() @ whiten[0]).float().numpy() if whiten is not None else table.numpy()
    cands = candidates(table, w, bands=(16,), splits=(1,)) if quick else candidates(table, w)
    jobs = [(f"{r}x params", int(total / r), "params") for r in ratios]
    if flash:
        jobs.append(("1 MB flash", flash, "bytes"))
    for size, budget, unit in jobs:
        rep, comp = compress_model(model, "bert-tiny-sst2", budget, unit, finetune_steps=finetune_steps,
                                   int8=True, cands=cands, max_len=max_len, augment=augment,
                                   sensitivity=sensitivity, whiten=whiten)
        after = rep.sizes_after["total"]
        q = rep.quality
        rows.append({"model": "bert-tiny-sst2", "size": size, "budget": budget, "unit": unit,
                     "params": after["params"], "params_ratio": total / after["params"],
                     "int8_flash_bytes": after["int8_bytes"], "fits_1MB": after["int8_bytes"] <= 1 << 20,
                     "original_accuracy": q["original_accuracy"], "compressed_accuracy": q["compressed_accuracy"],
                     "finetuned_accuracy": q.get("finetuned_accuracy"), "int8_clr_accuracy": q["int8_clr_accuracy"],
                     "drop_points": q["drop_points"], "embedding_params": rep.sizes_after[
                         "word_embeddings (CLR)"]["params"], "other_params": other_params(model),
                     "candidate": rep.layout["candidate"], "position_rows": rep.positions["rows_after"],
                     "metric": rep.layout["metric"], "augment": augment,
                     "ranks": [("dense" if c["dense"] else c["rank"]) for c in rep.layout["clusters"]],
                     "lookup_max_macs": rep.lookup_cost["max_macs"], "seconds": rep.seconds})
    base = size_parts(model)["total"]
    rows.insert(0, {"model": "bert-tiny-sst2", "size": "uncompressed", "params": base["params"], "params_ratio": 1.0,
                    "int8_flash_bytes": base["int8_bytes"], "fits_1MB": base["int8_bytes"] <= 1 << 20,
                    "position_rows": model.config.max_position_embeddings,
                    "original_accuracy": trained.metrics.get("dev_accuracy"),
                    "int8_clr_accuracy": None, "finetuned_accuracy": trained.metrics.get("dev_accuracy")})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one cluster assignment instead of the full search")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--finetune-steps", type=int, default=800)
    p.add_argument("--skip-flash", action="store_true", help="no BERT-tiny run at the 1 MB flash budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--augment", type=float, default=1.0,
                   help="fine-tuning weight on rare-token substituted sentences (default 1; 0 = off)")
    p.add_argument("--euclidean", action="store_true",
                   help="rebuild BERT-tiny's table in plain (frequency-weighted) error, not in its sensitivity metric")
    p.add_argument("--max-len", type=int, default=-1,
                   help="BERT-tiny position rows to keep (default: the recipe's max_len, 64; 0 = all 512)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = {"bert_tiny": [], "minilm": []}
    if not args.skip_bert:
        out["bert_tiny"] = bert_rows(finetune_steps=args.finetune_steps, quick=args.quick,
                                     flash=None if args.skip_flash else 1 << 20, max_len=args.max_len or None,
                                     augment=args.augment, sensitivity=not args.euclidean)
    if not args.skip_minilm:
        out["minilm"] = minilm_rows(quick=args.quick)
    out["seconds"] = round(time.time() - t0, 1)
    path = build_dir() / "bench" / "compress.json"
    if path.is_file():  # a skipped part keeps its rows from the previous run
        old = json.loads(path.read_text())
        for part in ("bert_tiny", "minilm"):
            if not out[part] and old.get(part):
                out[part] = old[part]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))

    con = Console(width=200)
    if out["bert_tiny"]:
        t = Table(title="BERT-tiny SST-2: total parameters vs dev accuracy (CLR word embeddings)")
        for c in ("size", "params", "ratio", "pos. rows", "int8 flash", "fits 1 MB", "acc before FT", "acc fp32 CLR",
                  "acc int8 CLR", "drop (pts)", "ranks"):
            t.add_column(c, justify="left" if c in ("size", "ranks") else "right")
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
        for r in out["bert_tiny"]:
            t.add_row(r["size"], f"{r['params']:,}", f"{r['params_ratio']:.2f}x", str(r.get("position_rows", "-")),
                      f"{r['int8_flash_bytes']:,}",
                      "yes" if r["fits_1MB"] else "no", pct(r.get("compressed_accuracy")),
                      pct(r.get("finetuned_accuracy")), pct(r.get("int8_clr_accuracy")),
                      "-" if r.get("drop_points") is None else f"{r['drop_points']:.2f}",
                      " ".join(map(str, r.get("ranks", []))))
        con.print(t)
    if out["minilm"]:
        t = Table(title="all-MiniLM-L6-v2 word table: sentence-embedding fidelity on SST-2 dev")
        for c in ("size", "method", "params", "bytes", "params ratio", "bytes ratio", "fidelity", "w. rel. error"):
            t.add_column(c, justify="left" if c in ("size", "method") else "right")
        for r in out["minilm"]:
            t.add_row(r["size"], r["method"], f"{r['params']:,}", f"{r['bytes']:,}", f"{r['params_ratio']:.1f}x",
                      f"{r['bytes_ratio']:.1f}x", f"{r['fidelity']:.4f}", f"{r['weighted_rel_error']:.4f}")
        con.print(t)
    con.print(f"wrote {path} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
