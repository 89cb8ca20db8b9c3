"""Benchmark: the edge runtime — .tflite export error, int8 agreement and accuracy, latency, TFLM arena.

    nice -n 10 .venv/bin/python -m tools.bench.edge [--limit N] [--reps 20] [--threads 1]

1. fp32 error: MiniLM sentence embeddings of SST-2 dev, LiteRT fp32 vs torch.
2. Accuracy: SST-2 dev with MiniLM embeddings + a logistic-regression head (fit on torch embeddings
   of SST-2 train sentences), from torch fp32 / LiteRT fp32 / LiteRT int8 (L = 64, which every dev
   sentence fits, so the embeddings are those of L = 128); the BERT-tiny SST-2
   classifier when its recipe has been trained (build/models/bert-tiny-sst2); the ViT on the
   MNIST test set (vit-mnist recipe, cached).
3. int8 agreement: an int8 linear stack vs the numpy reference of base.quant (LiteRT builtin
   kernels, LiteRT XNNPACK, TFLite Micro), and a full-int8 BERT-tiny, LiteRT vs TFLite Micro.
4. Latency (median, batch 1, L = 128, same thread count): torch fp32, LiteRT fp32, LiteRT int8, for
   MiniLM and BERT-tiny, side by side in this one run.
5. TFLite Micro arena of the int8 BERT-tiny encoder at L = 128, 256, 512.
Prints tables and writes build/bench/edge.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from base.paths import build_dir


def _median_ms(fn, reps: int) -> tuple[float, float]:
    """(wall, cpu) medians in ms. With one thread everything runs on the calling thread, so its
    CPU time is the inference's own cost even when the machine is shared; wall time is not."""
    fn()  # warm-up: first call plans memory / packs weights
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3)


def _torch_sentence(model, ids: np.ndarray, batch: int = 32) -> np.ndarray:
    from edge.models.bert import mean_pool
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x = torch.from_numpy(ids[i:i + batch]).long()
            m = (x > 0).long()
            out.append(torch.nn.functional.normalize(mean_pool(model(x, m), m), dim=-1).numpy())
    return np.concatenate(out)


def _run_all(interp, ids: np.ndarray, bar, task) -> np.ndarray:
    out = []
    for i in range(len(ids)):
        out.append(interp.run(ids[i:i + 1]))
        bar.update(task, advance=1)
    return np.concatenate(out)


