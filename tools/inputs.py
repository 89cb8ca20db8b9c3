"""Turning INPUT arguments of the CLI into model inputs (one home for run, run --board and infer)."""
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
