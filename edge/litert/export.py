"""Lower tinyshield's torch models to a .tflite graph of builtin ops, for a fixed batch and L.

    model_bytes = export_model(load_minilm(), seq_len=128)          # ids (1, 128) int32 -> (1, 384)
    model_bytes = export_model(vit, batch=1)                         # (1, 1, 28, 28) -> (1, 10) logits

What each model becomes:
- BertModel (incl. MiniLM): int32 token ids (B, L), 0 = [PAD]; the attention mask is derived in
  the graph (min(id, 1)). `head`: "sentence" (mean pool over real tokens + L2 normalise, the
  sentence-transformers embedding; the default), "mean" (mean pool only) or "hidden" (B, L, d).
- BertClassifier: ids (B, L) -> logits (B, labels) (mean pool + classifier).
- ViT: images (B, C, H, W) float in [0, 1] -> logits; the conv stem becomes PAD + CONV_2D
  (torch pads 1 on each side; TFLite SAME padding would pad only after, so PAD + VALID it is).
- nn.Sequential of Linear / ReLU / GELU / Tanh / Sigmoid / LayerNorm / Identity / Dropout.

LayerNorm is MEAN, SQUARED_DIFFERENCE, ADD(eps), RSQRT, SUB, MUL, MUL(gamma), ADD(beta). GELU
is the builtin GELU ("exact" erf form, "tanh" form) or x * LOGISTIC(1.702 x) ("sigmoid", for
runtimes without a GELU kernel such as TFLite Micro). Attention is FULLY_CONNECTED q/k/v (the
1/sqrt(dh) folded into q), RESHAPE + TRANSPOSE to heads, BATCH_MATMUL, ADD(mask), SOFTMAX,
BATCH_MATMUL, TRANSPOSE + RESHAPE back. Anything else raises TinyshieldError naming the module.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edge.errors import TinyshieldError
from edge.litert.writer import Builder
from edge.models.bert import BertClassifier, BertConfig, BertLayer, BertModel
from edge.models.vit import ConvStem, PatchStem, ViT

GELU_MODES = ("exact", "tanh", "sigmoid")
HEADS = ("sentence", "mean", "hidden")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def unsupported(module: nn.Module, path: str, what: str = "") -> TinyshieldError:
    kind = type(module).__name__
    return TinyshieldError(
        f"cannot export {path or 'the model'}: {kind}{' ' + what if what else ''} is not supported by the .tflite "
        f"exporter (it lowers Linear, Conv2d stems, LayerNorm, GELU/ReLU/Tanh/Sigmoid, BERT attention, and "
        f"the BertModel / BertClassifier / ViT / nn.Sequential models)")


def _expect(module: nn.Module, cls, path: str) -> nn.Module:
    if type(module) is not cls:
        raise unsupported(module, path, f"(expected {cls.__name__})")
    return module


class Lowering:
    """Emits ops for modules into a Builder. One instance per export."""

    def __init__(self, b: Builder, gelu: str = "exact"):
        if gelu not in GELU_MODES:
            raise TinyshieldError(f"unknown GELU form {gelu!r}: use one of {', '.join(GELU_MODES)}")
        self.b, self.gelu_mode = b, gelu

    def at(self, path: str):
        self.b.source = path
        return self

    def linear(self, x: int, m: nn.Module, path: str, act: str | None = None, scale: float = 1.0) -> int:
        _expect(m, nn.Linear, path)
        self.at(path)
        w, bias = _np(m.weight) * scale, None if m.bias is None else _np(m.bias) * scale
        return self.b.fully_connected(x, self.b.const(f"{path}.weight", w),
                                      None if bias is None else self.b.const(f"{path}.bias", bias), act, name=path)

    def layernorm(self, x: int, m: nn.Module, path: str) -> int:
        _expect(m, nn.LayerNorm, path)
        if len(m.normalized_shape) != 1 or not m.elementwise_affine:
            raise unsupported(m, path, "over more than the last axis or without affine parameters")
        b = self.at(path).b
        mu = b.mean(x, [-1], name=f"{path}/mean")
        var = b.mean(b.squared_difference(x, mu, name=f"{path}/sqdiff"), [-1], name=f"{path}/var")
        r = b.rsqrt(b.add(var, b.const(f"{path}/eps", np.array([m.eps], np.float32)), name=f"{path}/var_eps"),
                    name=f"{path}/rsqrt")
        y = b.mul(b.sub(x, mu, name=f"{path}/centre"), r, name=f"{path}/norm")
        y = b.mul(y, b.const(f"{path}.weight", _np(m.weight)), name=f"{path}/gamma")
        return b.add(y, b.const(f"{path}.bias", _np(m.bias)), name=path)

    def activation(self, x: int, name: str, path: str) -> int:
        b = self.at(path).b
        if name == "gelu":
            if self.gelu_mode == "sigmoid":
                s = b.logistic(b.mul(x, b.const(f"{path}/1.702", np.array([1.702], np.float32)),
                                     name=f"{path}/scaled"), name=f"{path}/sigmoid")
                return b.mul(x, s, name=path)
            return b.gelu(x, approximate=self.gelu_mode == "tanh", name=path)
        if name == "gelu_tanh":
            return b.gelu(x, approximate=True, name=path)
        if name == "relu":
            return b.relu(x, name=path)
        if name == "tanh":
            return b.tanh(x, name=path)
        if name == "sigmoid":
            return b.logistic(x, name=path)
        raise TinyshieldError(f"cannot export {path}: activation {name!r} is not supported (gelu, gelu_tanh, relu)")

    # ---- BERT blocks -------------------------------------------------------------------------
    def attention(self, x: int, att: nn.Module, cfg: BertConfig, mask_bias: int | None, path: str) -> int:
        b = self.b
        sa = att.self
        B, L, D = b.shape(x)
        h, dh = cfg.num_attention_heads, cfg.head_dim

        def heads(t, name):  # (B, L, D) -> (B, h, L, dh)
            return b.transpose(b.reshape(t, (B, L, h, dh), name=f"{name}/split"), (0, 2, 1, 3), name=f"{name}/heads")

        q = heads(self.linear(x, sa.query, f"{path}.self.query", scale=1.0 / math.sqrt(dh)), f"{path}.self.query")
        k = heads(self.linear(x, sa.key, f"{path}.self.key"), f"{path}.self.key")
        v = heads(self.linear(x, sa.value, f"{path}.self.value"), f"{path}.self.value")
        self.at(f"{path}.self")
        s = b.batch_matmul(q, k, adj_y=True, name=f"{path}.self/scores")
        if mask_bias is not None:
            s = b.add(s, mask_bias, name=f"{path}.self/masked_scores")
        p = b.softmax(s, name=f"{path}.self/probs")
        ctx = b.batch_matmul(p, v, name=f"{path}.self/context")
        ctx = b.reshape(b.transpose(ctx, (0, 2, 1, 3), name=f"{path}.self/merge"), (B, L, D), name=f"{path}.self/out")
        o = self.linear(ctx, _expect(att.output.dense, nn.Linear, f"{path}.output.dense"), f"{path}.output.dense")
        o = self.at(f"{path}.output").b.add(o, x, name=f"{path}.output/residual")
        return self.layernorm(o, att.output.LayerNorm, f"{path}.output.LayerNorm")

    def bert_layer(self, x: int, layer: nn.Module, cfg: BertConfig, mask_bias: int | None, path: str) -> int:
        _expect(layer, BertLayer, path)
        a = self.attention(x, layer.attention, cfg, mask_bias, f"{path}.attention")
        hdn = self.linear(a, layer.intermediate.dense, f"{path}.intermediate.dense")
        hdn = self.activation(hdn, cfg.hidden_act, f"{path}.intermediate.act")
        o = self.linear(hdn, layer.output.dense, f"{path}.output.dense")
        o = self.at(f"{path}.output").b.add(o, a, name=f"{path}.output/residual")
        return self.layernorm(o, layer.output.LayerNorm, f"{path}.output.LayerNorm")

    def encoder(self, x: int, enc: nn.Module, cfg: BertConfig, mask_bias: int | None, path: str) -> int:
        for i, layer in enumerate(enc.layer):
            x = self.bert_layer(x, layer, cfg, mask_bias, f"{path}.layer.{i}")
        return x

    def bert(self, m: BertModel, ids: int, path: str = "bert") -> tuple[int, int, int]:
        """(hidden, mask (B, L) float, mask bias (B, 1, 1, L)) from int32 ids (B, L)."""
        b, cfg = self.b, m.config
        B, L = b.shape(ids)
        if L > cfg.max_position_embeddings:
            raise TinyshieldError(f"sequence length {L} exceeds the model's {cfg.max_position_embeddings} positions")
        e = m.embeddings
        self.at(f"{path}.embeddings")
        # a CLR-compressed table (edge.compress) is exported as the dense table it reconstructs: its lookup
        # equals a lookup in that table, and LiteRT has no clustered low-rank gather
        w = e.word_embeddings
        table = w.weight if isinstance(w, nn.Embedding) else w.table()
        words = b.gather(b.const(f"{path}.embeddings.word_embeddings", _np(table)), ids,
                         name=f"{path}.embeddings/words")
        # position + token-type 0 embeddings are the same for every input: one constant
        fixed = _np(e.position_embeddings.weight[:L]) + _np(e.token_type_embeddings.weight[0])
        x = b.add(words, b.const(f"{path}.embeddings/position_type", fixed[None]), name=f"{path}.embeddings/sum")
        x = self.layernorm(x, e.LayerNorm, f"{path}.embeddings.LayerNorm")
        self.at(f"{path}/mask")
        # mask = min(id, 1): ids are >= 0 and 0 is [PAD]
        mask = b.minimum(b.cast(ids, np.float32, name="ids_float"), b.const("one", np.array([1.0], np.float32)),
                         name="mask")
        bias = b.mul(b.add(mask, b.const("minus_one", np.array([-1.0], np.float32)), name="mask_minus_one"),
                     b.const("big", np.array([1e9], np.float32)), name="mask_bias")
        bias = b.reshape(bias, (B, 1, 1, L), name="mask_bias4")
        return self.encoder(x, m.encoder, cfg, bias, f"{path}.encoder"), mask, bias

    def mean_pool(self, h: int, mask: int, path: str = "pool") -> int:
        b = self.at(path).b
        B, L, D = b.shape(h)
        m3 = b.reshape(mask, (B, L, 1), name=f"{path}/mask3")
        s = b.sum(b.mul(h, m3, name=f"{path}/masked"), [1], name=f"{path}/sum")        # (B, 1, D)
        n = b.sum(m3, [1], name=f"{path}/count")                                       # (B, 1, 1)
        return b.reshape(b.div(s, n, name=f"{path}/mean"), (B, D), name=path)


def _done(b: Builder, y: int) -> Builder:
    b.outputs = [y]
    return b


def build_bert(model: BertModel, seq_len: int, batch: int = 1, head: str = "sentence", gelu: str = "exact",
               name: str = "bert") -> Builder:
    if head not in HEADS:
        raise TinyshieldError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
    b = Builder(name)
    lo = Lowering(b, gelu)
    ids = b.input("input_ids", (batch, seq_len), np.int32)
    h, mask, _ = lo.bert(model, ids, "bert")
    if head == "hidden":
        return _done(b, h)
    y = lo.mean_pool(h, mask)
    if head == "sentence":
        y = lo.at("normalize").b.l2_normalize(y, name="sentence_embedding")
    return _done(b, y)


def build_bert_classifier(model: BertClassifier, seq_len: int, batch: int = 1, gelu: str = "exact",
                          name: str = "bert-classifier") -> Builder:
    b = Builder(name)
    lo = Lowering(b, gelu)
    ids = b.input("input_ids", (batch, seq_len), np.int32)
    h, mask, _ = lo.bert(_expect(model.bert, BertModel, "bert"), ids, "bert")
    return _done(b, lo.linear(lo.mean_pool(h, mask), model.classifier, "classifier"))


def build_vit(model: ViT, batch: int = 1, gelu: str = "exact", name: str = "vit") -> Builder:
    c = model.config
    b = Builder(name)
    lo = Lowering(b, gelu)
    x = b.input("image", (batch, c.in_chans, c.image_size, c.image_size))
    lo.at("stem")
    x = (b.reshape(x, (batch, c.image_size, c.image_size, 1), name="nhwc") if c.in_chans == 1
         else b.transpose(x, (0, 2, 3, 1), name="nhwc"))
    stem = model.stem
    if type(stem) is ConvStem:
        for i, conv in enumerate((stem.conv1, stem.conv2)):
            path = f"stem.conv{i + 1}"
            _expect(conv, nn.Conv2d, path)
            if conv.groups != 1 or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1] \
                    or conv.padding[0] != conv.padding[1] or not isinstance(conv.padding[0], int):
                raise unsupported(conv, path, "with groups/dilation/asymmetric stride or padding")
            lo.at(path)
            p = conv.padding[0]
            if p:
                x = b.pad(x, [(0, 0), (p, p), (p, p), (0, 0)], name=f"{path}/pad")
            w = _np(conv.weight).transpose(0, 2, 3, 1)  # torch (O, I, kh, kw) -> TFLite (O, kh, kw, I)
            bias = _np(conv.bias) if conv.bias is not None else np.zeros(w.shape[0], np.float32)
            x = b.conv2d(x, b.const(f"{path}.weight", w), b.const(f"{path}.bias", bias), conv.stride[0],
                         act="relu" if i == 0 else None, name=path)
    elif type(stem) is PatchStem:
        # linear patches == a p x p convolution with stride p; the Linear's input order is (C, p, p)
        p = stem.p
        w = _np(stem.proj.weight).reshape(-1, c.in_chans, p, p).transpose(0, 2, 3, 1)
        lo.at("stem.proj")
        x = b.conv2d(x, b.const("stem.proj.weight", w), b.const("stem.proj.bias", _np(stem.proj.bias)), p,
                     name="stem.proj")
    else:
        raise unsupported(stem, "stem")
    n, gh, gw, d = b.shape(x)
    lo.at("tokens")
    x = b.reshape(x, (batch, gh * gw, d), name="tokens")
    x = b.add(x, b.const("pos_embedding", _np(model.pos_embedding)), name="tokens/pos")
    x = lo.layernorm(x, model.LayerNorm, "LayerNorm")
    x = lo.encoder(x, model.encoder, c.encoder_config(), None, "encoder")
    lo.at("pool")
    x = b.reshape(b.mean(x, [1], name="pool/mean"), (batch, d), name="pool")
    return _done(b, lo.linear(x, model.classifier, "classifier"))


def build_sequential(model: nn.Sequential, input_shape, gelu: str = "exact", name: str = "sequential") -> Builder:
    """An nn.Sequential of per-token layers (Linear, LayerNorm, activations) over float input."""
    b = Builder(name)
    lo = Lowering(b, gelu)
    x = b.input("input", tuple(input_shape))
    acts = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
    for i, m in enumerate(model):
        path = str(i)
        if type(m) is nn.Linear:
            x = lo.linear(x, m, path)
        elif type(m) is nn.LayerNorm:
            x = lo.layernorm(x, m, path)
        elif type(m) is nn.GELU:
            x = Lowering(b, "tanh" if m.approximate == "tanh" else gelu).activation(x, "gelu", path)
        elif type(m) in acts:
            x = lo.activation(x, acts[type(m)], path)
        elif type(m) in (nn.Identity, nn.Dropout):
            continue
        else:
            raise unsupported(m, path)
    return _done(b, x)


def build_model(model: nn.Module, seq_len: int | None = None, batch: int = 1, gelu: str = "exact",
                head: str = "sentence", input_shape=None) -> Builder:
    """The fp32 graph of a tinyshield model, not yet serialised (int8 export quantises it)."""
    model = model.eval()
    with torch.no_grad():
        if type(model) is ViT:
            return build_vit(model, batch, gelu)
        if type(model) in (BertModel, BertClassifier):
            if seq_len is None or seq_len < 1:
                raise TinyshieldError("text models export for a fixed sequence length: give seq_len (--seq-len L)")
            if type(model) is BertClassifier:
                return build_bert_classifier(model, seq_len, batch, gelu)
            return build_bert(model, seq_len, batch, head, gelu)
        if type(model) is nn.Sequential:
            if input_shape is None:
                raise TinyshieldError("an nn.Sequential needs input_shape to export")
            return build_sequential(model, input_shape, gelu)
    raise unsupported(model, type(model).__name__)


def export_model(model: nn.Module, seq_len: int | None = None, batch: int = 1, gelu: str = "exact",
                 head: str = "sentence", input_shape=None) -> bytes:
    """fp32 .tflite bytes of a tinyshield model (see the module docstring for inputs and outputs)."""
    return build_model(model, seq_len, batch, gelu, head, input_shape).finish()
