"""Eviction policies for the expert cache. Each sees keys (layer, expert) and decides what leaves.

A policy is told about every demand access (`on_access`, in order), every insertion and eviction,
and is asked for a `victim` when the cache needs room (None = do not admit the new key). `fits`
lets a policy partition the cache (per-layer slots); the cache itself only enforces the byte budget.
`allocate_slots` is the DP that sizes those per-layer partitions from measured hit curves.
"""
from __future__ import annotations

import bisect
from collections import Counter, OrderedDict, defaultdict
from typing import Iterable, Sequence

Key = tuple[int, int]


class Policy:
    name = "policy"

    def fits(self, key: Key, resident: Iterable[Key]) -> bool:
        return True

    def victim(self, key: Key, resident: Sequence[Key]) -> Key | None:
        raise NotImplementedError

    def on_access(self, key: Key) -> None:
        pass

    def on_insert(self, key: Key) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        pass


class NoCache(Policy):
    """On-demand loading: every expert is read when needed and dropped after use."""
    name = "on-demand"

    def fits(self, key, resident):
        return False

    def victim(self, key, resident):
        return None


class LayerLRU(Policy):
    """LRU inside fixed per-layer partitions (Mixtral-offloading uses equal slots per layer)."""
    name = "lru"

    def __init__(self, slots: Sequence[int]):
        self.slots = list(slots)
        self.order: dict[int, OrderedDict] = defaultdict(OrderedDict)

    def fits(self, key, resident):
        return len(self.order[key[0]]) < self.slots[key[0]]

    def victim(self, key, resident):
        if self.slots[key[0]] == 0:
            return None
        layer = self.order[key[0]]
        if layer:
            return next(iter(layer))
        # Layer empty: the byte budget is the limit; take the globally oldest entry of any layer.
        for l in sorted(self.order, key=lambda l: -len(self.order[l])):
            if self.order[l]:
                return next(iter(self.order[l]))
        return None

    def on_access(self, key):
        if key in self.order[key[0]]:
            self.order[key[0]].move_to_end(key)

    def on_insert(self, key):
        self.order[key[0]][key] = None

    def on_evict(self, key):
        self.order[key[0]].pop(key, None)


class LFU(Policy):
    """Global least-frequently-used (counts persist after eviction); ties go to the least recent."""
    name = "lfu"

    def __init__(self):
        self.count: Counter = Counter()
        self.last: dict[Key, int] = {}
        self.clock = 0

    def victim(self, key, resident):
        return min(resident, key=lambda k: (self.count[k], self.last.get(k, -1)), default=None)

    def on_access(self, key):
        self.clock += 1
        self.count[key] += 1
        self.last[key] = self.clock


class LeastStale(Policy):
    """Evicts the expert whose layer the decoder reaches last from now (our reading of SpecMD's
    Least-Stale, arXiv 2602.03921).

    Decoding visits layers 0..L-1 in order for every token, so an expert of layer l cannot be needed
    before the decoder's cursor comes back to l: for a cursor at layer c that is (l - c) mod L layer
    steps away, and a full L for layer c itself (the current token has used it by the time a new expert
    of layer c is inserted). Evicting the largest distance is what Belady would do if every resident
    expert were needed on its layer's next visit; ties (experts of the same layer) go to the least
    recently used, and a new expert farther than every resident one is not admitted. Global LRU does the opposite on this cyclic pattern: its oldest entries are the next
    layer's experts, needed soonest, which is where LRU's collision misses come from."""
    name = "least-stale"

    def __init__(self, layers: int):
        self.layers = layers
        self.cursor = 0
        self.clock = 0
        self.last: dict[Key, int] = {}

    def distance(self, key: Key) -> int:
        return (key[0] - self.cursor) % self.layers or self.layers

    def victim(self, key, resident):
        far = max(resident, key=lambda k: (self.distance(k), -self.last.get(k, -1)), default=None)
        # Like Belady, do not admit a key needed later than everything resident: without this the layer
        # being decoded would push out the next layers' experts, and at small budgets no layer would ever
        # find its own experts from the previous token (measured: ~3% hits at 10%).
        if far is None or self.distance(far) < self.distance(key):
            return None
        return far

    def on_access(self, key):
        self.cursor = key[0]
        self.clock += 1
        self.last[key] = self.clock


class Belady(Policy):
    """Offline MIN: evict the resident key used farthest in the future (or skip admitting the new key
    if it is itself the farthest). Needs the whole demand trace in advance; optimal for equal sizes."""
    name = "belady"

    def __init__(self, trace: Sequence[Key]):
        self.uses: dict[Key, list[int]] = defaultdict(list)
        for i, k in enumerate(trace):
            self.uses[k].append(i)
        self.t = 0  # index of the next demand access

    def next_use(self, key: Key) -> float:
        u = self.uses.get(key, [])
        i = bisect.bisect_left(u, self.t)
        return u[i] if i < len(u) else float("inf")

    def victim(self, key, resident):
        far = max(resident, key=self.next_use, default=None)
        if far is None or self.next_use(key) >= self.next_use(far):
            return None
        return far

    def on_access(self, key):
        self.t += 1


def lru_hit_curve(trace: Sequence[Key], layer: int, max_slots: int) -> list[int]:
    """Hits of an LRU cache of s = 0..max_slots slots on one layer's accesses (stack distances)."""
    stack: list[int] = []
    hist = [0] * (max_slots + 1)
    for l, e in trace:
        if l != layer:
            continue
        if e in stack:
            d = stack.index(e)  # 0 = most recent: a hit for every cache of > d slots
            if d < max_slots:
                hist[d + 1] += 1
            stack.remove(e)
        stack.insert(0, e)
    out, acc = [], 0
    for s in range(max_slots + 1):
        acc += hist[s]
        out.append(acc)
    return out


def allocate_slots(curves: Sequence[Sequence[float]], total: int) -> list[int]:
    """DP over layers: slots s_l (0 <= s_l < len(curves[l])) with sum <= total maximising sum curves[l][s_l].

    Ties prefer the more even split, so a flat curve does not starve a layer."""
    L = len(curves)
    best = [0.0] + [float("-inf")] * total  # best[b]: value using exactly b slots so far
    choice: list[list[int]] = []
    for l in range(L):
        new = [float("-inf")] * (total + 1)
        pick = [0] * (total + 1)
        for b in range(total + 1):
            for s in range(min(b, len(curves[l]) - 1) + 1):
                if best[b - s] == float("-inf"):
                    continue
                v = best[b - s] + curves[l][s] - 1e-9 * s * s
                if v > new[b]:
                    new[b], pick[b] = v, s
        best = new
        choice.append(pick)
    b = max(range(total + 1), key=lambda i: best[i])
    slots = [0] * L
    for l in reversed(range(L)):
        slots[l] = choice[l][b]
        b -= slots[l]
    return slots


def even_slots(layers: int, experts: int, total: int) -> list[int]:
    """Equal split of `total` slots over layers (the remainder goes to the first layers)."""
    base, extra = divmod(total, layers)
    return [min(experts, base + (l < extra)) for l in range(layers)]
