"""Offline measurements AdapMoE needs before it runs: per-layer sensitivity s_l, the gating threshold T,
and per-layer hit curves from which the DP sizes each layer's share of the cache.

s_l: dropping the second expert moves the gate weights from (w1, w2) to (1, 0), i.e. by w2 along
d = (+1, -1). A second-order estimate of the loss change is 1/2 * s_l * w2^2 with s_l = E[(g . d)^2]
(the Fisher approximation of the curvature), g being the loss gradient with respect to the two
gate weights of a token. T is the quantile of s_l * w2^2 over calibration tokens that drops the
requested fraction of second experts. All measured on training text, never on the evaluation text.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from edge.moe.model import VOCAB, MoEModel
from edge.moe.policies import allocate_slots, lru_hit_curve
from edge.moe.runtime import Gating, MoERuntime
from edge.moe.store import ExpertStore
from base.paths import config_hash, files_hash


@dataclass
class Calibration:
    sensitivity: list[float]
    threshold: float
    drop_fraction: float
    curves_top2: list[list[int]]    # per layer: LRU hits with 0..E slots, gating off
    curves_gated: list[list[int]]   # the same with adaptive gating on
    tokens: int
    thresholds: dict[str, float]    # T for other drop shares ("0.3" -> T), for sweeps

    def gating(self, drop_fraction: float | None = None) -> Gating:
        if drop_fraction is None:
            return Gating(self.sensitivity, self.threshold)
        return Gating(self.sensitivity, self.thresholds[f"{drop_fraction:.1f}"])

    def slots(self, total: int, gated: bool) -> list[int]:
        """DP allocation of `total` expert slots over layers (each layer keeps at least one when possible)."""
        curves = self.curves_gated if gated else self.curves_top2
        L = len(curves)
        if total < L:
            return allocate_slots(curves, total)
        rest = allocate_slots([c[1:] for c in curves], total - L)  # one slot per layer first
        return [s + 1 for s in rest]


def full_model(store: ExpertStore, model: MoEModel | None = None) -> MoEModel:
    """The all-in-RAM model rebuilt from the store (int8 experts dequantised): the reference."""
    from edge.moe.runtime import dense_model

    dense = model or dense_model(store)
    full = MoEModel(store.cfg)
    state = {k: v for k, v in dense.state_dict().items() if not k.endswith((".moe.w1", ".moe.w2"))}
    experts = store.load_all()
    for l in range(store.cfg.layers):
        ws = [experts[(l, e)].weights() for e in range(store.cfg.experts)]
        state[f"blocks.{l}.moe.w1"] = torch.stack([w[0] for w in ws])
        state[f"blocks.{l}.moe.w2"] = torch.stack([w[1] for w in ws])
    full.load_state_dict(state)
    return full.eval()


def sensitivity(model: MoEModel, ids: torch.Tensor) -> tuple[list[float], list[np.ndarray]]:
    """s_l per layer and, per layer, every calibration token's second gate weight w2."""
    T = model.cfg.context
    n = (len(ids) - 1) // T
    x = torch.stack([ids[i * T:i * T + T + 1] for i in range(n)])
    model.zero_grad(set_to_none=True)
    logits = model(x[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum").backward()
    s, w2 = [], []
    for b in model.blocks:
        w = b.moe.last_weights
        g = w.grad[:, 1] - w.grad[:, 0]
        s.append(float((g ** 2).mean()))
        w2.append(w[:, 1].detach().numpy())
    model.zero_grad(set_to_none=True)
    return s, w2


def calibrate(store: ExpertStore, ids: torch.Tensor, drop_fraction: float | None = None,
              trace_tokens: int = 768, max_ppl_increase: float = 0.005,
              candidates=(0.3, 0.4, 0.5, 0.6, 0.7)) -> Calibration:
    """Measures s_l, T and hit curves on `ids` (training text); cached in the store directory.

    With `drop_fraction=None` the threshold is the largest candidate whose perplexity on the
    calibration text stays within `max_ppl_increase` of top-2 (the evaluation text is never used)."""
    if len(ids) < store.cfg.context + 1:
        raise ValueError(f"calibration needs at least {store.cfg.context + 1} tokens, got {len(ids)}")
    key = config_hash({"ids": config_hash(ids.tolist()), "drop": drop_fraction, "trace": trace_tokens, "v": 3,
                       "auto": [max_ppl_increase, list(candidates)] if drop_fraction is None else None})
    path = store.root / f"calibration-{key}.json"
    if path.is_file():
        return Calibration(**json.loads(path.read_text()))
    model = full_model(store)
    s, w2 = sensitivity(model, ids)
    scores = np.concatenate([s_l * w ** 2 for s_l, w in zip(s, w2)])

    def gating_for(frac):
        return Gating(s, float(np.quantile(scores, frac)) if frac > 0 else 0.0)

    probe = ids[:trace_tokens + 1]
    with MoERuntime(store, "ram", model=None) as rt:
        top2 = rt.score(probe)
    if drop_fraction is None:
        drop_fraction = 0.0
        for frac in sorted(candidates):
            with MoERuntime(store, "ram", gating=gating_for(frac)) as rt:
                if rt.score(probe).perplexity > top2.perplexity * (1 + max_ppl_increase):
                    break
            drop_fraction = frac
    gating = gating_for(drop_fraction)
    with MoERuntime(store, "ram", gating=gating) as rt:
        gated = rt.score(probe)
    curves = [[lru_hit_curve(t.trace, l, store.cfg.experts) for l in range(store.cfg.layers)] for t in (top2, gated)]
    sweep = {f"{f:.1f}": gating_for(f).threshold for f in np.arange(0.0, 1.0, 0.1)}
    cal = Calibration(s, gating.threshold, drop_fraction, curves[0], curves[1], trace_tokens, sweep)
    path.write_text(json.dumps(asdict(cal)))
    return cal



@dataclass
class MarginCalibration:
    """Cache-aware routing's margin for one cache set-up: the largest candidate whose perplexity on the
    calibration text stays within `max_ppl_increase` of plain top-2 (measured, not guessed)."""
    margin: float
    max_ppl_increase: float
    top2_perplexity: float
    sweep: list[dict]   # per candidate: margin, perplexity, hit rate, reroute share


def calibrate_margin(store: ExpertStore, ids: torch.Tensor, policy: str, budget_bytes: int,
                     candidates=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), max_ppl_increase: float = 0.01,
                     tokens: int = 256, lowp: str | None = None, slots: list[int] | None = None,
                     lowp_max_weight: float = 0.5) -> MarginCalibration:
    """Sweeps the margin on `ids` (training text) with the cache the runtime will have (policy, budget).

    The perplexity cost of a margin depends on what is resident, so it is calibrated per policy and
    budget (and, with `lowp`, the same cheap-miss rule: it changes what fits); without prefetching (its timing
    would make the calibration depend on the machine's load);
    reads go to the unthrottled store (only hits and perplexity matter here). Cached in the store."""
    key = config_hash({"ids": config_hash(ids[:tokens + 1].tolist()), "policy": policy, "budget": budget_bytes,
                       "cand": list(candidates), "max": max_ppl_increase, "lowp": lowp, "slots": slots,
                       "lowp_max_weight": lowp_max_weight if lowp else None,
                       "code": files_hash([Path(__file__).parent / f for f in
                                          ("runtime.py", "policies.py", "routing.py", "store.py", "kernels.py",
                                           "csrc/expert_ffn.c")])})
    path = store.root / f"margin-{key}.json"
    if path.is_file():
        return MarginCalibration(**json.loads(path.read_text()))
    plain = ExpertStore(store.root)  # host speed: calibration measures hits and perplexity, not time
    probe = ids[:tokens + 1]
    with MoERuntime(plain, "ram") as rt:
        top2 = rt.score(probe).perplexity
    sweep, best = [], 0.0
    for m in sorted(candidates):
        with MoERuntime(plain, policy, budget_bytes, route_margin=m, lowp=lowp, slots=slots,
                        lowp_max_weight=lowp_max_weight) as rt:
            s = rt.score(probe)
        ok = s.perplexity <= top2 * (1 + max_ppl_increase)
        sweep.append({"margin": m, "perplexity": s.perplexity, "hit_rate": s.hit_rate,
                      "reroute_share": s.reroutes / max(1, s.tokens * store.cfg.layers), "within_budget": ok})
        if not ok:
            break  # perplexity grows with the margin: larger ones only cost more
        best = m
    cal = MarginCalibration(best, max_ppl_increase, top2, sweep)
    path.write_text(json.dumps(asdict(cal)))
    return cal
