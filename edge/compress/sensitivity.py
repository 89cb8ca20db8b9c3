"""Which directions of the word-embedding space a classifier's output is sensitive to.

A table can be rebuilt exactly only along some directions; the error that matters is the one the
model notices. To second order, the loss change from perturbing the word vectors by delta is
0.5 * delta^T M delta, with M the expected Fisher information of the output w.r.t. a word vector:

    M = sum over training tokens of  E_{y ~ p(y|x)} [ g_y g_y^T ],   g_y = d log p(y|x) / d e_token

(d x d, summed over every token position of the training sequences). For the BERT-tiny SST-2 model
it is far from isotropic: the top direction carries ~39x the mean eigenvalue, and the mean
direction, which the embedding LayerNorm removes, carries none. Reconstructing E S with
S = (M/mean + ridge I)^(1/2) instead of E spends the rank where the classifier looks; the ridge
keeps every direction in play because M is measured at one operating point.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def embedding_metric(model: nn.Module, seqs: list[np.ndarray], batch_size: int = 128) -> np.ndarray:
    """(d, d) expected Fisher of `model`'s class distribution w.r.t. its input word vectors, summed
    over every real token of `seqs` (token-id arrays). `model` is a BertClassifier."""
    from edge.train import logits, pad

    model.eval()
    table = model.bert.embeddings.word_embeddings.weight.detach()
    d = table.shape[1]
    metric = torch.zeros(d, d, dtype=torch.float64)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad([seqs[j] for j in order[i:i + batch_size]])
        words = table[ids].clone().requires_grad_(True)
        logp = torch.log_softmax(logits(model, ids, mask, lambda _: words), -1)
        p = logp.detach().exp()
        real = mask.bool()
        for y in range(logp.shape[1]):
            g, = torch.autograd.grad(logp[:, y].sum(), words, retain_graph=y + 1 < logp.shape[1])
            # each position belongs to one sequence, so this is the per-sequence gradient
            g = g[real].double()
            w = p[:, y, None].expand_as(mask)[real].double()
            metric += (g * w[:, None]).T @ g
    return metric.numpy()


def whitening(metric: np.ndarray, ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S = (M / mean eigenvalue + ridge I)^(1/2), symmetric, float64."""
    m = (metric + metric.T) / 2
    m = m / (np.trace(m) / len(m))
    vals, vecs = np.linalg.eigh(m)
    vals = np.clip(vals, 0.0, None) + ridge
    s = (vecs * np.sqrt(vals)) @ vecs.T
    s_inv = (vecs / np.sqrt(vals)) @ vecs.T
    return torch.from_numpy(s), torch.from_numpy(s_inv)
