"""Post-training int8 quantisation of an exported fp32 graph (a `Builder`), for LiteRT and TFLite Micro.

    b = build_model(model, seq_len=128)                       # the fp32 graph
    ranges = calibrate(b, calib_inputs)                       # min/max of every float tensor
    model_bytes = quantize_graph(b, ranges, mode="hybrid").finish()

Modes:
- "hybrid": the matrix ops (FULLY_CONNECTED, BATCH_MATMUL, CONV_2D) and the embedding GATHER run in
  int8; LayerNorm, softmax, GELU, residual adds stay float, with QUANTIZE / DEQUANTIZE between.
  Accurate; this is the int8 model the edge (LiteRT) benchmark reports.
- "full": every op with an int8 kernel in both runtimes runs int8 too (ADD, SUB, MUL, MEAN,
  SQUARED_DIFFERENCE, RSQRT, SOFTMAX, LOGISTIC, ...); only the attention-mask derivation and
  the pooling division stay float. This is the graph TFLite Micro's arena figure is about.

Numerics follow `base.quant` (TFLite's convention): weights int8 symmetric per output channel,
bias int32 at s_in * s_w, activations int8 per tensor from calibrated min/max. The multipliers
themselves are derived by the interpreters from the scales written here.
"""
from __future__ import annotations

import re

import numpy as np

from base import quant as Q
from base.errors import TinyshieldError
from edge.litert.schema import OP_NAMES
from edge.litert.writer import OPS, Builder, Quant

MATRIX_OPS = {OPS.FULLY_CONNECTED, OPS.BATCH_MATMUL, OPS.CONV_2D}
FOLLOW_INPUT = {OPS.RESHAPE, OPS.TRANSPOSE, OPS.PAD, OPS.STRIDED_SLICE}   # same quantisation in and out
INT8_OPS = {
    "hybrid": MATRIX_OPS | {OPS.GATHER},
    "full": MATRIX_OPS | {OPS.GATHER, OPS.ADD, OPS.SUB, OPS.MUL, OPS.MEAN, OPS.SUM, OPS.SQUARED_DIFFERENCE,
                          OPS.RSQRT, OPS.SOFTMAX, OPS.LOGISTIC, OPS.TANH},
}
FLOAT_ONLY = {OPS.CAST, OPS.MINIMUM, OPS.DIV, OPS.L2_NORMALIZATION}
# ops whose int8 output quantisation is fixed by the kernels
FIXED_OUT = {OPS.SOFTMAX: (1 / 256, -128), OPS.LOGISTIC: (1 / 256, -128), OPS.TANH: (1 / 128, 0)}
# which inputs are the (per-channel) weights and bias
WEIGHT_POS = {OPS.FULLY_CONNECTED: (1, 2), OPS.CONV_2D: (1, 2)}
QUANT_DTYPES = ("float32", "int8", "int16")
SENTINEL = -1e8          # values below are "minus infinity" (the attention mask), not data
MASK_MARGIN = 24.0       # masked scores sit this far below the top of the range: exp(-24) is 0 in int8


class Ranges(dict):
    """tensor name -> (lo, hi, saw_sentinel)."""


def calibrate(b: Builder, inputs, percentile: float = 100.0, progress=None) -> Ranges:
    """Run the fp32 graph in LiteRT on each calibration input (a list of arrays per sample, or one
    array) and record every float tensor's range: min/max, or with `percentile` < 100 the mean
    per-sample percentiles (base.quant.RangeObserver), which clips rare outliers."""
    from edge.litert.runtime import Interpreter
    interp = Interpreter(b.finish(), xnnpack=False, preserve_all=True)
    details = [d for d in interp.interp.get_tensor_details() if d["dtype"] == np.float32]
    observers: dict[str, Q.RangeObserver] = {}
    sentinel: dict[str, bool] = {}
    n = 0
    for x in inputs:
        interp.run(x)
        n += 1
        for d in details:
            v = interp.interp.get_tensor(d["index"])
            if v is None or v.size == 0:
                continue
            real = v[v > SENTINEL]
            name = d["name"]
            sentinel[name] = sentinel.get(name, False) or bool(real.size < v.size)
            observers.setdefault(name, Q.RangeObserver(percentile)).update(real if real.size else np.zeros(1))
        if progress:
            progress()
    if n == 0:
        raise TinyshieldError("calibration set is empty: give at least one calibration input")
    return Ranges({k: (*o.range(), sentinel[k]) for k, o in observers.items()})


