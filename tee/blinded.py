"""Slalom-style blinded linear layers: fixed point in Z_p, one-time masks, Freivalds' check.

Offline: weights become int8 per output channel (w_q, w_scale) and each layer gets a number of fractional
bits fx for its input, calibrated so that |x_q @ w_q^T| stays below p/8 (the result must not wrap).
A pad holds, per layer, a uniform mask r (rows x in) and its unblinding factor u = r w_q^T mod p; pads are
precomputed and sealed, and each is used for exactly one inference.
Online: the enclave sends x~ = x_q + r mod p; the accelerator returns y~ = x~ w_q^T mod p; the enclave checks
y~ s == x~ (w_q^T s) mod p for a fresh random s (Freivalds; a wrong y~ passes with probability <= 1/p),
then y = centre(y~ - u) * fx scale * w_scale + b. The result equals the fixed-point reference exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge.errors import TinyshieldError
from tee.fieldmath import HALF, P, center, check_exact_bound, matmul_mod, uniform

W_BITS = 8
MAX_W = 2 ** (W_BITS - 1) - 1
HEADROOM = P // 8   # calibrated |x_q @ w_q^T| must stay below this


@dataclass
class BlindLayer:
    w_q: np.ndarray       # int32 (out, in), |w_q| <= 127
    w_scale: np.ndarray   # float32 (out,)
    fx: int               # input fractional bits: x_q = round(x * 2^fx)
    bias: np.ndarray      # float32 (out,)

    @property
    def out_scale(self) -> np.ndarray:
        return (self.w_scale / np.float32(2.0 ** self.fx)).astype(np.float32)


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / MAX_W
    w_q = np.clip(np.round(w / scale[:, None]), -MAX_W, MAX_W).astype(np.int32)
    return w_q, scale.astype(np.float32)


def quantize_input(x: torch.Tensor, fx: int) -> np.ndarray:
    return torch.round(x * float(2 ** fx)).to(torch.int64).numpy()


def calibrate_fx(x_calib: np.ndarray, w_q: np.ndarray, max_fx: int = 24) -> int:
    """Most fractional bits for which the calibration inputs neither wrap nor leave the centred field."""
    xt = torch.from_numpy(np.ascontiguousarray(x_calib, dtype=np.float32))
    for fx in range(max_fx, -9, -1):
        xq = quantize_input(xt, fx)
        if np.abs(xq).max(initial=0) >= HEADROOM:
            continue
        y = xq.astype(np.float64) @ w_q.T.astype(np.float64)
        if np.abs(y).max(initial=0) < HEADROOM:
            return fx
    raise TinyshieldError("blinded mode: inputs of a layer are too large for the field even at 8 integer "
                          "bits; use shadownet or enclave-only for this model")


def make_layer(w: np.ndarray, b: np.ndarray, x_calib: np.ndarray) -> BlindLayer:
    w_q, w_scale = quantize_weights(w)
    check_exact_bound(w.shape[1], MAX_W)
    return BlindLayer(w_q=w_q, w_scale=w_scale, fx=calibrate_fx(x_calib, w_q), bias=b.astype(np.float32))


def make_pad(layers: dict[str, BlindLayer], rows: dict[str, int]) -> dict[str, np.ndarray]:
    """One inference's masks and unblinding factors (uint32, every entry < p)."""
    pad = {}
    for name, layer in layers.items():
        r = uniform((rows[name], layer.w_q.shape[1]))
        pad[f"{name}.r"] = r.astype(np.uint32)
        pad[f"{name}.u"] = matmul_mod(center(r), layer.w_q.T).astype(np.uint32)
    return pad


def blind(x: torch.Tensor, layer: BlindLayer, r: np.ndarray) -> np.ndarray:
    xq = quantize_input(x, layer.fx)
    if np.abs(xq).max(initial=0) >= HALF:
        raise TinyshieldError("blinded mode: an activation left the fixed-point range (overflow); "
                              "protect the model again with calibration inputs closer to real ones")
    return ((xq + r) % P).astype(np.uint32)


def accelerate(x_tilde: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """The accelerator's work: y~ = x~ w_q^T mod p, exactly, in float64 (wt = w_q^T as float64)."""
    return matmul_mod(center(x_tilde.astype(np.int64)), wt).astype(np.uint32)


def freivalds(x_tilde: np.ndarray, y_tilde: np.ndarray, w_q: np.ndarray, key: bytes | None = None) -> bool:
    """y~ == x~ w_q^T (mod p)? Checked on a fresh random s: cost O(rows*(in+out) + in*out), miss <= 1/p."""
    if y_tilde.shape != (x_tilde.shape[0], w_q.shape[0]) or (y_tilde >= P).any():
        return False
    s = uniform((w_q.shape[0],), key)
    ws = (w_q.T.astype(np.int64) @ s) % P                 # |.| < in-range: 127 * p * out < 2^63
    lhs = (y_tilde.astype(np.int64) @ s) % P              # each term < p^2 ~ 2^46.7; out <= 2^16 terms
    rhs = (x_tilde.astype(np.int64) @ ws) % P
    return bool(np.array_equal(lhs, rhs))


def unblind(y_tilde: np.ndarray, u: np.ndarray, layer: BlindLayer) -> torch.Tensor:
    y_int = center((y_tilde.astype(np.int64) - u) % P)
    return dequantize(y_int, layer)


def dequantize(y_int: np.ndarray, layer: BlindLayer) -> torch.Tensor:
    y = torch.from_numpy(y_int.astype(np.float32))   # |y_int| < p/2 < 2^24: exact in float32
    return y * torch.from_numpy(layer.out_scale) + torch.from_numpy(layer.bias)


def reference_lin(layers: dict[str, BlindLayer]):
    """The fixed-point reference: the same quantisation and dequantisation with x_q w_q^T computed in the clear."""
    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = layers[name]
        xq = quantize_input(x, layer.fx)
        y = xq.astype(np.float64) @ layer.w_q.T.astype(np.float64)   # exact: |partial sums| < 2^53
        return dequantize(y.astype(np.int64), layer)
    return lin
