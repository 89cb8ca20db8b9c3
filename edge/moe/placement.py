"""Every expert resident: which precision each expert is held at so that all of them fit the budget.

An int8 cache that is a few experts short of holding everything thrashes: per-layer LRU on 31 slots
for 32 experts misses on that layer's last expert, and every miss waits for the device. When the
budget is just short, it is cheaper to keep *all* experts in RAM and hold the least-used ones at a
lower precision: a packed int4 copy is half the bytes of the int8 one. `place` starts from the
first precision of a ladder (int8) and moves the least-used expert one rung down (int4) until the
total fits: as many experts as the missing bytes need, not a fixed count. Decoding then never reads
storage; the cache is filled once at load (`MoERuntime(..., "resident", placement=...)`).

"Least used" is the expert's gate-weight mass on calibration text (training text, never the evaluation
text): the sum over tokens of the weight the router gives it. An expert's quantisation error enters a
token's output scaled by its gate weight, so the mass is how much of the model's output passes through
it, routing frequency and how strongly it is chosen in one number.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from base.errors import TinyshieldError
from base.paths import config_hash
from edge.moe.model import route
from edge.moe.policies import Key
from edge.moe.store import ExpertStore

LADDER = ("int8", "int4")  # full precision first would need 4x the bytes: the resident case starts at int8


@dataclass
class Placement:
    """Per expert, the copy held in RAM ("full", "int8", "int4"), and what that costs."""
    precisions: dict[Key, str]
    ram_bytes: int
    budget_bytes: int
    usage: dict[Key, float]   # gate-weight mass per token on calibration text (per layer it sums to 1)

    def count(self, precision: str) -> int:
        return sum(p == precision for p in self.precisions.values())

    def describe(self) -> str:
        order = ("full", *LADDER)
        used = sorted(set(self.precisions.values()), key=order.index)
        low = sorted(k for k, p in self.precisions.items() if p != used[0])
        return (f"{' + '.join(f'{self.count(p)} {p}' for p in used)} experts, {self.ram_bytes:,} of "
                f"{self.budget_bytes:,} B" + (f" ({', '.join(f'L{l}E{e}' for l, e in low)} at lower precision)"
                                             if low else ""))


def expert_usage(store: ExpertStore, ids: torch.Tensor) -> dict[Key, float]:
    """Gate-weight mass per token of every expert, from the all-in-RAM model (plain top-k) on `ids`.

    Per layer the values sum to 1 (the top-k weights of a token sum to 1). Cached in the store directory."""
    from edge.moe.calibrate import full_model

    cfg = store.cfg
    T = cfg.context
    n = (len(ids) - 1) // T
    if n < 1:
        raise TinyshieldError(f"expert usage needs at least {T + 1} calibration tokens, got {len(ids)}")
    key = config_hash({"ids": config_hash(ids[:n * T].tolist()), "v": 1})
    path = store.root / f"usage-{key}.json"
    if path.is_file():
        return {tuple(map(int, k.split("/"))): v for k, v in json.loads(path.read_text()).items()}
    model = full_model(store)
    mass = torch.zeros(cfg.layers, cfg.experts, dtype=torch.float64)
    hooks = []
    for l, b in enumerate(model.blocks):
        def hook(_mod, _inp, logits, l=l):
            idx, w = route(logits.reshape(-1, cfg.experts), cfg.top_k)
            mass[l].index_add_(0, idx.reshape(-1), w.reshape(-1).double())
        hooks.append(b.moe.router.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.stack([ids[i * T:(i + 1) * T] for i in range(n)]))
    finally:
        for h in hooks:
            h.remove()
    usage = {(l, e): float(mass[l, e]) / (n * T) for l in range(cfg.layers) for e in range(cfg.experts)}
    path.write_text(json.dumps({f"{l}/{e}": v for (l, e), v in usage.items()}))
    return usage


def place(store: ExpertStore, budget_bytes: int, usage: dict[Key, float], ladder=LADDER) -> Placement:
    """Every expert at ladder[0], then the least-used one rung down at a time until the total fits.

    Demoting the least-used expert all the way before touching the next keeps the error where the model
    looks least. Raises when even the last rung for every expert does not fit (the fix: a cache policy)."""
    for p in ladder:
        if p != "full" and p not in store.copies:
            raise TinyshieldError(f"the store {store.root} has no {p} copies (it has {store.copies or 'none'}); "
                                  "rebuild it with write_store(..., copies=('int8', 'int4'))")
    cost = {p: store.expert_bytes_of(p) for p in ladder}
    keys = store.keys()
    missing = [k for k in keys if k not in usage]
    if missing:
        raise TinyshieldError(f"no usage figure for expert {missing[0]}: measure it on this store's model "
                              "(edge.moe.placement.expert_usage)")
    prec = {k: ladder[0] for k in keys}
    total = len(keys) * cost[ladder[0]]
    floor = len(keys) * cost[ladder[-1]]
    if floor > budget_bytes:
        raise TinyshieldError(f"all {len(keys)} experts do not fit {budget_bytes:,} B even as {ladder[-1]} "
                              f"({floor:,} B): use a cache policy (lru, adapmoe) at this budget")
    for k in sorted(keys, key=lambda k: (usage[k], k)):  # least used first
        for lower in ladder[1:]:
            if total <= budget_bytes:
                break
            total += cost[lower] - cost[prec[k]]
            prec[k] = lower
        if total <= budget_bytes:
            break
    return Placement(prec, total, budget_bytes, dict(usage))
