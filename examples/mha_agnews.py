"""(c) A text classifier with `nn.MultiheadAttention` (batch_first, packed q/k/v projection) and a
key-padding mask from `ids == 0`, a post-LN ReLU MLP and masked mean pooling, on AG News (4 topics).

    python examples/mha_agnews.py [OUT] [--steps 500]
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from examples.common import main, text_data
except ImportError:
    from common import main, text_data


class MHAClassifier(nn.Module):
    def __init__(self, vocab=4000, seq_len=48, d=64, heads=4, ff=128, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(seq_len, d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        pad = ids == 0
        x = self.embed(ids) + self.pos.weight[: ids.shape[1]]
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.ln1(x + a)
        x = self.ln2(x + self.mlp(x))
        m = (~pad).unsqueeze(-1).float()
        return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))


if __name__ == "__main__":
    main("mha_agnews", MHAClassifier, lambda: text_data("agnews", 4000, 48, 500), steps=500, lr=2e-3)
