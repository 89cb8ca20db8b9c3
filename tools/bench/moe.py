"""MoE expert-caching benchmark: policies x budgets x storage profiles on real routing of held-out text.

For each expert budget (default 10%, 25%, 50% of all expert bytes) and storage profile (host disk, phone
UFS, eMMC, SD card, MCU QSPI flash; see `edge.moe.storage`) it decodes the same held-out text token by
token with: per-layer LRU (Mixtral-offloading), LFU, least-stale, the landed AdapMoE (DP-sized LRU,
adaptive gating, prefetch), cache-aware routing over LRU and over least-stale (margin calibrated on
training text for <= 1% perplexity), the landed combination (cache-aware per-layer LRU + cheap int8
misses + prefetch), the int8 cache (every expert served from its int8 copy: four times as many experts
in the same bytes), the best configuration (cache-aware per-layer LRU over the int8 cache, prefetching
the next layer's two predicted experts) and, where the budget allows it, every expert resident (int8, the
least-used as packed int4: `edge.moe.placement`; RAM filled once at load, timed apart as "load ms"). It measures demand hit rate, bytes read, stall and decode time per token, tokens/s and
perplexity, next to the all-in-RAM reference and Belady's MIN replaying the unmodified top-2 trace
(with as many slots as full experts fit the budget, and -- the fair ceiling for an int8 cache -- as
many as int8 copies fit).
Every read really reads the file and checks its sha256; on "host" it goes to this machine's disk
(posix_fadvise DONTNEED after every read), on a device profile it then waits for the profile's device.

Writes a table, build/bench/moe.json, build/bench/moe_hit_rate.png (offline replay vs budget) and
build/bench/moe_profiles.png (hit rate and tokens/s vs budget per profile).

    nice -n 10 python -m tools.bench.moe [--tokens 384] [--budgets 10,25,50] [--storage host,ufs,emmc,sd,qspi]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

EVAL_CORPORA = ("tinyshakespeare", "warpeace", "wikitext2-valid")
PROFILE_NAMES = ("host", "ufs", "emmc", "sd", "qspi")


def eval_ids(tokens: int) -> torch.Tensor:
    """Held-out text: equal slices of each training corpus's validation tail plus WikiText-2 test."""
    from base import data
    from edge.moe.train import split_corpora

    _, val = split_corpora(EVAL_CORPORA)
    parts = list(val.values()) + [np.frombuffer(data.text_corpus("wikitext2-test").encode(), dtype=np.uint8)]
    per = tokens // len(parts) + 1
    return torch.from_numpy(np.concatenate([p[:per] for p in parts]).astype(np.int64))[:tokens + 1]


@dataclass
class Config:
    """One runtime set-up of the benchmark: a label and how to open it."""
    label: str
    policy: str
    margin_from: str | None = None   # cache-aware: the margin calibrated for this base policy
    lowp: str | None = None
    prefetch: bool = False
    adapmoe: bool = False            # the landed AdapMoE (DP slots, gating, prefetch)
    lowp_max_weight: float | None = None  # None: the command line's; >= 1: every expert from the copy
    prefetch_k: int = 1


BEST = "best: cache-aware lru + int8 cache + prefetch"
LANDED = "cache-aware + int8 misses + prefetch"
RESIDENT = "resident int8 + int4"


