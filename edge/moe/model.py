"""A small decoder-only Mixture-of-Experts language model over UTF-8 bytes.

Every block is pre-LN attention followed by a sparse FFN: a router picks the top-k of E experts per
token (softmax over the k chosen logits, as in Mixtral). An expert is two matrices, `w1` (d x f) and
`w2` (f x d), with a GELU between; together they hold almost all of the parameters, which is what
makes offloading them worthwhile. `MoEModel.forward` is the training / all-in-RAM path; the
token-by-token runtime in `edge.moe.runtime` reuses the same pieces (`attend`, `route`, `expert_ffn`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256  # bytes: no tokenizer to download or train


@dataclass
class MoEConfig:
    # Sized by measurement on a 2-core CPU at one torch thread: dim 160 / ffn 320 trains ~7% faster than
    # dim 128 / ffn 384 at the same parameter count. Context 128 = the training window: positions the
    # model never trained on would make evaluation windows worse than the model is.
    dim: int = 160
    layers: int = 4
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    ffn: int = 320       # hidden width of one expert
    context: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def expert_params(self) -> int:
        return 2 * self.dim * self.ffn


def expert_ffn(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.gelu(h @ w1) @ w2


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per row and their weights (softmax over the chosen logits, summing to 1)."""
    top, idx = logits.topk(k, dim=-1)
    return idx, top.softmax(-1)


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (B, T, d). With `past` (keys, values of earlier positions) x holds the new positions only."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], 2)
            v = torch.cat([past[1], v], 2)
        causal = past is None or past[0].shape[2] == 0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, d)), (k, v)


class MoEFFN(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(cfg.experts, cfg.dim, cfg.ffn) / math.sqrt(cfg.dim))
        self.w2 = nn.Parameter(torch.randn(cfg.experts, cfg.ffn, cfg.dim) / math.sqrt(cfg.ffn) / 2)
        self.aux_loss = torch.zeros(())
        self.last_weights: torch.Tensor | None = None  # kept for the sensitivity estimate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        logits = self.router(h)
        idx, w = route(logits, self.cfg.top_k)
        if w.requires_grad:
            w.retain_grad()
        self.last_weights = w
        # Switch-Transformer balance loss: E * sum_e (fraction routed to e) * (mean router prob of e)
        probs = logits.softmax(-1)
        frac = F.one_hot(idx, self.cfg.experts).float().sum(1).mean(0) / self.cfg.top_k
        self.aux_loss = self.cfg.experts * (frac * probs.mean(0)).sum()
        out = torch.zeros_like(h)
        for e in range(self.cfg.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                y = expert_ffn(h[rows], self.w1[e], self.w2[e])
                out.index_add_(0, rows, y * w[rows, slot, None])
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.moe = MoEFFN(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))[0]
        return x + self.moe(self.ln2(x))


class MoEModel(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[-1])
        return self.tok(ids) + self.pos(pos)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))

    def aux_loss(self) -> torch.Tensor:
        return sum(b.moe.aux_loss for b in self.blocks) / len(self.blocks)

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Everything except the experts: what stays in RAM at inference."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith((".moe.w1", ".moe.w2"))}


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
