"""Slalom-style blinded linear layers: fixed point in Z_p, one-time masks, Freivalds' check.

Offline: weights become int8 per output channel (w_q, w_scale) and each layer gets a number of fractional
bits fx for its input, calibrated so that |x_q @ w_q^T| stays below p/8 (the result must not wrap).
A pad holds, per layer, a uniform mask r (rows x in) and its unblinding factor u = r w_q^T mod p; pads are
precomputed and sealed, and each is used for exactly one inference.
Online: the enclave sends x~ = x_q + r mod p (as three uint8 digit planes, what the accelerator's int8 GEMM
takes); the accelerator returns y~ = x~ w_q^T mod p; the enclave checks
y~ s == x~ v mod p for the pad's one-time secret s and v = w_q^T s (Freivalds; a wrong y~ passes with
probability <= 1/p),
then y = centre(y~ - u) * fx scale * w_scale + b. The result equals the fixed-point reference exactly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from base.errors import TinyshieldError
from base.quant import quantize_weights_f32
from tee import fieldkernels
from tee.fieldgemm import FieldGemm
from tee.fieldmath import P, center, check_exact_bound, matmul_mod, uniform

W_BITS = 8
MAX_W = 2 ** (W_BITS - 1) - 1
HEADROOM = P // 8   # calibrated |x_q @ w_q^T| must stay below this


@dataclass
class BlindLayer:
    w_q: np.ndarray       # int32 (out, in), |w_q| <= 127
    w_scale: np.ndarray   # float32 (out,)
    fx: int               # input fractional bits: x_q = round(x * 2^fx)
    bias: np.ndarray      # float32 (out,)

    @functools.cached_property
    def gemm(self) -> FieldGemm:
        """The accelerator's exact GEMM for this layer (the owner and the enclave make pads with it)."""
        return FieldGemm(torch.from_numpy(self.w_q.T.astype(np.int8)))

    @functools.cached_property
    def out_scale(self) -> np.ndarray:
        return (self.w_scale / np.float32(2.0 ** self.fx)).astype(np.float32)


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes per output row (held as int32 for the field arithmetic) and float32 scales, the rule of
    base.quant.quantize_weights_f32 (the C kernel dequantises with float32 scales)."""
    w_q, scale = quantize_weights_f32(w, axis=0)
    return w_q.astype(np.int32), scale


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
    check_exact_bound(w.shape[1], MAX_W, w.shape[0])
    return BlindLayer(w_q=w_q, w_scale=w_scale, fx=calibrate_fx(x_calib, w_q), bias=b.astype(np.float32))


def make_pad(layers: dict[str, BlindLayer], rows: dict[str, int]) -> dict[str, np.ndarray]:
    """One inference's secrets per layer (uint32, entries < p): mask r, unblinding factor u = r w_q^T,
    and a Freivalds vector s with v = w_q^T s, so the online check costs only O(rows * (in + out))."""
    pad = {}
    for name, layer in layers.items():
        r = uniform((rows[name], layer.w_q.shape[1]))
        s = uniform((layer.w_q.shape[0],))
        pad[f"{name}.r"] = r.astype(np.uint32)
        pad[f"{name}.u"] = layer.gemm(pad[f"{name}.r"])
        pad[f"{name}.s"] = s.astype(np.uint32)
        pad[f"{name}.v"] = matmul_mod(center(s)[None], layer.w_q)[0].astype(np.uint32)
    return pad


def blind(x: torch.Tensor, layer: BlindLayer, r: np.ndarray, v: np.ndarray,
          out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x~ = round(x 2^fx) + r mod p as the accelerator takes it -- its three digit planes, uint8 (3 rows, k)
    (fieldmath.from_digits gives the field elements) -- into `out`, e.g. the accelerator's buffer; and the
    Freivalds right-hand side x~ v mod p per row. One pass of the C kernel."""
    x = x.detach().to(torch.float32).contiguous().numpy()
    out = np.empty((3 * r.shape[0], r.shape[1]), np.uint8) if out is None else out
    in_range, rhs = fieldkernels.blind(x, layer.fx, r, v, out)
    if not in_range:
        raise TinyshieldError("blinded mode: an activation left the fixed-point range (overflow); "
                              "protect the model again with calibration inputs closer to real ones")
    return out, rhs


def unblind(y_tilde: np.ndarray, u: np.ndarray, s: np.ndarray, rhs: np.ndarray, layer: BlindLayer) -> torch.Tensor | None:
    """y = centre(y~ - u) * scale + bias after Freivalds' check y~ s == x~ v (mod p) -- one pass of the C kernel,
    reading each entry of y~ once (it may sit in memory the accelerator can still write). None when the answer
    is wrong: an entry that is no field element, or a failed check (a wrong y~ passes with probability <= 1/p)."""
    if y_tilde.shape != u.shape or y_tilde.dtype != np.uint32:
        return None
    out = np.empty(u.shape, np.float32)
    valid, lhs = fieldkernels.unblind(y_tilde, u, s, layer.out_scale, layer.bias, out)
    return torch.from_numpy(out) if valid and np.array_equal(lhs, rhs) else None


def dequantize(y_int, layer: BlindLayer) -> torch.Tensor:
    """The reference's dequantisation: float32 multiply, then add (two roundings, as the C kernel)."""
    y = np.asarray(y_int).astype(np.float32)   # |y_int| < p/2 < 2^24: exact in float32
    return torch.from_numpy(y * layer.out_scale + layer.bias)


def reference_lin(layers: dict[str, BlindLayer]):
    """The fixed-point reference: the same quantisation and dequantisation with x_q w_q^T computed in the clear."""
    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = layers[name]
        xq = quantize_input(x, layer.fx).astype(np.float64)
        y = xq @ layer.w_q.T.astype(np.float64)   # exact: |partial sums| < 2^53
        return dequantize(torch.from_numpy(y.astype(np.int64)), layer)
    return lin
