"""Export a Linear layer or a stack of them (optional ReLU between) to .tflite, fp32 or int8.

fp32:  export_linear_stack([(w1, b1), (w2, b2)], batch_shape=(1,), relu=True) -> bytes
int8:  q = quantize_linear_stack(layers, calib=x_float, relu=True); q.export((1,)) -> bytes;
       q.reference(x_int8) is the exact numpy int8 result (base.quant fixed point) the
       interpreters must reproduce.

Weights follow torch: w is (out_features, in_features); b is (out_features,) or None. An
`nn.Linear` is accepted wherever a (w, b) pair is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from base import quant as Q
from base.errors import TinyshieldError
from edge.litert.writer import Builder, Quant


def _pair(layer, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    if hasattr(layer, "weight") and hasattr(layer, "in_features"):  # nn.Linear, without importing torch
        w = layer.weight.detach().cpu().numpy()
        b = None if layer.bias is None else layer.bias.detach().cpu().numpy()
    elif isinstance(layer, (tuple, list)) and len(layer) == 2:
        w, b = layer
    else:
        raise TinyshieldError(f"layer {i}: expected an nn.Linear or a (weight, bias) pair, got {type(layer).__name__}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise TinyshieldError(f"layer {i}: weight must be 2-D (out, in), got shape {w.shape}")
    if b is not None:
        b = np.asarray(b, dtype=np.float32)
        if b.shape != (w.shape[0],):
            raise TinyshieldError(f"layer {i}: bias shape {b.shape} does not match {w.shape[0]} outputs")
    return w, b


def _pairs(layers) -> list[tuple[np.ndarray, np.ndarray | None]]:
    ps = [_pair(l, i) for i, l in enumerate(layers)]
    if not ps:
        raise TinyshieldError("empty layer stack: give at least one (weight, bias) pair")
    for i in range(1, len(ps)):
        if ps[i][0].shape[1] != ps[i - 1][0].shape[0]:
            raise TinyshieldError(f"layer {i} takes {ps[i][0].shape[1]} features but layer {i - 1} "
                                  f"gives {ps[i - 1][0].shape[0]}")
    return ps


def export_linear_stack(layers, batch_shape=(1,), relu: bool = False, name: str = "linear_stack") -> bytes:
    """fp32 .tflite of x -> Linear -> [ReLU] -> Linear ... (no ReLU after the last layer).

    Input shape batch_shape + (in_features,), float32; output batch_shape + (out_features,)."""
    ps = _pairs(layers)
    b = Builder(name)
    x = b.input("input", tuple(batch_shape) + (ps[0][0].shape[1],))
    for i, (w, bias) in enumerate(ps):
        act = "relu" if relu and i < len(ps) - 1 else None
        x = b.fully_connected(x, b.const(f"fc{i}/weight", w),
                              None if bias is None else b.const(f"fc{i}/bias", bias), act, name=f"fc{i}")
    return b.finish([x])


def export_linear(weight, bias=None, batch_shape=(1,)) -> bytes:
    """fp32 .tflite of one Linear layer."""
    return export_linear_stack([(weight, bias)], batch_shape, name="linear")


# ---- int8 -----------------------------------------------------------------------------------

@dataclass
class QLinear:
    w: np.ndarray           # int8 (out, in), symmetric per output channel
    w_scale: np.ndarray     # float32 (out,)
    bias: np.ndarray        # int32 (out,), scale in_scale * w_scale
    out: Q.ActQ
    relu: bool


def _f32(x) -> float:
    return float(np.float32(x))


def requant_params(in_scale: float, w_scale: np.ndarray, out_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (multiplier, shift) exactly as TFLite derives them from the file's float32 scales."""
    eff = np.float64(np.float32(in_scale)) * w_scale.astype(np.float32).astype(np.float64) \
        / np.float64(np.float32(out_scale))
    return Q.quantize_multipliers(eff)


