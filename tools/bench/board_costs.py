"""Benchmark: where an on-board evaluation's time goes, per input, on one emulated board.

    nice -n 10 .venv/bin/python -m tools.bench.board_costs [--model vit-mnist] [--inputs 20]

For the demo's models (the shipped ViT; `--model bert` the shipped 1 MB BERT-tiny on the shipped
sentences): the firmware build (cached after the first time), booting QEMU, then with and without the
instruction-count plugin: a serial round trip (ECHO of 16 bytes), uploading one input, RUN alone, and
a whole `Device.infer` (upload, run, count, download), each as wall time and as the CPU seconds QEMU
used; the host int8 reference of one input; and whether the instruction count is the same for every
input (it decides whether counting a few inputs could stand for all). Medians of --repeat calls (the
host is shared). Prints a table and writes build/bench/board_costs.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from base.paths import build_dir


def _timed(f, repeat: int, pid: int | None = None) -> tuple[float, float | None]:
    """Median wall seconds of f(), and the median CPU seconds process `pid` used meanwhile."""
    from mcu.fleet import _proc_cpu_seconds
    walls, cpus = [], []
    for _ in range(repeat):
        c0 = _proc_cpu_seconds(pid) if pid else None
        t = time.perf_counter()
        f()
        walls.append(time.perf_counter() - t)
        if c0 is not None:
            cpus.append(_proc_cpu_seconds(pid) - c0)
    return statistics.median(walls), statistics.median(cpus) if cpus else None


def _model(which: str, n: int):
    """(built, quantised inputs) as the demo makes them without the data folder."""
    from mcu.build import build_model
    if which == "bert":
        from base.data import sentences
        from edge.models.minilm import token_ids
        from edge.recipes.bert_tiny_sst2 import compressed_1mb
        from tools.commands.demo import _calibration_file
        r = compressed_1mb(any_shipped=True)
        built = build_model(str(r.path), "stm32f405", seq_len=64, name="bert-tiny-sst2-clr",
                            calib_file=_calibration_file(64))
        xs = token_ids(sentences("test").texts, 64)[:n]
    else:
        from edge.recipes.vit_mnist import train
        r = train(fallback_data=True, any_shipped=True)
        built = build_model(str(r.path), "stm32f405", name="vit-mnist")
        xs = built.test_set("mnist", n)[0]
    return built, [built.quantise_input(x) for x in xs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-mnist", choices=["vit-mnist", "bert"])
    ap.add_argument("--inputs", type=int, default=20, help="inputs run through Device.infer per setting (default 20)")
    ap.add_argument("--repeat", type=int, default=10, help="calls per median (default 10)")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from mcu.device import Device
    from mcu.emulator import Emulator
    from mcu.link import Link
    from tools.bench.fleet import cpu_name

    torch.set_num_threads(1)
    t = time.perf_counter()
    built, qs = _model(args.model, args.inputs)
    rows = [("model + firmware build (cached after the first run)", time.perf_counter() - t, None)]
    rows.append(("host int8 reference, one input", *_timed(lambda: built.reference(qs[0]), args.repeat)))
    counts = None
    for plugin in (True, False):
        tag = "counting" if plugin else "no plugin"   # in parentheses: rich reads [..] as markup
        t = time.perf_counter()
        emu = Emulator(built.firmware, count_instructions=plugin).start()
        link = Link(emu.url)
        dev = Device(link, emu.count_file if plugin else None, emu)
        rows.append((f"({tag}) QEMU boot + connect + INFO", time.perf_counter() - t, None))
        pid = emu.pid
        data = dev.check_input(qs[0])
        rows.append((f"({tag}) serial round trip (ECHO 16 B)", *_timed(lambda: link.echo(b"x" * 16), args.repeat, pid)))
        rows.append((f"({tag}) upload one input ({len(data):,} B)", *_timed(lambda: link.upload(data), args.repeat, pid)))
        rows.append((f"({tag}) RUN alone", *_timed(link.run, args.repeat, pid)))
        it = iter(qs * (1 + args.repeat // max(len(qs), 1)))
        rows.append((f"({tag}) Device.infer (upload, run, count, download)",
                     *_timed(lambda: dev.infer(next(it)), args.repeat, pid)))
        if plugin:
            counts = [dev.infer(q).instructions for q in qs]
        link.close()
        emu.stop()

    same = len(set(counts)) == 1
    out = {"cpu": cpu_name(), "model": args.model, "inputs": len(qs),
           "rows": [{"what": w, "wall_s": s, "qemu_cpu_s": c} for w, s, c in rows],
           "instructions": counts, "same_count_every_input": same}
    table = Table(title=f"{args.model}: cost per step on one emulated board ({out['cpu']}, machine shared)")
    for col in ("step", "wall (median)", "QEMU CPU (median)"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for w, s, c in rows:
        table.add_row(w, f"{s * 1e3:,.1f} ms", "" if c is None else f"{c * 1e3:,.1f} ms")
    Console().print(table)
    print(f"instructions per inference on {len(counts)} inputs: {min(counts):,} to {max(counts):,} "
          f"({len(set(counts))} distinct): " + ("the same for every input" if same else
                                               "they depend on the input, so every input must be counted"))
    path = build_dir() / "bench" / "board_costs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