# LFU is in the offline replay (hit_rate_vs_budget) only: it never led there, and every decoded run costs minutes.
CONFIGS = (Config("lru", "lru"), Config("least-stale", "least-stale"),
           Config("adapmoe", "adapmoe", adapmoe=True),
           Config("cache-aware lru", "lru", margin_from="lru"),
           Config("cache-aware least-stale", "least-stale", margin_from="least-stale"),
           Config(LANDED, "lru", margin_from="lru+int8", lowp="int8", prefetch=True),
           Config("int8 cache lru", "lru", lowp="int8", lowp_max_weight=1.0),
           Config(BEST, "lru", margin_from="lru+int8 cache", lowp="int8", lowp_max_weight=1.0,
                  prefetch=True, prefetch_k=2),
           Config(RESIDENT, "resident"))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def open_config(store, c: Config, budget: int, margins: dict, cal, lowp_max_weight: float):
    from edge.moe.adapmoe import open_runtime
    from edge.moe.runtime import MoERuntime

    if c.adapmoe:
        return open_runtime(store, "adapmoe", budget, calibration=cal)
    if c.policy == "resident":
        return open_runtime(store, "resident", budget)
    margin = margins[c.margin_from].margin if c.margin_from else 0.0
    return MoERuntime(store, c.policy, budget, route_margin=margin, lowp=c.lowp, prefetch=c.prefetch,
                      lowp_max_weight=c.lowp_max_weight or lowp_max_weight, prefetch_k=c.prefetch_k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.moe")
    ap.add_argument("--tokens", type=int, default=384, help="held-out bytes decoded per run (default 384)")
    ap.add_argument("--budgets", default="10,25,50", help="percent of all expert bytes, comma separated")
    ap.add_argument("--storage", default=",".join(PROFILE_NAMES), help="storage profiles, comma separated")
    ap.add_argument("--policies", default=None, help="only these configuration labels (comma separated)")
    ap.add_argument("--lowp-max-weight", type=float, default=0.35,
                    help="cheap misses: second experts with a gate weight below this read the int8 copy")
    # The target is 1% on held-out text; a margin calibrated to 1% on training text came out at +1.2-1.6% on
    # held-out text (the two are small and differ), and one calibrated to 0.5% at +1.18% (the 1,400-step
    # model, 10% budget), so the calibration keeps three quarters of the 1% as headroom.
    ap.add_argument("--max-ppl-increase", type=float, default=0.0025,
                    help="margin calibration: allowed ppl increase on training text (default 0.0025)")
    ap.add_argument("--int8", action="store_true", help="the int8 expert store (full copies int8)")
    ap.add_argument("--model", help="trained MoE model directory (default: the `moe train` model)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, budgets and profiles (smoke check)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is kept (the machine is "
                                                            "shared, so tokens/s is noisy)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: decoding one token gains "
                                                            "nothing from more)")
    ap.add_argument("--out", default=None, help="output stem under build/bench (default moe / moe_int8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    from rich.console import Console
    from rich.table import Table

    from edge.moe.adapmoe import calibration_ids
    from edge.moe.calibrate import calibrate, calibrate_margin
    from edge.moe.placement import expert_usage, place
    from base.errors import TinyshieldError
    from edge.moe.replay import replay_all
    from edge.moe.runtime import MoERuntime
    from edge.moe.storage import profile
    from edge.moe.store import ExpertStore, store_for
    from edge.moe.train import train
    from base.paths import build_dir

    con = Console(width=220)
    tokens = 128 if args.quick else args.tokens
    budgets = [10, 25] if args.quick else [int(p) for p in args.budgets.split(",")]
    profiles = ["host", "emmc"] if args.quick else [p.strip() for p in args.storage.split(",")]
    for p in profiles:
        profile(p)  # unknown names fail here, before any work
    wanted = set(args.policies.split(",")) if args.policies else None
    configs = [c for c in CONFIGS if wanted is None or c.label in wanted]
    model_dir = args.model or train().path
    base = store_for(model_dir, int8=args.int8)
    cfg = base.cfg
    ids = eval_ids(tokens)
    calib_ids = calibration_ids()
    margin_ids = calibration_ids(per_corpus=171)  # 512 tokens for the margin sweeps, a third from each corpus
    t0 = time.time()
    cal = calibrate(base, calib_ids)
    con.print(f"AdapMoE calibration: s_l = {[f'{s:.3g}' for s in cal.sensitivity]}, T = {cal.threshold:.4g} "
              f"({time.time() - t0:.1f} s)")

    # the reference: every expert in RAM, plain top-2 (fastest of a few runs: the machine is shared)
    refs = []
    for _ in range(max(2, args.repeats)):
        with MoERuntime(base, "ram") as rt:
            refs.append(rt.score(ids))
    ref = min(refs, key=lambda s: s.wall_seconds)
    top2_trace, ref_ppl = list(ref.trace), ref.perplexity
    ref_ms = 1e3 * ref.wall_seconds / ref.tokens

    rows, margins_by_budget = [], {}
    total = base.total_bytes
    for pct in budgets:
        budget = total * pct // 100
        slots = budget // base.expert_bytes
        belady = replay_all(top2_trace, cfg.layers, cfg.experts, slots)["belady"]
        slots_int8 = budget // base.expert_bytes_of("int8")
        belady_int8 = replay_all(top2_trace, cfg.layers, cfg.experts, slots_int8)["belady"]
        margins = {}
        for c in configs:
            if c.margin_from and c.margin_from not in margins:
                t1 = time.time()
                margins[c.margin_from] = calibrate_margin(
                    base, margin_ids, c.policy, budget, lowp=c.lowp, tokens=512, max_ppl_increase=args.max_ppl_increase,
                    lowp_max_weight=c.lowp_max_weight or args.lowp_max_weight)
                m = margins[c.margin_from]
                at = next((s["perplexity"] for s in m.sweep if s["margin"] == m.margin), m.top2_perplexity)
                con.print(f"  {pct}%: margin for {c.margin_from} = {m.margin} "
                          f"(calibration ppl {m.top2_perplexity:.3f} -> {at:.3f}, {time.time() - t1:.0f} s)")
        margins_by_budget[pct] = {k: {"margin": v.margin, "sweep": v.sweep} for k, v in margins.items()}
        placement = None
        if any(c.policy == "resident" for c in configs):
            try:
                placement = place(base, budget, expert_usage(base, calib_ids))
                con.print(f"  {pct}%: resident placement: {placement.describe()}")
            except TinyshieldError as e:
                con.print(f"  {pct}%: no resident placement ({e})")
        for prof in profiles:
            store = ExpertStore(base.root, storage=prof)
            for c in configs:
                if c.policy == "resident" and placement is None:
                    continue
                # each run beside an all-in-RAM run, so that the ratio compares the two under the same load
                # (the machine is shared: a reference timed once at the start drifts from the cells)
                best, ram_best = None, None
                for _ in range(max(1, args.repeats)):
                    with MoERuntime(base, "ram") as rt:
                        r = rt.score(ids)
                    with open_config(store, c, budget, margins, cal, args.lowp_max_weight) as rt:
                        s = rt.score(ids)
                    if best is None or s.wall_seconds < best.wall_seconds:
                        best = s
                    if ram_best is None or r.wall_seconds < ram_best.wall_seconds:
                        ram_best = r
                ram_ms = 1e3 * ram_best.wall_seconds / ram_best.tokens
                summ = best.summary()
                rows.append({"budget_pct": pct, "budget_bytes": budget, "slots": slots, "storage": prof,
                             "label": c.label, "policy": c.policy, "lowp": c.lowp, "prefetch": c.prefetch,
                             "margin": margins[c.margin_from].margin if c.margin_from else 0.0,
                             "belady_top2_trace": belady, "slots_int8": slots_int8,
                             "belady_top2_trace_int8_slots": belady_int8,
                             "placement": placement.describe() if c.policy == "resident" else None,
                             "ram_ms_per_token": ram_ms, "slowdown_vs_ram": summ["ms_per_token"] / ram_ms,
                             "ppl_change_pct": 100 * (summ["perplexity"] / ref_ppl - 1),
                             **{k: v for k, v in summ.items() if k not in ("nll_sum", "nll_count")}})
                con.print(f"  {pct}% {prof:5s} {c.label}: {summ['tokens_per_s']:.1f} tok/s, "
                          f"hit {100 * summ['hit_rate']:.1f}% (Belady top-2 {100 * belady:.1f}%), "
                          f"ppl {summ['perplexity']:.3f}")

    # hit rate vs budget, offline replay of the unmodified top-2 trace (no I/O)
    curve = []
    from edge.moe.cache import replay
    from edge.moe.policies import Belady, LeastStale
    for slots in range(1, cfg.layers * cfg.experts + 1):
        r = replay_all(top2_trace, cfg.layers, cfg.experts, slots, dp_slots=cal.slots(slots, gated=False))
        r["least-stale"] = replay(top2_trace, slots, LeastStale(cfg.layers)).hits / max(1, len(top2_trace))
        # the same bytes holding int8 copies: Belady's ceiling for the int8 cache
        n8 = min(cfg.layers * cfg.experts, slots * base.expert_bytes // base.expert_bytes_of("int8"))
        r["belady-int8"] = replay(top2_trace, n8, Belady(top2_trace)).hits / max(1, len(top2_trace))
        curve.append({"slots": slots, "budget_pct": 100 * slots / (cfg.layers * cfg.experts), **r})

    headline = headlines(rows, budgets, profiles)
    # the reference as reported: the fastest all-in-RAM run of the whole bench (the runs at the start and the
    # ones paired with each cell), so that a busy start does not make the reference look slow
    ref_ms = min([ref_ms] + [r["ram_ms_per_token"] for r in rows])
    result = {"cpu": cpu_name(), "cores_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
              "model": str(model_dir), "store": str(base.root), "dtype": "int8" if args.int8 else "float32",
              "expert_bytes": base.expert_bytes, "expert_file_bytes": base.entry((0, 0))["file_bytes"],
              "experts_total_bytes": total, "eval_tokens": ref.tokens,
              "profiles": {p: (profile(p).to_dict() if profile(p) else None) for p in profiles},
              "io": "every expert read reads its file and checks its sha256; host: posix_fadvise(POSIX_FADV_DONTNEED) "
                    "after every read (this machine's disk); device profiles: page cache kept, then the profile's "
                    "device waits until latency + bytes/bandwidth (single queue)",
              "reference": {"perplexity": ref_ppl, "ms_per_token": ref_ms, "tokens_per_s": 1e3 / ref_ms},
              "lowp_max_weight": args.lowp_max_weight, "max_ppl_increase": args.max_ppl_increase,
              "adapmoe_calibration": {"sensitivity": cal.sensitivity, "threshold": cal.threshold,
                                      "drop_fraction": cal.drop_fraction},
              "margins": margins_by_budget, "runs": rows, "hit_rate_vs_budget": curve, "headline": headline}
    out = build_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("moe_int8" if args.int8 else "moe")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    plot_replay(curve, rows, out / f"{stem}_hit_rate.png")
    plot_profiles(rows, profiles, ref_ms, out / f"{stem}_profiles.png")

    t = Table(title=f"MoE expert caching on {cpu_name()}, 1 thread — {ref.tokens} held-out tokens, experts "
                    f"{total / 1e6:.1f} MB ({cfg.layers}x{cfg.experts} x {base.expert_bytes / 1e3:.0f} kB), "
                    f"all in RAM: ppl {ref_ppl:.3f}, {ref_ms:.2f} ms/token")
    for col in ["budget", "storage", "config", "margin", "hit rate", "Belady top-2", "(int8 slots)", "kB read/tok",
                "stall ms/tok",
                "ms/tok", "load ms", "x RAM", "tok/s", "ppl", "ppl change"]:
        t.add_column(col, justify="left" if col in ("config", "storage") else "right")

    def pct(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    for r in rows:
        t.add_row(f"{r['budget_pct']}%", r["storage"], r["label"], f"{r['margin']:.2f}", pct(r["hit_rate"]),
                  pct(r["belady_top2_trace"]), pct(r["belady_top2_trace_int8_slots"]),
                  f"{r['bytes_per_token'] / 1e3:.0f}", f"{r['stall_ms_per_token']:.2f}",
                  f"{r['ms_per_token']:.2f}", f"{1e3 * r['load_seconds']:.0f}", f"{r['slowdown_vs_ram']:.2f}", f"{r['tokens_per_s']:.1f}",
                  f"{r['perplexity']:.3f}", f"{r['ppl_change_pct']:+.2f}%")
    con.print(t)
    if headline:
        h = Table(title="headline")
        h.add_column("figure")
        h.add_column("value", justify="right")
        for k, v in headline.items():
            h.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
        con.print(h)
    con.print(f"wrote {out / (stem + '.json')}, {out / (stem + '_hit_rate.png')}, {out / (stem + '_profiles.png')}")
    return 0


def headlines(rows, budgets, profiles) -> dict:
    """The issue's numbers: eMMC at 25%, cache-aware vs Belady at 10/25%, the fastest configuration within 1%
    perplexity vs LRU and AdapMoE per profile and budget."""
    def row(pct, prof, label):
        return next((r for r in rows if r["budget_pct"] == pct and r["storage"] == prof and r["label"] == label), None)

    h = {}
    ref = "emmc" if "emmc" in profiles else profiles[0]  # hit rates move a little with prefetch timing
    for pct in (10, 25):
        for label in ("cache-aware lru", "cache-aware least-stale", LANDED, "int8 cache lru", BEST, RESIDENT):
            r = row(pct, ref, label)
            if r:
                h[f"{pct}% {ref}: {label} hit rate - Belady(top-2) (points)"] = 100 * (r["hit_rate"] - r["belady_top2_trace"])
                if r["lowp"] and "int8 cache" in label:
                    h[f"{pct}% {ref}: {label} hit rate - Belady(top-2, int8 slots) (points)"] = \
                        100 * (r["hit_rate"] - r["belady_top2_trace_int8_slots"])
                h[f"{pct}% {ref}: {label} ppl change (%)"] = r["ppl_change_pct"]
    # the best configuration per budget and profile: the fastest measured one within 1% of top-2's perplexity
    for pct in budgets:
        for prof in profiles:
            ok = [r for r in rows if r["budget_pct"] == pct and r["storage"] == prof and r["ppl_change_pct"] <= 1.0]
            if not ok:
                continue
            b = max(ok, key=lambda r: r["tokens_per_s"])
            h[f"{pct}% {prof}: fastest within 1% ppl"] = b["label"]
            h[f"{pct}% {prof}: its ms/token / all-in-RAM"] = b["slowdown_vs_ram"]
            for base in ("lru", "adapmoe"):
                o = row(pct, prof, base)
                if o:
                    h[f"{pct}% {prof}: its tokens/s / {base}"] = b["tokens_per_s"] / o["tokens_per_s"]
    return h


def plot_replay(curve, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [c["budget_pct"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in [("lru", "per-layer LRU", "-"), ("lfu", "LFU", "-"), ("least-stale", "least-stale", "-"),
                              ("dp-lru", "DP-sized LRU", "-"), ("belady", "Belady (MIN)", "--"),
                              ("belady-int8", "Belady, int8 copies in the same bytes", ":")]:
        ax.plot(x, [100 * c[key] for c in curve], style, label=label)
    host = [r for r in rows if r["storage"] == rows[0]["storage"]] if rows else []
    for label, mark in [("cache-aware least-stale", "r*"), ("cache-aware lru", "m^"), ("adapmoe", "k*"),
                        ("int8 cache lru", "bs"), (BEST, "gP"), (RESIDENT, "cD")]:
        pts = [(r["budget_pct"], 100 * r["hit_rate"]) for r in host if r["label"] == label]
        if pts:
            ax.plot(*zip(*pts), mark, markersize=10, label=f"{label} (measured)")
    ax.set_xlabel("cache budget (% of all expert bytes)")
    ax.set_ylabel("demand hit rate (%)")
    ax.set_title("Expert cache hit rate vs budget\n(held-out text; lines: offline replay of the top-2 trace)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_profiles(rows, profiles, ref_ms, path) -> None:
    """Per storage profile (columns): hit rate (top) and tokens/s (bottom) vs budget, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(2, len(profiles), figsize=(3.6 * len(profiles), 6.5), squeeze=False, sharex=True)
    for j, prof in enumerate(profiles):
        for label in labels:
            pts = sorted((r["budget_pct"], r) for r in rows if r["storage"] == prof and r["label"] == label)
            if not pts:
                continue
            x = [p for p, _ in pts]
            axes[0][j].plot(x, [100 * r["hit_rate"] for _, r in pts], "o-", label=label)
            axes[1][j].plot(x, [r["tokens_per_s"] for _, r in pts], "o-", label=label)
        # the fastest all-in-RAM run timed beside this profile's cells (the one timed at the start drifts with load)
        paired = [r["ram_ms_per_token"] for r in rows if r["storage"] == prof]
        axes[1][j].axhline(1e3 / min(paired or [ref_ms]), color="k", ls="--", lw=1, label="all experts in RAM")
        axes[0][j].set_title(prof)
        axes[1][j].set_xlabel("budget (% of expert bytes)")
        axes[1][j].set_yscale("log")
        for a in (axes[0][j], axes[1][j]):
            a.grid(alpha=0.3)
    axes[0][0].set_ylabel("demand hit rate (%)")
    axes[1][0].set_ylabel("tokens/s (log)")
    handles, names = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle("MoE decoding per storage profile: hit rate and tokens/s vs expert budget")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
