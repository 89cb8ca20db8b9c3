"""A BERT encoder whose parameter names match Hugging Face `BertModel`, so real checkpoints load.

Kept deliberately plain (nanoGPT-style): one module per block, no framework. Names such as
`encoder.layer.0.attention.self.query.weight` are exactly those of the HF checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from base.errors import TinyshieldError
from edge.models.io import DictConfig


PAD_ID = 0   # [PAD] in every vocabulary the project uses: padded positions are masked out


@dataclass
class BertConfig(DictConfig):
    vocab_size: int = 30522
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    add_pooler: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def activation(name: str):
    if name == "gelu":
        return F.gelu  # exact erf form, as HF "gelu"
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act {name!r} (gelu, gelu_tanh, relu)")


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None, word_embeds=None):
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            # e.g. a compressed model whose position table was cut to its deployed length
            raise TinyshieldError(f"sequence of {L} tokens is longer than this model's "
                                  f"{self.position_embeddings.num_embeddings} positions: use a sequence length "
                                  f"(--seq-len) of at most {self.position_embeddings.num_embeddings}")
        pos = torch.arange(L, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word_embeddings(input_ids) if word_embeds is None else word_embeds
        x = words + self.position_embeddings(pos)[None] + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.h, self.dh = c.num_attention_heads, c.head_dim
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, mask_bias):
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.h, self.dh).transpose(1, 2)  # (B, h, L, dh)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + mask_bias
        ctx = scores.softmax(-1) @ v
        return ctx.transpose(1, 2).reshape(B, L, D)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, x, mask_bias):
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = activation(c.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)  # HF calls it BertOutput; same shape

    def forward(self, x, mask_bias):
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x, mask_bias):
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    """Returns the last hidden states (B, L, d)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        if config.add_pooler:
            self.pooler = BertPooler(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, word_embeds=None):
        if attention_mask is None:
            attention_mask = (input_ids != PAD_ID).long()     # the mask a deployed model builds itself
        # Padded keys get a large negative bias; finfo.min as HF does would overflow when added twice.
        mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        x = self.embeddings(input_ids, token_type_ids, word_embeds)
        return self.encoder(x, mask_bias)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (unpadded) tokens, as sentence-transformers' Pooling(mean)."""
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class BertClassifier(nn.Module):
    """BERT encoder + mean pooling + a linear head: the text classifier the MCU runs."""

    def __init__(self, config: BertConfig, num_labels: int = 2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = (input_ids != PAD_ID).long()     # the mask a deployed model builds itself
        h = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(mean_pool(h, attention_mask))


class MeanPooled(nn.Module):
    """A BertModel's sentence embedding from token ids alone: mean over the real tokens ([PAD] = 0 masked),
    L2-normalised when `normalize` (sentence-transformers' Pooling(mean) -> Normalize, as MiniLM's)."""

    def __init__(self, bert: BertModel, normalize: bool = True):
        super().__init__()
        self.bert, self.normalize, self.config = bert, normalize, bert.config

    def forward(self, input_ids, attention_mask=None):
        mask = (input_ids != PAD_ID).long() if attention_mask is None else attention_mask
        e = mean_pool(self.bert(input_ids, mask), mask)
        return F.normalize(e, dim=-1) if self.normalize else e


def served(model: nn.Module) -> nn.Module:
    """The module that answers for `model` when it is run or served: a bare encoder (MiniLM) answers with its
    sentence embedding, every other model with its own output."""
    return MeanPooled(model).eval() if isinstance(model, BertModel) else model


HEADS = ("sentence", "mean", "hidden")


def with_head(bert: BertModel, head: str) -> nn.Module:
    """The encoder with the output `head`: "sentence" (mean pool + L2 normalise), "mean" (mean pool)
    or "hidden" (the (B, L, d) hidden states: the BertModel itself)."""
    if head not in HEADS:
        raise TinyshieldError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
    return bert if head == "hidden" else MeanPooled(bert, normalize=head == "sentence")
