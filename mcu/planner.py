"""Arena planning: give every buffer of a schedule a byte offset in one static arena.

Pure functions over buffer sizes and lifetimes (first and last call index, inclusive, from
`Schedule.lifetimes()`). Two buffers may share bytes only when their lifetimes do not overlap.

Strategies:
- `greedy_by_size` — TFLite Micro's GreedyMemoryPlanner: largest buffer first, each placed at the
  lowest offset that does not collide with an already placed, simultaneously live buffer.
- `best_fit` — several orderings (by size, by size x lifetime, by start, by longest lifetime),
  each placing a buffer into the *tightest* gap it fits among the live neighbours (best fit,
  which keeps big holes for later big buffers), plus greedy_by_size itself; the smallest arena
  wins. So it is never worse than greedy_by_size.

`check(plan, schedule)` replays the plan call by call and raises on any overlap; `lower_bound`
is the largest sum of (aligned) sizes live at one call — no plan can be smaller.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from base.errors import InternalError, TinyshieldError
from mcu.graph import Schedule

STRATEGIES = ("greedy_by_size", "best_fit")


class PlanError(InternalError):
    """A plan that places two simultaneously live buffers on the same bytes (or is malformed): the
    planner broke its own invariant, which no flag can fix."""


@dataclass
class ArenaPlan:
    offsets: dict[str, int]                 # buffer -> byte offset in the arena
    arena_bytes: int                        # the arena size (peak), a multiple of `align`
    strategy: str
    align: int
    sizes: dict[str, int] = field(default_factory=dict)          # aligned sizes
    lifetimes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def end(self, name: str) -> int:
        return self.offsets[name] + self.sizes[name]


def align_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _place(order: list[str], sizes: dict[str, int], life: dict[str, tuple[int, int]],
           best: bool) -> dict[str, int]:
    """Place buffers one by one in `order`; first fit (lowest offset) or best fit (tightest gap)."""
    offsets: dict[str, int] = {}
    # Placed buffers indexed by time bucket, so finding the ones whose lifetimes meet a new
    # buffer's costs the buffers live nearby, not all of them (schedules have 10^4 buffers).
    durations = sorted(b - a + 1 for a, b in life.values())
    width = max(1, durations[len(durations) // 2] if durations else 1)   # the typical lifetime
    buckets: dict[int, list[str]] = {}
    for name in order:
        size = sizes[name]
        a, b = life[name]
        near = {o for k in range(a // width, b // width + 1) for o in buckets.get(k, ())}
        # Bytes already taken by placed buffers whose lifetimes meet this one's, by offset.
        taken = sorted((offsets[o], offsets[o] + sizes[o]) for o in near if _overlap(life[o], life[name]))
        gaps, cursor = [], 0
        for lo, hi in taken:
            if lo - cursor >= size:
                gaps.append((lo - cursor, cursor))
            cursor = max(cursor, hi)
        if not gaps or not best:
            choice = gaps[0][1] if gaps else cursor
        else:
            choice = min(gaps)[1]          # tightest gap, lowest offset on ties
        offsets[name] = choice
        for k in range(a // width, b // width + 1):
            buckets.setdefault(k, []).append(name)
    return offsets


def _arena(offsets: dict[str, int], sizes: dict[str, int]) -> int:
    return max((offsets[n] + sizes[n] for n in offsets), default=0)


def plan_buffers(sizes: dict[str, int], lifetimes: dict[str, tuple[int, int]],
                 strategy: str = "best_fit", align: int = 16) -> ArenaPlan:
    """Plan raw (size, lifetime) pairs. Sizes are rounded up to `align`; offsets are multiples of it."""
    if strategy not in STRATEGIES:
        raise TinyshieldError(f"unknown planner strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if align < 1 or align & (align - 1):
        raise TinyshieldError(f"alignment {align} is not a power of two")
    missing = set(sizes) - set(lifetimes)
    if missing:
        raise InternalError(f"buffers without a lifetime: {', '.join(sorted(missing))}")
    sz = {n: align_up(max(int(s), 0), align) for n, s in sizes.items()}
    life = {n: lifetimes[n] for n in sizes}
    by_size = sorted(sz, key=lambda n: (-sz[n], life[n][0], n))
    offsets = _place(by_size, sz, life, best=False)
    if strategy == "best_fit":
        dur = {n: life[n][1] - life[n][0] + 1 for n in sz}
        orders = [
            by_size,
            sorted(sz, key=lambda n: (-sz[n] * dur[n], n)),
            sorted(sz, key=lambda n: (-dur[n], -sz[n], n)),
            sorted(sz, key=lambda n: (life[n][0], -sz[n], n)),
        ]
        for order in orders:
            cand = _place(order, sz, life, best=True)
            if _arena(cand, sz) < _arena(offsets, sz):
                offsets = cand
    return ArenaPlan(offsets, align_up(_arena(offsets, sz), align), strategy, align, sz, life)


def plan(schedule: Schedule, strategy: str = "best_fit", align: int = 16) -> ArenaPlan:
    """Offsets for every buffer of `schedule` (contracts.md planner API)."""
    return plan_buffers({n: b.nbytes for n, b in schedule.buffers.items()},
                        schedule.lifetimes(), strategy, align)


def live_at(lifetimes: dict[str, tuple[int, int]], step: int) -> list[str]:
    return [n for n, (a, b) in lifetimes.items() if a <= step <= b]


def live_bytes(sizes: dict[str, int], lifetimes: dict[str, tuple[int, int]], steps: int) -> list[int]:
    """Sum of sizes live at each call index 0..steps-1 (a sweep, O(n + steps))."""
    delta = [0] * (steps + 1)
    for n, (a, b) in lifetimes.items():
        if n in sizes and steps:
            a, b = max(a, 0), min(b, steps - 1)
            if a <= b:
                delta[a] += sizes[n]
                delta[b + 1] -= sizes[n]
    out, run = [], 0
    for i in range(steps):
        run += delta[i]
        out.append(run)
    return out


def lower_bound(schedule: Schedule, align: int = 16) -> int:
    """Max over calls of the aligned bytes live at that call: no arena plan can beat it."""
    sizes = {n: align_up(b.nbytes, align) for n, b in schedule.buffers.items()}
    life = schedule.lifetimes()
    steps = max((b for _, b in life.values()), default=-1) + 1
    return max(live_bytes(sizes, life, max(steps, 1)), default=0)


def check_buffers(p: ArenaPlan, sizes: dict[str, int], lifetimes: dict[str, tuple[int, int]]) -> None:
    """Replay the plan in time order and raise PlanError on the first overlap of live buffers."""
    for n, s in sizes.items():
        if n not in p.offsets:
            raise PlanError(f"buffer {n!r} has no offset in the plan")
        o = p.offsets[n]
        if o < 0 or o % p.align or o + s > p.arena_bytes:
            raise PlanError(f"buffer {n!r} at [{o}, {o + s}) is misaligned or outside the "
                            f"{p.arena_bytes}-byte arena")
    # Sweep over lifetime events: at each buffer's start, compare it with everything live then.
    events = sorted(sizes, key=lambda n: (lifetimes[n][0], n))
    live: list[str] = []
    for n in events:
        start = lifetimes[n][0]
        live = [m for m in live if lifetimes[m][1] >= start]
        lo, hi = p.offsets[n], p.offsets[n] + sizes[n]
        for m in live:
            mlo, mhi = p.offsets[m], p.offsets[m] + sizes[m]
            if sizes[n] and sizes[m] and lo < mhi and mlo < hi:
                raise PlanError(
                    f"buffers {m!r} [{mlo}, {mhi}) live {lifetimes[m]} and {n!r} [{lo}, {hi}) "
                    f"live {lifetimes[n]} overlap")
        live.append(n)


def check(p: ArenaPlan, schedule: Schedule) -> None:
    """Prove that no two simultaneously live buffers of `schedule` share a byte under plan `p`."""
    check_buffers(p, {n: b.nbytes for n, b in schedule.buffers.items()}, schedule.lifetimes())
