"""Training recipes: `tinyshield train NAME`. Each returns a `Trained` result and caches by config hash."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Trained:
    name: str
    path: Path              # directory with model.safetensors + config.json
    metrics: dict = field(default_factory=dict)
    cached: bool = False    # True when a previous run with the same config was reused


def recipes() -> dict:
    """Name -> callable(**overrides) -> Trained. Imported lazily: training pulls in torch."""
    from edge.recipes import bert_tiny_sst2, vit_mnist

    return {"vit-mnist": vit_mnist.train, "bert-tiny-sst2": bert_tiny_sst2.train}
