"""Memory profile of a schedule: the live set at every call, the peak, the arena map, the budget check.

Pure data (dataclasses) plus two presenters: rich tables for the terminal and a matplotlib timeline
that overlays several schedules on one figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edge.errors import TinyshieldError
from mcu.graph import Schedule
from mcu.planner import ArenaPlan, align_up, check, live_bytes, lower_bound, plan

# RAM budgets for the arena, bytes. Replaced by mcu.boards when the boards module provides them.
BOARD_RAM = {"stm32f405": 192 * 1024, "mps2-an386": 320 * 1024, "mps3-an547": 512 * 1024}


def board_budget(board: str) -> int:
    """RAM budget of `board` in bytes: mcu.boards' linker budget when that module is present."""
    try:
        from mcu.boards import board as board_info
    except ImportError:
        board_info = None
    if board_info is not None:
        return int(board_info(board).ram_bytes)
    if board not in BOARD_RAM:
        raise TinyshieldError(f"unknown board {board!r}: use one of {', '.join(BOARD_RAM)}")
    return BOARD_RAM[board]


@dataclass
class Step:
    index: int
    kernel: str
    op: str
    macs: int
    live: list[str]           # buffers live during this call
    live_bytes: int           # their aligned sizes summed


@dataclass
class Profile:
    schedule: str
    params: dict
    steps: list[Step]
    plan: ArenaPlan
    peak_live: int            # max live-set bytes (lower bound for any plan)
    peak_step: int
    arena_bytes: int          # the planner's arena (>= peak_live)
    macs: int
    buffers: dict[str, tuple[int, str]] = field(default_factory=dict)   # name -> (nbytes, kind)

    @property
    def peak_op(self) -> str:
        s = self.steps[self.peak_step]
        return f"{s.op} ({s.kernel}, call {s.index})"


def profile(schedule: Schedule, strategy: str = "best_fit", align: int = 16) -> Profile:
    p = plan(schedule, strategy, align)
    check(p, schedule)
    life = schedule.lifetimes()
    sizes = {n: align_up(b.nbytes, align) for n, b in schedule.buffers.items()}
    per_call = live_bytes(sizes, life, len(schedule.calls))
    # The live *names* are only kept for the peak and for short schedules (the table shows them).
    starts: dict[int, list[str]] = {}
    for n, (a, _) in life.items():
        starts.setdefault(a, []).append(n)
    steps, live = [], []
    for i, c in enumerate(schedule.calls):
        live = [n for n in live if life[n][1] >= i] + starts.get(i, [])
        steps.append(Step(i, c.kernel, c.op, c.macs, sorted(live), per_call[i]))
    peak_step = max(range(len(steps)), key=lambda i: per_call[i]) if steps else 0
    return Profile(schedule.name, dict(schedule.params), steps, p, lower_bound(schedule, align), peak_step,
                   p.arena_bytes, schedule.macs(),
                   {n: (b.nbytes, b.kind) for n, b in schedule.buffers.items()})


def check_budget(prof: Profile, budget: int, board: str) -> None:
    """Refuse a plan over the board's RAM budget, naming the peak op, the peak bytes and the budget."""
    if prof.arena_bytes > budget:
        raise TinyshieldError(
            f"the {prof.schedule} schedule needs {prof.arena_bytes:,} B of arena (live-set peak "
            f"{prof.peak_live:,} B at {prof.peak_op}) but {board} has a budget of {budget:,} B: "
            "use --schedule tiled, a shorter --seq-len, or a board with more RAM")


# ---------------------------------------------------------------- presenters

def op_rows(prof: Profile, max_rows: int = 40) -> list[Step]:
    """One row per op (consecutive calls of the same op merged to their worst call), the peak kept."""
    merged: list[Step] = []
    for s in prof.steps:
        if merged and merged[-1].op == s.op:
            last = merged[-1]
            if s.live_bytes > last.live_bytes:
                merged[-1] = Step(s.index, s.kernel, s.op, last.macs + s.macs, s.live, s.live_bytes)
            else:
                last.macs += s.macs
        else:
            merged.append(Step(s.index, s.kernel, s.op, s.macs, s.live, s.live_bytes))
    if len(merged) <= max_rows:
        return merged
    top = sorted(range(len(merged)), key=lambda i: -merged[i].live_bytes)[:max_rows]
    return [merged[i] for i in sorted(top)]


def render(prof: Profile, console=None, budget: int | None = None, board: str = "") -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    head = Table(title=f"{prof.schedule} schedule {prof.params or ''}", show_header=False)
    head.add_row("arena (planned, " + prof.plan.strategy + ")", f"{prof.arena_bytes:,} B")
    head.add_row("live-set peak (lower bound)", f"{prof.peak_live:,} B")
    head.add_row("peak op", prof.peak_op)
    head.add_row("calls / MACs", f"{len(prof.steps):,} / {prof.macs:,}")
    if budget is not None:
        head.add_row(f"budget ({board})", f"{budget:,} B  ({100 * prof.arena_bytes / budget:.0f}% used)")
    console.print(head)

    t = Table(title="live set by op (worst call of each op run)")
    for col in ("call", "op", "kernel", "live bytes", "live buffers"):
        t.add_column(col, justify="right" if col in ("call", "live bytes") else "left")
    for s in op_rows(prof):
        mark = " *" if s.index == prof.peak_step else ""
        t.add_row(str(s.index), s.op + mark, s.kernel, f"{s.live_bytes:,}", ", ".join(s.live))
    console.print(t)

    m = Table(title="arena map")
    for col in ("offset", "end", "bytes", "buffer", "kind", "live calls"):
        m.add_column(col, justify="right" if col in ("offset", "end", "bytes") else "left")
    for n in sorted(prof.plan.offsets, key=lambda n: (prof.plan.offsets[n], prof.plan.lifetimes[n])):
        nbytes, kind = prof.buffers[n]
        a, b = prof.plan.lifetimes[n]
        m.add_row(f"{prof.plan.offsets[n]:,}", f"{prof.plan.offsets[n] + nbytes:,}", f"{nbytes:,}", n, kind,
                  f"{a}-{b}")
    console.print(m)


def plot_timelines(profiles: list[Profile], path, budget: int | None = None, title: str = "") -> None:
    """Live bytes against progress through the inference (0..1, so schedules of different call
    counts line up), one line per schedule, the planned arena dashed, the budget as a red line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for prof in profiles:
        n = max(len(prof.steps), 1)
        xs = [(s.index + 0.5) / n for s in prof.steps]
        ys = [s.live_bytes / 1024 for s in prof.steps]
        line, = ax.step(xs, ys, where="mid", label=f"{prof.schedule}: live set (peak {prof.peak_live / 1024:.0f} KiB)")
        ax.axhline(prof.arena_bytes / 1024, color=line.get_color(), ls="--", lw=1,
                   label=f"{prof.schedule}: planned arena {prof.arena_bytes / 1024:.0f} KiB")
    if budget is not None:
        ax.axhline(budget / 1024, color="red", lw=1.5, label=f"board budget {budget / 1024:.0f} KiB")
    ax.set_xlabel("progress through one inference (fraction of kernel calls)")
    ax.set_ylabel("arena bytes live (KiB)")
    ax.set_yscale("log")
    ax.set_title(title or "memory timeline")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
