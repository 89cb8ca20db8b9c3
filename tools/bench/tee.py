"""Benchmark: protected inference of all-MiniLM-L6-v2 (real weights) in the four modes, and the attack suite.

    nice -n 10 .venv/bin/python -m tools.bench.tee [--seq-len 128] [--iters 10] [--trials 1000]

- correctness: shadownet vs the fp32 model (max relative error), blinded vs the fixed-point reference
  (bit-exact) and vs fp32 (sentence-embedding cosine), on real sentences;
- latency at L = seq-len, the four modes side by side in one run (sessions open together, requests
  interleaved so machine load hits all modes alike), each taking turns, plus blinded with its row parts
  pipelined (a session's default with two or more cores): client total, enclave compute (1 thread),
  accelerator compute (all cores), enclave<->accelerator transfer, and their overlap; medians over --iters;
- lying accelerator: --trials per attack against the blinded check on one MiniLM layer;
- weights: which modes expose them (normalise-and-match) and the ShadowNet recovery attacks on all 24 layers;
- transcript: plaintext rows and mask reuse in what the accelerator received.
- with --task sst2 (or agnews): the model's confidentiality on a task -- the sliced model (TEESlice: private
  slices on the public backbone) vs the same backbone fully fine-tuned, sliced latency (taking turns and with
  overlap) vs enclave-only, model stealing (N queries, thief with the accelerator's view vs black-box) and
  membership inference in every mode.
Prints rich tables and writes build/bench/tee.json (--task-only: just the task part, into --out).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from base.paths import build_dir

OVERLAP = "blinded (overlap)"
SLICED_OVERLAP = "sliced (overlap)"
# the modes that protect any model (here the MiniLM sentence encoder); sliced needs a model partitioned before
# training and is measured with --task
MODES = ("shadownet", "blinded", "enclave-only", "plain")
SENTENCES = [
    "A gripping, beautifully shot film that stays with you long after the credits.",
    "The quarterly report shows revenue growth slowing across every region.",
    "Can protected inference keep a model's weights secret on an untrusted device?",
    "The striker scored twice in the second half to seal the win.",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools.bench.tee")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--detect-layer", default="bert.encoder.layer.0.attention.output.dense")
    ap.add_argument("--accel-threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--backend", choices=["litert", "torch"], default=None,
                    help="accelerator backend of the fp32 modes (default: litert, as exported); blinded always runs torch")
    ap.add_argument("--out", default="tee.json", help="file name under build/bench/")
    ap.add_argument("--vit-images", type=int, default=500,
                    help="MNIST test images for the protected trained ViT's accuracy (0 skips; trains vit-mnist if not cached)")
    ap.add_argument("--task", action="append", choices=["sst2", "agnews"], default=None,
                    help="also measure the model's confidentiality on a task (repeatable): sliced vs fully fine-tuned "
                         "accuracy, sliced latency, stealing and membership against every mode (trains if not cached)")
    ap.add_argument("--task-only", action="store_true", help="only the --task part (the four embedding modes skipped)")
    ap.add_argument("--steal-n", default="50,500,5000", help="query budgets of the model thief (default 50,500,5000)")
    ap.add_argument("--finetune-n", default="50,500,5000",
                    help="query budgets of the fine-tuning thief against the sliced mode (and its black-box baseline)")
    ap.add_argument("--finetune-n-others", default="50,500",
                    help="query budgets of the fine-tuning thief against the other modes ('' skips them)")
    ap.add_argument("--members", type=int, default=500, help="training and held-out sentences each for membership")
    ap.add_argument("--task-iters", type=int, default=20, help="sliced vs enclave-only latency: median of this many")
    args = ap.parse_args(argv)
    if args.task_only:
        return main_tasks(args)

    from rich.console import Console

    from edge.models.minilm import load_minilm, load_tokenizer, tokenize
    from tee import audit, blinded, bundle, fieldgemm, program
    from tee.client import ProtectedSession
    from tee.enclave import Enclave

    con = Console(width=170)   # the latency table has 12 columns
    torch.set_num_threads(1)
    out_dir = build_dir() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_minilm()
    prog = bundle.captured(bundle.served(model), {"input_ids": [1, args.seq_len], "attention_mask": [1, args.seq_len]})
    params = program.linears(prog)
    tok = load_tokenizer()
    inputs = []
    for s in SENTENCES:
        t = tokenize(tok, [s], pad_to=args.seq_len)
        inputs.append({"input_ids": t.input_ids.numpy().astype(np.int32),
                       "attention_mask": t.attention_mask.numpy().astype(np.int32)})
    fp32 = [program.forward(prog, x, program.plain_lin(params)) for x in inputs]
    n_runs = args.warmup + args.iters

    bundles = {}
    protect_s = {}
    for mode in MODES:
        con.print(f"protect minilm ({mode})")
        pads = 2 * (n_runs + len(inputs) + 3) if mode == "blinded" else 0   # two sessions: with and without overlap
        b = bundle.protect(model, build_dir() / "bench" / "tee" / f"minilm-{mode}", mode, seq_len=args.seq_len, pads=pads)
        bundles[mode], protect_s[mode] = b, round(b.seconds, 1)

    threads = args.accel_threads or os.cpu_count()
    result = {"seq_len": args.seq_len, "iters": args.iters, "accel_threads": threads, "enclave_threads": 1,
              "cpu_count": os.cpu_count(), "cpu": cpu_info(), "load_avg_start": os.getloadavg(), "protect_s": protect_s}
    sessions = {m: ProtectedSession(bundles[m].path, accel_threads=threads, record=False, overlap=False,
                                    backend=args.backend if m in ("plain", "shadownet") else None)
                for m in MODES}
    # the same blinded bundle with overlap: pipelined row parts, polling for messages
    sessions[OVERLAP] = ProtectedSession(bundles["blinded"].path, accel_threads=threads, overlap=True)
    try:
        # ---- correctness ---------------------------------------------------------------------------
        owner = Enclave(bundles["blinded"].path)
        correctness = {}
        for mode, s in sessions.items():
            errs, exact, cos = [], [], []
            for x, ref in zip(inputs, fp32):
                y, _ = s.infer(x)
                errs.append(float(np.abs(y - ref).max() / np.abs(ref).max()))
                cos.append(float(y[0] @ ref[0]))
                if mode.startswith("blinded"):
                    exact.append(bool(np.array_equal(y, program.forward(owner.prog, x, blinded.reference_lin(owner.blind)))))
            correctness[mode] = {"max_rel_err_vs_fp32": max(errs), "min_cos_vs_fp32": min(cos)}
            if exact:
                correctness[mode]["equal_to_fixed_point_reference"] = all(exact)
        result["correctness"] = correctness

        # ---- latency, interleaved ------------------------------------------------------------------
        rows = {m: [] for m in sessions}
        for i in range(n_runs):
            for mode, s in sessions.items():
                _, t = s.infer(inputs[i % len(inputs)])
                s.ready()     # the next pad is unsealed between requests, never during another mode's
                if i >= args.warmup:
                    rows[mode].append(t)
        med = lambda ts, k: float(np.median([getattr(t, k) for t in ts])) * 1e3
        keys = ("total_s", "enclave_s", "accelerator_s", "transfer_s", "overlap_s", "pad_s", "offline_s",
                "enclave_cpu_s", "accelerator_cpu_s")
        latency = {m: {k: med(ts, k) for k in keys} | {"min_total_s": min(t.total_s for t in ts) * 1e3}
                   for m, ts in rows.items()}
        latency = {m: {k[:-2] + "_ms": round(v, 2) for k, v in d.items()} for m, d in latency.items()}
        result["latency_ms"] = latency
        result["backends"] = {m: s.backend if m in ("plain", "shadownet") else ("none" if m == "enclave-only" else "torch")
                              for m, s in sessions.items()}
        # the exact field GEMM each blinded accelerator chose (tee.fieldgemm), and why faster ones were passed over
        stats = {m: s.accelerator_stats() for m, s in sessions.items()}
        result["kernels"] = {m: st["kernel"] for m, st in stats.items()}
        result["kernel_notes"] = {m: st["kernel_note"] for m, st in stats.items() if st["kernel_note"]}
        result["load_avg_end"] = os.getloadavg()
        bl, pl, eo = (min(latency["blinded"]["total_ms"], latency[OVERLAP]["total_ms"]) if m == "blinded"
                      else latency[m]["total_ms"] for m in ("blinded", "plain", "enclave-only"))
        result["targets"] = {"blinded_best_ms": bl, "blinded_over_plain": round(bl / pl, 2),
                             "blinded_le_2x_plain": bl <= 2 * pl, "blinded_over_enclave_only": round(bl / eo, 2),
                             "blinded_faster_than_enclave_only": bl < eo}
        result["core_scaling"] = core_scaling()
        result["field_gemm"] = field_gemm_kernels(params, args.seq_len, threads)

        # ---- transcript ----------------------------------------------------------------------------
        transcripts = {}
        seq = [inputs[0], inputs[1], inputs[0]]
        acts = [bundle.record_inputs(prog, [x]) for x in seq]
        for mode in MODES:
            s = sessions[mode]
            s.record(True)
            for x in seq:
                s.infer(x)
            tr = s.transcript()
            s.record(False)
            transcripts[mode] = asdict(audit.transcript_report(mode, tr, acts))
        result["transcript"] = transcripts
    finally:
        for s in sessions.values():
            s.close()

    # ---- weights ---------------------------------------------------------------------------------
    from safetensors.numpy import load_file
    exposure = {}
    for mode, b in bundles.items():
        f = b.path / "accelerator" / "weights.safetensors"
        exposure[mode] = asdict(audit.weight_exposure(mode, load_file(str(f)) if f.is_file() else {}, params))
    result["weight_exposure"] = exposure
    sn = Enclave(bundles["shadownet"].path)
    accel = load_file(str(bundles["shadownet"].path / "accelerator" / "weights.safetensors"))
    rng = np.random.default_rng(0)
    attacks = {"public=MiniLM checkpoint": [], "public=related model (weights + 50% noise)": []}
    for name, (w, _) in params.items():
        layer = sn.side.layers[name][0]
        noisy = w + 0.5 * rng.standard_normal(w.shape).astype(np.float32) * np.linalg.norm(w, axis=1, keepdims=True) / np.sqrt(w.shape[1])
        for key, pub in zip(attacks, (w, noisy)):
            attacks[key].append(asdict(audit.shadow_attacks(name, accel[name].T, layer.fake, layer.perm, w, pub)))
    summary = {}
    for key, rs in attacks.items():
        summary[key] = {k: float(np.mean([r[k] for r in rs])) for k in
                        ("normalise_match_cos", "fake_auc", "fake_balanced_accuracy", "fake_recall", "public_match_share",
                         "public_fake_accuracy", "public_recovered_cos", "public_only_cos")}
    result["shadownet_attacks"] = {"mean_over_layers": summary, "per_layer": attacks["public=related model (weights + 50% noise)"]}

    # ---- lying accelerator ------------------------------------------------------------------------
    w, b_ = params[args.detect_layer]
    t0 = time.perf_counter()
    det = audit.detection_trials(w, b_, args.seq_len, args.trials)
    result["detection"] = {"layer": args.detect_layer, "seconds": round(time.perf_counter() - t0, 1),
                           "kernel": fieldgemm.chosen().name,
                           "results": [asdict(d) for d in det],
                           "other_modes": "plain and shadownet have no integrity check: every altered result is accepted"}

    if args.vit_images > 0:
        con.print(f"protected ViT on {args.vit_images} MNIST test images")
        result["vit"] = bench_vit(args.vit_images, threads, args.backend)

    (out_dir / args.out).write_text(json.dumps(result, indent=1, default=float))
    report(con, result)
    con.print(f"wrote {out_dir / args.out}")
    if args.task:
        main_tasks(args, {"cpu": result["cpu"], "cpu_count": result["cpu_count"], "load_avg_start": os.getloadavg()})
    return 0


def bench_vit(n: int, threads: int, backend: str | None) -> dict:
    """Accuracy and latency of the trained vit-mnist in each mode on the first n MNIST test images."""
    from base import data
    from edge.models.registry import load_dir
    from edge.recipes import vit_mnist
    from tee import bundle
    from tee.client import ProtectedSession

    model = load_dir(vit_mnist.train(quiet=True).path).model
    ds = data.mnist(allow_fallback=True)
    x = vit_mnist.to_tensor(ds.x_test[:n]).numpy()
    y = ds.y_test[:n]
    with torch.no_grad():
        fp32 = model(torch.from_numpy(x)).argmax(-1).numpy()
    out = {"images": n, "fp32_accuracy": float((fp32 == y).mean()), "modes": {}}
    for mode in MODES:
        b = bundle.protect(model, build_dir() / "bench" / "tee" / f"vit-{mode}", mode, pads=0)
        preds, totals = [], []
        with ProtectedSession(b.path, accel_threads=threads,
                              backend=backend if mode in ("plain", "shadownet") else None) as s:
            for i in range(n):
                logits, t = s.infer({"image": x[i:i + 1]})
                preds.append(int(logits.argmax()))
                totals.append(t.total_s - t.offline_s)   # blinded pads are made on the spot here: offline work
        preds = np.array(preds)
        out["modes"][mode] = {"accuracy": float((preds == y).mean()), "agrees_with_fp32": float((preds == fp32).mean()),
                              "median_ms": float(np.median(totals)) * 1e3}
    return out


def field_gemm_kernels(params: dict, seq_len: int, threads: int, iters: int = 20) -> dict:
    """Every field GEMM kernel (tee.fieldgemm) on this CPU: its self-test verdict, and the median time of one
    MiniLM encoder layer's four GEMMs (real quantised weights, seq_len rows of three digit planes) on the
    accelerator's threads -- the numbers behind the order in which tee.fieldgemm.KERNELS tries them."""
    from tee import blinded, fieldgemm
    rng = np.random.default_rng(0)
    layer = [blinded.quantize_weights(w)[0] for n, (w, _) in params.items() if ".layer.0." in n]
    data = [(rng.integers(0, 256, (3 * seq_len, w.shape[1]), dtype=np.uint8), torch.from_numpy(w.T.astype(np.int8)))
            for w in layer]
    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for name, kernel in fieldgemm.KERNELS.items():
            if not kernel.available:
                out[name] = {"self_test": "not in this torch build"}
                continue
            why = fieldgemm.self_test(kernel)
            gemms = [fieldgemm.FieldGemm(wt, kernel) for _, wt in data]
            times = []
            for _ in range(iters + 2):
                t = time.perf_counter()
                for g, (d, _) in zip(gemms, data):
                    g.planes(d)
                times.append(time.perf_counter() - t)
            out[name] = {"self_test": why or "passed", "layer_ms": round(float(np.median(times[2:])) * 1e3, 2),
                         "min_layer_ms": round(min(times) * 1e3, 2)}
    finally:
        torch.set_num_threads(own)
    return out


