"""Benchmark: on-device cost of each model on each emulated board.

    nice -n 10 .venv/bin/python -m tools.bench.device [--limit 50] [--boards stm32f405,mps2-an386,mps3-an547]

For every (model, board, schedule): flash/RAM use of the firmware, instructions per inference
and per MAC (exact, from the QEMU plugin; identical on every run), arena (planner) and stack
high-water (stack painting) measured on the device, and agreement with the host int8 reference.
Prints a table and writes build/bench/device.json.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from base.paths import build_dir


def bert_tiny_clr() -> tuple[str, bool]:
    """The compressed BERT-tiny the demo deploys (`tinyshield train bert-tiny-sst2-1mb`): from the build cache,
    else the copy shipped in the package. Returns (model directory, trained?)."""
    from edge.recipes.bert_tiny_sst2 import compressed_1mb
    return str(compressed_1mb(quiet=True, any_shipped=True).path), True


def bench(models, boards, schedules, limit: int) -> list[dict]:
    from base.progress import progress
    from mcu.build import build_model
    from mcu.device import evaluate, open_board

    rows = []
    with progress() as bar:
        for spec, dataset in models:
            trained, name = True, spec
            if spec == "bert-tiny-clr":
                spec, trained = bert_tiny_clr()
                name = "bert-tiny-clr" + ("" if trained else " (random)")
            for board in boards:
                for schedule in schedules:
                    try:
                        built = build_model(spec, board, schedule=schedule,
                                            seq_len=64 if dataset == "sst2" else None)
                    except Exception as e:  # a model that does not fit is a result, not a crash
                        rows.append({"model": name, "board": board, "schedule": schedule, "error": str(e)})
                        continue
                    xs, ys, _ = built.test_set(dataset, limit)
                    with open_board(built.firmware) as dev:
                        ev = evaluate(dev, built, xs, ys, bar)
                    fw = built.firmware
                    rows.append({**asdict(ev), "model": name, "spec": spec, "device_model": ev.model, "board": board,
                                 "schedule": schedule, "flash_used": fw.flash_used, "flash_bytes": fw.flash_bytes,
                                 "ram_used": fw.ram_used, "ram_bytes": fw.ram_bytes,
                                 "planner_arena": built.plan.arena_bytes, "trained": trained})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=50, help="test inputs per configuration")
    p.add_argument("--boards", default="stm32f405,mps2-an386,mps3-an547")
    p.add_argument("--schedules", default="layerwise,tiled")
    p.add_argument("--models", default="vit-mnist:mnist,bert-tiny-clr:sst2",
                   help="comma list of MODEL:DATASET (bert-tiny-clr: the compressed BERT-tiny, L = 64)")
    a = p.parse_args(argv)
    models = [tuple(m.split(":")) for m in a.models.split(",")]
    rows = bench(models, a.boards.split(","), a.schedules.split(","), a.limit)

    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"on-device cost ({a.limit} inputs each)")
    for c in ["model", "board", "schedule", "flash B", "instr/inference", "instr/MAC", "MACs", "arena B",
              "stack B", "peak SRAM B", "accuracy", "bit-exact"]:
        t.add_column(c, justify="left" if c in ("model", "board", "schedule") else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["model"], r["board"], r["schedule"], f"[red]{r['error'][:100]}", *[""] * 8)
            continue
        t.add_row(r["model"], r["board"], r["schedule"], f"{r['flash_used']:,}", f"{r['mean_instructions']:,.0f}",
                  f"{r['instructions_per_mac']:.3f}", f"{r['macs']:,}", f"{r['arena_bytes']:,}",
                  f"{r['stack_max']:,}", f"{r['peak_sram']:,}",
                  f"{100 * r['accuracy']:.1f}%" if r["trained"] else "n/a (random weights)",
                  f"{100 * r['agreement']:.1f}%")
    Console(width=200).print(t)
    out = build_dir() / "bench" / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"limit": a.limit, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