def _act_quant(lo: float, hi: float, sentinel: bool) -> Quant:
    if sentinel:  # masked attention scores: keep real scores resolvable, saturate the mask to the bottom
        lo = min(lo, hi - MASK_MARGIN)
    q = Q.choose_activation_qparams(lo, hi)
    return Quant.per_tensor(float(np.float32(q.scale)), q.zero_point)


def _const_quant(a: np.ndarray) -> tuple[np.ndarray, Quant]:
    """Per-tensor int8 for a constant operand of an int8 elementwise op."""
    q = Q.choose_activation_qparams(float(a.min()), float(a.max()))
    s = float(np.float32(q.scale))
    return Q.quantize(a, s, q.zero_point), Quant.per_tensor(s, q.zero_point)


def quantize_graph(b: Builder, ranges: Ranges, mode: str = "hybrid", int8_io: bool = False,
                   float_modules: tuple[str, ...] = (), wide_modules: str | None = None) -> Builder:
    """A new Builder computing `b` in int8 (see the module docstring).

    int8_io: float graph inputs and outputs become int8 (the caller quantises/dequantises);
    int32 inputs stay. float_modules: ops lowered from a module whose path contains one of
    these strings stay float. wide_modules: a regex; matrix ops of matching modules take and give
    int16 activations (symmetric) with int8 weights and int64 bias — TFLite's 16x8 scheme, for
    layers whose inputs have outliers (BERT's FFN output projection)."""
    if mode not in INT8_OPS:
        raise TinyshieldError(f"unknown int8 mode {mode!r}: use hybrid or full")
    int8_ops = INT8_OPS[mode]
    wide = re.compile(wide_modules) if wide_modules else None
    qb = Builder(b.name + f"-int8-{mode}")
    native: dict[int, int] = {}                   # old tensor -> new tensor in the domain it was computed in
    copies: dict[tuple[int, str], int] = {}       # (old tensor, dtype) -> converted copy
    pinned: set[int] = set()                      # float tensors on the mask path: they stay float

    def act_q(t: int, dtype: str = "int8") -> Quant:
        name = b.tensors[t].name
        if name not in ranges:
            raise TinyshieldError(f"tensor {name} was not seen during calibration (is it computed?)")
        return _act_quant(*ranges[name]) if dtype == "int8" else _wide_quant(*ranges[name])

    for t in b.inputs:
        info = b.tensors[t]
        if info.dtype == np.float32 and int8_io:
            native[t] = qb.input(info.name, info.shape, np.int8, act_q(t))
        else:
            native[t] = qb.input(info.name, info.shape, info.dtype)

    def get(t: int, want: str) -> int:
        """Tensor t as float32 / int8 / int16, converting (once) if it was computed in another."""
        n = native[t]
        have = str(qb.dtype(n))
        if have == want or have not in QUANT_DTYPES:
            return n
        if (t, want) not in copies:
            nm = b.tensors[t].name
            src = n if want == "float32" or have == "float32" else get(t, "float32")
            copies[(t, want)] = (qb.dequantize(src, name=f"{nm}/dq") if want == "float32"
                                 else qb.quantize(src, act_q(t, want), dtype=want, name=f"{nm}/q{want[3:]}"))
        return copies[(t, want)]

    for k, (op, code) in enumerate(zip(b.operators, b.op_codes)):
        ins, outs = list(op.inputs), list(op.outputs)
        src = b.op_sources[k]
        acts = [t for t in ins if t >= 0 and b.tensors[t].data is None and b.tensors[t].dtype == np.float32]
        # the mask path (float computed from int32 ids and constants only) stays float
        on_mask_path = code == OPS.CAST or (bool(acts) and all(t in pinned for t in acts))
        if code in FOLLOW_INPUT:
            dom = str(qb.dtype(native[ins[0]]))
        elif code in int8_ops and code not in FLOAT_ONLY and not on_mask_path \
                and not any(f in src for f in float_modules):
            dom = "int16" if wide and code in MATRIX_OPS and wide.search(src) else "int8"
        else:
            dom = "float32"
        if on_mask_path and dom == "float32":
            pinned.update(t for t in outs if b.tensors[t].dtype == np.float32)
        qb.source = src
        new_ins: list[int] = []
        for pos, t in enumerate(ins):
            info = b.tensors[t] if t >= 0 else None
            if t < 0:
                new_ins.append(-1)
            elif info.data is not None:
                new_ins.append(_const(qb, info, code, pos, dom, new_ins))
            else:
                new_ins.append(get(t, dom) if info.dtype == np.float32 else native[t])
        new_outs = []
        for t in outs:
            info = b.tensors[t]
            if dom == "float32" or info.dtype != np.float32:
                new_outs.append(qb.tensor(info.name, info.shape, info.dtype))
                continue
            if code in FOLLOW_INPUT or code == OPS.GATHER:
                q = qb.quant(new_ins[0])
            elif code in FIXED_OUT:
                q = Quant.per_tensor(*FIXED_OUT[code])
            else:
                q = act_q(t, dom)
            new_outs.append(qb.tensor(info.name, info.shape, np.dtype(dom), q))
        qb.op(code, new_ins, new_outs, op.builtinOptions, op.builtinOptionsType)
        for t, n in zip(outs, new_outs):
            native[t] = n

    qb.outputs = [get(t, "int8" if int8_io else "float32") if b.tensors[t].dtype == np.float32 else native[t]
                  for t in b.outputs]
    return qb


