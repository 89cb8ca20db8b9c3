"""INPUT arguments of the command line -> model inputs: the one home for `run` (every backend and the board),
`infer` and `audit`. An INPUT is a sentence, mnist:INDEX, a 28x28 grey image (.npy / .png), or for an exported
model a .npy file holding its one input."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from base.errors import TinyshieldError


def load_image(spec: str) -> tuple[np.ndarray, int | None]:
    """mnist:INDEX (a test image and its label), or a 28x28 .npy / .png file -> (uint8 (28, 28), label)."""
    if spec.startswith("mnist:"):
        from base.data import data_dir, mnist
        ds = mnist(allow_fallback=data_dir(required=False) is None)
        try:
            i = int(spec.split(":", 1)[1])
        except ValueError:
            raise TinyshieldError(f"{spec!r}: expected mnist:INDEX with an integer index") from None
        if not 0 <= i < len(ds.x_test):
            raise TinyshieldError(f"mnist index {i} out of range 0..{len(ds.x_test) - 1}")
        return ds.x_test[i], int(ds.y_test[i])
    p = Path(spec)
    if not p.is_file():
        raise TinyshieldError(f"input {spec!r} is neither mnist:INDEX nor an image file (.npy, .png)")
    if p.suffix == ".npy":
        img = np.load(p)
    else:
        import matplotlib.image as mpimg
        img = mpimg.imread(p)
        img = img[..., :3].mean(-1) if img.ndim == 3 else img
        img = (img * 255).round() if img.dtype != np.uint8 else img
    img = np.asarray(img)
    if img.shape != (28, 28):
        raise TinyshieldError(f"image {p} is {img.shape}, the model takes 28x28 grey")
    return img.astype(np.uint8), None


def read_tensor(spec: str, shape) -> np.ndarray:
    """A .npy file holding one input of `shape` (batch first, batch 1), with or without its batch dimension."""
    shape = tuple(int(d) for d in shape)
    if not spec.endswith(".npy") or not Path(spec).is_file():
        raise TinyshieldError(f"input {spec!r}: give a .npy file holding one input of shape {list(shape[1:])}")
    x = np.load(spec, allow_pickle=False)
    x = x[None] if tuple(x.shape) == shape[1:] else x
    if tuple(x.shape) != shape:
        raise TinyshieldError(f"{spec}: shape {list(x.shape)}, the model takes {list(shape)}")
    return x


def read_inputs(specs: list[str], kind: str, shape=None, seq_len: int | None = None):
    """INPUT strings -> (inputs, labels): "ids" (sentences -> int32 (1, seq_len) token ids), "image"
    (-> float32 (1, 1, 28, 28) in [0, 1], with the label of an mnist:INDEX) or "tensor" (.npy of `shape`)."""
    if not specs:
        raise TinyshieldError("give at least one INPUT (a sentence, or mnist:INDEX / an image file)")
    if kind == "tensor":
        return [read_tensor(s, shape) for s in specs], None
    if kind == "ids":
        from edge.models.minilm import token_ids
        ids = token_ids(specs, seq_len)
        return [ids[i:i + 1] for i in range(len(specs))], None
    from edge.models.vit import to_tensor
    imgs, labels = zip(*(load_image(s) for s in specs))
    x = to_tensor(np.stack(imgs)).numpy()
    return [x[i:i + 1] for i in range(len(specs))], list(labels)


def test_set(dataset: str, kind: str, seq_len: int | None, limit: int, data: str | None = None):
    """Labelled inputs to evaluate a model on: (inputs, labels, where from). `data` (an .npz with x and y) wins; else the recipe's test set: MNIST test images for an image model ("vit"),
    SST-2 dev token ids padded to `seq_len` for a text classifier ("bert-classifier")."""
    if data is not None:
        from base.data import load_array
        xs, ys = load_array(data, "x"), load_array(data, "y")
        if len(xs) != len(ys):
            raise TinyshieldError(f"{data}: {len(xs)} inputs but {len(ys)} labels")
        return xs[:limit], ys[:limit], data
    if kind in ("pt2", "tflite"):
        raise TinyshieldError(f"a .{kind} model is evaluated on your data: pass --data test.npz (arrays x and y)")
    if dataset == "mnist":
        if kind != "vit":
            raise TinyshieldError(f"dataset mnist needs an image model, this one is {kind}")
        from base.data import data_dir, mnist
        ds = mnist(allow_fallback=data_dir(required=False) is None)
        return ds.x_test[:limit], ds.y_test[:limit], ds.source
    if kind != "bert-classifier":
        raise TinyshieldError(f"dataset sst2 needs a text classifier, this one is {kind}")
    from base.data import sst2
    from edge.models.minilm import token_ids
    ds = sst2("dev")
    return token_ids(ds.texts[:limit], seq_len), ds.labels[:limit], ds.source
