"""Benchmark: .tflite models made by another converter, on the emulated board vs TFLite Micro.

    nice -n 10 .venv/bin/python -m tools.bench.tflite [--inputs 5] [--board mps2-an386] [--fixtures bert64,...]

Fixtures: tests/fixtures/tflite (litert-torch + ai-edge-quantizer, see its README): the BERT-tiny-shaped
int8 encoder at L = 64, 128, 256, 512, a tiny ViT, a conv + attention model. For each: the int8 graph
imported by mcu.from_tflite, arenas of the layerwise and the row-block (tiled) schedules (best_fit
planner), TFLite Micro's arena (its recording allocator, the `tflite_micro` interpreter on this
machine) and the ratio TFLite Micro / tiled (the target: >= 5x for the encoder at L >= 256), then the
tiled firmware on the emulated board: every input's output compared with TFLite Micro's bit for bit,
instructions per inference (QEMU plugin). Inputs: standard-normal values quantised with the model's
input scale (the calibration distribution), fixed seed.
Prints a table and writes build/bench/tflite.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from base.paths import build_dir

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tflite"
DEFAULT = ("bert64", "bert128", "bert256", "bert512", "vit", "convattn")


def inputs(graph, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    s, z = graph.meta["input_q"]
    return [np.clip(np.round(rng.standard_normal(graph.meta["input_shape"]) / s) + z, -128, 127).astype(np.int8)
            for _ in range(n)]


def measure(path: Path, board: str, n: int) -> dict:
    from mcu.build import build_model
    from mcu.device import open_board
    from mcu.from_tflite import agreement, lower_tflite, micro_outputs
    from mcu.planner import plan
    from mcu.schedules import layerwise
    from mcu.tflite_schedule import search_rows

    g = lower_tflite(path)
    lw, tl = layerwise(g), search_rows(g)
    xs = inputs(g, n)
    # standard-normal inputs never tie 512 attention scores at a row's maximum (where TFLite Micro's
    # int8 softmax would abort): the L = 512 encoder may run
    micro, tflm_arena = micro_outputs(path, xs, long_softmax=True)
    built = build_model(str(path), board, schedule="tiled")
    with open_board(built.firmware) as dev:
        runs = [dev.infer(built.quantise_input(x)) for x in xs]
    bad = agreement(built.graph, [r.output for r in runs], micro)
    instr = [r.instructions for r in runs if r.instructions is not None]
    row = {"model": path.stem, "ops": len(g.ops), "layerwise_arena": plan(lw).arena_bytes,
           "tiled_arena": built.plan.arena_bytes, "rows": tl.params["rows"], "tflm_arena": tflm_arena,
           "inputs": n, "bit_identical": n - len(bad), "mismatches": bad, "macs": built.macs,
           "instructions": float(np.mean(instr)) if instr else None, "flash_used": built.firmware.flash_used,
           "ram_used": built.firmware.ram_used, "stack_max": max(r.stack_bytes for r in runs)}
    row["tflm_over_tiled"] = tflm_arena / row["tiled_arena"]
    row["tflm_over_layerwise"] = tflm_arena / row["layerwise_arena"]
    row["in_place"] = len(tl.params.get("in_place", {}))
    L = int(path.stem[4:]) if path.stem.startswith("bert") and path.stem[4:].isdigit() else None
    row["seq_len"] = L
    row["target"] = ">= 5x" if L and L >= 256 else None
    row["target_met"] = row["tflm_over_tiled"] >= 5 if row["target"] else None
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default=",".join(n for n in DEFAULT if (FIXTURES / f"{n}.tflite").exists()))
    p.add_argument("--inputs", type=int, default=5, help="inputs per model (default 5)")
    p.add_argument("--board", default="mps2-an386")
    args = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from base.progress import progress

    out = build_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    names = args.fixtures.split(",")
    rows = []
    with progress() as bar:
        task = bar.add_task("tflite", total=len(names), info="")
        for name in names:
            bar.update(task, info=name)
            rows.append(measure(FIXTURES / f"{name}.tflite", args.board, args.inputs))
            bar.advance(task)
    kb = lambda b: f"{b / 1024:,.1f}"   # noqa: E731
    t = Table(title=f".tflite fixtures on {args.board} (emulated) vs TFLite Micro: arenas in KiB")
    for c in ["model", "ops", "device == TFLM", "layerwise", "tiled (rows)", "TFLM arena", "TFLM/tiled",
              "target", "TFLM/layerwise", "MACs", "instr/inference", "flash B"]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], str(r["ops"]), f"{r['bit_identical']}/{r['inputs']}", kb(r["layerwise_arena"]),
                  f"{kb(r['tiled_arena'])} ({r['rows']})", kb(r["tflm_arena"]), f"{r['tflm_over_tiled']:.2f}x",
                  "-" if r["target"] is None else f"{r['target']} {'met' if r['target_met'] else 'MISSED'}",
                  f"{r['tflm_over_layerwise']:.2f}x", f"{r['macs']:,}",
                  f"{r['instructions']:,.0f}" if r["instructions"] else "-", f"{r['flash_used']:,}")
    con = Console(width=170)
    con.print(t)
    (out / "tflite.json").write_text(json.dumps({"board": args.board, "rows": rows}, indent=2))
    con.print(f"wrote {out / 'tflite.json'}")
    return 0 if all(r["bit_identical"] == r["inputs"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
