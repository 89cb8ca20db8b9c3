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

from edge.errors import TinyshieldError
from tee import fieldkernels
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
        """The accelerator's exact kernel for this layer (the owner uses it to make pads)."""
        return FieldGemm(torch.from_numpy(self.w_q.T.astype(np.int8)))

    @functools.cached_property
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


F32_EXACT = 2 ** 24   # float32 holds every integer up to this
MAX_DIGIT = 128       # |digit - zero point| for the uint8 digits with zero point 128
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def exact_parts(w: np.ndarray) -> list[slice]:
    """Consecutive input ranges of w (out, in) over which a digit GEMM's float32 sums are exact whatever the
    digits: MAX_DIGIT * sum_j |w[o, j]| <= 2^24 for every output o. A real layer's weights are far from all
    +-127 (MiniLM's widest rows reach 37% of the bound over 1536 inputs), so this is one range for every
    MiniLM and ViT layer; the worst case (all +-127) allows 1032 inputs per range."""
    acc = np.zeros(w.shape[0], np.int64)
    parts, start = [], 0
    for j, col in enumerate(np.abs(w.astype(np.int64)).T):
        if MAX_DIGIT * int((acc + col).max(initial=0)) > F32_EXACT:
            parts.append(slice(start, j))
            start, acc = j, np.zeros_like(acc)
        acc += col
    return parts + [slice(start, w.shape[1])]


class FieldGemm:
    """The accelerator's exact y~ = x~ w_q^T mod p for one layer, wt = w_q^T (k, m) with |w_q| <= 127.

    The masked input comes as three digit planes (the enclave's blinding writes them; `__call__` makes them
    from field elements), one int8 GEMM runs over the stacked planes, and the planes' products are
    recombined mod p (fieldmath.int8_matmul_mod is the reference). The GEMM is
    oneDNN's quantised linear with the weights packed once (AMX or VNNI where the CPU has them): inputs as
    uint8 bytes with zero point 128, output float32 -- exact while every sum stays below 2^24, so a layer
    whose weights could pass that is split along k (`exact_parts`) and the parts added mod p. Without
    oneDNN, torch._int_mm (int32 sums; it repacks the weights on every call, measured 1.5x slower here)."""

    def __init__(self, wt: torch.Tensor):
        self.k, self.m = wt.shape
        w = wt.to(torch.int8).T.contiguous()                    # (m, k), as oneDNN wants it
        if _ONEDNN:
            self.parts = [(cols, torch.ops.onednn.qlinear_prepack(w[:, cols].contiguous(), None))
                          for cols in exact_parts(w.numpy())]
            self.one, self.zero = torch.ones(self.m), torch.zeros(self.m, dtype=torch.int64)
        else:
            self.wt = w.T.contiguous()

    def __call__(self, x_tilde: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """From field elements (uint32 (rows, k))."""
        return self.planes(fieldkernels.digits(x_tilde, unsigned=True), out)

    def planes(self, d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """From digit planes (uint8 (3 rows, k), zero point 128) -> uint32 (rows, m)."""
        if not _ONEDNN:
            y = torch._int_mm(torch.from_numpy((d ^ np.uint8(0x80)).view(np.int8)), self.wt)
            return fieldkernels.recombine(y.numpy(), out)
        for i, (cols, packed) in enumerate(self.parts):
            part = d if len(self.parts) == 1 else np.ascontiguousarray(d[:, cols])
            y = torch.ops.onednn.qlinear_pointwise(torch.from_numpy(part), 1.0, 128, packed, self.one, self.zero, None,
                                                   1.0, 0, torch.float32, "none", [], "")
            out = fieldkernels.recombine(y.numpy(), out, accumulate=i > 0)
        return out


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
