"""Benchmark: .tflite models made by another converter, on the emulated board vs TFLite Micro.

    nice -n 10 .venv/bin/python -m tools.bench.tflite [--inputs 5] [--board mps2-an386] [--fixtures bert64,...]
    nice -n 10 .venv/bin/python -m tools.bench.tflite --sweep bert64      # every row-block size of one fixture

Fixtures: tests/fixtures/tflite (litert-torch + ai-edge-quantizer, see its README): the BERT-tiny-shaped
int8 encoder at L = 64, 128, 256, 512, a tiny ViT, a conv + attention model. For each: the int8 graph
imported by mcu.from_tflite, arenas of the layerwise and the row-block (tiled) schedules (best_fit
planner), TFLite Micro's arena (its recording allocator, the `tflite_micro` interpreter on this
machine) and the ratio TFLite Micro / tiled (the target: >= 5x for the encoder at L >= 256), then the
tiled firmware on the emulated board: every input's output compared with TFLite Micro's bit for bit,
instructions per inference (QEMU plugin). Inputs: standard-normal values quantised with the model's
input scale (the calibration distribution), fixed seed.
Prints a table and writes build/bench/tflite.json. `--sweep NAME`: the row-block schedule of one fixture
at every block size the search considers (arena, calls, the search's score, instructions on the board
for one input), the search's choice marked; writes build/bench/tflite_rows_NAME.json.
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


def sweep(path: Path, board: str) -> list[dict]:
    """Every block size of the row-block search on the board: what the arena / calls trade buys."""
    import tempfile

    from base.errors import TinyshieldError
    from mcu.build import get_board
    from mcu.codegen import generate
    from mcu.compile import build_firmware
    from mcu.device import open_board
    from mcu.from_tflite import lower_tflite, quantise_input
    from mcu.planner import check, plan
    from mcu.tflite_schedule import block_score, block_sizes, row_tiled, search_rows
    from mcu.tflite_views import attention_views

    g0 = lower_tflite(path)
    g = attention_views(g0)
    x = quantise_input(g0, inputs(g0, 1)[0])
    chosen = search_rows(g0).params["rows"]
    rows = []
    for r, arena, calls in block_sizes(g):
        s = row_tiled(g, r)
        p = plan(s)
        check(p, s)
        row = {"rows": r, "arena": arena, "calls": calls, "score": block_score(arena, calls), "instructions": None,
               "chosen": r == chosen, "error": None}
        try:            # every call is code: many small blocks may not fit the board's flash
            with tempfile.TemporaryDirectory() as d:
                generate(s, p, Path(d) / "src")
                fw = build_firmware(Path(d) / "src", get_board(board), input_bytes=g.tensors[g.inputs[0]].nbytes,
                                    output_bytes=g.tensors[g.outputs[0]].nbytes)
        except TinyshieldError as e:
            row["error"] = str(e)
        else:
            with open_board(fw) as dev:
                row["instructions"] = dev.infer(x).instructions
        rows.append(row)
    return rows


def main_sweep(name: str, board: str) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = sweep(FIXTURES / f"{name}.tflite", board)
    t = Table(title=f"{name}: row-block sizes on {board} (emulated), one input")
    for c in ["rows", "arena B", "calls", "score", "instr/inference", "chosen"]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["rows"]), f"{r['arena']:,}", f"{r['calls']:,}", f"{r['score']:.4f}",
                  f"{r['instructions']:,}" if r["instructions"] else "does not fit" if r["error"] else "-",
                  "*" if r["chosen"] else "")
    con = Console(width=120)
    con.print(t)
    out = build_dir() / "bench" / f"tflite_rows_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"board": board, "model": name, "rows": rows}, indent=2))
    con.print(f"wrote {out}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default=",".join(n for n in DEFAULT if (FIXTURES / f"{n}.tflite").exists()))
    p.add_argument("--inputs", type=int, default=5, help="inputs per model (default 5)")
    p.add_argument("--board", default="mps2-an386")
    p.add_argument("--sweep", default=None, metavar="NAME", help="every row-block size of one fixture instead")
    args = p.parse_args(argv)
    if args.sweep:
        return main_sweep(args.sweep, args.board)
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
