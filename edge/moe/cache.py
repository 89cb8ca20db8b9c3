"""A byte-budgeted expert cache; what to evict is the policy's call, the budget is the cache's.

Thread-safe (the prefetch thread inserts while the decoder reads). Statistics live in `CacheStats`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from edge.moe.policies import Key, Policy


@dataclass
class CacheStats:
    accesses: int = 0
    hits: int = 0
    inserts: int = 0
    evictions: int = 0
    rejected: int = 0
    peak_bytes: int = 0


class ExpertCache:
    def __init__(self, budget_bytes: int, policy: Policy):
        if budget_bytes < 0:
            raise ValueError("budget must be >= 0")
        self.budget = int(budget_bytes)
        self.policy = policy
        self.items: dict[Key, object] = {}
        self.sizes: dict[Key, int] = {}
        self.used = 0
        self.stats = CacheStats()
        self.lock = threading.RLock()

    def __contains__(self, key: Key) -> bool:
        with self.lock:
            return key in self.items

    def access(self, key: Key):
        """A demand access: tells the policy, returns the value or None on a miss."""
        with self.lock:
            self.stats.accesses += 1
            v = self.items.get(key)
            if v is not None:
                self.stats.hits += 1
            self.policy.on_access(key)
            return v

    def put(self, key: Key, value, nbytes: int) -> bool:
        """Inserts `value` if the policy admits it, evicting until it fits. Returns whether it is now cached."""
        with self.lock:
            if key in self.items:
                return True
            if nbytes > self.budget:
                self.stats.rejected += 1
                return False
            while self.items and (self.used + nbytes > self.budget or not self.policy.fits(key, self.items)):
                v = self.policy.victim(key, list(self.items))
                if v is None or v not in self.items:
                    break
                self._evict(v)
            if self.used + nbytes > self.budget or not self.policy.fits(key, self.items):
                self.stats.rejected += 1
                return False
            self.items[key] = value
            self.sizes[key] = nbytes
            self.used += nbytes
            self.stats.inserts += 1
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            self.policy.on_insert(key)
            assert self.used <= self.budget
            return True

    def replace(self, key: Key, value, nbytes: int) -> bool:
        """Swaps the cached value of `key` (a low-precision copy for the full expert); False if it no longer fits."""
        with self.lock:
            if key in self.items:
                self._evict(key)
                self.stats.evictions -= 1  # an upgrade, not an eviction
            return self.put(key, value, nbytes)

    def _evict(self, key: Key) -> None:
        del self.items[key]
        self.used -= self.sizes.pop(key)
        self.stats.evictions += 1
        self.policy.on_evict(key)
        self.on_evict(key)

    def on_evict(self, key: Key) -> None:
        """Hook for the runtime (counts prefetched experts evicted unused)."""


def replay(trace, budget_slots: int, policy: Policy) -> CacheStats:
    """Demand-only simulation of a trace with unit-size entries: no I/O, just hits and misses."""
    cache = ExpertCache(budget_slots, policy)
    for key in trace:
        if cache.access(key) is None:
            cache.put(key, True, 1)
    return cache.stats
