"""Memory profile of a schedule: the live set at every call, the peak, the arena map, the budget check.

Pure data (dataclasses) plus two presenters: rich tables for the terminal and a matplotlib timeline
that overlays several schedules on one figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from base.errors import TinyshieldError
from mcu.graph import Schedule
from mcu.planner import ArenaPlan, align_up, check, live_bytes, lower_bound, plan

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
        fix = "use --schedule tiled, a shorter --seq-len" if prof.schedule != "tiled" else "use a shorter --seq-len"
        raise TinyshieldError(
            f"the {prof.schedule} schedule needs {prof.arena_bytes:,} B of arena (live-set peak "
            f"{prof.peak_live:,} B at {prof.peak_op}) but {board} has an arena budget of {budget:,} B "
            f"(RAM minus stack and I/O): {fix} or a board with more RAM")


# ---------------------------------------------------------------- presenters

@dataclass
class OpRow:
    op: str
    kernel: str
    calls: int
    macs: int
    worst: Step               # the op's call with the largest live set


def op_rows(prof: Profile) -> list[OpRow]:
    """One row per op in order of first call: its calls, MACs and its worst live set. (A tiled
    schedule calls each op once per block; the table shows the op, not every block.)"""
    rows: dict[str, OpRow] = {}
    for s in prof.steps:
        r = rows.get(s.op)
        if r is None:
            rows[s.op] = OpRow(s.op, s.kernel, 1, s.macs, s)
        else:
            r.calls += 1
            r.macs += s.macs
            if s.live_bytes > r.worst.live_bytes:
                r.worst = s
    return list(rows.values())


_SHORT = (("encoder.layer.", "L"), ("embeddings.", "emb."), ("attention.self.", "att."),
          ("attention.output.", "att.out."), ("intermediate.", "ffn."), ("output.", "out."),
          ("LayerNorm", "LN"), ("word_embeddings", "words"))


def short(name: str) -> str:
    """A compact buffer/op name for tables: encoder.layer.0.attention.self.query.out -> L0.att.query."""
    for a, b in _SHORT:
        name = name.replace(a, b)
    return name.replace(".out@", "@").removesuffix(".out")


def _live_text(prof: Profile, live: list[str], top: int = 6) -> str:
    big = sorted(live, key=lambda n: -prof.buffers[n][0])
    text = ", ".join(f"{short(n)} {prof.buffers[n][0] / 1024:.1f}K" for n in big[:top])
    return text + (f", +{len(big) - top} smaller" if len(big) > top else "")


def render(prof: Profile, console=None, budget: int | None = None, board: str = "", max_rows: int = 40) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    shown = {k: v for k, v in prof.params.items() if isinstance(v, (int, float, str, bool, type(None)))}
    head = Table(title=f"{prof.schedule} schedule {shown or ''}", show_header=False)
    head.add_row("arena (planned, " + prof.plan.strategy + ")", f"{prof.arena_bytes:,} B")
    head.add_row("live-set peak (lower bound)", f"{prof.peak_live:,} B")
    head.add_row("peak op", prof.peak_op)
    head.add_row("calls / MACs", f"{len(prof.steps):,} / {prof.macs:,}")
    if budget is not None:
        head.add_row(f"arena budget ({board})", f"{budget:,} B  ({100 * prof.arena_bytes / budget:.0f}% used)")
    console.print(head)

    t = Table(title="live set by op (at each op's worst call; * = the peak)")
    for col in ("op", "kernel", "calls", "MACs", "live bytes", "largest live buffers"):
        t.add_column(col, justify="right" if col in ("calls", "MACs", "live bytes") else "left")
    rows = op_rows(prof)
    if len(rows) > max_rows:   # keep the heaviest, in schedule order
        keep = set(sorted(range(len(rows)), key=lambda i: -rows[i].worst.live_bytes)[:max_rows])
        rows = [r for i, r in enumerate(rows) if i in keep]
    for r in rows:
        mark = " *" if r.worst.index == prof.peak_step else ""
        t.add_row(short(r.op) + mark, r.kernel, str(r.calls), f"{r.macs:,}", f"{r.worst.live_bytes:,}",
                  _live_text(prof, r.worst.live))
    console.print(t)

    m = Table(title="arena map (per-block buffers at the same place shown once, xN)")
    for col in ("offset", "end", "bytes", "buffer", "kind", "live calls"):
        m.add_column(col, justify="right" if col in ("offset", "end", "bytes") else "left")
    for (off, base, nbytes, kind), lives in arena_map(prof):
        label = short(base) + (f" x{len(lives)}" if len(lives) > 1 else "")
        m.add_row(f"{off:,}", f"{off + nbytes:,}", f"{nbytes:,}", label, kind,
                  f"{lives[0][0]}-{lives[-1][1]}")
    console.print(m)


def pareto(cands: list[dict]) -> list[dict]:
    """Tile candidates ({rows, kt, peak, macs, calls}) on the front of peak vs (MACs, calls)."""
    front, best = [], None
    for c in sorted(cands, key=lambda c: (c["peak"], c["macs"], c["calls"])):
        if best is None or (c["macs"], c["calls"]) < best:
            front.append(c)
            best = (c["macs"], c["calls"])
    return front


def search_table(cands: list[dict], base_macs: int, chosen: tuple | None = None, title: str = "tile search"):
    """The memory / recomputation / call-count trade of a tile search, as a rich table. `chosen` is
    (rows, kt) or (rows, kt, recomputed K/V layers)."""
    from rich.table import Table
    t = Table(title=f"{title}: live-set peak vs recomputation and calls (Pareto front)")
    for col in ("rows", "kt", "K/V recomputed in", "peak bytes", "MACs", "recompute", "calls"):
        t.add_column(col, justify="right")
    for c in pareto(cands):
        rec = tuple(c.get("recompute", ()))
        mark = " *" if chosen in ((c["rows"], c["kt"], rec), (c["rows"], c["kt"]) if not rec else None) else ""
        t.add_row(f"{c['rows']}{mark}", str(c["kt"]), ",".join(map(str, rec)) or "-", f"{c['peak']:,}",
                  f"{c['macs']:,}", f"{100 * (c['macs'] / base_macs - 1):.1f}%", f"{c['calls']:,}")
    return t


def arena_map(prof: Profile) -> list[tuple[tuple[int, str, int, str], list[tuple[int, int]]]]:
    """Arena rows by offset: (offset, buffer name without its block suffix, bytes, kind) -> lifetimes."""
    groups: dict[tuple[int, str, int, str], list[tuple[int, int]]] = {}
    for n, off in prof.plan.offsets.items():
        nbytes, kind = prof.buffers[n]
        groups.setdefault((off, n.split("@")[0] + ("@*" if "@" in n else ""), nbytes, kind), []).append(
            prof.plan.lifetimes[n])
    return sorted(((k, sorted(v)) for k, v in groups.items()), key=lambda kv: (kv[0][0], kv[1][0]))


def plot_timelines(profiles: list[Profile], path, budget: int | None = None, title: str = "",
                   budget_label: str = "board budget") -> None:
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
        ax.axhline(budget / 1024, color="red", lw=1.5, label=f"{budget_label} {budget / 1024:.0f} KiB")
    ax.set_xlabel("progress through one inference (fraction of kernel calls)")
    ax.set_ylabel("arena bytes live (KiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "memory timeline")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- graphs to plan

def planning_graph(spec: str, seq_len: int, calib: int = 4, seed: int = 0, calib_file=None):
    """The int8 graph of MODEL for memory planning: `bert-tiny` (BERT-tiny, 2x128, 2 heads, FFN 512,
    random weights — memory does not depend on them), `vit-mnist` (the trained recipe when at hand,
    else the same architecture with random weights), `minilm`, a model directory or a .pt2. Calibration
    uses a few random inputs (a .pt2: `calib_file`, else its example input): scales change no buffer size.
    The graph comes from the deployment's own path (mcu.build.lower_source)."""
    from pathlib import Path

    import torch

    from mcu.build import Source, load_source, lower_source

    if str(spec).endswith(".tflite"):      # already int8, its sequence length fixed by the file
        from mcu.from_tflite import lower_tflite
        return lower_tflite(spec)
    torch.manual_seed(seed)
    if spec == "bert-tiny":
        from edge.models.bert import BertClassifier, BertConfig
        model = BertClassifier(BertConfig(max_position_embeddings=max(512, seq_len)), 2).eval()
        src = Source(model, "bert-classifier", None)
    else:
        try:
            src = load_source(spec, train_if_missing=False)
        except TinyshieldError:
            if spec != "vit-mnist":
                raise
            from edge.models.vit import ViT, ViTConfig
            src = Source(ViT(ViTConfig()).eval(), "vit", None)
    if src.kind not in ("vit", "bert-classifier", "bert", "minilm", "pt2"):
        raise TinyshieldError(f"cannot plan a {src.kind!r} model: bert-tiny, vit-mnist, minilm, a model directory "
                              "or a .pt2")
    src.model = src.model.eval() if src.model is not None else None
    name = f"{Path(spec).stem if src.kind == 'pt2' else spec}-int8"
    return lower_source(src, calib, seq_len, calib_file, random_seed=seed, name=name)
