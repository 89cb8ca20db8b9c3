"""The training loop every recipe and the compressed model's recovery fine-tuning use, and what they share
around it: the warm-up + cosine learning rate, padded token batches of similar lengths, classifier accuracy.

Recipes (edge/recipes) decide *what* to train (model, data, loss); this module is *how* a step runs.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from base.progress import progress
from edge.models.bert import BertClassifier, mean_pool


def cosine_warmup(opt: torch.optim.Optimizer, total: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warm` steps, then a cosine decay to zero at step `total`."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


def endless(epoch: Callable[[], Iterable]) -> Iterator:
    """Batches of epoch after epoch; `epoch()` is called (and draws its shuffle) only when the last ran out."""
    while True:
        yield from epoch()


def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, batches: Iterator,
        loss_fn: Callable[[object], torch.Tensor], total: int, desc: str, quiet: bool = False) -> list[float]:
    """`total` optimiser steps, one per batch of `batches`, with a progress bar showing the running loss.
    Returns the loss of every step. Gradients are on whatever the caller set globally."""
    losses: list[float] = []
    with progress(disable=quiet) as bar, torch.enable_grad():
        task = bar.add_task(desc, total=total, info="")
        for _, batch in zip(range(total), batches):   # range first: no batch is drawn after the last step
            model.train()
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------- token sequences of a text classifier

def pad(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length id sequences -> (ids, mask), zero-padded to the longest (id 0 is [PAD])."""
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    ids = torch.from_numpy(ids)
    return ids, (ids != 0).long()


def batches(n: int, batch_size: int, lengths: np.ndarray, g: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths (little padding): shuffle, sort within pools of 50 batches."""
    perm = g.permutation(n)
    pool = batch_size * 50
    out = []
    for i in range(0, n, pool):
        chunk = perm[i:i + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [out[k] for k in g.permutation(len(out))]


def logits(model: BertClassifier, ids, mask, word_embeds_fn=None, return_pooled: bool = False):
    """The classifier's logits (and its mean-pooled sentence vector); `word_embeds_fn(ids)` swaps in another
    word-embedding lookup (e.g. a compressed one)."""
    we = None if word_embeds_fn is None else word_embeds_fn(ids)
    pooled = mean_pool(model.bert(ids, mask, word_embeds=we), mask)
    out = model.classifier(pooled)
    return (out, pooled) if return_pooled else out


@torch.no_grad()
def predict(model: BertClassifier, seqs: list[np.ndarray], batch: int = 128, word_embeds_fn=None) -> np.ndarray:
    """Predicted class per id sequence, batched by length; `word_embeds_fn(ids)` swaps in another
    word-embedding lookup (e.g. a compressed one)."""
    model.eval()
    order = np.argsort([len(s) for s in seqs])
    out = np.empty(len(seqs), dtype=np.int64)
    for i in range(0, len(seqs), batch):
        idx = order[i:i + batch]
        ids, mask = pad([seqs[j] for j in idx])
        out[idx] = logits(model, ids, mask, word_embeds_fn).argmax(-1).numpy()
    return out


def accuracy(model: BertClassifier, seqs: list[np.ndarray], labels: np.ndarray, batch: int = 128,
             word_embeds_fn=None) -> float:
    """Accuracy over id sequences (see `predict`)."""
    return int((predict(model, seqs, batch, word_embeds_fn) == labels).sum()) / len(seqs)
