"""A model as the enclave sees it: a list of linear layers (outsourced) and the forward pass around them.

`linears(model)` names every linear map as a (W: out x in, b) pair -- Q, K and V fused into one call, the
ViT's convolutions as im2col matmuls -- and `forward(model, inputs, lin)` runs the non-linear parts
(embeddings, attention softmax, GELU, LayerNorm, residuals, pooling) in place, calling `lin(name, x)`
for each linear layer. The modes differ only in what `lin` does, so every mode runs the same code.

`pipelined(model, inputs, submit, chunks)` is the same forward pass with the rows (tokens) of the
encoder cut into `chunks` parts: `submit(name, x, rows)` starts a linear layer on one part and returns a
function that waits for its result. Everything between two attention blocks is row-wise, so while the
accelerator works on part c the enclave finishes part c - 1 and sends the next layer's part -- the two
processes overlap instead of taking turns. Only attention needs every row (all keys), once per layer.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from edge.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertModel, activation
from edge.models.vit import ViT

Lin = Callable[[str, torch.Tensor], torch.Tensor]  # (name, rows x in) -> rows x out, bias included
Pending = Callable[[], torch.Tensor]               # waits for a submitted layer's result
Submit = Callable[[str, torch.Tensor, slice], Pending]   # (name, part of the input, which rows of it) -> pending


def eager(lin: Lin) -> Submit:
    """A synchronous `lin` as a `submit` (it computes at once)."""
    return lambda name, x, rows: (lambda y=lin(name, x): y)


def parts(n: int, chunks: int) -> list[slice]:
    """`n` rows cut into at most `chunks` nearly equal consecutive parts."""
    size = -(-n // max(1, chunks))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def kind_of(model) -> str:
    if isinstance(model, ViT):
        return "vit"
    if isinstance(model, BertClassifier):
        return "bert-classifier"
    if isinstance(model, BertModel):
        return "bert"
    raise TinyshieldError(f"cannot protect a {type(model).__name__}: supported are ViT, BertClassifier, BertModel")


def _bert(model):
    return model.bert if isinstance(model, BertClassifier) else model


def linears(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every outsourced linear map in call order: name -> (W (out, in) float32, b (out,) float32)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if isinstance(model, ViT):
        if model.config.stem == "conv":
            for n in ("conv1", "conv2"):
                conv = getattr(model.stem, n)
                out[f"stem.{n}"] = (conv.weight.flatten(1), conv.bias)
        else:
            out["stem.proj"] = (model.stem.proj.weight, model.stem.proj.bias)
        layers = model.encoder.layer
    else:
        layers = _bert(model).encoder.layer
    for i, layer in enumerate(layers):
        s = layer.attention.self
        out[f"layer{i}.qkv"] = (torch.cat([s.query.weight, s.key.weight, s.value.weight]),
                                torch.cat([s.query.bias, s.key.bias, s.value.bias]))
        out[f"layer{i}.attn_out"] = (layer.attention.output.dense.weight, layer.attention.output.dense.bias)
        out[f"layer{i}.ffn_in"] = (layer.intermediate.dense.weight, layer.intermediate.dense.bias)
        out[f"layer{i}.ffn_out"] = (layer.output.dense.weight, layer.output.dense.bias)
    if isinstance(model, (ViT, BertClassifier)):
        out["classifier"] = (model.classifier.weight, model.classifier.bias)
    return {k: (w.detach().float().contiguous().numpy().copy(), b.detach().float().numpy().copy())
            for k, (w, b) in out.items()}


def rows_per_call(model, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """How many rows each linear call gets for these inputs (blinded pads are made for this shape)."""
    rows = {}
    if isinstance(model, ViT):
        B = inputs["image"].shape[0]
        c = model.config
        if c.stem == "conv":
            rows["stem.conv1"] = B * ((c.image_size + 1) // 2) ** 2
            rows["stem.conv2"] = B * c.num_tokens
        else:
            rows["stem.proj"] = B * c.num_tokens
        n = B * c.num_tokens
        layers = len(model.encoder.layer)
    else:
        B, L = inputs["input_ids"].shape
        n, layers = B * L, len(_bert(model).encoder.layer)
    for i in range(layers):
        for part in ("qkv", "attn_out", "ffn_in", "ffn_out"):
            rows[f"layer{i}.{part}"] = n
    if isinstance(model, (ViT, BertClassifier)):
        rows["classifier"] = B
    return rows


def _blocks(layers, x: torch.Tensor, mask_bias, submit: Submit, act, chunks: int) -> torch.Tensor:
    B, L, D = x.shape
    rows = parts(B * L, chunks)
    xs = [x.reshape(B * L, D)[r] for r in rows]
    pending = [submit("layer0.qkv", xc, r) for xc, r in zip(xs, rows)]
    for i, layer in enumerate(layers):
        s = layer.attention.self
        h, dh = s.h, s.dh
        qkv = torch.cat([wait() for wait in pending]).reshape(B, L, 3, h, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # every query needs all keys, but queries are independent: a part whose rows lie in one sequence is
        # attended and sent on its own, so the accelerator starts on it while the next part is attended
        one_seq = all(r.start // L == (r.stop - 1) // L for r in rows)
        ctx = None if one_seq else _attend(q, k, v, mask_bias, dh).transpose(1, 2).reshape(B * L, D)
        pending = []
        for r in rows:
            if one_seq:
                b, lo = divmod(r.start, L)
                bias = mask_bias[b:b + 1] if torch.is_tensor(mask_bias) else mask_bias
                part = _attend(q[b:b + 1, :, lo:lo + r.stop - r.start], k[b:b + 1], v[b:b + 1], bias, dh)
                part = part.transpose(1, 2).reshape(r.stop - r.start, D)
            else:
                part = ctx[r]
            pending.append(submit(f"layer{i}.attn_out", part, r))
        # from here to the next attention every step is row-wise: part c is sent on as soon as it is ready
        a, nxt = [], []
        for wait, xc, r in zip(pending, xs, rows):
            a.append(layer.attention.output.LayerNorm(wait() + xc))
            nxt.append(submit(f"layer{i}.ffn_in", a[-1], r))
        pending = [submit(f"layer{i}.ffn_out", act(wait()), r) for wait, r in zip(nxt, rows)]
        xs, nxt = [], []
        for wait, ac, r in zip(pending, a, rows):
            xs.append(layer.output.LayerNorm(wait() + ac))
            if i + 1 < len(layers):
                nxt.append(submit(f"layer{i + 1}.qkv", xs[-1], r))
        pending = nxt
    return torch.cat(xs).reshape(B, L, D)


def _attend(q, k, v, mask_bias, dh: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh) + mask) v for (B, heads, rows, dh) queries against all keys."""
    return (q @ k.transpose(-1, -2) / math.sqrt(dh) + mask_bias).softmax(-1) @ v


