"""Benchmark: eval throughput on a fleet of emulated boards, and what Ray costs per task.

    nice -n 5 .venv/bin/python -m tools.bench.fleet [--limit 48] [--boards 1,2,4]

Rows: one board without Ray (mcu.device.evaluate, the baseline), then 1, 2, 4 emulated boards
as Ray actors (mcu.fleet). Each row: inputs/s over the evaluation (boards already booted),
efficiency = throughput / (boards x one board through Ray), QEMU CPU seconds per inference and
serial bytes per inference. Every fleet result is checked equal to the baseline (predictions and
per-input instruction counts). Then Ray's per-task costs on this host (no-op round trip,
pipelined, with a chunk of images) and the host reference's cost per input, for the scaling
model. Each row is the fastest of --repeat runs (the host is shared). Prints tables and writes
build/bench/fleet.json. Needs the optional `fleet` extra.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import asdict

from base.paths import build_dir


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-mnist")
    ap.add_argument("--board", default="stm32f405")
    ap.add_argument("--limit", type=int, default=48, help="test images per row (default 48)")
    ap.add_argument("--boards", default="1,2,4", help="fleet sizes (default 1,2,4)")
    ap.add_argument("--chunk", type=int, default=None, help="inputs per task (default: the fleet's choice)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per row, the fastest kept (the host is shared: the minimum is the least disturbed)")
    ap.add_argument("--calib", type=int, default=500,
                    help="calibration inputs of the int8 build (default 500, as eval; fewer builds faster, same cost)")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.boards.split(",")]

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from mcu.build import build_model
    from mcu.device import evaluate, open_board
    from base.cluster import init_ray, require_ray, usable_cpus
    from mcu.fleet import EMULATED_RESOURCE, Fleet, task_overheads

    ray = require_ray()
    con = Console()
    built = build_model(args.model, args.board, calib=args.calib)
    xs, ys, source = built.test_set("mnist", args.limit)
    cores = usable_cpus()
    import os
    load0 = os.getloadavg()[0]          # the host is shared: a busy one slows every row, say how busy
    con.print(f"{args.model} on {args.board}, {len(xs)} images ({source}); {cores} cores: {cpu_name()}; "
              f"load average {load0:.1f}")

    # Baseline: one board, no Ray. The link's byte counters give the serial traffic per inference.
    with open_board(built.firmware) as dev:
        evaluate(dev, built, xs[:2], ys[:2])                   # warm: TCG translation cache, imports
        wire0 = dev.link.tx_bytes + dev.link.rx_bytes
        base = min((evaluate(dev, built, xs, ys) for _ in range(args.repeat)), key=lambda e: e.seconds)
        wire = (dev.link.tx_bytes + dev.link.rx_bytes - wire0) / len(xs) / args.repeat
    t = time.perf_counter()
    for x in xs[:8]:
        built.reference(built.quantise_input(x))
    ref_ms = (time.perf_counter() - t) / 8 * 1e3
    rows = [{"setup": "1 board, no Ray", "boards": 1, "seconds": base.seconds, "inputs_per_s": len(xs) / base.seconds,
             "efficiency": None, "start_seconds": None, "qemu_cpu_per_input_s": None, "wire_bytes_per_input": wire,
             "failures": 0, "identical": True}]

    t0 = time.perf_counter()
    init_ray(resources={EMULATED_RESOURCE: max(sizes)}, num_cpus=cores)
    ray_init_s = time.perf_counter() - t0
    overheads = None
    try:
        one = None
        for k in sizes:
            with Fleet.emulated(built, k) as fleet:
                fleet.evaluate(xs[:2 * k], ys[:2 * k], chunk_size=1)      # warm every board
                fe = min((fleet.evaluate(xs, ys, chunk_size=args.chunk) for _ in range(args.repeat)),
                         key=lambda f: f.seconds)
                if overheads is None:
                    overheads = task_overheads(next(iter(fleet.actors.values())), np.asarray(xs[:4]))
            ev = fe.evaluation
            same = ev.predictions == base.predictions and ev.instructions == base.instructions
            if k == 1:
                one = fe.throughput
            rows.append({"setup": f"{k} board{'s' if k > 1 else ''}, Ray", "boards": k, "seconds": fe.seconds,
                         "inputs_per_s": fe.throughput, "efficiency": fe.throughput / (k * one) if one else None,
                         "start_seconds": fe.start_seconds, "qemu_cpu_per_input_s": fe.qemu_cpu_seconds / len(xs),
                         "wire_bytes_per_input": fe.wire_bytes / len(xs), "failures": len(fe.failures),
                         "identical": same, "chunk_size": fe.chunk_size, "per_board": fe.inputs_per_board})
    finally:
        ray.shutdown()

    t = Table(title=f"eval throughput, {args.model} on emulated {args.board} ({len(xs)} images; {cores} cores, "
                    f"{cpu_name()}; load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    for c in ("setup", "inputs/s", "efficiency", "wall s", "start s", "QEMU CPU s/input", "serial B/input", "== baseline"):
        t.add_column(c, justify="left" if c == "setup" else "right")
    for r in rows:
        t.add_row(r["setup"], f"{r['inputs_per_s']:.2f}", f"{r['efficiency']:.2f}" if r["efficiency"] else "-",
                  f"{r['seconds']:.1f}", f"{r['start_seconds']:.1f}" if r["start_seconds"] else "-",
                  f"{r['qemu_cpu_per_input_s']:.3f}" if r["qemu_cpu_per_input_s"] else "-",
                  f"{r['wire_bytes_per_input']:,.0f}", "yes" if r["identical"] else "NO")
    con.print(t)
    ray1 = next((r for r in rows[1:] if r["boards"] == 1), None)         # rows[0] is the one without Ray
    overhead = (ray1["seconds"] / rows[0]["seconds"] - 1) if ray1 else None
    o = Table(title="Ray per-task costs on this host (ms)")
    for c in ("no-op round trip", "p90", "pipelined / call", f"with {overheads.payload_bytes} B payload",
              "ray.init s", "host reference / input"):
        o.add_column(c, justify="right")
    o.add_row(f"{overheads.roundtrip_ms:.2f}", f"{overheads.roundtrip_p90_ms:.2f}", f"{overheads.pipelined_ms:.3f}",
              f"{overheads.payload_ms:.2f}", f"{ray_init_s:.1f}", f"{ref_ms:.1f}")
    con.print(o)
    if overhead is not None:
        con.print(f"one board through Ray vs without: {100 * overhead:+.1f}% wall time "
                  f"({ray1['inputs_per_s']:.2f} vs {rows[0]['inputs_per_s']:.2f} inputs/s)")
    out = {"model": args.model, "board": args.board, "inputs": len(xs), "cores": cores, "cpu": cpu_name(),
           "rows": rows, "ray_overhead_one_board": overhead, "task_overheads": asdict(overheads),
           "ray_init_seconds": ray_init_s, "host_reference_ms_per_input": ref_ms,
           "mean_instructions": base.mean_instructions, "accuracy": base.accuracy,
           "load_average": {"start": load0, "end": os.getloadavg()[0]}}
    path = build_dir() / "bench" / "fleet.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    con.print(f"wrote {path}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
