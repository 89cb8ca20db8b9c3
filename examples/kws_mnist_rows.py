"""(d) A keyword-spotting-style transformer on spectrogram-like input: each MNIST image read as 28
frames of 28 "mel bins". A linear frame projection, learned positions, one pre-LN block whose
attention is written out by hand (q k^T * scale, softmax, times v), a SiLU MLP, and mean pooling over
the frames.

    python examples/kws_mnist_rows.py [OUT] [--steps 1500]
"""
from __future__ import annotations

import math

import torch
from torch import nn

try:
    from examples.common import main, mnist_data
except ImportError:
    from common import main, mnist_data


class KWSBlock(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.SiLU(), nn.Linear(ff, d))

    def forward(self, x):
        B, T, d = x.shape
        y = self.norm1(x)
        split = lambda t: t.view(B, T, self.h, self.dh).transpose(1, 2)     # noqa: E731
        q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.norm2(x))


class KWS(nn.Module):
    def __init__(self, frames=28, bins=28, d=48, heads=2, ff=96, layers=2, classes=10):
        super().__init__()
        self.frame = nn.Linear(bins, d)
        self.pos = nn.Parameter(torch.randn(1, frames, d) * 0.02)
        self.blocks = nn.Sequential(*(KWSBlock(d, heads, ff) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, spec):                      # (B, frames, bins)
        x = self.blocks(self.frame(spec) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


def data():
    xtr, ytr, xte, yte = mnist_data(500)
    return xtr[:, 0], ytr, xte[:, 0], yte          # (N, 28 frames, 28 bins)


if __name__ == "__main__":
    main("kws_mnist_rows", KWS, data, steps=1500, lr=2e-3)