def bench_minilm(a, bar) -> dict:
    """fp32 error and SST-2 accuracy of MiniLM sentence embeddings: torch vs LiteRT fp32 vs int8."""
    from sklearn.linear_model import LogisticRegression

    from base import data
    from edge.litert import Interpreter
    from edge.litert.export import export_model
    from edge.litert.int8 import calibration_set, export_int8
    from edge.models.minilm import load_minilm, load_tokenizer, tokenize

    model, tok = load_minilm(), load_tokenizer()
    L = a.acc_seq_len
    dev = data.sst2("dev")
    texts, y = dev.texts[:a.limit], dev.labels[:a.limit]
    ids = tokenize(tok, texts, pad_to=L).input_ids.numpy().astype(np.int32)
    train = data.sst2("train")
    pick = np.random.default_rng(0).choice(len(train.texts), size=a.train_n, replace=False)
    train_ids = tokenize(tok, [train.texts[i] for i in pick], pad_to=64).input_ids.numpy()

    t = bar.add_task("MiniLM torch fp32 embeddings", total=1, info="")
    e_torch = _torch_sentence(model, ids)
    head = LogisticRegression(C=1.0, max_iter=2000).fit(_torch_sentence(model, train_ids), train.labels[pick])
    bar.update(t, advance=1)

    fp = Interpreter(export_model(model, seq_len=L), threads=a.threads)
    e_fp = _run_all(fp, ids, bar, bar.add_task("MiniLM LiteRT fp32", total=len(ids), info=f"L={L}"))
    int8_bytes = export_int8(model, calibration_set("sst2", n=a.calib_n, seq_len=L), seq_len=L)
    q = Interpreter(int8_bytes, threads=a.threads)
    e_q = _run_all(q, ids, bar, bar.add_task("MiniLM LiteRT int8", total=len(ids), info=f"L={L}"))

    acc = {k: float((head.predict(e) == y).mean()) for k, e in
           (("torch_fp32", e_torch), ("litert_fp32", e_fp), ("litert_int8", e_q))}
    cos = lambda u, v: (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    return {
        "model": "MiniLM-L6 (+ logistic regression head)", "dataset": f"SST-2 dev ({len(ids)}), L={L}",
        "fp32_max_abs_err": float(np.abs(e_fp - e_torch).max()),
        "fp32_mean_abs_err": float(np.abs(e_fp - e_torch).mean()),
        "int8_cosine_mean": float(cos(e_q, e_torch).mean()), "int8_cosine_min": float(cos(e_q, e_torch).min()),
        "accuracy": acc, "int8_agreement_with_fp32": float((head.predict(e_q) == head.predict(e_torch)).mean()),
        "head_train_sentences": a.train_n, "calib": f"sst2 train x{a.calib_n}", "int8_mode": "hybrid",
        "tflite_bytes": {"fp32": None, "int8": len(int8_bytes)},
    }


def _bert_tiny_dir() -> Path | None:
    root = build_dir() / "models" / "bert-tiny-sst2"
    dirs = sorted((p for p in root.glob("*") if (p / "model.safetensors").is_file()),
                  key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return dirs[-1] if dirs else None


def bench_bert_tiny(a, bar) -> dict | None:
    """SST-2 dev accuracy of the trained BERT-tiny classifier through every backend."""
    from base import data
    from edge.litert import Interpreter, MicroInterpreter
    from edge.litert.export import export_model
    from edge.litert.int8 import calibration_set, export_int8
    from edge.models.minilm import token_ids
    from edge.models.registry import load_dir

    d = _bert_tiny_dir()
    if d is None:
        return None
    model = load_dir(d).model
    L = 64  # the recipe's max_len; every SST-2 dev sentence fits
    dev = data.sst2("dev")
    texts, y = dev.texts[:a.limit], dev.labels[:a.limit]
    ids = token_ids(texts, L)
    with torch.no_grad():
        x = torch.from_numpy(ids).long()
        logits_torch = model(x, (x > 0).long()).numpy()
    calib = calibration_set("sst2", n=a.calib_n, seq_len=L)
    runs = {
        "litert_fp32": Interpreter(export_model(model, seq_len=L), threads=a.threads),
        "litert_int8_hybrid": Interpreter(export_int8(model, calib, seq_len=L), threads=a.threads),
        "litert_int8_full": Interpreter(export_int8(model, calib, seq_len=L, mode="full"), threads=a.threads),
        "tflm_int8_full_sigmoid_gelu": MicroInterpreter(export_int8(model, calib, seq_len=L, mode="full",
                                                                    gelu="sigmoid", wide_modules=None)),
    }
    acc = {"torch_fp32": float((logits_torch.argmax(1) == y).mean())}
    agree = {}
    for name, r in runs.items():
        logits = _run_all(r, ids, bar, bar.add_task(f"BERT-tiny {name}", total=len(ids), info=f"L={L}"))
        acc[name] = float((logits.argmax(1) == y).mean())
        agree[name] = float((logits.argmax(1) == logits_torch.argmax(1)).mean())
        if name == "litert_fp32":
            fp_err = float(np.abs(logits - logits_torch).max())
    return {"model": f"BERT-tiny SST-2 ({d.name})", "dataset": f"SST-2 dev ({len(ids)}), L={L}",
            "accuracy": acc, "agreement_with_torch": agree, "fp32_max_abs_err_logits": fp_err,
            "calib": f"sst2 train x{a.calib_n}"}


def bench_vit(a, bar) -> dict:
    from base import data
    from edge.litert import Interpreter
    from edge.litert.export import export_model
    from edge.litert.int8 import calibration_set, export_int8
    from edge.models.registry import load_dir
    from edge.recipes import vit_mnist

    model = load_dir(vit_mnist.train(quiet=True).path).model
    ds = data.mnist()
    n = len(ds.x_test) if a.limit is None else min(a.limit * 10, len(ds.x_test))
    B = 100
    n -= n % B
    x, y = vit_mnist.to_tensor(ds.x_test[:n]).numpy(), ds.y_test[:n]
    with torch.no_grad():
        logits_torch = np.concatenate([model(torch.from_numpy(x[i:i + B])).numpy() for i in range(0, n, B)])
    calib = calibration_set("mnist", n=a.calib_n)
    runs = {"litert_fp32": export_model(model, batch=B),
            "litert_int8_hybrid": export_int8(model, calib, batch=B),
            "litert_int8_full": export_int8(model, calib, batch=B, mode="full")}
    acc = {"torch_fp32": float((logits_torch.argmax(1) == y).mean())}
    err = None
    for name, m in runs.items():
        interp = Interpreter(m, threads=a.threads)
        t = bar.add_task(f"ViT {name}", total=n // B, info="")
        out = []
        for i in range(0, n, B):
            out.append(interp.run(x[i:i + B]))
            bar.update(t, advance=1)
        logits = np.concatenate(out)
        acc[name] = float((logits.argmax(1) == y).mean())
        if name == "litert_fp32":
            err = float(np.abs(logits - logits_torch).max())
    return {"model": "ViT (vit-mnist)", "dataset": f"MNIST test ({n})", "accuracy": acc,
            "fp32_max_abs_err_logits": err, "calib": f"mnist train x{a.calib_n}"}


def bench_int8_agreement(a) -> list[dict]:
    from edge.litert import Interpreter, MicroInterpreter, quantize_linear_stack
    from edge.litert.int8 import bert_tiny_int8_encoder, calibration_set

    rng = np.random.default_rng(0)
    sizes = (128, 512, 512, 10)
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1) for i, o in zip(sizes[:-1], sizes[1:])]
    q = quantize_linear_stack(layers, calib=rng.normal(size=(512, 128)), relu=True)
    B = 1000
    model = q.export((B,))
    xq = q.quantize_input(rng.normal(size=(B, 128)))
    refs = {"double": q.reference(xq).astype(np.int32), "single": q.reference(xq, "single").astype(np.int32)}
    rows = []
    outs = (("TFLite Micro", MicroInterpreter(model).run(xq)),
            ("LiteRT reference kernels", Interpreter(model, reference_kernels=True).run(xq)),
            ("LiteRT optimised kernels", Interpreter(model, xnnpack=False).run(xq)),
            ("LiteRT + XNNPACK", Interpreter(model).run(xq)))
    for name, out in outs:
        for rounding, ref in refs.items():
            d = np.abs(out.astype(np.int32) - ref)
            rows.append({"what": f"int8 linear stack 128-512-512-10 (ReLU), {B} inputs", "runtime": name,
                         "vs": f"numpy reference, {rounding} rounding", "exact_fraction": float((d == 0).mean()),
                         "max_lsb": int(d.max())})
    L = 128
    enc = bert_tiny_int8_encoder(L)
    xs = calibration_set("random", n=8, seq_len=L, seed=1)
    lite, micro = Interpreter(enc, xnnpack=False), MicroInterpreter(enc)
    d = np.concatenate([np.abs(lite.run(x).astype(np.int32) - micro.run(x).astype(np.int32)).ravel() for x in xs])
    rows.append({"what": f"full-int8 BERT-tiny encoder, L={L}, 8 inputs (hidden states)", "runtime": "TFLite Micro",
                 "vs": "LiteRT builtin kernels", "exact_fraction": float((d == 0).mean()), "max_lsb": int(d.max())})
    return rows


def bench_latency(a, bar) -> list[dict]:
    from edge.litert import Interpreter
    from edge.litert.export import export_model
    from edge.litert.int8 import calibration_set, export_int8
    from edge.models.bert import BertConfig, BertModel
    from edge.models.minilm import load_minilm

    L = a.seq_len
    torch.manual_seed(0)
    models = {"MiniLM-L6 (6x384)": load_minilm(),
              "BERT-tiny (2x128)": BertModel(BertConfig()).eval()}
    calib = calibration_set("sst2", n=a.calib_n, seq_len=L)
    x = calib[0]
    rows = []
    for name, m in models.items():
        t = bar.add_task(f"latency {name}", total=4, info=f"L={L}")
        xt = torch.from_numpy(x).long()
        mt = (xt > 0).long()
        with torch.no_grad():
            torch_ms = _median_ms(lambda: m(xt, mt), a.reps)
        bar.update(t, advance=1)
        fp = Interpreter(export_model(m, seq_len=L, head="hidden"), threads=a.threads)
        fp_ms = _median_ms(lambda: fp.run(x), a.reps)
        bar.update(t, advance=1)
        q = Interpreter(export_int8(m, calib, seq_len=L, head="hidden"), threads=a.threads)
        q_ms = _median_ms(lambda: q.run(x), a.reps)
        bar.update(t, advance=1)
        qf = Interpreter(export_int8(m, calib, seq_len=L, head="hidden", mode="full"), threads=a.threads)
        qf_ms = _median_ms(lambda: qf.run(x), a.reps)
        # the default int8 graphs run the FFN output projection 16x8 (accuracy); LiteRT has no fast
        # 16x8 kernel, so also time the all-int8 variant
        q8 = Interpreter(export_int8(m, calib, seq_len=L, head="hidden", wide_modules=None), threads=a.threads)
        q8_ms = _median_ms(lambda: q8.run(x), a.reps)
        bar.update(t, advance=1)
        row = {"model": name, "L": L, "batch": 1, "threads": a.threads, "reps": a.reps}
        for key, (wall, cpu) in (("torch_fp32", torch_ms), ("litert_fp32", fp_ms), ("litert_int8_hybrid", q_ms),
                                 ("litert_int8_full", qf_ms), ("litert_int8_hybrid_all8", q8_ms)):
            row[f"{key}_ms"], row[f"{key}_cpu_ms"] = wall, cpu
        rows.append(row)
    return rows


def bench_arena() -> list[dict]:
    from edge.litert import tflm_arena_bytes
    from edge.litert.int8 import bert_tiny_int8_encoder
    rows = []
    for L in (128, 256, 512):
        enc = bert_tiny_int8_encoder(L)
        rows.append({"model": "BERT-tiny encoder int8 (full, GELU as x*sigmoid(1.702x))", "L": L,
                     "arena_bytes": tflm_arena_bytes(enc), "tflite_bytes": len(enc)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N SST-2 dev sentences (10N MNIST images)")
    ap.add_argument("--seq-len", type=int, default=128, help="L for latency (128)")
    ap.add_argument("--acc-seq-len", type=int, default=64,
                    help="L for the MiniLM error/accuracy pass (64: every SST-2 dev sentence fits in 57 tokens, "
                         "so the embeddings are those of any longer L)")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and LiteRT (default 1)")
    ap.add_argument("--reps", type=int, default=20, help="latency repetitions (median)")
    ap.add_argument("--calib-n", type=int, default=32, help="calibration inputs for int8")
    ap.add_argument("--train-n", type=int, default=4000, help="SST-2 train sentences for the MiniLM head")
    ap.add_argument("--out", default=None, help="JSON path (default build/bench/edge.json)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["minilm", "bert-tiny", "vit", "agreement",
                                                              "latency", "arena"])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from edge.litert.runtime import _litert_module
    from base.progress import progress

    res = {"args": vars(a), "machine": platform.processor() or platform.machine(),
           "runtime": _litert_module()[1], "torch": torch.__version__}
    out = Path(a.out) if a.out else build_dir() / "bench" / "edge.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [("agreement", "int8_agreement", lambda bar: bench_int8_agreement(a)),
                ("arena", "tflm_arena", lambda bar: bench_arena()),
                ("latency", "latency", lambda bar: bench_latency(a, bar)),
                ("vit", "vit", lambda bar: bench_vit(a, bar)),
                ("bert-tiny", "bert_tiny", lambda bar: bench_bert_tiny(a, bar) or {
                    "skipped": "bert-tiny-sst2 is not trained (tinyshield train bert-tiny-sst2)"}),
                ("minilm", "minilm", lambda bar: bench_minilm(a, bar))]
    with progress() as bar:
        for name, key, fn in sections:
            if name in a.skip:
                continue
            t0 = time.time()
            res[key] = fn(bar)
            res.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
            res["load_average"] = list(__import__("os").getloadavg())
            out.write_text(json.dumps(res, indent=2))  # partial results survive an interrupted run
    report(res)
    print(f"wrote {out}")


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console()
    pct = lambda v: f"{100 * v:.2f}%" if v is not None else "-"
    if "latency" in res:
        t = Table(title=f"Latency, batch 1, median ms: CPU (wall) ({res['args']['threads']} thread(s), "
                        f"{res['runtime']}, load {res.get('load_average', ['?'])[0]:.1f})")
        for c in ("model", "L", "torch fp32", "LiteRT fp32", "LiteRT int8 hybrid (16x8 FFN out)",
                  "LiteRT int8 full (16x8 FFN out)", "LiteRT int8 hybrid, all 8-bit"):
            t.add_column(c, justify="left" if c == "model" else "right")
        keys = ("torch_fp32", "litert_fp32", "litert_int8_hybrid", "litert_int8_full", "litert_int8_hybrid_all8")
        for r in res["latency"]:
            t.add_row(r["model"], str(r["L"]), *[f"{r.get(k + '_cpu_ms', float('nan')):.1f} ({r[k + '_ms']:.1f})"
                                                 if k + "_ms" in r else "-" for k in keys])
        con.print(t)
    acc_rows = [res[k] for k in ("minilm", "bert_tiny", "vit") if k in res and "accuracy" in res[k]]
    if acc_rows:
        cols = ["torch_fp32", "litert_fp32", "litert_int8", "litert_int8_hybrid", "litert_int8_full",
                "tflm_int8_full_sigmoid_gelu"]
        t = Table(title="Accuracy by backend")
        t.add_column("model")
        t.add_column("data")
        for c in cols:
            t.add_column(c.replace("_", " "), justify="right")
        t.add_column("fp32 max |err|", justify="right")
        for r in acc_rows:
            err = r.get("fp32_max_abs_err", r.get("fp32_max_abs_err_logits"))
            t.add_row(r["model"], r["dataset"], *[pct(r["accuracy"].get(c)) for c in cols], f"{err:.2e}")
        con.print(t)
    if "minilm" in res:
        m = res["minilm"]
        con.print(f"MiniLM embeddings, LiteRT fp32 vs torch: max |err| {m['fp32_max_abs_err']:.2e} "
                  f"(mean {m['fp32_mean_abs_err']:.2e}); int8 cosine to fp32 mean {m['int8_cosine_mean']:.4f} "
                  f"min {m['int8_cosine_min']:.4f}; int8/fp32 prediction agreement {pct(m['int8_agreement_with_fp32'])}")
    if "bert_tiny" in res and "skipped" in res["bert_tiny"]:
        con.print(f"BERT-tiny SST-2 accuracy skipped: {res['bert_tiny']['skipped']}")
    if "int8_agreement" in res:
        t = Table(title="int8 agreement")
        for c in ("what", "runtime", "vs", "exact", "max LSB"):
            t.add_column(c, justify="right" if c in ("exact", "max LSB") else "left")
        for r in res["int8_agreement"]:
            t.add_row(r["what"], r["runtime"], r["vs"], pct(r["exact_fraction"]), str(r["max_lsb"]))
        con.print(t)
    if "tflm_arena" in res:
        t = Table(title="TFLite Micro arena (recording allocator)")
        for c in ("model", "L", "arena bytes", ".tflite bytes"):
            t.add_column(c, justify="left" if c == "model" else "right")
        for r in res["tflm_arena"]:
            t.add_row(r["model"], str(r["L"]), f"{r['arena_bytes']:,}", f"{r['tflite_bytes']:,}")
        con.print(t)


if __name__ == "__main__":
    main()
