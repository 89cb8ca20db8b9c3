"""Benchmark: on-device cost of each model on each emulated board.

    nice -n 10 .venv/bin/python -m tools.bench.device [--limit 50] [--boards stm32f405,mps2-an386,mps2-an386-4m,mps3-an547]
    nice -n 10 .venv/bin/python -m tools.bench.device --models bert-tiny-clr:ids:512 --boards stm32f405 --limit 1

For every (model, board, schedule): flash/RAM use of the firmware, instructions per inference
and per MAC (exact, from the QEMU plugin; identical on every run), arena (planner) and stack
high-water (stack painting) measured on the device, and agreement with the host int8 reference.
Schedules: layerwise, tiled (K/V kept unless that does not fit the board) and recompute (every
layer's K/V recomputed per query block); each tiled row is compared with layerwise at the same
model, board and L (instructions, MACs). Prints a table, writes build/bench/device.json and
build/bench/device.png (instructions per inference by schedule).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from base.paths import build_dir


def bert_tiny_clr(positions: int = 64) -> tuple[str, bool]:
    """The compressed BERT-tiny the demo deploys (`tinyshield train bert-tiny-sst2-1mb`, 64 positions: from the
    build cache, else the copy shipped in the package); for more positions a random-initialised BERT-tiny with
    a rank-8 CLR word table and `positions` positions: the same shapes, hence the same cost, but no meaningful
    accuracy. Past 512 positions the word table has rank 4, which gives back the flash the position table and
    the longer schedule's calls take (1 MB boards; the word lookup is < 0.1% of the MACs there). Returns
    (model directory, trained?)."""
    if positions <= 64:
        from edge.recipes.bert_tiny_sst2 import compressed_1mb
        return str(compressed_1mb(quiet=True, any_shipped=True).path), True
    rank = 8 if positions <= 512 else 4
    out = build_dir() / "bench" / f"bert-tiny-random-clr{'' if rank == 8 else rank}-p{positions}"
    if not (out / "config.json").is_file():
        import numpy as np
        import torch

        from edge.compress.clr import QuantCLR, factorize, layout_from_clusters
        from edge.compress.io import save_compressed
        from edge.compress.model import set_word_embeddings
        from edge.models.bert import BertClassifier, BertConfig
        torch.manual_seed(0)
        m = BertClassifier(BertConfig(max_position_embeddings=positions), 2).eval()
        table = m.bert.embeddings.word_embeddings.weight.detach()
        clr = factorize(table, layout_from_clusters(np.zeros(len(table), np.int64), (rank,), (False,), table.shape[1]))
        set_word_embeddings(m, clr)
        save_compressed(m, QuantCLR.from_float(clr), out)
    return str(out), False


def random_ids(built, limit: int):
    """Full-length random token ids (no padding: every key is attended, the most work per inference)."""
    import numpy as np
    L = built.graph.tensors[built.graph.inputs[0]].shape[0]
    ids = np.random.default_rng(0).integers(1000, 30000, (limit, L)).astype(np.int32)
    ids[:, 0] = 101                                   # [CLS]
    return ids, np.zeros(limit, np.int64), "random ids"


def parse_model(text: str) -> tuple[str, str, int | None]:
    """MODEL:DATASET[:L] (DATASET mnist, sst2 or ids: random full-length token ids)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        from base.errors import TinyshieldError
        raise TinyshieldError(f"--models entry {text!r}: give MODEL:DATASET or MODEL:DATASET:L, e.g. bert-tiny-clr:ids:512")
    return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else (64 if parts[1] in ("sst2", "ids") else None)


def bench(models, boards, schedules, limit: int, calib: int = 500) -> list[dict]:
    from base.progress import progress
    from mcu.build import build_model
    from mcu.device import evaluate, open_board

    rows = []
    with progress() as bar:
        for spec, dataset, L in models:
            trained, name = True, spec
            if spec == "bert-tiny-clr":
                spec, trained = bert_tiny_clr(L or 64)
                name = "bert-tiny-clr" + ("" if trained else " (random)")
            trained = trained and dataset != "ids"
            for board in boards:
                for schedule in schedules:
                    base = {"model": name, "L": L, "board": board, "schedule": schedule}
                    try:
                        built = build_model(spec, board, schedule=schedule, seq_len=L, calib=calib)
                    except Exception as e:  # a model that does not fit is a result, not a crash
                        rows.append({**base, "error": str(e)})
                        continue
                    xs, ys, _ = random_ids(built, limit) if dataset == "ids" else built.test_set(dataset, limit)
                    with open_board(built.firmware) as dev:
                        ev = evaluate(dev, built, xs, ys, bar)
                    fw = built.firmware
                    rows.append({**asdict(ev), **base, "spec": spec, "dataset": dataset, "device_model": ev.model,
                                 "flash_used": fw.flash_used, "flash_bytes": fw.flash_bytes,
                                 "ram_used": fw.ram_used, "ram_bytes": fw.ram_bytes,
                                 "planner_arena": built.plan.arena_bytes, "trained": trained,
                                 "tiles": {k: built.schedule.params.get(k) for k in ("rows", "kt", "recompute")}})
    _compare(rows)
    return rows


