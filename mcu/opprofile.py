"""Per-operator cost on the device: executed instructions per op (exact, from the emulator), MACs,
instructions per MAC, arena bytes live per op (as planned) and stack high-water per op (measured).

Instructions: the deployed firmware itself is profiled, unchanged. mcu.compile finds in its image the
first kernel call of `tsh_model_run` and the return address of every kernel call; the instruction-count
plugin cuts each inference at those addresses into regions that partition it: [entry + input copy],
call 0, ..., call n-1 (each with its argument set-up), [output copy + return]. Their sum is the
whole-inference count by construction; `profile_ops` checks it for every inference.

Stack per op: the tap build (mcu/validate.py) runs one segment per op (STEP) with the stack painted
before each, and reports the high-water of each — the deepest stack the op's kernels reached (plus
the runtime frames under them, the same as in a whole inference). Its overhead (flash, and its own
whole-inference count) is reported next to the profile; no count is taken from it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from base.errors import TinyshieldError


@dataclass
class OpCost:
    op: str
    kind: str
    calls: int
    instructions: int             # executed on the device (argument set-up in tsh_model_run included)
    macs: int
    live_bytes: int               # arena bytes live during the op's calls, as planned (max over its calls)
    stack_bytes: int | None       # stack high-water of the op's segment in the tap build (None: not measured)
    where: str = ""

    @property
    def instructions_per_mac(self) -> float | None:
        return self.instructions / self.macs if self.macs else None


@dataclass
class OpProfile:
    model: str
    board: str
    firmware: str
    schedule: str
    ops: list[OpCost]
    entry_instructions: int       # tsh_mark_begin's return, tsh_model_run's prologue, the input copy
    exit_instructions: int        # the output copy, epilogue and return to tsh_mark_end
    total_instructions: int       # the plugin's whole-inference count of the profiled firmware
    flash_used: int
    tap_flash: int | None         # flash of the tap build (per-op stack), None when not built
    tap_instructions: int | None  # whole-inference count of the tap build on the first input
    macs: int
    arena_bytes: int
    stack_max: int                # whole-inference stack high-water (RUN)
    inputs: int
    instructions_vary: bool       # per-call counts differed between inputs (then: their mean, rounded)
    seconds: float
    calls: list[int] = field(default_factory=list)   # per-call instructions, in schedule order

    @property
    def op_sum(self) -> int:
        return self.entry_instructions + sum(o.instructions for o in self.ops) + self.exit_instructions

    @property
    def tap_overhead_instructions(self) -> int | None:
        return None if self.tap_instructions is None else self.tap_instructions - self.first_total

    first_total: int = 0          # whole-inference count of the first input (compared with the tap build)

    def to_json(self) -> dict:
        d = asdict(self)
        for o, j in zip(self.ops, d["ops"]):
            j["instructions_per_mac"] = o.instructions_per_mac
        d.update(op_sum=self.op_sum, sums_exactly=self.op_sum == self.total_instructions,
                 profiling_overhead_instructions=0, tap_overhead_instructions=self.tap_overhead_instructions,
                 tap_overhead_flash=None if self.tap_flash is None else self.tap_flash - self.flash_used)
        return d


def _per_op(built, calls: list[int]):
    """Per-call instruction counts -> op rows in order of first call (tiled ops have several calls)."""
    from mcu.profile import profile as mem_profile

    sched = built.schedule
    steps = mem_profile(sched).steps
    kinds = {op.name: op.kind for op in built.graph.ops}
    where = built.graph.meta.get("where", {})
    rows: dict[str, OpCost] = {}
    for i, c in enumerate(sched.calls):
        r = rows.get(c.op)
        if r is None:
            r = rows[c.op] = OpCost(c.op, kinds.get(c.op, c.kernel), 0, 0, 0, 0, None, where.get(c.op, ""))
        r.calls += 1
        r.instructions += calls[i]
        r.macs += c.macs
        r.live_bytes = max(r.live_bytes, steps[i].live_bytes)
    return rows


def segment_stacks(built, q: np.ndarray) -> tuple[dict[str, int], int, int]:
    """Stack high-water per op from the tap build, stepping one segment at a time.
    -> (op -> stack bytes, the tap build's flash, its whole-inference count on `q`)."""
    from mcu.build import firmware_variant
    from mcu.codegen import segments
    from mcu.device import open_board

    segs = segments(built.schedule)
    fw = firmware_variant(built, taps=True)
    out: dict[str, int] = {}
    with open_board(fw) as dev:
        total = dev.infer(q).instructions
        dev.link.upload(dev.check_input(q))
        for k, sg in enumerate(segs):
            s = dev.link.step(k)
            for c in built.schedule.calls[sg.start:sg.stop]:
                out[c.op] = max(out.get(c.op, 0), s)
    return out, fw.flash_used, total


def profile_ops(built, xs, stack: bool = True) -> OpProfile:
    """Run the raw inputs `xs` on the emulated board with per-call counting; -> the per-op profile."""
    from mcu.device import open_board

    t0 = time.monotonic()
    fw = built.firmware
    if not fw.call_marks:
        raise TinyshieldError(f"{fw.elf}: no kernel calls found in tsh_model_run — install binutils-arm-none-eabi "
                              "(arm-none-eabi-objdump) and rebuild (tinyshield build MODEL --force)")
    n = len(built.schedule.calls)
    if len(fw.call_marks) != n + 1:
        raise TinyshieldError(f"{fw.elf} makes {len(fw.call_marks) - 1} kernel calls in tsh_model_run, the schedule "
                              f"{n}: the firmware is of another build — rebuild (tinyshield build MODEL --force)")
    qs = [built.quantise_input(x) for x in xs]
    runs, totals, stack_max = [], [], 0
    with open_board(fw, count_calls=True) as dev:
        for q in qs:
            r = dev.infer(q)
            regions = dev.call_instructions()
            if len(regions) != n + 2:
                raise TinyshieldError(f"the plugin reported {len(regions)} regions for {n} calls: the plugin and the "
                                      "firmware disagree — rebuild both (tinyshield build MODEL --force)")
            if sum(regions) != r.instructions:
                raise TinyshieldError(f"per-call counts sum to {sum(regions):,}, the inference took {r.instructions:,} "
                                      "instructions: a call label is not on the path of every inference")
            runs.append(regions)
            totals.append(r.instructions)
            stack_max = max(stack_max, r.stack_bytes)
    arr = np.array(runs, dtype=np.int64)
    vary = bool((arr != arr[0]).any())
    mean = np.rint(arr.mean(0)).astype(np.int64) if vary else arr[0]
    total = int(round(float(np.mean(totals))))
    if vary:        # keep the rounded per-call means adding up to the rounded mean total
        mean[-1] += total - int(mean.sum())
    rows = _per_op(built, [int(v) for v in mean[1:-1]])

    tap_flash = tap_total = None
    if stack:
        stacks, tap_flash, tap_total = segment_stacks(built, qs[0])
        for op, sb in stacks.items():
            rows[op].stack_bytes = sb
    return OpProfile(built.name, built.board, str(fw.elf), built.schedule.name, list(rows.values()), int(mean[0]),
                     int(mean[-1]), total, fw.flash_used, tap_flash, tap_total, built.macs, built.plan.arena_bytes,
                     stack_max, len(qs), vary, time.monotonic() - t0, [int(v) for v in mean[1:-1]], int(totals[0]))


# ---------------------------------------------------------------- presentation

def render(p: OpProfile, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{p.model} on {p.board} ({p.schedule}): per-op cost on the device")
    for c in ["op", "kind", "calls", "instructions", "%", "MACs", "instr/MAC", "arena live B", "stack B"]:
        t.add_column(c, justify="left" if c in ("op", "kind") else "right", overflow="fold",
                     min_width=24 if c == "op" else None)
    for o in p.ops:
        ipm = o.instructions_per_mac
        t.add_row(o.op, o.kind, str(o.calls), f"{o.instructions:,}", f"{100 * o.instructions / max(p.total_instructions, 1):.1f}",
                  f"{o.macs:,}", "—" if ipm is None else f"{ipm:.2f}", f"{o.live_bytes:,}",
                  "—" if o.stack_bytes is None else f"{o.stack_bytes:,}")
    t.add_row("(entry, input copy)", "", "", f"{p.entry_instructions:,}", "", "", "", "", "")
    t.add_row("(output copy, return)", "", "", f"{p.exit_instructions:,}", "", "", "", "", "")
    ipm = p.total_instructions / p.macs if p.macs else float("nan")
    t.add_row("total", "", str(len(p.calls)), f"{p.total_instructions:,}", "100.0", f"{p.macs:,}", f"{ipm:.2f}",
              f"{p.arena_bytes:,}", f"{p.stack_max:,}", style="bold")
    console.print(t)
    ok = "[green]exactly[/]" if p.op_sum == p.total_instructions else "[bold red]NOT[/]"
    console.print(f"per-op counts sum to {p.op_sum:,} = {ok} the whole-inference count {p.total_instructions:,}"
                  + (" (mean over inputs; per-call counts varied)" if p.instructions_vary else ""))
    console.print("profiling overhead: none — the deployed firmware is profiled unchanged (the plugin cuts at "
                  "kernel-call addresses)")
    if p.tap_instructions is not None:
        console.print(f"tap build (per-op stack): flash {p.tap_flash - p.flash_used:+,} B, whole inference "
                      f"{p.tap_overhead_instructions:+,} instructions against the deployed firmware")


def plot(p: OpProfile, path, top: int = 40) -> None:
    """PNG: instructions by op (bars, the `top` costliest, others summed) beside the planned arena bytes
    live per op with the measured stack high-water on top of it, in execution order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted(p.ops, key=lambda o: -o.instructions)
    shown, rest = ops[:top], ops[top:]
    labels = [o.op for o in shown] + ([f"{len(rest)} other ops"] if rest else [])
    vals = [o.instructions for o in shown] + ([sum(o.instructions for o in rest)] if rest else [])
    h = max(4.0, 0.22 * len(labels) + 1.5)
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, h), gridspec_kw={"width_ratios": [1.1, 1]})
    y = np.arange(len(labels))
    a.barh(y, vals, color="tab:blue")
    a.set_yticks(y, [s if len(s) <= 48 else "…" + s[-47:] for s in labels], fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("executed instructions per inference")
    a.set_title(f"instructions by op (total {p.total_instructions:,}, {p.total_instructions / max(p.macs, 1):.2f} / MAC)")
    x = np.arange(len(p.ops))
    live = [o.live_bytes for o in p.ops]
    b.step(x, live, where="mid", color="tab:orange", label="arena live (planned)")
    stack = [o.stack_bytes for o in p.ops]
    if all(s is not None for s in stack):
        b.step(x, [l + s for l, s in zip(live, stack)], where="mid", color="tab:red", linestyle="--",
               label="+ stack high-water (measured)")
    b.axhline(p.arena_bytes, color="grey", linewidth=0.8, label=f"arena {p.arena_bytes:,} B")
    b.set_xlabel("op, in execution order")
    b.set_ylabel("bytes")
    b.set_title("memory per op")
    b.legend(fontsize=8)
    fig.suptitle(f"{p.model} on {p.board} ({p.schedule} schedule)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