def single_rounding_mbqm(x, m, shift) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier under TFLITE_SINGLE_ROUNDING: one rounding of the
    64-bit product, half up: (x * m + 2^(30 - shift)) >> (31 - shift). ai-edge-litert's reference
    kernels use it; base.quant (and TFLite Micro) round twice, so the two differ by 1 LSB at ties."""
    x, m, shift = (np.asarray(v, dtype=np.int64) for v in (x, m, shift))
    total = 31 - shift
    return (x * m + (np.int64(1) << (total - 1))) >> total


@dataclass
class QuantizedStack:
    """An int8 linear stack: int8 in, int8 out, per-channel weights, int32 bias."""
    input: Q.ActQ
    layers: list[QLinear]

    @property
    def output(self) -> Q.ActQ:
        return self.layers[-1].out

    def quantize_input(self, x) -> np.ndarray:
        return Q.quantize(x, self.input.scale, self.input.zero_point)

    def dequantize_output(self, q) -> np.ndarray:
        return Q.dequantize(q, self.output.scale, self.output.zero_point).astype(np.float32)

    def reference(self, xq, rounding: str = "double") -> np.ndarray:
        """Exact int8 result: int32 accumulation, then requantisation by base.quant's fixed point
        ("double": SaturatingRoundingDoublingHighMul + RoundingDivideByPOT, the project's
        convention and TFLite Micro's) or TFLite's single-rounding variant ("single", what
        LiteRT's reference kernels compute)."""
        if rounding not in ("double", "single"):
            raise TinyshieldError(f"rounding must be 'double' or 'single', not {rounding!r}")
        x = np.asarray(xq, dtype=np.int64)
        s_in, zp_in = self.input.scale, self.input.zero_point
        for l in self.layers:
            acc = (x - zp_in) @ l.w.astype(np.int64).T + l.bias.astype(np.int64)
            m, sh = requant_params(s_in, l.w_scale, l.out.scale)
            mbqm = Q.multiply_by_quantized_multiplier if rounding == "double" else single_rounding_mbqm
            y = mbqm(acc, m.astype(np.int64), sh.astype(np.int64)) + l.out.zero_point
            lo = l.out.zero_point if l.relu else Q.INT8_MIN
            x = np.clip(y, lo, Q.INT8_MAX)
            s_in, zp_in = l.out.scale, l.out.zero_point
        return x.astype(np.int8)

    def export(self, batch_shape=(1,), float_io: bool = False, name: str = "linear_stack_int8") -> bytes:
        """int8 .tflite; with float_io the graph takes and returns float32 (QUANTIZE/DEQUANTIZE at the ends)."""
        b = Builder(name)
        shape = tuple(batch_shape) + (self.layers[0].w.shape[1],)
        qin = Quant.per_tensor(self.input.scale, self.input.zero_point)
        if float_io:
            x = b.quantize(b.input("input", shape), qin, name="input_q")
        else:
            x = b.input("input", shape, np.int8, qin)
        s_in = _f32(self.input.scale)
        for i, l in enumerate(self.layers):
            wq = Quant(tuple(float(s) for s in l.w_scale), (0,) * len(l.w_scale), 0)
            bq = Quant(tuple(float(np.float32(s_in) * np.float32(s)) for s in l.w_scale), (0,) * len(l.w_scale), 0)
            x = b.fully_connected(x, b.const(f"fc{i}/weight", l.w, quant=wq), b.const(f"fc{i}/bias", l.bias, quant=bq),
                                  "relu" if l.relu else None, name=f"fc{i}",
                                  out_quant=Quant.per_tensor(l.out.scale, l.out.zero_point))
            s_in = _f32(l.out.scale)
        if float_io:
            x = b.dequantize(x, name="output")
        return b.finish([x])


def quantize_linear_stack(layers, calib, relu: bool = False) -> QuantizedStack:
    """Post-training quantisation of a linear stack from float calibration inputs (N, in_features).

    Activation ranges are the min/max the float stack produces on `calib`; scales are rounded to
    float32 up front because that is what the .tflite file stores and the kernels use."""
    ps = _pairs(layers)
    x = np.asarray(calib, dtype=np.float32).reshape(-1, ps[0][0].shape[1])
    if x.shape[0] == 0:
        raise TinyshieldError("calibration set is empty: give at least one input row")

    def act(x):
        q = Q.choose_activation_qparams(float(x.min()), float(x.max()))
        return Q.ActQ(_f32(q.scale), q.zero_point)

    q_in = act(x)
    s_in = q_in.scale
    out = []
    for i, (w, bias) in enumerate(ps):
        last = i == len(ps) - 1
        x = x @ w.T + (0 if bias is None else bias)
        if relu and not last:
            x = np.maximum(x, 0)
        wq, ws = Q.quantize_weights_per_channel(w, axis=0)
        ws = ws.astype(np.float32)
        b32 = Q.quantize_bias(np.zeros(w.shape[0]) if bias is None else bias,
                              np.float32(s_in), ws.astype(np.float64))
        o = act(x)
        out.append(QLinear(wq, ws, b32, o, relu and not last))
        s_in = o.scale
    return QuantizedStack(q_in, out)
