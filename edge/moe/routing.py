"""Cache-aware routing (Qualcomm, "Mixture of Cache-Conditional Experts", arXiv 2412.00099).

When the router's choice is close, take an expert that is already in RAM: every resident expert's
gate logit gets a bonus of `margin` before the top-k. That guarantees each chosen expert's logit is
within `margin` of the k-th largest logit (a non-resident expert above the cut keeps its place over
any resident one more than `margin` below it), so `margin = 0` is plain top-k and the margin is the
one knob that trades perplexity for hit rate; `calibrate.calibrate_margin` sets it on training text.
The gate weights are the softmax of the chosen experts' *unmodified* logits: the bonus decides who
runs, never how much each contributes.
"""
from __future__ import annotations

import torch


def cache_aware_route(logits: torch.Tensor, k: int, resident: torch.Tensor, margin: float
                      ) -> tuple[list[int], torch.Tensor]:
    """logits (E,), resident (E,) bool -> (chosen experts, most weight first; their gate weights summing to 1)."""
    score = logits + margin * resident.to(logits.dtype) if margin > 0 else logits
    idx = score.topk(k).indices
    w = logits[idx].softmax(-1)
    order = w.argsort(descending=True)  # the first is the most important: gating and cheap misses look at the rest
    return idx[order].tolist(), w[order]


def within_margin(logits: torch.Tensor, chosen: list[int], k: int, margin: float) -> bool:
    """The routing guarantee: no chosen expert is more than `margin` below the k-th largest logit."""
    kth = logits.topk(k).values[-1]
    return bool((logits[chosen] >= kth - margin - 1e-6).all())
