"""Turn a MODEL argument into a model: a recipe name, `minilm`, or a directory holding
`model.safetensors` + `config.json` (whose "kind" says which class to build)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from base.errors import TinyshieldError
from edge.models.io import load_into, read_json, read_safetensors


@dataclass
class Loaded:
    model: nn.Module
    kind: str          # "vit", "bert-classifier", "minilm", ...
    config: dict       # the whole config.json
    path: Path | None


def build(kind: str, model_cfg: dict, num_labels: int | None = None) -> nn.Module:
    if kind == "vit":
        from edge.models.vit import ViT, ViTConfig
        return ViT(ViTConfig.from_dict(model_cfg))
    if kind == "bert-classifier":
        from edge.models.bert import BertClassifier, BertConfig
        return BertClassifier(BertConfig.from_dict(model_cfg), num_labels or model_cfg.get("num_labels", 2))
    if kind == "bert":
        from edge.models.bert import BertConfig, BertModel
        return BertModel(BertConfig.from_dict(model_cfg))
    if kind == "sliced-classifier":
        from edge.models.bert import BertConfig
        from edge.models.sliced import SlicedClassifier
        return SlicedClassifier(BertConfig.from_dict(model_cfg), num_labels or model_cfg.get("num_labels", 2),
                                model_cfg.get("rank", 8))
    raise TinyshieldError(f"unknown model kind {kind!r} (vit, bert-classifier, bert, sliced-classifier)")


def load_dir(path: str | Path) -> Loaded:
    d = Path(path)
    cfg = read_json(d / "config.json")
    if "kind" not in cfg or "model" not in cfg:
        raise TinyshieldError(f"{d / 'config.json'}: not a tinyshield model config (needs 'kind' and 'model')")
    if cfg["kind"].endswith("-clr"):  # written by `tinyshield compress`: its own format and loader
        from edge.compress.io import load_compressed
        return Loaded(load_compressed(d).model.eval(), cfg["kind"], cfg, d)
    model = build(cfg["kind"], cfg["model"], cfg.get("num_labels"))
    load_into(model, read_safetensors(d / "model.safetensors"), d / "model.safetensors")
    return Loaded(model.eval(), cfg["kind"], cfg, d)


def resolve(spec: str, train_if_missing: bool = True) -> Loaded:
    """`minilm`, a recipe name (trained on first use, then cached), or a model directory."""
    if spec == "minilm":
        from edge.models.minilm import load_minilm
        m = load_minilm()
        return Loaded(m, "minilm", {"kind": "minilm", "model": m.config.to_dict()}, None)
    p = Path(spec)
    if p.is_dir():
        return load_dir(p)
    from edge.recipes import recipes
    table = recipes()
    if spec in table:
        if not train_if_missing:
            raise TinyshieldError(f"{spec} is not trained yet: run `tinyshield train {spec}`")
        return load_dir(table[spec]().path)
    raise TinyshieldError(
        f"unknown model {spec!r}: give a model directory (model.safetensors + config.json), "
        f"'minilm', or one of the recipes: {', '.join(table)}")
