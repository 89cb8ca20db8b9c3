"""Benchmark: arena memory of BERT-tiny int8 under the layerwise and tiled schedules, vs TFLite Micro.

    nice -n 10 .venv/bin/python -m tools.bench.memory [--lengths 64,128,256,512,1024] [--no-tflm]

Model: BERT-tiny encoder (BertConfig defaults: 2 layers, d = 128, 2 heads, FFN 512, vocab 30522;
positions extended to 1024 for L = 1024), random weights (memory depends on shapes only), int8 by
mcu.lower; input int32 ids (L), output the int8 hidden states (L, d).
For each L: layerwise and tiled arenas (planner: best_fit; greedy_by_size = TFLite Micro's planner,
for comparison; tiles: the fewest MACs, then calls, within 2% of the smallest peak the search finds), the floor 3*L*d (X, K, V of all tokens) plus the attention block scratch of the
chosen tiles (q and context rows, score tile, int32 accumulators, row statistics), MACs of both
schedules (tiled recomputes scores when a key tile is shorter than L), and TFLite Micro's measured
arena for the same encoder exported by edge.litert (full int8; GELU there is x*sigmoid(1.702x)
because TFLite Micro has no GELU kernel). Then the largest L whose tiled arena fits stm32f405.
Prints a table and writes build/bench/memory.json and build/bench/memory_timeline_L512.png.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from base.paths import build_dir

D = 128


def encoder_graph(L: int, seed: int = 0, classifier: bool = False):
    """BERT-tiny int8 at L tokens: the encoder (ids -> hidden states), or with `classifier` the
    deployable model (+ mean pooling + 2-way head: ids -> logits, so I/O is a few bytes)."""
    import torch

    from edge.models.bert import BertClassifier, BertConfig, BertModel
    from mcu.from_aten import lower_module

    torch.manual_seed(seed)
    cfg = BertConfig(max_position_embeddings=max(512, L))
    ids = np.random.default_rng(seed).integers(1, 30522, (2, L))
    if classifier:
        model = BertClassifier(cfg, 2).eval()
        return model, lower_module(model, ids)
    model = BertModel(cfg).eval()
    return model, lower_module(model, ids)


def block_scratch(rows: int, kt: int, L: int, d: int = D, heads: int = 2) -> int:
    """Bytes of one attention block: q rows + context rows + score tile + accumulators + row stats."""
    from mcu.tiled import attention_scratch
    return 2 * rows * d + sum(attention_scratch(rows, min(kt, L), d // heads).values())


def measure(L: int, tflm: bool, plot_path=None) -> dict:
    from mcu.planner import plan
    from mcu.profile import plot_timelines, profile
    from mcu.schedules import Tiles, layerwise, search_tiles, tiled_with

    model, g = encoder_graph(L)
    lw = layerwise(g)
    t0 = time.time()
    search = search_tiles(g, budget=None, slack=1.02)   # ~ the smallest peak (2% slack for fewer calls)
    tl = tiled_with(g, Tiles(search.chosen.rows, search.chosen.kt))
    search_s = time.time() - t0
    plw, ptl = profile(lw), profile(tl)
    floor = 3 * L * D
    scratch = block_scratch(search.chosen.rows, search.chosen.kt, L)
    row = {
        "L": L,
        "layerwise_arena": plw.arena_bytes, "layerwise_greedy_by_size": plan(lw, "greedy_by_size").arena_bytes,
        "layerwise_peak_op": plw.steps[plw.peak_step].op,
        "tiled_arena": ptl.arena_bytes, "tiled_greedy_by_size": plan(tl, "greedy_by_size").arena_bytes,
        "tiled_live_peak": ptl.peak_live, "tiled_peak_op": ptl.steps[ptl.peak_step].op,
        "rows": search.chosen.rows, "kt": search.chosen.kt, "calls": len(tl.calls), "search_s": round(search_s, 1),
        "floor_3Ld": floor, "block_scratch": scratch,
        "ratio_to_floor_plus_scratch": ptl.arena_bytes / (floor + scratch),
        "layerwise_over_tiled": plw.arena_bytes / ptl.arena_bytes,
        "macs_layerwise": lw.macs(), "macs_tiled": tl.macs(), "recompute": tl.macs() / lw.macs() - 1,
        "candidates": [{"rows": c.rows, "kt": c.kt, "peak": c.peak, "macs": c.macs, "calls": c.calls}
                       for c in search.candidates],
    }
    if plot_path is not None:
        plot_timelines([plw, ptl], plot_path, 256 * 1024, f"BERT-tiny int8 encoder, L = {L}",
                       budget_label="target")
        row["plot"] = str(plot_path)
    if tflm:
        from edge.litert.int8 import bert_tiny_int8_encoder
        arena, err = tflm_arena(bert_tiny_int8_encoder(L, model=model), L)
        if arena is None:
            row["tflm_error"] = err
        else:
            row["tflm_arena"] = arena
            row["tflm_over_tiled"] = arena / ptl.arena_bytes
    return row


_TFLM_RUN = """
import sys, numpy as np
from edge.litert.runtime import MicroInterpreter
ids = np.random.default_rng(1).integers(1, 30522, (1, int(sys.argv[2]))).astype(np.int32)
print(MicroInterpreter(open(sys.argv[1], "rb").read()).run_full([ids]).arena_bytes)
"""


def tflm_arena(model: bytes, L: int) -> tuple[int | None, str]:
    """TFLite Micro's arena for one inference on real token ids (not zeros: an all-[PAD] input
    aborts its int8 graph at L = 512), in a child process because TFLite Micro aborts the
    process on failures (it does at L = 1024)."""
    import subprocess
    import sys
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(model)
        f.flush()
        r = subprocess.run([sys.executable, "-c", _TFLM_RUN, f.name, str(L)], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"TFLite Micro exited with {r.returncode}: {r.stderr.strip()[-200:]}"
    return int(r.stdout.split()[-1]), ""


def planner_stats(n: int = 400, seed: int = 0) -> dict:
    """greedy_by_size (TFLite Micro) vs best_fit on random buffer sets (8-40 buffers, sizes 16 B-8 KiB,
    random lifetimes over 60 steps): arena over the live-set lower bound, and how often best_fit wins."""
    from mcu.planner import align_up, live_bytes, plan_buffers
    rng = np.random.default_rng(seed)
    over = {"greedy_by_size": [], "best_fit": []}
    wins = 0
    for _ in range(n):
        k = int(rng.integers(8, 41))
        sizes = {f"b{i}": int(rng.integers(1, 513)) * 16 for i in range(k)}
        life = {}
        for name in sizes:
            a = int(rng.integers(0, 60))
            life[name] = (a, min(59, a + int(rng.geometric(0.15))))
        bound = max(live_bytes({n_: align_up(v, 16) for n_, v in sizes.items()}, life, 60))
        arenas = {st: plan_buffers(sizes, life, st).arena_bytes for st in over}
        for st, a in arenas.items():
            over[st].append(a / bound - 1)
        wins += arenas["best_fit"] < arenas["greedy_by_size"]
    return {"cases": n, "best_fit_smaller": wins,
            **{f"{st}_mean_over_bound": float(np.mean(v)) for st, v in over.items()},
            **{f"{st}_max_over_bound": float(np.max(v)) for st, v in over.items()}}


def largest_fitting(board: str, lo: int, hi: int, step: int = 8) -> dict:
    """Binary search of the largest L (multiple of `step`) whose smallest tiled arena fits `board`,
    for the deployable classifier (ids -> logits): against its arena budget (RAM - stack - I/O,
    what the firmware link checks) and against the whole RAM."""
    from mcu.planner import plan
    from mcu.boards import arena_budget, board as board_info
    from mcu.schedules import Tiles, search_tiles, tiled_with

    ram = board_info(board).ram_bytes
    cache: dict[int, tuple[int, int]] = {}

    def arena(L):
        if L not in cache:
            _, g = encoder_graph(L, classifier=True)
            c = search_tiles(g, budget=None, slack=1.02).chosen
            cache[L] = (plan(tiled_with(g, Tiles(c.rows, c.kt))).arena_bytes, arena_budget(board, g))
        return cache[L]

    out = {}
    for label, fits in (("links", lambda L: arena(L)[0] <= arena(L)[1]), ("ram", lambda L: arena(L)[0] <= ram)):
        a, b = lo // step, hi // step            # invariant: a*step fits, b*step does not (checked)
        if not fits(a * step):
            out[label] = None
            continue
        if fits(b * step):
            out[label] = b * step
            continue
        while b - a > 1:
            m = (a + b) // 2
            a, b = (m, b) if fits(m * step) else (a, m)
        out[label] = a * step
        out[f"{label}_arena"] = arena(a * step)[0]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="64,128,256,512,1024")
    p.add_argument("--no-tflm", action="store_true", help="skip the TFLite Micro baseline")
    p.add_argument("--board", default="stm32f405", help="board for the largest-L search")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    from base.progress import progress
    from mcu.profile import search_table

    out = build_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(v) for v in args.lengths.split(",")]
    rows = []
    with progress() as bar:
        task = bar.add_task("memory", total=len(lengths) + 1, info="")
        for L in lengths:
            bar.update(task, info=f"L = {L}")
            rows.append(measure(L, not args.no_tflm, out / "memory_timeline_L512.png" if L == 512 else None))
            bar.advance(task)
        bar.update(task, info=f"largest L on {args.board}")
        fit = largest_fitting(args.board, 256, 512)
        bar.advance(task)
    planners = planner_stats()

    kb = lambda b: f"{b / 1024:,.1f}"   # noqa: E731
    t = Table(title="BERT-tiny int8 encoder: arena bytes (KiB) by schedule")
    cols = ["L", "layerwise", "tiled", "tiles rows/kt", "3Ld floor", "+ block scratch", "tiled/(floor+scr)",
            "layerwise/tiled", "TFLM arena*", "TFLM/tiled", "MACs recompute"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["L"]), kb(r["layerwise_arena"]), kb(r["tiled_arena"]), f"{r['rows']}/{r['kt']}",
                  kb(r["floor_3Ld"]), kb(r["block_scratch"]), f"{r['ratio_to_floor_plus_scratch']:.3f}",
                  f"{r['layerwise_over_tiled']:.2f}x",
                  kb(r["tflm_arena"]) if "tflm_arena" in r else ("crashed" if "tflm_error" in r else "-"),
                  f"{r['tflm_over_tiled']:.2f}x" if "tflm_over_tiled" in r else "-",
                  f"{100 * r['recompute']:.1f}%")
    con = Console(width=160)
    con.print(t)
    con.print("* TFLite Micro: the same encoder exported by edge.litert (full int8, GELU as x*sigmoid(1.702x): "
              "TFLite Micro has no GELU kernel), arena measured by its recording allocator.")
    for r in rows:
        if r["L"] == 512:
            con.print(search_table(r["candidates"], r["macs_layerwise"], title=f"tile search at L = {r['L']}"))
    con.print(f"largest L whose tiled arena fits {args.board} (BERT-tiny classifier, ids -> logits): "
              f"{fit.get('links')} (arena + I/O + {8}K stack <= RAM, "
              f"arena {fit.get('links_arena', 0):,} B); {fit.get('ram')} (arena <= all {kb(196608)} KiB RAM)")
    p2 = t2 = None
    for r in rows:
        if r["L"] == 512:
            p2, t2 = r, r["tiled_arena"]
    if p2:
        con.print(f"L = 512 targets: layerwise/tiled {p2['layerwise_over_tiled']:.2f} (>= 3.5); "
                  f"tiled/(floor+scratch) {p2['ratio_to_floor_plus_scratch']:.3f} (<= 1.2); "
                  f"tiled {t2:,} B (< 262,144); TFLM/tiled {p2.get('tflm_over_tiled', float('nan')):.2f} (>= 6)")
    con.print(f"planners on {planners['cases']} random buffer sets: arena over the live-set bound, mean / max: "
              f"greedy_by_size (TFLite Micro) {100 * planners['greedy_by_size_mean_over_bound']:.1f}% / "
              f"{100 * planners['greedy_by_size_max_over_bound']:.1f}%, best_fit "
              f"{100 * planners['best_fit_mean_over_bound']:.1f}% / {100 * planners['best_fit_max_over_bound']:.1f}%; "
              f"best_fit smaller in {planners['best_fit_smaller']} cases")
    result = {"model": "bert-tiny encoder int8 (2x128, 2 heads, FFN 512), random weights", "rows": rows,
              "largest_L": {args.board: fit}, "planners": planners}
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    con.print(f"wrote {out / 'memory.json'} and {out / 'memory_timeline_L512.png'}")


if __name__ == "__main__":
    main()
