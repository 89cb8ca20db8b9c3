"""Save and load a model whose word embeddings are a CLR table (format: see `edge.compress`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from edge.compress.clr import CLREmbedding, Layout, QuantCLR, layout_bytes
from edge.compress.model import bert_of, set_word_embeddings
from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertConfig, BertModel
from edge.models.io import load_into, read_json, read_safetensors

FORMAT = "tinyshield-clr"
VERSION = 1
KINDS = {"bert-classifier-clr": "bert-classifier", "bert-clr": "bert"}


def _word_key(model: nn.Module) -> str:
    return ("bert." if isinstance(model, BertClassifier) else "") + "embeddings.word_embeddings"


def save_compressed(model: nn.Module, quant: QuantCLR | None, directory: str | Path,
                    extra: dict | None = None) -> Path:
    """Write `model.safetensors` + `config.json`. With `quant` the CLR factors are stored as int8
    (the deployable form); without, the model's float factors are stored as float32."""
    bert = bert_of(model)
    emb = bert.embeddings.word_embeddings
    if not isinstance(emb, CLREmbedding):
        raise TinyshieldError("the model's word embeddings are not a CLR table: compress it first")
    lay = emb.layout
    key = _word_key(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(key + ".")}
    state["clr.slot"] = torch.as_tensor(lay.slot, dtype=torch.int32)
    for c in range(len(lay.sizes)):
        if quant is not None:
            state[f"clr.{c}.u"] = quant.u[c].contiguous()
            state[f"clr.{c}.u_scale"] = quant.u_scale[c].float().contiguous()
            if not lay.dense[c]:
                state[f"clr.{c}.v"] = quant.v[c].contiguous()
                state[f"clr.{c}.v_scale"] = quant.v_scale[c].float().contiguous()
        else:
            state[f"clr.{c}.u"] = emb.u[c].detach().float().contiguous()
            if not lay.dense[c]:
                state[f"clr.{c}.v"] = emb.v[c].detach().float().contiguous()
    starts = lay.starts
    kind = "bert-classifier-clr" if isinstance(model, BertClassifier) else "bert-clr"
    config = {
        "kind": kind,
        "model": bert.config.to_dict(),
        "word_embeddings": {
            "format": FORMAT, "version": VERSION, "dtype": "int8" if quant is not None else "float32",
            "vocab_size": lay.vocab_size, "dim": lay.dim,
            "clusters": [{"start": int(s), "rows": n, "rank": r, "dense": dn}
                         for s, n, r, dn in zip(starts, lay.sizes, lay.ranks, lay.dense)],
            "params": lay.params(), "int8_bytes": layout_bytes(lay),
        },
    }
    if isinstance(model, BertClassifier):
        config["num_labels"] = model.num_labels
    config.update(extra or {})
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(state, str(d / "model.safetensors"), metadata={"format": FORMAT, "version": str(VERSION)})
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default))
    return d


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class LoadedCLR:
    model: nn.Module          # float model; its CLR module holds the (dequantised) factors
    quant: QuantCLR | None    # the int8 factors, when stored as int8
    config: dict
    path: Path


def _need(state: dict, key: str, path: Path, shape: tuple | None = None, dtype=None) -> torch.Tensor:
    if key not in state:
        raise TinyshieldError(f"{path}: missing tensor {key!r} — the file does not match its config.json")
    t = state[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise TinyshieldError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TinyshieldError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    return t


def load_compressed(directory: str | Path) -> LoadedCLR:
    d = Path(directory)
    cfg = read_json(d / "config.json")
    kind = cfg.get("kind")
    we = cfg.get("word_embeddings", {})
    if kind not in KINDS or we.get("format") != FORMAT:
        raise TinyshieldError(f"{d / 'config.json'}: not a CLR-compressed model (kind {kind!r}); "
                              f"expected kind {' or '.join(KINDS)} with word_embeddings.format {FORMAT!r}")
    if we.get("version") != VERSION:
        raise TinyshieldError(f"{d / 'config.json'}: CLR format version {we.get('version')} is not supported "
                              f"(this tinyshield reads version {VERSION})")
    path = d / "model.safetensors"
    state = read_safetensors(path)
    try:
        V, dim = int(we["vocab_size"]), int(we["dim"])
        clusters = we["clusters"]
        sizes = tuple(int(c["rows"]) for c in clusters)
        ranks = tuple(int(c["rank"]) for c in clusters)
        dense = tuple(bool(c["dense"]) for c in clusters)
        dtype = we["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise TinyshieldError(f"{d / 'config.json'}: incomplete word_embeddings section ({e})") from e
    if sum(sizes) != V:
        raise TinyshieldError(f"{d / 'config.json'}: cluster rows add up to {sum(sizes)}, vocab_size is {V}")
    if dtype not in ("int8", "float32"):
        raise TinyshieldError(f"{d / 'config.json'}: word_embeddings.dtype must be int8 or float32, not {dtype!r}")
    slot = _need(state, "clr.slot", path, (V,)).long().numpy()
    if not np.array_equal(np.sort(slot), np.arange(V)):
        raise TinyshieldError(f"{path}: clr.slot is not a permutation of 0..{V - 1}")
    layout = Layout(slot, sizes, ranks, dense, dim)
    u, us, v, vs = [], [], [], []
    qdt = torch.int8 if dtype == "int8" else torch.float32
    for c, (n, r, dn) in enumerate(zip(sizes, ranks, dense)):
        u.append(_need(state, f"clr.{c}.u", path, (n, dim if dn else r), qdt))
        v.append(None if dn else _need(state, f"clr.{c}.v", path, (r, dim), qdt))
        if dtype == "int8":
            us.append(_need(state, f"clr.{c}.u_scale", path, (n,)).float())
            vs.append(None if dn else _need(state, f"clr.{c}.v_scale", path, (dim,)).float())
    if dtype == "int8":
        quant = QuantCLR(layout, u, us, v, vs)
        clr = quant.to_float()
    else:
        quant, clr = None, CLREmbedding(layout, u, v)

    config = BertConfig.from_dict(cfg["model"])
    if config.vocab_size != V or config.hidden_size != dim:
        raise TinyshieldError(f"{d / 'config.json'}: word_embeddings is {V}x{dim} but the model config says "
                              f"{config.vocab_size}x{config.hidden_size}")
    model = BertClassifier(config, int(cfg.get("num_labels", 2))) if KINDS[kind] == "bert-classifier" \
        else BertModel(config)
    key = _word_key(model)
    rest = {k: t for k, t in state.items() if not k.startswith("clr.")}
    # Load everything but the word table strictly; the table placeholder is then replaced.
    rest[key + ".weight"] = torch.zeros(V, dim)
    load_into(model, rest, path)
    set_word_embeddings(model, clr)
    return LoadedCLR(model.eval(), quant, cfg, d)
