"""Benchmark: accuracy of the int8 models (PTQ, integer-only inference) against their fp32 originals.

    nice -n 10 .venv/bin/python -m tools.bench.int8 [--calib 500] [--limit N] [--skip-bert]

- tiny ViT on the MNIST test set (trained by the vit-mnist recipe, cached);
- BERT-tiny on SST-2 dev (the bert-tiny-sst2 recipe, cached; trained on first use unless --no-train).
The int8 numbers come from the generated C (host build), which the test suite proves equal to the
numpy reference bit for bit; the first `--check` inputs are re-run through the numpy reference here
too and the agreement is reported. Prints a table and writes build/bench/int8.json.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from base.paths import build_dir


def _int8_model(graph, tag):
    from mcu.codegen import generate
    from mcu.schedules import layerwise
    from mcu.hostlib import HostModel
    from mcu.planner import plan

    s = layerwise(graph)
    p = plan(s)
    d = build_dir() / "bench" / f"int8-{tag}"
    generate(s, p, d)
    return s, p, HostModel(d)


def _agreement(s, p, hm, inputs) -> float:
    from mcu.execute import run
    same = [np.array_equal(run(s, {s.graph.inputs[0]: x}, p)[s.graph.outputs[0]], hm.run(x)) for x in inputs]
    return float(np.mean(same))


def bench_vit(calib: int, limit: int | None, check: int, bar) -> dict:
    from base import data
    from edge.models.registry import load_dir
    from edge.recipes import vit_mnist
    from mcu.from_aten import lower_module

    tr = vit_mnist.train(quiet=True)
    model = load_dir(tr.path).model
    ds = data.mnist()
    x, y = ds.x_test[:limit], ds.y_test[:limit]
    fp32 = vit_mnist.accuracy(model, x, y)
    t0 = time.time()
    g = lower_module(model, data.image_batch(ds.x_train[:calib]))
    s, p, hm = _int8_model(g, "vit")
    q = (x.astype(np.int16) - 128).astype(np.int8)
    task = bar.add_task("int8 ViT / MNIST test", total=len(x), info="")
    pred = []
    for i in range(len(x)):
        pred.append(int(hm.run(q[i].reshape(28, 28, 1)).argmax()))
        bar.update(task, advance=1)
    int8 = float(np.mean(np.array(pred) == y))
    return {"model": "vit-mnist", "dataset": f"MNIST test ({len(x)})", "fp32": fp32, "int8": int8,
            "delta_points": 100 * (int8 - fp32), "calib": calib, "seconds": round(time.time() - t0, 1),
            "reference_agreement": _agreement(s, p, hm, [q[i].reshape(28, 28, 1) for i in range(check)]),
            "arena_bytes": p.arena_bytes, "const_bytes": g.const_bytes()}


def bench_bert(calib: int, limit: int | None, check: int, bar, train: bool, seq_len: int = 64,
               max_steps: int | None = None) -> dict | None:
    from base import data
    from edge.models.minilm import load_tokenizer, tokenize
    from edge.models.registry import load_dir
    from edge.recipes import recipes
    from mcu.from_aten import lower_module

    table = recipes()
    if "bert-tiny-sst2" not in table:
        return None
    from edge.recipes import bert_tiny_sst2
    overrides = {"max_steps": max_steps, "threads": 1} if max_steps else {}
    tr = bert_tiny_sst2.train(quiet=True, **overrides) if train else None
    if tr is None:
        return None
    model = load_dir(tr.path).model.eval()
    dev, train_set = data.sst2("dev"), data.sst2("train")
    tok = load_tokenizer()
    texts, labels = dev.texts[:limit], dev.labels[:limit]
    b = tokenize(tok, texts, pad_to=seq_len)
    with torch.no_grad():
        fp32 = float((model(b.input_ids, b.attention_mask).argmax(-1).numpy() == labels).mean())
    t0 = time.time()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train_set.texts), size=calib, replace=False)
    cal = tokenize(tok, [train_set.texts[i] for i in pick], pad_to=seq_len)
    g = lower_module(model, cal.input_ids)
    s, p, hm = _int8_model(g, "bert")
    ids = b.input_ids.numpy().astype(np.int32)
    task = bar.add_task("int8 BERT-tiny / SST-2 dev", total=len(ids), info="")
    pred = []
    for i in range(len(ids)):
        pred.append(int(hm.run(ids[i]).argmax()))
        bar.update(task, advance=1)
    int8 = float(np.mean(np.array(pred) == labels))
    name = "bert-tiny-sst2" + (f" ({max_steps} steps)" if max_steps else "")
    return {"model": name, "dataset": f"SST-2 dev ({len(ids)}), L={seq_len}", "fp32": fp32, "int8": int8,
            "delta_points": 100 * (int8 - fp32), "calib": calib, "seconds": round(time.time() - t0, 1),
            "reference_agreement": _agreement(s, p, hm, list(ids[:check])),
            "arena_bytes": p.arena_bytes, "const_bytes": g.const_bytes()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=500, help="calibration inputs from the training split")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N test inputs")
    ap.add_argument("--check", type=int, default=100, help="inputs re-run through the numpy reference")
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--no-train", action="store_true", help="skip BERT-tiny if it is not trained yet")
    ap.add_argument("--bert-max-steps", type=int, default=None,
                    help="a shorter BERT-tiny training (the recipe with max_steps) instead of the full one")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    from base.progress import progress

    rows = []
    with progress() as bar:
        rows.append(bench_vit(a.calib, a.limit, a.check, bar))
        if not a.skip_bert:
            r = bench_bert(a.calib, a.limit, a.check, bar, train=not a.no_train, max_steps=a.bert_max_steps)
            rows.append(r or {"model": "bert-tiny-sst2", "error": "recipe not available"})

    from rich.console import Console
    from rich.table import Table
    t = Table(title="int8 (integer-only) vs fp32 accuracy")
    for c in ["model", "data", "fp32", "int8", "delta (points)", "bit-exact vs numpy", "arena B", "weights B"]:
        t.add_column(c, justify="left" if c in ("model", "data") else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["model"], r["error"], *[""] * 6)
            continue
        t.add_row(r["model"], r["dataset"], f"{100 * r['fp32']:.2f}%", f"{100 * r['int8']:.2f}%",
                  f"{r['delta_points']:+.2f}", f"{100 * r['reference_agreement']:.0f}% of {a.check}",
                  f"{r['arena_bytes']:,}", f"{r['const_bytes']:,}")
    Console().print(t)
    out = build_dir() / "bench" / "int8.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