def _compare(rows: list[dict]) -> None:
    """Each row's instructions and MACs relative to layerwise at the same model, L, board and inputs."""
    ref = {(r["model"], r["L"], r["board"]): r for r in rows if r["schedule"] == "layerwise" and "error" not in r}
    for r in rows:
        lw = ref.get((r["model"], r["L"], r["board"]))
        if "error" not in r and lw is not None and r["mean_instructions"] and lw["mean_instructions"]:
            r["instructions_vs_layerwise"] = r["mean_instructions"] / lw["mean_instructions"] - 1
            r["macs_vs_layerwise"] = r["macs"] / lw["macs"] - 1


def plot(rows: list[dict], path) -> None:
    """Instructions per inference, one group of bars per (model, L, board), one bar per schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r.get("mean_instructions")]
    groups = list(dict.fromkeys((r["model"], r["L"], r["board"]) for r in ok))
    scheds = list(dict.fromkeys(r["schedule"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    w = 0.8 / max(1, len(scheds))
    for j, s in enumerate(scheds):
        vals = [next((r["mean_instructions"] / 1e6 for r in ok if (r["model"], r["L"], r["board"]) == g
                      and r["schedule"] == s), 0) for g in groups]
        ax.bar([i + j * w for i in range(len(groups))], vals, w, label=s)
    ax.set_xticks([i + w * (len(scheds) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{m}\nL={L}\n{b}" if L else f"{m}\n{b}" for m, L, b in groups], fontsize=7)
    ax.set_ylabel("instructions / inference (M)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("on-device instructions per inference (QEMU plugin)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=50, help="test inputs per configuration")
    p.add_argument("--boards", default="stm32f405,mps2-an386,mps2-an386-4m,mps3-an547")
    p.add_argument("--schedules", default="layerwise,tiled,recompute")
    p.add_argument("--models", default="vit-mnist:mnist,bert-tiny-clr:sst2",
                   help="comma list of MODEL:DATASET[:L] (bert-tiny-clr: the compressed BERT-tiny, L = 64 unless given, "
                        "random weights past 64 tokens; DATASET ids: random full-length token ids)")
    p.add_argument("--calib", type=int, default=500,
                   help="calibration inputs of each build (the cost does not depend on them; fewer build faster at large L)")
    p.add_argument("--out", default=None, help="JSON path (default build/bench/device.json; the plot beside it)")
    a = p.parse_args(argv)
    models = [parse_model(m) for m in a.models.split(",")]
    rows = bench(models, a.boards.split(","), a.schedules.split(","), a.limit, a.calib)

    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"on-device cost ({a.limit} inputs each)")
    cols = ["model", "L", "board", "schedule", "tiles", "flash B", "instr/inference", "instr/MAC", "vs layerwise",
            "MACs", "MACs vs lw", "arena B", "stack B", "peak SRAM B", "accuracy", "bit-exact"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "board", "schedule", "tiles") else "right")
    pct = lambda r, k: f"{100 * r[k]:+.1f}%" if k in r else ""          # noqa: E731
    for r in rows:
        head = [r["model"], str(r["L"] or ""), r["board"], r["schedule"]]
        if "error" in r:
            t.add_row(*head, "", f"[red]{r['error'][:100]}", *[""] * (len(cols) - 6))
            continue
        tl = r["tiles"]
        tiles = "" if tl["rows"] is None else f"{tl['rows']}x{tl['kt']}" + (
            f" K/V recomputed in {','.join(map(str, tl['recompute']))}" if tl["recompute"] else "")
        t.add_row(*head, tiles, f"{r['flash_used']:,}", f"{r['mean_instructions']:,.0f}",
                  f"{r['instructions_per_mac']:.3f}", pct(r, "instructions_vs_layerwise"), f"{r['macs']:,}",
                  pct(r, "macs_vs_layerwise"), f"{r['arena_bytes']:,}", f"{r['stack_max']:,}", f"{r['peak_sram']:,}",
                  f"{100 * r['accuracy']:.1f}%" if r["trained"] else "n/a (random)", f"{100 * r['agreement']:.1f}%")
    Console(width=200).print(t)
    from pathlib import Path
    out = Path(a.out) if a.out else build_dir() / "bench" / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"limit": a.limit, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