def cpu_info() -> dict:
    """The CPU the numbers were measured on, and the instruction-set limit oneDNN was given."""
    from pathlib import Path
    info = {"model": "unknown", "int8_dot_product": [],
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["model"] = value.strip()
            elif key.strip() == "flags":
                info["int8_dot_product"] = sorted(set(value.split()) & {"avx512_vnni", "avx_vnni", "amx_int8"})
                break
    except OSError:
        pass
    return info


def _matmul_loop(seconds: float, start, queue) -> None:
    import numpy as np
    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    start.wait()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ a
        n += 1
    queue.put(n)


def core_scaling(seconds: float = 2.0) -> dict:
    """How much more work all cores do than one: 1 process, then os.cpu_count() processes, each multiplying
    256x256 matrices with one BLAS thread. On a machine whose cores are really separate the ratio is near
    the core count; it bounds what overlapping the enclave with the accelerator can gain."""
    import multiprocessing as mp

    from tee.client import threads_env

    ctx = mp.get_context("spawn")
    k = os.cpu_count() or 1
    counts = {}
    with threads_env(1):
        for n in (1, k):
            queue, start = ctx.Queue(), ctx.Event()
            procs = [ctx.Process(target=_matmul_loop, args=(seconds, start, queue)) for _ in range(n)]
            for p in procs:
                p.start()
            time.sleep(1.0)          # let every process import numpy before the clock starts
            start.set()
            counts[n] = sum(queue.get() for _ in procs)
            for p in procs:
                p.join()
    return {"processes": k, "seconds": seconds, "ops_one": counts[1], "ops_all": counts[k],
            "speedup": round(counts[k] / max(counts[1], 1), 2)}


def report(con, r: dict) -> None:
    from rich.table import Table
    cpu = r["cpu"]
    isa = f", ONEDNN_MAX_CPU_ISA={cpu['onednn_max_cpu_isa']}" if cpu["onednn_max_cpu_isa"] else ""
    tab = Table(title=f"MiniLM L={r['seq_len']}: latency (median of {r['iters']}, ms; enclave 1 thread, accelerator "
                      f"{r['accel_threads']} threads) on {cpu['model']} "
                      f"({', '.join(cpu['int8_dot_product']) or 'no VNNI/AMX'}{isa})")
    for c in ("mode", "backend (kernel)", "total", "min total", "enclave", "accelerator", "transfer", "overlap", "vs plain",
              "vs enclave-only", "enclave CPU", "accel CPU"):
        tab.add_column(c, justify="right")
    L = r["latency_ms"]
    for m, d in L.items():
        kernel = r["kernels"][m]
        tab.add_row(m, r["backends"][m] + (f" ({kernel})" if kernel != "none" else ""), f"{d['total_ms']:.1f}",
                    f"{d['min_total_ms']:.1f}", f"{d['enclave_ms']:.1f}",
                    f"{d['accelerator_ms']:.1f}", f"{d['transfer_ms']:.1f}", f"{d['overlap_ms']:.1f}",
                    f"{d['total_ms'] / L['plain']['total_ms']:.2f}x",
                    f"{d['total_ms'] / L['enclave-only']['total_ms']:.2f}x", f"{d['enclave_cpu_ms']:.1f}",
                    f"{d['accelerator_cpu_ms']:.1f}")
    con.print(tab)
    for m, note in r["kernel_notes"].items():
        con.print(f"{m}: {note}")
    con.print("The four modes take turns (enclave, then accelerator); \"blinded (overlap)\" pipelines two row parts "
              "and polls for messages -- the default of a protected session with two or more cores.")
    con.print("overlap = enclave + accelerator + transfer - total: work the two processes did at the same time "
              "(with overlap, CPU times include polling for the other side's messages).")
    cs = r["core_scaling"]
    con.print(f"this machine's cores: {cs['processes']} processes multiplying matrices together do {cs['speedup']:.2f}x "
              f"the work of one ({cs['ops_one']} vs {cs['ops_all']} products in {cs['seconds']} s) -- the most any "
              "overlap of enclave and accelerator can gain here")
    tab = Table(title=f"field GEMM kernels: one MiniLM layer's four GEMMs, L={r['seq_len']} "
                      f"(median of 20, ms, {r['accel_threads']} threads), in the order they are tried")
    for c in ("kernel", "self-test", "layer", "min layer"):
        tab.add_column(c, justify="right")
    for k, d in r["field_gemm"].items():
        ms = [f"{d[c]:.1f}" if c in d else "-" for c in ("layer_ms", "min_layer_ms")]
        tab.add_row(k, d["self_test"][:60], *ms)
    con.print(tab)
    con.print(f"targets: {r['targets']}; load average {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f} "
              f"on {r['cpu_count']} cores")
    tab = Table(title="correctness vs the fp32 model")
    for c in ("mode", "max rel err", "min cosine", "== fixed-point ref"):
        tab.add_column(c, justify="right")
    for m, d in r["correctness"].items():
        tab.add_row(m, f"{d['max_rel_err_vs_fp32']:.2e}", f"{d['min_cos_vs_fp32']:.6f}",
                    str(d.get("equal_to_fixed_point_reference", "")))
    con.print(tab)
    tab = Table(title="what the untrusted accelerator learns")
    for c in ("mode", "weights exposed", "weight rows matched", "input rows matched", "max |cos| (chance)",
              "same data on repeat", "mask-reuse pairs"):
        tab.add_column(c, justify="right")
    for m in r["weight_exposure"]:
        w, t = r["weight_exposure"][m], r["transcript"][m]
        tab.add_row(m, "YES" if w["exposed"] else "no", f"{w['share_rows_matched']:.1%}", str(t["rows_matched"]),
                    f"{t['max_row_cos']:.3f} ({t['chance_cos']:.3f})", str(t["repeated_input_identical"]),
                    f"{t['mask_reuse_pairs']}/{t['pairs_checked']}")
    con.print(tab)
    tab = Table(title="ShadowNet weight recovery (mean over the 24 MiniLM layers)")
    for c in ("attacker's public model", "normalise+match cos", "fake AUC / bal. acc (statistics)", "channels placed",
              "fakes by public match", "recovered cos", "public-only cos"):
        tab.add_column(c, justify="right")
    for k, d in r["shadownet_attacks"]["mean_over_layers"].items():
        tab.add_row(k, f"{d['normalise_match_cos']:.4f}", f"{d['fake_auc']:.3f} / {d['fake_balanced_accuracy']:.2f}",
                    f"{d['public_match_share']:.2%}", f"{d['public_fake_accuracy']:.2f}",
                    f"{d['public_recovered_cos']:.4f}", f"{d['public_only_cos']:.4f}")
    con.print(tab)
    tab = Table(title=f"lying accelerator vs blinded mode ({r['detection']['layer']}, "
                      f"kernel {r['detection']['kernel']})")
    for c in ("attack", "trials", "detected", "rate", "theoretical miss / check"):
        tab.add_column(c, justify="right")
    for d in r["detection"]["results"]:
        tab.add_row(d["attack"], str(d["trials"]), str(d["detected"]), f"{d['rate']:.4f}", f"{d['theoretical_miss']:.2e}")
    con.print(tab)
    con.print(r["detection"]["other_modes"])
    if "vit" in r:
        v = r["vit"]
        tab = Table(title=f"trained vit-mnist, first {v['images']} MNIST test images (fp32 accuracy {v['fp32_accuracy']:.2%})")
        for c in ("mode", "accuracy", "agrees with fp32", "median ms (online)"):
            tab.add_column(c, justify="right")
        for m, d in v["modes"].items():
            tab.add_row(m, f"{d['accuracy']:.2%}", f"{d['agrees_with_fp32']:.2%}", f"{d['median_ms']:.1f}")
        con.print(tab)


def main_tasks(args, result: dict | None = None) -> int:
    from rich.console import Console
    con = Console(width=170)
    torch.set_num_threads(1)
    result = {"cpu": cpu_info(), "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()} if result is None else result
    threads = args.accel_threads or os.cpu_count()
    ns = tuple(int(n) for n in args.steal_n.split(","))
    result["tasks"] = {}
    for task in args.task or ["sst2"]:
        con.print(f"task {task}")
        ft = {"sliced": _ints(args.finetune_n), "others": _ints(args.finetune_n_others)}
        result["tasks"][task] = bench_task(task, args.seq_len, args.task_iters, args.warmup, threads, ns, args.members,
                                           ft)
        report_task(con, result["tasks"][task])
    result["load_avg_end_tasks"] = os.getloadavg()
    out = build_dir() / "bench" / (args.out if args.task_only else "tee-tasks.json")
    out.write_text(json.dumps(result, indent=1, default=float))
    con.print(f"wrote {out}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(",") if n.strip())


def bench_task(task: str, seq_len: int, iters: int, warmup: int, threads: int, ns: tuple[int, ...],
               members: int, finetune_ns: dict | None = None) -> dict:
    """The model's confidentiality on a task: the sliced model (private slices trained on a public backbone) and
    the same backbone fully fine-tuned (what a user would otherwise ship), same data and budget (edge.recipes.minilm_task);
    sliced inference exact and its latency next to enclave-only; model stealing and membership inference against
    every mode (tee.stealing): the sliced model in sliced mode, the fully fine-tuned one in the others."""
    from safetensors.numpy import load_file

    from edge.models.bert import BertClassifier
    from edge.models.minilm import load_minilm, load_tokenizer, tokenize
    from edge.models.registry import load_dir
    from edge.recipes import minilm_task
    from tee import blinded, bundle, program, stealing
    from tee.client import ProtectedSession
    from tee.enclave import Enclave

    trained = {v: minilm_task.train(task=task, variant=v, quiet=True) for v in minilm_task.VARIANTS}
    models = {v: load_dir(t.path).model for v, t in trained.items()}
    out = {"task": task, "models": {v: t.metrics | {"path": str(t.path)} for v, t in trained.items()}}
    tr, ev = minilm_task.splits(task)

    # ---- sliced inference: exact, and its latency next to enclave-only (the same model) -------------------
    tok = load_tokenizer()
    inputs = []
    for text in ev.texts[:4]:
        t = tokenize(tok, [text], pad_to=seq_len)
        inputs.append({"input_ids": t.input_ids.numpy().astype(np.int32),
                       "attention_mask": t.attention_mask.numpy().astype(np.int32)})
    root = build_dir() / "bench" / "tee" / task
    n_runs = warmup + iters
    b_sl = bundle.protect(models["sliced"], root / "sliced", "sliced", seq_len=seq_len,
                          pads=2 * (n_runs + len(inputs) + 2))     # two sessions: with and without overlap
    b_eo = bundle.protect(models["sliced"], root / "sliced-enclave-only", "enclave-only", seq_len=seq_len)
    owner = Enclave(b_sl.path)
    # turn-taking, as the four modes above, and "sliced (overlap)" as "blinded (overlap)" there: row parts pipelined,
    # polling for messages -- it wins where the two sides find free cores and loses on a busy machine
    sessions = {"sliced": ProtectedSession(b_sl.path, accel_threads=threads, overlap=False),
                SLICED_OVERLAP: ProtectedSession(b_sl.path, accel_threads=threads, overlap=True),
                "enclave-only": ProtectedSession(b_eo.path, accel_threads=threads, overlap=False)}
    try:
        exact = []
        for x in inputs:
            ref = program.forward(owner.prog, x, blinded.reference_lin(owner.blind))
            for m in ("sliced", SLICED_OVERLAP):
                exact.append(bool(np.array_equal(sessions[m].infer(x)[0], ref)))
        rows = {m: [] for m in sessions}
        load_start = os.getloadavg()
        for i in range(n_runs):
            for m, s in sessions.items():
                _, t = s.infer(inputs[i % len(inputs)])
                s.ready()
                if i >= warmup:
                    rows[m].append(t)
        load = [load_start, os.getloadavg()]
        kernel = sessions["sliced"].accelerator_stats()["kernel"]
    finally:
        for s in sessions.values():
            s.close()
    lat = {m: {"total_ms": float(np.median([t.total_s for t in ts])) * 1e3,
               "enclave_ms": float(np.median([t.enclave_s for t in ts])) * 1e3,
               "accelerator_ms": float(np.median([t.accelerator_s for t in ts])) * 1e3,
               "transfer_ms": float(np.median([t.transfer_s for t in ts])) * 1e3,
               "enclave_cpu_ms": float(np.median([t.enclave_cpu_s for t in ts])) * 1e3,
               "accelerator_cpu_ms": float(np.median([t.accelerator_cpu_s for t in ts])) * 1e3} for m, ts in rows.items()}
    out["sliced_inference"] = {"seq_len": seq_len, "iters": iters, "equal_to_fixed_point_reference": all(exact),
                               "latency_ms": lat, "load_avg": load, "accel_threads": threads, "field_gemm": kernel,
                               "enclave_steps": len(owner.prog.plan), "cpu": cpu_info()["model"],
                               "sliced_over_enclave_only": round(lat["sliced"]["total_ms"] / lat["enclave-only"]["total_ms"], 3),
                               "sliced_overlap_over_enclave_only":
                                   round(lat[SLICED_OVERLAP]["total_ms"] / lat["enclave-only"]["total_ms"], 3)}

    # ---- stealing and membership against every mode --------------------------------------------------------
    public = load_minilm()
    thief = BertClassifier(public.config, minilm_task.TASKS[task])
    thief.bert.load_state_dict(public.state_dict())
    used = set(np.load(trained["sliced"].path / "members.npy").tolist())
    outside = [i for i in np.random.default_rng(1).permutation(len(tr.texts)) if i not in used]
    queries = [tr.texts[i] for i in outside[:max(ns)]]
    held_out = outside[max(ns):max(ns) + members]
    inside = sorted(used)[:members]
    steal, member, member_of = {}, {}, {}
    caches = {v: {} for v in models}
    for mode in bundle.MODES:
        v = "sliced" if mode == "sliced" else "full"
        b = bundle.protect(models[v], root / f"steal-{mode}", mode, seq_len=64, pads=0, litert=False)
        f = b.path / "accelerator" / "weights.safetensors"
        accel = load_file(str(f)) if f.is_file() else {}
        t0 = time.perf_counter()
        steal[mode] = [asdict(t) for t in stealing.steal(mode, models[v], Enclave(b.path).prog, accel, thief, queries,
                                                         ev.texts, ev.labels, ns, cache=caches[v])]
        if v not in member_of:     # the protected answers are the model's: one measurement per model
            member_of[v] = asdict(stealing.membership(mode, models[v], [tr.texts[i] for i in inside], tr.labels[inside],
                                                      [tr.texts[i] for i in held_out], tr.labels[held_out]))
        member[mode] = member_of[v] | {"mode": mode, "victim": v}
        print(f"  {mode}: stealing and membership in {time.perf_counter() - t0:.0f} s", flush=True)
    out["stealing"], out["membership"] = steal, member
    report_task(con_task(), {k: out[k] for k in ("task", "models", "sliced_inference", "stealing", "membership")}
                | {"targets": "(fine-tuning thief next)"})
    # the fine-tuning thief (whole model trained on the answers): the sliced mode at every budget, the others at a
    # smaller set (each budget trains a model per mode; black-box thieves and public starting points are shared)
    finetune_ns = finetune_ns or {"sliced": ns, "others": ns}
    out["stealing_finetune"] = {}
    for mode in sorted(bundle.MODES, key=lambda m: m != "sliced"):    # the mode the targets are about first
        n_ft = finetune_ns["sliced" if mode == "sliced" else "others"]
        if not n_ft:
            continue
        v = "sliced" if mode == "sliced" else "full"
        b = bundle.load_header(root / f"steal-{mode}")
        f = b.path / "accelerator" / "weights.safetensors"
        accel = load_file(str(f)) if f.is_file() else {}
        t0 = time.perf_counter()
        out["stealing_finetune"][mode] = [asdict(t) for t in stealing.steal_finetune(
            mode, models[v], Enclave(b.path).prog, accel, thief, queries, ev.texts, ev.labels, n_ft)]
        print(f"  {mode}: fine-tuning thief in {time.perf_counter() - t0:.0f} s", flush=True)
    acc = {v: out["models"][v]["accuracy"] for v in models}
    out["targets"] = {
        "sliced_minus_full_accuracy_points": round(100 * (acc["sliced"] - acc["full"]), 2),
        "sliced_within_1_point": acc["sliced"] >= acc["full"] - 0.01,
        "sliced_stolen_le_blackbox_plus_1": all(t["stolen_accuracy"] <= t["blackbox_accuracy"] + 0.01
                                                for t in steal["sliced"] + out["stealing_finetune"].get("sliced", [])),
        "sliced_membership_le_52": member["sliced"]["balanced_accuracy"] <= 0.52,
        # the faster way of running the sliced mode, as the blinded target above takes the faster of its two
        "sliced_le_enclave_only": min(out["sliced_inference"]["sliced_over_enclave_only"],
                                      out["sliced_inference"]["sliced_overlap_over_enclave_only"]) <= 1.0}
    return out


def con_task():
    from rich.console import Console
    return Console(width=170)


def report_task(con, r: dict) -> None:
    from rich.table import Table
    tab = Table(title=f"{r['task']}: the private part trained on a public backbone vs full fine-tuning (same data, steps)")
    for c in ("model", "accuracy", "trained parameters", "train s", "steps x batch"):
        tab.add_column(c, justify="right")
    for v, m in r["models"].items():
        tab.add_row(v, f"{m['accuracy']:.2%}", f"{m['trained_parameters']:,}", f"{m['train_seconds']:.0f}",
                    f"{m['steps']} ({m['train_sentences']} sentences)")
    con.print(tab)
    si = r["sliced_inference"]
    con.print(f"sliced L={si['seq_len']}: equal to its fixed-point reference: {si['equal_to_fixed_point_reference']}; "
              f"median of {si['iters']}: sliced {si['latency_ms']['sliced']['total_ms']:.1f} ms, enclave-only "
              f"{si['latency_ms']['enclave-only']['total_ms']:.1f} ms ({si['sliced_over_enclave_only']:.2f}x)"
              + (f", sliced with overlap {si['latency_ms'][SLICED_OVERLAP]['total_ms']:.1f} ms "
                 f"({si['sliced_overlap_over_enclave_only']:.2f}x)" if SLICED_OVERLAP in si["latency_ms"] else "")
              + (f"; load average {si['load_avg'][0][0]:.1f} -> {si['load_avg'][1][0]:.1f}" if "load_avg" in si else "")
              + (f"; {si['cpu']}, accelerator {si['accel_threads']} threads, {si['field_gemm']}, enclave plan "
                 f"{si['enclave_steps']} steps" if "field_gemm" in si else ""))
    con.print({m: {k: round(v, 1) for k, v in d.items()} for m, d in si["latency_ms"].items()})
    tab = Table(title="model stealing: thief with the accelerator's view vs black-box (same queries)")
    for c in ("mode", "thief", "N", "victim acc", "stolen acc", "agreement", "black-box acc", "black-box agreement",
              "layers recovered"):
        tab.add_column(c, justify="right")
    for mode, ts in list(r["stealing"].items()) + list(r.get("stealing_finetune", {}).items()):
        for t in ts:
            tab.add_row(mode, t.get("attack", "probe"), str(t["n"]), f"{t['victim_accuracy']:.2%}", f"{t['stolen_accuracy']:.2%}",
                        f"{t['stolen_agreement']:.2%}", f"{t['blackbox_accuracy']:.2%}",
                        f"{t['blackbox_agreement']:.2%}", str(t["layers_recovered"]) + (" + head" if t["head_recovered"] else ""))
    con.print(tab)
    tab = Table(title="membership inference (confidence threshold), training vs held-out sentences")
    for c in ("mode", "victim", "balanced accuracy", "AUC"):
        tab.add_column(c, justify="right")
    for mode, m in r["membership"].items():
        tab.add_row(mode, m["victim"], f"{m['balanced_accuracy']:.2%}", f"{m['auc']:.3f}")
    con.print(tab)
    con.print(f"targets: {r['targets']}")


if __name__ == "__main__":
    raise SystemExit(main())
