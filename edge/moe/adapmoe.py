"""Putting a runtime together: the trained model's store, its calibration, and a policy by name.

`open_runtime(store, "adapmoe", budget, gating=..., prefetch=...)` is AdapMoE: DP-sized per-layer
LRU partitions, adaptive gating and prefetching; "resident" keeps every expert in RAM, the least-used
as int4 (placed for the budget from usage measured on training text); the other names are the baselines.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from base.errors import TinyshieldError
from base.sizes import parse_size
from edge.moe.calibrate import Calibration, calibrate
from edge.moe.runtime import POLICIES, MoERuntime
from edge.moe.store import ExpertStore


def parse_budget(text: str, total_bytes: int) -> int:
    """'25%' (of all experts) or a size in bytes, read by base.sizes ('4MB' = 4 MiB, '512KiB', '1000000')."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", str(text))
    if m is None:
        return parse_size(text, "bytes")
    value = float(m.group(1))
    if value > 100:
        raise TinyshieldError(f"budget {text!r} is more than 100% of the experts")
    return int(total_bytes * value / 100)


def calibration_ids(corpora=None, per_corpus: int = 1024) -> torch.Tensor:
    """Calibration bytes from the training part of each corpus (never the validation tail)."""
    from edge.moe.train import CORPORA, split_corpora

    train, _ = split_corpora(corpora or CORPORA)
    parts = [s[len(s) // 3:len(s) // 3 + per_corpus] for s in train.values()]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def open_runtime(store: ExpertStore, policy: str, budget_bytes: int, *, gating: bool = True,
                 prefetch: bool = True, dp: bool = True, calibration: Calibration | None = None,
                 trace=None, prefetch_at: str = "attn", **options) -> MoERuntime:
    """options (route_margin, lowp, lowp_max_weight) go to `MoERuntime` for the non-AdapMoE policies;
    `prefetch` applies to them only when given explicitly there."""
    if policy not in POLICIES:
        raise TinyshieldError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "resident":
        from edge.moe.placement import expert_usage, place

        placement = place(store, budget_bytes, expert_usage(store, calibration_ids()))
        return MoERuntime(store, policy, budget_bytes, placement=placement, **options)
    if policy != "adapmoe":
        return MoERuntime(store, policy, budget_bytes, trace=trace, **options)
    if calibration is None and (gating or dp):
        calibration = calibrate(store, calibration_ids())
    total = budget_bytes // store.expert_bytes
    slots = calibration.slots(total, gated=gating) if dp else None
    return MoERuntime(store, "adapmoe", budget_bytes, gating=calibration.gating() if gating else None,
                      prefetch=prefetch, slots=slots, prefetch_at=prefetch_at)
