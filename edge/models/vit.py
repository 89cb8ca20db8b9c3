"""A tiny ViT for MNIST-sized images.

Tokens come from a small conv stem (two 3x3 stride-2 convs: 28x28 -> 14x14 -> 7x7 = 49 tokens),
or from linear patches. The encoder blocks are exactly the BERT blocks (post-LayerNorm, GELU),
so the integer graph, the memory schedules and the C kernels have one transformer block to handle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.models.bert import BertConfig, BertEncoder
from edge.models.io import DictConfig


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1]: the model's input convention."""
    return torch.from_numpy(x).float().div_(255.0).unsqueeze(1)


@dataclass
class ViTConfig(DictConfig):
    image_size: int = 28
    in_chans: int = 1
    stem: str = "conv"        # "conv" (3x3 stride-2 convs) or "patch" (linear patches)
    stem_channels: int = 16   # channels after the first conv
    patch_size: int = 4       # for stem="patch"
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    num_labels: int = 10
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        if self.stem == "conv":
            s = self.image_size
            for _ in range(2):
                s = (s + 2 - 3) // 2 + 1  # 3x3, stride 2, padding 1
            return s
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def encoder_config(self) -> BertConfig:
        return BertConfig(vocab_size=1, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                          num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                          max_position_embeddings=self.num_tokens, layer_norm_eps=self.layer_norm_eps)


class ConvStem(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(c.in_chans, c.stem_channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c.stem_channels, c.hidden_size, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class PatchStem(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.p = c.patch_size
        self.proj = nn.Linear(c.in_chans * c.patch_size ** 2, c.hidden_size)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.p
        patches = x.unfold(2, p, p).unfold(3, p, p)  # B, C, H/p, W/p, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)
        y = self.proj(patches)  # B, N, D
        g = H // p
        return y.transpose(1, 2).reshape(B, -1, g, g)


class ViT(nn.Module):
    """Input: images (B, C, H, W) in [0, 1]. Output: logits (B, num_labels)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.stem = ConvStem(config) if config.stem == "conv" else PatchStem(config)
        self.pos_embedding = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = BertEncoder(config.encoder_config())
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def tokens(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid
        return self.LayerNorm(t + self.pos_embedding)

    def forward(self, x):
        h = self.encoder(self.tokens(x), 0.0)
        return self.classifier(h.mean(1))