def _wide_quant(lo: float, hi: float, sentinel: bool) -> Quant:
    """int16 activations are symmetric (zero point 0), as TFLite's 16x8 kernels require."""
    a = max(abs(lo), abs(hi))
    return Quant.per_tensor(float(np.float32(a / 32767.0 if a > 0 else 1.0 / 32767.0)), 0)


def _const(qb: Builder, info, code: int, pos: int, dom: str, new_ins: list[int]) -> int:
    a = info.data
    if a.dtype != np.float32 or dom == "float32":
        return qb.const(info.name, a)
    if code in WEIGHT_POS and pos == WEIGHT_POS[code][0]:
        w, scales = Q.quantize_weights_per_channel(a, axis=0)
        scales = scales.astype(np.float32)
        return qb.const(info.name, w, quant=Quant(tuple(map(float, scales)), (0,) * len(scales), 0))
    if code in WEIGHT_POS and pos == WEIGHT_POS[code][1]:
        s_in = np.float32(qb.quant(new_ins[0]).scale[0])
        s_w = np.array(qb.quant(new_ins[1]).scale, np.float32)
        s_b = (s_in * s_w).astype(np.float32)
        q = Q.round_half_away(a.astype(np.float64) / s_b.astype(np.float64))
        # int8 kernels take an int32 bias, the 16x8 kernels an int64 one
        bias = Q.saturate(q, np.int32) if dom == "int8" else q.astype(np.int64)
        return qb.const(info.name, bias, dtype=bias.dtype, quant=Quant(tuple(map(float, s_b)), (0,) * len(s_b), 0))
    if code == OPS.BATCH_MATMUL or dom != "int8":
        raise TinyshieldError(f"{info.name}: constant operands of {OP_NAMES[code]} in {dom} are not supported")
    q, quant = _const_quant(a)
    return qb.const(info.name, q, quant=quant)


def op_summary(b: Builder) -> dict[str, dict[str, int]]:
    """{op name: {dtype of its first output: count}} — which ops ended up int8."""
    out: dict[str, dict[str, int]] = {}
    for op, code in zip(b.operators, b.op_codes):
        dt = str(b.tensors[op.outputs[0]].dtype)
        d = out.setdefault(OP_NAMES[code], {})
        d[dt] = d.get(dt, 0) + 1
    return out
