"""int8 .tflite export of whole models, and the calibration sets it needs.

    calib = calibration_set("sst2", n=32, seq_len=128)          # list of int32 id arrays (1, L)
    model_bytes = export_int8(model, calib, seq_len=128)         # hybrid: int8 matmuls, float non-linears
    enc = bert_tiny_int8_encoder(seq_len=128)                    # full int8 BERT-tiny for TFLite Micro
    tflm_arena_bytes(enc)                                        # -> bytes of arena it needs

Calibration runs the exported fp32 graph itself, on the calibration inputs regrouped into its batch
size (cycled when there are fewer), so every tensor it quantises has its own range.
"""
from __future__ import annotations

import numpy as np
import torch

from base.errors import TinyshieldError
from edge.litert.export import build_model
from edge.litert.quantize import calibrate, quantize_graph

CALIB_SETS = ("sst2", "mnist", "random")
# BERT's FFN output projection sees GELU outputs with rare large outliers: per-tensor int8 on its
# input costs MiniLM ~0.05 of embedding cosine; 16-bit activations there (int8 weights) keep 0.99.
FFN_OUT = r"layer\.\d+\.output\.dense$"


def calibration_set(name: str, n: int = 32, seq_len: int | None = None, seed: int = 0,
                    vocab_size: int = 30522) -> list[np.ndarray]:
    """`n` single-sample calibration inputs: "sst2" (train sentences, MiniLM/BERT uncased
    tokenizer, padded to seq_len), "mnist" (train images as (1, 1, 28, 28) floats in [0, 1]) or
    "random" (random token ids: enough when only sizes matter, e.g. the TFLite Micro arena)."""
    rng = np.random.default_rng(seed)
    if name == "sst2":
        if seq_len is None:
            raise TinyshieldError("SST-2 calibration needs a sequence length (--seq-len L)")
        from base import data
        from edge.models.minilm import token_ids
        ds = data.sst2("train")
        pick = rng.choice(len(ds.texts), size=min(n, len(ds.texts)), replace=False)
        ids = token_ids([ds.texts[i] for i in pick], seq_len)
        return [ids[i:i + 1] for i in range(len(ids))]
    if name == "mnist":
        from base import data
        from edge.models.vit import to_tensor
        imgs = data.mnist(allow_fallback=True)
        pick = rng.choice(len(imgs.x_train), size=min(n, len(imgs.x_train)), replace=False)
        x = to_tensor(imgs.x_train[pick]).numpy()
        return [x[i:i + 1] for i in range(len(x))]
    if name == "random":
        if seq_len is None:
            raise TinyshieldError("random-id calibration needs a sequence length")
        out = []
        for _ in range(n):
            ids = rng.integers(1, vocab_size, size=(1, seq_len), dtype=np.int32)
            ids[0, rng.integers(seq_len // 2, seq_len + 1):] = 0   # some padding, as real batches have
            ids[0, 0] = min(101, vocab_size - 1)                   # [CLS]
            out.append(ids)
        return out
    raise TinyshieldError(f"unknown calibration set {name!r}: use one of {', '.join(CALIB_SETS)}")


def export_int8(model: torch.nn.Module, calib: list, seq_len: int | None = None, batch: int = 1,
                mode: str = "hybrid", gelu: str = "exact", head: str = "sentence", int8_io: bool = False,
                input_shape=None, wide_modules: str | None = FFN_OUT, float_modules: tuple[str, ...] = (),
                percentile: float = 100.0, description: str = "tinyshield") -> bytes:
    """int8 .tflite bytes of a model (see edge.litert.quantize for the modes and options)."""
    calib = list(calib)
    if not calib:
        raise TinyshieldError("calibration set is empty: give at least one calibration input")
    fp = build_model(model, seq_len, batch, gelu, head, input_shape)
    ranges = calibrate(fp, _batches(calib, batch), percentile)
    return quantize_graph(fp, ranges, mode, int8_io, float_modules, wide_modules).finish(description=description)


def _batches(calib: list, batch: int) -> list[np.ndarray]:
    """The calibration inputs regrouped into batches of `batch`, the last one filled from the start."""
    xs = np.concatenate([np.asarray(c) for c in calib])
    return [xs[np.arange(i, i + batch) % len(xs)] for i in range(0, len(xs), batch)]


def bert_tiny_int8_encoder(seq_len: int, model: torch.nn.Module | None = None, calib: list | None = None,
                           mode: str = "full", int8_io: bool = True, wide_modules: str | None = None) -> bytes:
    """An int8 BERT-tiny encoder for TFLite Micro: int32 ids (1, L) -> hidden states (1, L, d).

    GELU is x * sigmoid(1.702 x) (TFLite Micro has no GELU kernel). Without `model`, a
    random-initialised BERT-tiny (BertConfig defaults: 2 x 128, 2 heads, FFN 512); without
    `calib`, random token ids — the arena size depends on shapes only."""
    from edge.models.bert import BertConfig, BertModel
    if model is None:
        torch.manual_seed(0)
        model = BertModel(BertConfig()).eval()
    bert = getattr(model, "bert", model)   # a BertClassifier's encoder
    if calib is None:
        calib = calibration_set("random", n=4, seq_len=seq_len, vocab_size=bert.config.vocab_size)
    return export_int8(bert, calib, seq_len=seq_len, mode=mode, gelu="sigmoid", head="hidden", int8_io=int8_io,
                       wide_modules=wide_modules)
