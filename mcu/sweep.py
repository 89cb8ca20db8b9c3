"""Sweeps of memory-schedule settings as Ray Tune trials: table, JSON and a Pareto plot.

    res = plan_sweep("bert-tiny", 128, "stm32f405", out_dir)   # every (rows, kt, planner) as a trial
    res.pareto                                                 # arena bytes vs MACs front

One trial schedules the int8 graph with one tile size, plans its arena with one planner and
reports arena bytes, live-set peak, MACs (recomputed attention included) and generated calls.
The tiled schedule is exact at every setting (tests/test_schedules.py), so fidelity is the same
for all trials and the trade is memory against compute. The graph is lowered once by the driver
and shared with the trials through Ray's object store. Ray is the optional `fleet` extra.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from base.errors import TinyshieldError

STRATEGIES = ("best_fit", "greedy_by_size")
HINT = "or drop --sweep to plan one schedule"


@dataclass
class PlanTrial:
    schedule: str                 # "tiled" or "layerwise"
    rows: int | None              # tokens per block (tiled)
    kt: int | None                # keys per tile (tiled)
    strategy: str                 # arena planner
    arena_bytes: int
    peak_live: int
    macs: int
    calls: int
    fits: bool                    # arena within the board's budget
    seconds: float                # the trial's own compute time

    @property
    def label(self) -> str:
        return "layerwise" if self.schedule == "layerwise" else f"{self.rows}x{self.kt}"


@dataclass
class PlanSweep:
    model: str
    board: str
    seq_len: int
    budget: int
    trials: list[PlanTrial]
    pareto: list[PlanTrial]       # no other trial has fewer arena bytes, MACs and calls at once
    seconds: float                # wall time of the Tune run
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pareto"] = [t.label + "/" + t.strategy for t in self.pareto]
        return d


def pareto_front(trials: list[PlanTrial]) -> list[PlanTrial]:
    """Trials no other trial beats on arena bytes, MACs and calls at once (ties: the first kept).
    Calls count too: at equal MACs, smaller tiles trade memory for generated code and call overhead."""
    from base.cluster import pareto_front as front
    return front(trials, key=lambda t: (t.arena_bytes, t.macs, t.calls))


def plan_space(graph, rows: list[int] | None = None, kts: list[int] | None = None,
               strategies: tuple[str, ...] = STRATEGIES) -> list[dict]:
    """The configurations of a plan sweep: the tile search's grid (mcu.schedules.search_tiles) or
    the rows/kts given, times the planners, plus the layerwise schedule per planner."""
    from mcu.schedules import KT_CHOICES, _powers, seq_rows
    L = seq_rows(graph)
    rows = rows or _powers(1, L)
    kts = kts or sorted({k for k in KT_CHOICES if k < L} | {L})
    bad = [v for v in rows + kts if not 1 <= v <= L]
    if bad:
        raise TinyshieldError(f"tile sizes {bad} are outside 1..{L} (the model's {L} tokens): pick rows/kt within it")
    space = [{"schedule": "tiled", "rows": r, "kt": k, "strategy": s} for r in rows for k in kts for s in strategies]
    return space + [{"schedule": "layerwise", "rows": None, "kt": None, "strategy": s} for s in strategies]


def _plan_trial(config: dict, graph=None, budget: int = 0) -> dict:
    """One Tune trial (runs in a Ray worker): schedule + arena plan of one configuration."""
    from mcu.profile import profile
    from mcu.schedules import Tiles, layerwise, tiled_with
    t0 = time.process_time()
    s = layerwise(graph) if config["schedule"] == "layerwise" else tiled_with(graph, Tiles(config["rows"], config["kt"]))
    p = profile(s, config["strategy"])
    return {"arena_bytes": p.arena_bytes, "peak_live": p.peak_live, "macs": p.macs, "calls": len(s.calls),
            "fits": p.arena_bytes <= budget, "seconds": time.process_time() - t0}


def plan_sweep(model: str, seq_len: int, board: str, out_dir: str | Path, rows: list[int] | None = None,
               kts: list[int] | None = None, address: str | None = None, cpus_per_trial: float = 1.0,
               graph=None, strategies: tuple[str, ...] = STRATEGIES) -> PlanSweep:
    """Run the sweep as Tune trials on the local cores (or the cluster at `address`) and write
    trials.json, table.md and pareto.png into out_dir."""
    from base.cluster import require_ray, run_trials
    from mcu.boards import arena_budget
    from mcu.profile import planning_graph

    require_ray(HINT)
    out = Path(out_dir).resolve()
    arena_budget(board)                   # an unknown board fails before the lowering
    graph = graph if graph is not None else planning_graph(model, seq_len)
    budget = arena_budget(board, graph)
    space = plan_space(graph, rows, kts, strategies)
    results, seconds = run_trials(_plan_trial, space, out, metric="arena_bytes", mode="min", address=address,
                                  cpus_per_trial=cpus_per_trial, hint=HINT, graph=graph, budget=budget)
    trials = [PlanTrial(c["schedule"], c["rows"], c["kt"], c["strategy"], int(m["arena_bytes"]), int(m["peak_live"]),
                        int(m["macs"]), int(m["calls"]), bool(m["fits"]), float(m["seconds"])) for c, m in results]
    trials.sort(key=lambda t: (t.schedule != "layerwise", t.rows or 0, t.kt or 0, t.strategy))
    res = PlanSweep(model, board, seq_len, budget, trials, pareto_front(trials), seconds, str(out))
    res.files = {"json": str(out / "trials.json"), "table": str(out / "table.md"), "plot": str(out / "pareto.png")}
    Path(res.files["json"]).write_text(json.dumps(res.to_dict(), indent=1))
    Path(res.files["table"]).write_text(markdown_table(res))
    plot_pareto(res, res.files["plot"])
    return res


def markdown_table(res: PlanSweep) -> str:
    front = {id(t) for t in res.pareto}
    lines = [f"# plan sweep: {res.model}, L = {res.seq_len}, {res.board} (budget {res.budget:,} B)", "",
             f"{len(res.trials)} Ray Tune trials in {res.seconds:.1f} s; * = Pareto front (arena bytes, MACs, calls)", "",
             "| schedule | tiles | planner | arena B | live peak B | MACs | calls | fits |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for t in res.trials:
        star = " *" if id(t) in front else ""
        lines.append(f"| {t.schedule}{star} | {t.label if t.schedule == 'tiled' else '-'} | {t.strategy} | "
                     f"{t.arena_bytes:,} | {t.peak_live:,} | {t.macs:,} | {t.calls:,} | {'yes' if t.fits else 'no'} |")
    return "\n".join(lines) + "\n"


def rich_table(res: PlanSweep, max_rows: int = 60):
    from rich.table import Table
    front = {id(t) for t in res.pareto}
    t = Table(title=f"plan sweep: {len(res.trials)} trials, {res.board} budget {res.budget:,} B "
                    f"(* Pareto front: arena, MACs, calls)")
    for col in ("schedule", "tiles", "planner", "arena B", "peak B", "MACs", "calls", "fits"):
        t.add_column(col, justify="right" if col not in ("schedule", "planner") else "left")
    shown = res.pareto + [x for x in res.trials if id(x) not in front]
    for x in shown[:max_rows]:
        t.add_row(x.schedule + (" *" if id(x) in front else ""), x.label if x.schedule == "tiled" else "-",
                  x.strategy, f"{x.arena_bytes:,}", f"{x.peak_live:,}", f"{x.macs:,}", f"{x.calls:,}",
                  "yes" if x.fits else "no")
    return t


def plot_pareto(res: PlanSweep, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from base.cluster import plot_front, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    front = sorted(res.pareto, key=lambda t: t.arena_bytes)
    for ax, (what, get, unit) in zip(axes, (("MACs per inference", lambda t: t.macs / 1e6, "M"),
                                          ("kernel calls (generated code)", lambda t: t.calls, ""))):
        for strat, marker in zip(STRATEGIES, ("o", "s")):
            pts = [t for t in res.trials if t.strategy == strat]
            ax.scatter([t.arena_bytes / 1024 for t in pts], [get(t) for t in pts], marker=marker, alpha=0.5,
                       label=f"trials ({strat})")
        plot_front(ax, front, lambda t: t.arena_bytes / 1024, get)
        for t in front:
            ax.annotate(t.label, (t.arena_bytes / 1024, get(t)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(res.budget / 1024, color="r", linestyle="--", label=f"{res.board} budget")
        ax.set_xscale("log")
        ax.set_xlabel("arena (KiB, log)")
        ax.set_ylabel(f"{what}{f' ({unit})' if unit else ''}")
        ax.legend(fontsize=7)
    save_figure(fig, path, f"{res.model}, L = {res.seq_len}: memory vs compute ({len(res.trials)} trials; every "
                           "setting bit-exact)")
