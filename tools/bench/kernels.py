"""Benchmark: instructions per MAC of the int8 fully connected kernel (128 -> 512 over 128 tokens).

    nice -n 10 .venv/bin/python -m tools.bench.kernels [--board stm32f405] [--M 128 --K 128 --N 512]

- emulated Cortex-M: firmware whose model is one `tsh_fc_s8` call, run on the emulated board; the
  QEMU plugin counts the instructions of `tsh_model_run`. A second firmware with the same input and
  output copies but no call is subtracted, so the figure is the kernel alone. Both the board's own
  path (SMLAD/SXTB16 on the Cortex-M4, Helium/MVE on the Cortex-M55 `mps3-an547`; `dsp-int16`: the
  weights stored widened, mcu/weight_layout.py) and the portable C
  path are measured, and the device output is checked against the numpy reference bit for bit.
- host (x86-64): instructions of the same C kernel under `valgrind --tool=callgrind`.
- `--model vit-mnist`: the same subtraction per kernel over a whole model's layerwise schedule
  (firmware that makes only that kernel's calls, on the model's real arena), so each kernel's
  share of an inference is measured on the emulated board.
Prints a table and writes build/bench/kernels.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from base import quant as Q
from base.paths import build_dir


def fc_graph(M: int, K: int, N: int):
    from mcu.lower import Builder, fc

    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    b = Builder(f"fc-{K}x{N}x{M}")
    b.act("input", (M, K), Q.ActQ(4.0 / 255, 3))
    fc(b, "fc", lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy(), "input",
       Q.ActQ(2.0 / 255, -5), M, out_name="output")
    return b.graph(["input"], ["output"], {"kind": "bench"})


def schedules(g):
    from mcu.schedules import layerwise
    from mcu.graph import Schedule

    s = layerwise(g)
    empty = Schedule("copy-only", g, s.buffers, [])
    return s, empty


def emulated(g, board: str, variant: str, x: np.ndarray) -> dict:
    from mcu.boards import board as get_board
    from mcu.compile import build_firmware
    from mcu.codegen import generate
    from mcu.device import open_board
    from mcu.execute import run
    from mcu.planner import plan
    from mcu.weight_layout import widen_fc_weights

    s, empty = schedules(g)
    if variant == "dsp-int16":            # the weights stored widened to int16 (fc_s8w16)
        s = widen_fc_weights(s, 1 << 40)
    counts = {}
    out = None
    for sched in (s, empty):
        p = plan(sched)
        d = build_dir() / "bench" / "kernels" / f"{sched.name}-{variant}-{g.name}"
        generate(sched, p, d)
        flags = ("-DTSH_PORTABLE",) if variant == "portable" else ()
        fw = build_firmware(d, board, extra_cflags=flags)
        with open_board(fw) as dev:
            r = dev.infer(x)
            counts[sched.name] = r.instructions
            if sched is s:
                out = r.output
    ref = run(s, {"input": x})["output"]
    instr = counts[s.name] - counts[empty.name]
    if variant == "dsp" and get_board(board).cpu == "cortex-m55":
        variant = "mve (Helium)"     # the core's own path: tsh_mve.c on Armv8.1-M
    return {"where": f"{board} (emulated)", "path": variant, "instructions": instr, "macs": s.macs(),
            "instr_per_mac": instr / s.macs(), "bit_exact": bool(np.array_equal(out, ref)),
            "total_with_copies": counts[s.name], "copies_only": counts[empty.name]}


DRIVER = r"""
#include <stdint.h>
#include <stdlib.h>
#include "tsh_kernels.h"
int main(void) {
  enum { M = %(M)d, K = %(K)d, N = %(N)d };
  static int8_t x[M * K], w[N * K], y[M * N];
  static int32_t bias[N], mult[N], shift[N];
  for (int i = 0; i < M * K; i++) x[i] = (int8_t)(rand() %% 256 - 128);
  for (int i = 0; i < N * K; i++) w[i] = (int8_t)(rand() %% 255 - 127);
  for (int i = 0; i < N; i++) { bias[i] = rand() %% 1000; mult[i] = 1 << 30; shift[i] = -10; }
  tsh_fc_s8(x, w, bias, mult, shift, y, M, K, N, K, N, 0, -128, 127);
  return y[0] == 1 ? 1 : 0;
}
"""


def host(M: int, K: int, N: int, variant: str) -> dict | None:
    from mcu.hostlib import KERNEL_DIR, VARIANTS, kernel_sources

    if shutil.which("valgrind") is None:
        return None
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        (t / "main.c").write_text(DRIVER % {"M": M, "K": K, "N": N})
        exe = t / "fc"
        subprocess.run(["gcc", "-std=c99", "-O2", *VARIANTS[variant], f"-I{KERNEL_DIR}", str(t / "main.c"),
                        *map(str, kernel_sources()), "-o", str(exe)], check=True)
        out = t / "cg.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=tsh_fc_s8",
                        str(exe)], check=False, capture_output=True)
        total = None
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        macs = M * K * N
        return {"where": "host x86-64 (callgrind)", "path": variant + (" (DSP emulated in C)" if variant == "dsp" else ""),
                "instructions": total, "macs": macs, "instr_per_mac": total / macs, "bit_exact": None}


def per_kernel(spec: str, board: str) -> list[dict]:
    """Instructions of each kernel's calls within one inference of `spec` (layerwise schedule)."""
    from base import data
    from mcu.build import build_model
    from mcu.compile import build_firmware
    from mcu.codegen import generate
    from mcu.device import open_board
    from mcu.graph import Schedule

    built = build_model(spec, board, schedule="layerwise")
    s, p = built.schedule, built.plan
    if built.kind == "vit":
        x = built.quantise_input(data.mnist(allow_fallback=True).x_test[0])
    else:
        x = np.zeros(built.graph.tensors[built.graph.inputs[0]].shape, np.int32)
        x[:8] = np.arange(101, 109)

    def count(calls, tag):
        d = build_dir() / "bench" / "kernels" / f"{spec}-{tag}"
        generate(Schedule(tag, s.graph, s.buffers, calls), p, d)
        with open_board(build_firmware(d, board)) as dev:
            return dev.infer(x).instructions

    base = count([], "none")
    rows = []
    for k in sorted({c.kernel for c in s.calls}):
        calls = [c for c in s.calls if c.kernel == k]
        n = count(calls, k) - base
        macs = sum(c.macs for c in calls)
        rows.append({"model": spec, "kernel": k, "calls": len(calls), "instructions": n, "macs": macs,
                     "instr_per_mac": n / macs if macs else None})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board", default="stm32f405")
    ap.add_argument("--M", type=int, default=128, help="tokens")
    ap.add_argument("--K", type=int, default=128, help="input features")
    ap.add_argument("--N", type=int, default=512, help="output features")
    ap.add_argument("--no-emulator", action="store_true")
    ap.add_argument("--model", default=None, help="also profile every kernel of this model (e.g. vit-mnist)")
    a = ap.parse_args(argv)
    g = fc_graph(a.M, a.K, a.N)
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(a.M, a.K)).astype(np.int8)
    rows = []
    if not a.no_emulator:
        from mcu.boards import board as get_board
        m4 = get_board(a.board).cpu == "cortex-m4"     # the widened layout is for the M4's loop only
        for v in ("dsp", "dsp-int16", "portable") if m4 else ("dsp", "portable"):
            rows.append(emulated(g, a.board, v, x))
    for v in ("portable",):
        r = host(a.M, a.K, a.N, v)
        if r:
            rows.append(r)

    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"int8 FC {a.K}->{a.N} over {a.M} tokens ({a.M * a.K * a.N:,} MACs)")
    for c in ["where", "code path", "instructions", "instr / MAC", "bit-exact vs numpy"]:
        t.add_column(c, justify="left" if c in ("where", "code path") else "right")
    for r in rows:
        t.add_row(r["where"], r["path"], f"{r['instructions']:,}", f"{r['instr_per_mac']:.3f}",
                  "n/a" if r["bit_exact"] is None else str(r["bit_exact"]))
    Console().print(t)
    profile = per_kernel(a.model, a.board) if a.model and not a.no_emulator else []
    if profile:
        t = Table(title=f"{a.model}: instructions per kernel in one inference ({a.board}, layerwise)")
        for c in ["kernel", "calls", "instructions", "share", "MACs", "instr / MAC"]:
            t.add_column(c, justify="left" if c == "kernel" else "right")
        total = sum(r["instructions"] for r in profile)
        for r in profile:
            t.add_row(r["kernel"], str(r["calls"]), f"{r['instructions']:,}", f"{100 * r['instructions'] / total:.1f}%",
                      f"{r['macs']:,}", "" if r["instr_per_mac"] is None else f"{r['instr_per_mac']:.2f}")
        macs = sum(r["macs"] for r in profile)
        t.add_row("all", str(sum(r["calls"] for r in profile)), f"{total:,}", "100%", f"{macs:,}", f"{total / macs:.2f}")
        Console().print(t)
    out = build_dir() / "bench" / "kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows, "profile": profile}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
