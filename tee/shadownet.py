"""ShadowNet (S&P'23) weight transform for linear layers, and the enclave's restoration.

Offline, each W (out x in) becomes W' = rows of [diag(a) W ; F] in a secret random order: per-channel
random scales a, fake output channels F, shuffling. At run time the enclave sends x + R (R from a
small pool of precomputed masks, as ShadowNet keeps) and restores y = ((x+R) W'^T - R W'^T)[:, perm] / a + b.
This hides neither the weights (the audit recovers them) nor, since masks repeat, the inputs perfectly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ShadowLayer:
    obf: np.ndarray        # W' (out + fakes, in) float32: what the accelerator holds
    perm: np.ndarray       # int64 (out,): row of W' holding real channel i
    scale: np.ndarray      # float32 (out,): a_i, W'[perm[i]] = a_i * W[i]
    fake: np.ndarray       # bool (out + fakes,): which rows of W' are fake (kept secret)


def transform(w: np.ndarray, rng: np.random.Generator, fake_ratio: float = 0.25) -> ShadowLayer:
    out, k = w.shape
    n_fake = max(1, int(round(out * fake_ratio)))
    # Scales log-uniform in [1/4, 4] with random signs.
    scale = (np.exp(rng.uniform(np.log(0.25), np.log(4.0), out)) * rng.choice([-1.0, 1.0], out)).astype(np.float32)
    # Fake channels: Gaussian rows whose norms follow the real rows' norms.
    norms = np.linalg.norm(w, axis=1)
    fake_rows = rng.standard_normal((n_fake, k)).astype(np.float32)
    fake_rows *= (rng.choice(norms, n_fake) * np.exp(rng.uniform(np.log(0.25), np.log(4.0), n_fake))
                  / np.linalg.norm(fake_rows, axis=1))[:, None]
    order = rng.permutation(out + n_fake)          # order[j] = source row placed at position j
    stacked = np.concatenate([w * scale[:, None], fake_rows]).astype(np.float32)
    obf = stacked[order]
    pos = np.empty_like(order)
    pos[order] = np.arange(out + n_fake)
    return ShadowLayer(obf=np.ascontiguousarray(obf), perm=pos[:out].astype(np.int64), scale=scale,
                       fake=order >= out)


def mask_pool(rows: int, k: int, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n precomputed input masks (rows x k), on the scale of the layer's inputs."""
    return (rng.standard_normal((n, rows, k)) * sigma).astype(np.float32)


def restore(y_obf: np.ndarray, mask_out: np.ndarray, layer: ShadowLayer, bias: np.ndarray) -> np.ndarray:
    """The enclave's restoration: unmask, pick the real channels, undo the scales, add the bias."""
    return (y_obf[:, layer.perm] - mask_out[:, layer.perm]) / layer.scale + bias
