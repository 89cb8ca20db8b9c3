"""MoE expert-caching benchmark: policies x budgets on real routing of held-out text.

For budgets of 25% and 50% of all expert bytes it decodes the same evaluation text token by token
with each policy (on-demand, per-layer LRU, LFU, AdapMoE with and without gating/prefetch, Belady
replaying the recorded top-2 trace) and measures demand hit rate, prefetch precision/recall, bytes
read and stall per token, tokens/s and perplexity. Reads hit storage (posix_fadvise DONTNEED after
every read). Writes a rich table, build/bench/moe.json and build/bench/moe_hit_rate.png.

    python -m tools.bench.moe [--tokens 1536] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

EVAL_CORPORA = ("tinyshakespeare", "warpeace", "wikitext2-valid")


def eval_ids(tokens: int) -> torch.Tensor:
    """Held-out text: equal slices of each training corpus's validation tail plus WikiText-2 test."""
    from edge import data
    from edge.moe.train import split_corpora

    _, val = split_corpora(EVAL_CORPORA)
    parts = list(val.values()) + [np.frombuffer(data.text_corpus("wikitext2-test").encode(), dtype=np.uint8)]
    per = tokens // len(parts) + 1
    return torch.from_numpy(np.concatenate([p[:per] for p in parts]).astype(np.int64))[:tokens + 1]


