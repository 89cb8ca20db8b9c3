"""(a) A stock `nn.TransformerEncoder` (pre-LN: `norm_first=True`) with a learned CLS token, on SST-2.

Tokens: the project's WordPiece tokenizer, remapped to the 2,000 most frequent training tokens so the
embedding table fits the board (0 = padding). The key padding mask is built from `ids == 0`, with the
CLS position always valid. The sentence label is read off the CLS token after a final LayerNorm.

    python examples/encoder_cls_sst2.py [OUT] [--steps 600]
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from examples.common import main, text_data
except ImportError:          # run as a script
    from common import main, text_data


class EncoderCLS(nn.Module):
    def __init__(self, vocab=2000, seq_len=32, d=64, heads=2, ff=128, layers=2, classes=2, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, seq_len + 1, d) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = torch.cat([self.cls.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1) + self.pos
        pad = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), ids == 0], dim=1)
        h = self.encoder(x, src_key_padding_mask=pad)
        return self.head(h[:, 0])


if __name__ == "__main__":
    main("encoder_cls_sst2", EncoderCLS, lambda: text_data("sst2", 2000, 32, 500), steps=600, lr=2e-3)