def _unfold_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> im2col rows (B * H' * W', C * 9) for a 3x3 stride-2 padding-1 conv."""
    cols = F.unfold(x, 3, padding=1, stride=2)  # (B, C*9, H'*W')
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def forward(model, inputs: dict[str, np.ndarray], lin: Lin) -> np.ndarray:
    """The model's output for `inputs` with every linear layer computed by `lin`."""
    return pipelined(model, inputs, eager(lin), chunks=1)


@torch.no_grad()
def pipelined(model, inputs: dict[str, np.ndarray], submit: Submit, chunks: int = 2) -> np.ndarray:
    """`forward` with the encoder's rows in `chunks` parts, each linear layer started by `submit`."""
    def lin(name, x):                     # the layers outside the encoder: one call, waited for at once
        return submit(name, x, slice(0, x.shape[0]))()

    if isinstance(model, ViT):
        c = model.config
        img = torch.from_numpy(np.asarray(inputs["image"], dtype=np.float32))
        B = img.shape[0]
        if c.stem == "conv":
            g1 = (c.image_size + 1) // 2
            t = lin("stem.conv1", _unfold_rows(img)).reshape(B, g1, g1, -1).permute(0, 3, 1, 2)
            t = lin("stem.conv2", _unfold_rows(F.relu(t))).reshape(B, c.num_tokens, c.hidden_size)
        else:
            p = c.patch_size
            patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B * c.num_tokens, -1)
            t = lin("stem.proj", patches).reshape(B, c.num_tokens, c.hidden_size)
        x = model.LayerNorm(t + model.pos_embedding)
        x = _blocks(model.encoder.layer, x, 0.0, submit, activation("gelu"), chunks)
        return lin("classifier", x.mean(1)).numpy()
    bert = _bert(model)
    ids = torch.from_numpy(np.asarray(inputs["input_ids"])).long()
    mask = torch.from_numpy(np.asarray(inputs["attention_mask"])).long()
    mask_bias = (1.0 - mask[:, None, None, :].float()) * -1e9
    x = _blocks(bert.encoder.layer, bert.embeddings(ids), mask_bias, submit, activation(bert.config.hidden_act), chunks)
    m = mask[..., None].float()
    pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if isinstance(model, BertClassifier):
        return lin("classifier", pooled).numpy()
    return F.normalize(pooled, dim=-1).numpy()  # sentence embedding (MiniLM)


def plain_lin(params: dict[str, tuple[np.ndarray, np.ndarray]]) -> Lin:
    """The in-enclave fp32 linear (enclave-only mode, and the plaintext reference)."""
    t = {k: (torch.from_numpy(w), torch.from_numpy(b)) for k, (w, b) in params.items()}
    return lambda name, x: torch.addmm(t[name][1], x, t[name][0].T)