def runs(quick: bool):
    """(label, policy, options) in the order they run."""
    r = [("on-demand", "on-demand", {}), ("lru", "lru", {}), ("lfu", "lfu", {}),
         ("adapmoe dp only", "adapmoe", dict(gating=False, prefetch=False)),
         ("adapmoe +prefetch", "adapmoe", dict(gating=False, prefetch=True)),
         ("adapmoe +gating", "adapmoe", dict(gating=True, prefetch=False)),
         ("adapmoe", "adapmoe", dict(gating=True, prefetch=True)),
         ("belady (top-2 trace)", "belady", {})]
    return r[1:2] + r[-2:] if quick else r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.moe")
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--budgets", default="25,50", help="percent of all expert bytes, comma separated")
    ap.add_argument("--drop", type=float, default=None,
                    help="share of second experts the gating threshold drops on calibration text (default: the "
                         "largest that keeps calibration perplexity within 0.5%% of top-2)")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--model", help="trained MoE model directory (default: the `moe train` model)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and runs (smoke check)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is kept (the machine is shared, "
                                                            "so tokens/s is noisy)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from rich.console import Console
    from rich.table import Table

    from edge.moe.adapmoe import calibration_ids, open_runtime
    from edge.moe.calibrate import calibrate
    from edge.moe.replay import replay_all
    from edge.moe.runtime import MoERuntime
    from edge.moe.store import store_for
    from edge.moe.train import train
    from edge.paths import build_dir

    tokens = 256 if args.quick else args.tokens
    model_dir = args.model or train().path
    store = store_for(model_dir, int8=args.int8)
    cfg = store.cfg
    ids = eval_ids(tokens)
    t0 = time.time()
    cal = calibrate(store, calibration_ids(), drop_fraction=args.drop)
    print(f"calibration: s_l = {[f'{s:.3g}' for s in cal.sensitivity]}, T = {cal.threshold:.4g} "
          f"({time.time() - t0:.1f} s)")

    # the reference: every expert in RAM, top-2
    with MoERuntime(store, "ram") as rt:
        ref = rt.score(ids)
    top2_trace = list(ref.trace)
    ref_ppl = ref.perplexity
    # gating alone (no I/O): how many expert activations it saves at a few thresholds
    sweep = []
    for drop in ([cal.drop_fraction] if args.quick else sorted({0.3, 0.5, round(cal.drop_fraction, 1), 0.7})):
        gate = cal.gating(drop)
        with MoERuntime(store, "ram", gating=gate) as rt:
            s = rt.score(ids)
        sweep.append({"drop_fraction": drop, "threshold": gate.threshold, "perplexity": s.perplexity,
                      "ppl_change_pct": 100 * (s.perplexity / ref_ppl - 1), "experts_per_token": s.experts_activated / s.tokens,
                      "activation_reduction_pct": 100 * (1 - s.experts_activated / ref.experts_activated)})

    rows = []
    total = store.total_bytes
    for pct in [int(p) for p in args.budgets.split(",")]:
        budget = total * pct // 100
        slots = budget // store.expert_bytes
        for label, policy, opts in runs(args.quick):
            if policy == "on-demand" and rows and any(r["policy"] == "on-demand" for r in rows):
                prev = next(r for r in rows if r["policy"] == "on-demand")
                rows.append({**prev, "budget_pct": pct, "budget_bytes": budget, "slots": slots,  # budget-independent
                             "belady_same_trace": replay_all(top2_trace, cfg.layers, cfg.experts, slots)["belady"]})
                continue
            best = None
            for _ in range(max(1, args.repeats)):
                with open_runtime(store, policy, budget, calibration=cal, trace=top2_trace, **opts) as rt:
                    s = rt.score(ids)
                if best is None or s.wall_seconds < best[0].wall_seconds:
                    best = (s, rt)
            s, rt = best
            summ = s.summary()
            own = replay_all(s.trace, cfg.layers, cfg.experts, slots)["belady"]
            slot_plan = rt.cache.policy.slots if hasattr(rt.cache.policy, "slots") else None
            rows.append({"budget_pct": pct, "budget_bytes": budget, "slots": slots, "label": label, "policy": policy,
                         **opts, "slot_plan": slot_plan, "belady_same_trace": own,
                         **{k: v for k, v in summ.items() if k not in ("nll_sum", "nll_count")}})
            print(f"  {pct}% {label}: {summ['tokens_per_s']:.1f} tok/s, hit {100 * summ['hit_rate']:.1f}%")

    # hit rate vs budget, offline replay of the recorded traces (no I/O)
    with MoERuntime(store, "ram", gating=cal.gating()) as rt:
        gated_trace = list(rt.score(ids).trace)
    curve = []
    for slots in range(1, cfg.layers * cfg.experts + 1):
        top2 = replay_all(top2_trace, cfg.layers, cfg.experts, slots, dp_slots=cal.slots(slots, gated=False))
        gated = replay_all(gated_trace, cfg.layers, cfg.experts, slots, dp_slots=cal.slots(slots, gated=True))
        curve.append({"slots": slots, "budget_pct": 100 * slots / (cfg.layers * cfg.experts),
                      **{f"top2_{k}": v for k, v in top2.items()}, **{f"gated_{k}": v for k, v in gated.items()}})

    def row(pct, label):
        return next((r for r in rows if r["budget_pct"] == pct and r["label"] == label), None)

    headline = {}
    lru, ad = row(25, "lru"), row(25, "adapmoe")
    if lru and ad:
        headline = {"speedup_tokens_per_s_vs_lru_25": ad["tokens_per_s"] / lru["tokens_per_s"],
                    "adapmoe_ppl_change_pct": 100 * (ad["perplexity"] / ref_ppl - 1),
                    "adapmoe_hit_rate_25": ad["hit_rate"],
                    "belady_hit_rate_25_top2": row(25, "belady (top-2 trace)")["hit_rate"],
                    "belady_hit_rate_25_adapmoe_trace": ad["belady_same_trace"],
                    "activation_reduction_pct": 100 * (1 - ad["experts_per_token"] / (ref.experts_activated / ref.tokens))}

    result = {"model": str(model_dir), "store": str(store.root), "dtype": "int8" if args.int8 else "float32",
              "expert_bytes": store.expert_bytes, "experts_total_bytes": total, "eval_tokens": ref.tokens,
              "io": "posix_fadvise(POSIX_FADV_DONTNEED) after every expert read; sha256 checked on every read",
              "torch_threads": 1, "reference_perplexity": ref_ppl, "reference_tokens_per_s": ref.summary()["tokens_per_s"],
              "calibration": {"sensitivity": cal.sensitivity, "threshold": cal.threshold, "drop_fraction": cal.drop_fraction},
              "gating_sweep": sweep, "runs": rows, "hit_rate_vs_budget": curve, "headline": headline}
    out = build_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stem = "moe_int8" if args.int8 else "moe"  # the int8 store gets its own files
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    plot(curve, rows, out / f"{stem}_hit_rate.png")

    t = Table(title=f"MoE expert caching — {ref.tokens} held-out tokens, experts {total / 1e6:.1f} MB "
                    f"({cfg.layers}x{cfg.experts} x {store.expert_bytes / 1e3:.0f} kB), all-in-RAM ppl {ref_ppl:.3f}, "
                    f"{ref.summary()['tokens_per_s']:.0f} tok/s")
    for c in ["budget", "policy", "hit rate", "Belady same trace", "pf prec", "pf recall", "kB read/tok",
              "stall ms/tok", "tok/s", "ppl", "experts/tok (all layers)"]:
        t.add_column(c, justify="right" if c not in ("policy",) else "left")

    def pct(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    for r in rows:
        t.add_row(f"{r['budget_pct']}%", r["label"], pct(r["hit_rate"]), pct(r["belady_same_trace"]),
                  pct(r["prefetch_precision"]), pct(r["prefetch_recall"]), f"{r['bytes_per_token'] / 1e3:.0f}",
                  f"{r['stall_ms_per_token']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['perplexity']:.3f}",
                  f"{r['experts_per_token']:.2f}")
    con = Console(width=200)
    con.print(t)
    g = Table(title="adaptive gating alone (all experts in RAM)")
    for c in ["drop share (calib.)", "T", "ppl", "ppl change", "experts/tok", "activations saved"]:
        g.add_column(c, justify="right")
    for s in sweep:
        g.add_row(f"{s['drop_fraction']:.2f}", f"{s['threshold']:.3g}", f"{s['perplexity']:.3f}",
                  f"{s['ppl_change_pct']:+.2f}%", f"{s['experts_per_token']:.2f}", f"{s['activation_reduction_pct']:.1f}%")
    con.print(g)
    if headline:
        con.print({k: round(v, 4) for k, v in headline.items()})
    con.print(f"wrote {out / (stem + '.json')} and {out / (stem + '_hit_rate.png')}")
    return 0


def plot(curve, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [c["budget_pct"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in [("top2_lru", "per-layer LRU", "-"), ("top2_lfu", "LFU", "-"),
                              ("top2_dp-lru", "DP-sized LRU", "-"), ("top2_belady", "Belady (MIN)", "--"),
                              ("gated_dp-lru", "DP-sized LRU, gated trace", ":"),
                              ("gated_belady", "Belady, gated trace", ":")]:
        ax.plot(x, [100 * c[key] for c in curve], style, label=label)
    for r in rows:
        if r["label"] == "adapmoe":
            ax.plot(r["budget_pct"], 100 * r["hit_rate"], "k*", markersize=12,
                    label="AdapMoE measured (gating+prefetch)" if r["budget_pct"] == rows[0]["budget_pct"] else None)
    ax.set_xlabel("cache budget (% of all expert bytes)")
    ax.set_ylabel("demand hit rate (%)")
    ax.set_title("Expert cache hit rate vs budget (held-out text, offline replay)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
