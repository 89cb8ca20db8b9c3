"""(b) A patch ViT on MNIST: 7x7 patches cut by reshape/permute, a CLS token, pre-LN blocks with
`F.scaled_dot_product_attention` and a tanh-GELU MLP.

    python examples/vit_sdpa_mnist.py [OUT] [--steps 1500]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from examples.common import main, mnist_data
except ImportError:
    from common import main, mnist_data


class Block(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PatchViT(nn.Module):
    def __init__(self, patch=7, d=64, heads=2, ff=128, layers=2, classes=10):
        super().__init__()
        self.patch, n = patch, (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, img):                       # (B, 1, 28, 28)
        B, p, g = img.shape[0], self.patch, 28 // self.patch
        patches = img.reshape(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, g * g, p * p)
        x = torch.cat([self.cls.expand(B, -1, -1), self.embed(patches)], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


if __name__ == "__main__":
    main("vit_sdpa_mnist", PatchViT, lambda: mnist_data(500), steps=1500, lr=2e-3)
