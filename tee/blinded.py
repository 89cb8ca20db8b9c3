"""Slalom-style blinded linear layers: fixed point in Z_p, one-time masks, Freivalds' check.

Offline: weights become int8 per output channel (w_q, w_scale) and each layer gets a number of fractional
bits fx for its input, calibrated so that |x_q @ w_q^T| stays below p/8 (the result must not wrap).
A pad holds, per layer, a uniform mask r (rows x in) and its unblinding factor u = r w_q^T mod p; pads are
precomputed and sealed, and each is used for exactly one inference.
Online: the enclave sends x~ = x_q + r mod p; the accelerator returns y~ = x~ w_q^T mod p; the enclave checks
y~ s == x~ v mod p for the pad's one-time secret s and v = w_q^T s (Freivalds; a wrong y~ passes with
probability <= 1/p),
then y = centre(y~ - u) * fx scale * w_scale + b. The result equals the fixed-point reference exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge.errors import TinyshieldError
from tee.fieldmath import HALF, P, center, center_, check_exact_bound, float64_matmul_mod, int8_matmul_mod, matmul_mod, reduce_, split_matvec_mod, uniform

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
    """Most fractional bits for which the calibration inputs neither wrap nor leave the centred field.

    |x_q w_q^T| grows like 2^fx, so one float product gives the estimate; the exact check confirms it."""
    x = np.ascontiguousarray(x_calib, dtype=np.float32)
    peak = max(float(np.abs(x @ w_q.T.astype(np.float32)).max(initial=0)), float(np.abs(x).max(initial=0)), 1e-30)
    fx = min(max_fx, int(np.floor(np.log2(HEADROOM / peak))))
    xt = torch.from_numpy(x)
    while fx >= -8:
        xq = quantize_input(xt, fx)
        if np.abs(xq).max(initial=0) < HEADROOM and \
                np.abs(xq.astype(np.float64) @ w_q.T.astype(np.float64)).max(initial=0) < HEADROOM:
            return fx
        fx -= 1
    raise TinyshieldError("blinded mode: inputs of a layer are too large for the field even at 8 integer "
                          "bits; use shadownet or enclave-only for this model")


def make_layer(w: np.ndarray, b: np.ndarray, x_calib: np.ndarray) -> BlindLayer:
    w_q, w_scale = quantize_weights(w)
    check_exact_bound(w.shape[1], MAX_W)
    return BlindLayer(w_q=w_q, w_scale=w_scale, fx=calibrate_fx(x_calib, w_q), bias=b.astype(np.float32))


def make_pad(layers: dict[str, BlindLayer], rows: dict[str, int]) -> dict[str, np.ndarray]:
    """One inference's secrets per layer (uint32, entries < p): mask r, unblinding factor u = r w_q^T,
    and a Freivalds vector s with v = w_q^T s, so the online check costs only O(rows * (in + out))."""
    pad = {}
    for name, layer in layers.items():
        r = uniform((rows[name], layer.w_q.shape[1]))
        s = uniform((layer.w_q.shape[0],))
        pad[f"{name}.r"] = r.astype(np.uint32)
        pad[f"{name}.u"] = int8_matmul_mod(pad[f"{name}.r"], torch.from_numpy(layer.w_q.T.astype(np.int8)))
        pad[f"{name}.s"] = s.astype(np.uint32)
        pad[f"{name}.v"] = matmul_mod(center(s)[None], layer.w_q)[0].astype(np.uint32)
    return pad


def blind(x: torch.Tensor, layer: BlindLayer, r: np.ndarray) -> np.ndarray:
    """x~ = round(x 2^fx) + r mod p, as uint32 field elements."""
    scaled = x * float(2 ** layer.fx)
    lo, hi = torch.aminmax(scaled)
    if max(-float(lo), float(hi)) >= HALF:
        raise TinyshieldError("blinded mode: an activation left the fixed-point range (overflow); "
                              "protect the model again with calibration inputs closer to real ones")
    t = scaled.round_().to(torch.int32).add_(torch.from_numpy(r.view(np.int32)))   # in (-p/2, 3p/2)
    return reduce_(t).numpy().view(np.uint32)


def accelerate(x_tilde: np.ndarray, wt: torch.Tensor) -> np.ndarray:
    """The accelerator's work: y~ = x~ w_q^T mod p, exactly. wt = w_q^T as int8 (three int8 digit GEMMs)
    or as float64 (one exact float64 GEMM)."""
    if wt.dtype == torch.float64:
        return float64_matmul_mod(x_tilde, wt)
    return int8_matmul_mod(x_tilde, wt)


def _as64(a: np.ndarray) -> torch.Tensor:
    # [0, p): no centring needed for exactness; numpy's int32 -> float64 cast is several times faster than torch's
    return torch.from_numpy(a.view(np.int32).astype(np.float64))


def freivalds(x_tilde: np.ndarray, y_tilde: np.ndarray, s: np.ndarray, v: np.ndarray) -> bool:
    """y~ s == x~ v (mod p) with the pad's secret one-time s and v = w_q^T s: a wrong y~ passes with
    probability <= 1/p. Cost O(rows * (in + out)): two thin float64 GEMMs, exact by splitting s and v."""
    if y_tilde.shape != (x_tilde.shape[0], len(s)) or y_tilde.dtype != np.uint32 or int(y_tilde.max()) >= P:
        return False
    lhs = split_matvec_mod(_as64(y_tilde), s)
    rhs = split_matvec_mod(_as64(x_tilde), v)
    return bool(np.array_equal(lhs, rhs))


def unblind(y_tilde: np.ndarray, u: np.ndarray, layer: BlindLayer) -> torch.Tensor:
    d = torch.from_numpy(y_tilde.view(np.int32)) - torch.from_numpy(u.view(np.int32))   # in (-p, p)
    return dequantize(center_(d), layer)


def dequantize(y_int, layer: BlindLayer) -> torch.Tensor:
    y = torch.as_tensor(y_int).to(torch.float32)   # |y_int| < p/2 < 2^24: exact in float32
    return torch.addcmul(torch.from_numpy(layer.bias), y, torch.from_numpy(layer.out_scale))


def reference_lin(layers: dict[str, BlindLayer]):
    """The fixed-point reference: the same quantisation and dequantisation with x_q w_q^T computed in the clear."""
    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = layers[name]
        xq = torch.round(x * float(2 ** layer.fx)).to(torch.float64).numpy()
        y = xq @ layer.w_q.T.astype(np.float64)   # exact: |partial sums| < 2^53
        return dequantize(torch.from_numpy(y.astype(np.int64)), layer)
    return lin
