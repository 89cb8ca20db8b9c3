"""Offline replay of a recorded demand trace: hit rates of the demand policies, Belady as the ceiling."""
from __future__ import annotations

from edge.moe.cache import replay
from edge.moe.policies import LFU, Belady, LayerLRU, even_slots


def replay_all(trace, layers: int, experts: int, slots: int, dp_slots: list[int] | None = None) -> dict[str, float]:
    """Hit rate per policy for a cache of `slots` equal-size experts."""
    n = max(1, len(trace))
    out = {"lru": replay(trace, slots, LayerLRU(even_slots(layers, experts, slots))).hits / n,
           "lfu": replay(trace, slots, LFU()).hits / n}
    if dp_slots is not None:
        out["dp-lru"] = replay(trace, slots, LayerLRU(dp_slots)).hits / n
    out["belady"] = replay(trace, slots, Belady(trace)).hits / n
    return out
