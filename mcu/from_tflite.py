"""A .tflite model (made by any converter) -> the int8 `Graph`, computing what TFLite Micro computes.

The flatbuffer is checked first (edge.litert.validate: a truncated or corrupt file is one error, no
native code touches it). Then one walk over subgraph 0's operators in order, each handled by a small
rule (`RULES`) that maps it to kernels reproducing TFLite Micro's *reference* int8 arithmetic with
the file's own scales, zero points and integer weights (no requantisation of ours: the file is the
quantisation). Values are symbolic per tensor index: `Act` (an int8 activation: a graph tensor,
its shape and quantisation; RESHAPE and friends only change the shape), or a numpy constant.

GELU, which TFLite Micro does not have, is LiteRT's int8 GELU (its 256-entry float32 table); a model with
one records it in `meta["not_in_micro"]` and is checked against LiteRT's interpreter instead.

Edges: an int8 input is the board's input as is; a float input followed by QUANTIZE is quantised on
the host exactly as TFLite does (float32 x / scale, rounded half away from zero); a DEQUANTIZE at the
end is done on the host. Anything else without a rule is refused, naming the operator's index, its
name and its tensors, before any code is generated.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from base import quant as Q
from base.errors import TinyshieldError
from edge.litert.schema import NUMPY_TYPES, OP_NAMES, fb
from edge.litert.validate import validate
from mcu import kernels as K
from mcu import tflite_kernels as T
from mcu.graph import Graph, QParams
from mcu.lower import MAX_K, Builder


@dataclass(frozen=True)
class Act:
    tensor: str            # graph tensor holding the bytes (row-major, contiguous)
    shape: tuple
    scale: float
    zp: int
    dtype: str = "int8"


ACTIVATIONS = {fb.ActivationFunctionType.NONE: "NONE", fb.ActivationFunctionType.RELU: "RELU",
               fb.ActivationFunctionType.RELU6: "RELU6"}


def read(model) -> tuple[bytes, str]:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "model bytes"
    p = Path(model)
    if not p.is_file():
        raise TinyshieldError(f"{p}: .tflite file not found")
    return p.read_bytes(), str(p)


class Import:
    def __init__(self, m: fb.ModelT, data: bytes, where: str, name: str):
        self.m, self.data, self.where = m, data, where
        self.sg = m.subgraphs[0]
        self.codes = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.operatorCodes]
        self.b = Builder(name)
        self.env: dict[int, object] = {}
        self.meta: dict = {"source": "tflite"}
        self.index = 0

    # -------------------------------------------------- tensors
    def tname(self, i: int) -> str:
        n = self.sg.tensors[i].name
        return n.decode(errors="replace") if isinstance(n, bytes) else str(n)

    def shape(self, i: int) -> tuple:
        s = self.sg.tensors[i].shape
        return tuple(int(v) for v in (s if s is not None else []))

    def qparams(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.sg.tensors[i].quantization
        if q is None or q.scale is None or not len(q.scale):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return np.asarray(q.scale, np.float32), np.asarray(q.zeroPoint, np.int64)

    def const(self, i: int) -> np.ndarray | None:
        t = self.sg.tensors[i]
        if not self.m.buffers:
            return None
        buf = self.m.buffers[t.buffer]
        if buf.data is not None and len(buf.data):
            raw = bytes(bytearray(buf.data))
        elif (buf.offset or 0) > 1:          # stored after the flatbuffer (validate checked the range)
            raw = self.data[int(buf.offset):int(buf.offset) + int(buf.size)]
        else:
            return None
        return np.frombuffer(raw, dtype=NUMPY_TYPES[t.type]).reshape(self.shape(i))

    def value(self, i: int):
        if i in self.env:
            return self.env[i]
        c = self.const(i)
        if c is None:
            raise self.fail(f"tensor {i} ({self.tname(i)}) is read before any operator writes it")
        return c

    def act(self, i: int, what: str = "input", int16: bool = False) -> Act:
        """An int8 activation operand (or int16 where the op takes it); a constant operand becomes an int8
        constant tensor of the graph."""
        v = self.value(i)
        if isinstance(v, Act):
            if v.dtype != "int8" and not int16:
                raise self.fail(f"{what} {self.tname(i)} has {v.dtype} activations: on the board int16 is "
                                "supported by QUANTIZE and MEAN only")
            return v
        if not isinstance(v, np.ndarray):
            raise self.fail(f"{what} {self.tname(i)} is a {type(v).__name__} value, which only a convolution can read")
        t = self.sg.tensors[i]
        if t.type != fb.TensorType.INT8:
            raise self.fail(f"{what} {self.tname(i)} is a {np.dtype(NUMPY_TYPES[t.type]).name} constant "
                            "(int8 expected)")
        s, z = self.qparams(i)
        name = f"c{i}"
        if name not in self.b.tensors:
            self.b.const(name, np.ascontiguousarray(v.reshape(-1) if v.ndim else v.reshape(1)),
                         QParams((float(s[0]),), int(z[0])))
        return Act(name, v.shape, float(s[0]), int(z[0]))

    def out(self, i: int, int16: bool = False) -> Act:
        t = self.sg.tensors[i]
        types = {fb.TensorType.INT8: "int8", **({fb.TensorType.INT16: "int16"} if int16 else {})}
        if t.type not in types:
            raise self.fail(f"output {self.tname(i)} is {np.dtype(NUMPY_TYPES[t.type]).name}: only int8 "
                            "activations are supported here" + (" (and int16)" if int16 else ""))
        s, z = self.qparams(i)
        if not len(s):
            raise self.fail(f"output {self.tname(i)} is not quantised")
        a = Act(f"t{i}", self.shape(i), float(s[0]), int(z[0]), types[t.type])
        self.b.act(a.tensor, a.shape or (1,), Q.ActQ(a.scale, a.zp), dtype=a.dtype)
        self.env[i] = a
        return a

    def fail(self, what: str) -> TinyshieldError:
        op = self.sg.operators[self.index] if self.sg.operators else None
        if op is None:
            return TinyshieldError(f"{self.where}: {what}")
        name = OP_NAMES[self.codes[op.opcodeIndex]]
        ins = ", ".join(self.tname(i) for i in op.inputs if i >= 0)
        return TinyshieldError(f"{self.where}: operator {self.index} ({name}, inputs {ins}): {what}")

    # -------------------------------------------------- the walk
    def run(self) -> Graph:
        sg = self.sg
        if len(self.m.subgraphs) != 1:
            raise TinyshieldError(f"{self.where}: {len(self.m.subgraphs)} subgraphs; only single-subgraph models "
                                  "(no control flow) are supported")
        if len(sg.inputs) != 1 or len(sg.outputs) != 1:
            raise TinyshieldError(f"{self.where}: the model has {len(sg.inputs)} inputs and {len(sg.outputs)} "
                                  "outputs; a board model takes one and returns one")
        self.input(int(sg.inputs[0]))
        ops = list(sg.operators or [])
        for self.index, op in enumerate(ops):
            name = OP_NAMES[self.codes[op.opcodeIndex]]
            if name == "QUANTIZE" and self.index == 0 and int(op.inputs[0]) == int(sg.inputs[0]) and \
                    self.meta["input_kind"] == "tflite-float":
                self.quantize_input(op)
                continue
            if name == "DEQUANTIZE" and int(op.outputs[0]) == int(sg.outputs[0]):
                self.meta["dequantize"] = True
                self.env[int(op.outputs[0])] = self.value(int(op.inputs[0]))
                continue
            rule = RULES.get(name)
            if rule is None:
                outs = ", ".join(self.tname(i) for i in op.outputs)
                raise self.fail(f"operator {name} is not supported on the board (outputs {outs}); supported: "
                                f"{', '.join(sorted(RULES))}")
            rule(self, op, op.builtinOptions)
        out = self.value(int(sg.outputs[0]))
        if not isinstance(out, Act):
            raise TinyshieldError(f"{self.where}: the model's output does not depend on its input")
        self.rename(out.tensor, "output")
        self.meta.update(output_q=(out.scale, out.zp), output_shape=self.shape(int(sg.outputs[0])))
        from mcu.from_aten import eliminate_dead
        g = self.b.graph(["input"], ["output"], self.meta)
        eliminate_dead(g)
        return g

    def input(self, i: int) -> None:
        t = self.sg.tensors[i]
        shape = self.shape(i)
        if t.type == fb.TensorType.INT8:
            s, z = self.qparams(i)
            a = Act("input", shape, float(s[0]), int(z[0]))
            self.b.act("input", shape, Q.ActQ(a.scale, a.zp))
            self.env[i] = a
            self.meta.update(input_kind="tflite-int8", input_q=(a.scale, a.zp), input_shape=shape)
        elif t.type == fb.TensorType.INT32:        # token ids (read by GATHER)
            self.b.act("input", shape, None, dtype="int32")
            self.env[i] = Act("input", shape, 1.0, 0, "int32")
            self.meta.update(input_kind="tflite-int32", input_shape=shape)
        elif t.type == fb.TensorType.FLOAT32:
            self.meta.update(input_kind="tflite-float", input_shape=shape)
        else:
            raise TinyshieldError(f"{self.where}: input {self.tname(i)} of type {np.dtype(NUMPY_TYPES[t.type]).name}"
                                  " is not supported (int8, or float32 followed by QUANTIZE)")

    def quantize_input(self, op) -> None:
        o = int(op.outputs[0])
        if self.sg.tensors[o].type != fb.TensorType.INT8:
            raise self.fail("the input is quantised to a type other than int8")
        s, z = self.qparams(o)
        self.b.act("input", self.shape(o), Q.ActQ(float(s[0]), int(z[0])))
        self.env[o] = Act("input", self.shape(o), float(s[0]), int(z[0]))
        self.meta["input_q"] = (float(s[0]), int(z[0]))

    def rename(self, old: str, new: str) -> None:
        if old == new:
            return
        if self.b.tensors[old].kind != "activation":
            raise TinyshieldError(f"{self.where}: the model's output is its input or a constant")
        t = self.b.tensors.pop(old)
        t.name = new
        self.b.tensors[new] = t
        for op in self.b.ops:
            op.inputs = [new if x == old else x for x in op.inputs]
            op.outputs = [new if x == old else x for x in op.outputs]

    def opname(self, op) -> str:
        return f"op{self.index}.{OP_NAMES[self.codes[op.opcodeIndex]].lower()}"

    def act_range(self, opts, y: Act) -> tuple[int, int]:
        fn = getattr(opts, "fusedActivationFunction", fb.ActivationFunctionType.NONE)
        kind = ACTIVATIONS.get(fn)
        if kind is None:
            raise self.fail(f"fused activation {fn} is not supported (NONE, RELU, RELU6)")
        lo, hi = -128, 127
        if kind in ("RELU", "RELU6"):
            lo = max(lo, y.zp)
        if kind == "RELU6":
            hi = min(hi, y.zp + int(Q.round_half_away(6.0 / np.float32(y.scale))))
        return lo, hi


# ---------------------------------------------------------------- rules

def _weights(imp: Import, op, x: Act, axis: int, w=None):
    """The int8 weights (output channels first), their per-channel scales and the int32 bias."""
    w = imp.const(int(op.inputs[1])) if w is None else w
    if w is None or w.dtype != np.int8:
        raise imp.fail("the weights must be a constant int8 tensor")
    ws, wz = imp.qparams(int(op.inputs[1]))
    if len(wz) and np.any(wz != 0):
        raise imp.fail("weights with a nonzero zero point are not supported")
    N = w.shape[axis]
    ws = np.broadcast_to(ws, (N,)) if len(ws) == 1 else ws
    bias = np.zeros(N, np.int64)
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bv = imp.const(int(op.inputs[2]))
        if bv is None or bv.dtype != np.int32:
            raise imp.fail("the bias must be a constant int32 tensor")
        bias = bv.astype(np.int64)
    return w, ws, bias


def _multipliers(x_scale, ws, y_scale):
    reals = [float(np.float32(x_scale)) * float(s) / float(np.float32(y_scale)) for s in ws]
    return Q.quantize_multipliers(reals)


def _folded_bias(imp: Import, bias, rows: np.ndarray, x_zp: int) -> np.ndarray:
    b = bias - x_zp * rows.astype(np.int64).sum(1)
    if np.abs(b).max(initial=0) > Q.INT32_MAX:
        raise imp.fail("the bias with the input zero point folded in does not fit int32")
    return b.astype(np.int32)


def fully_connected(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]))
    w, ws, bias = _weights(imp, op, x, 0)
    N, Kd = w.shape
    if Kd > MAX_K:
        raise imp.fail(f"{Kd} inputs could overflow the int32 accumulator")
    y = imp.out(int(op.outputs[0]))
    lo, hi = imp.act_range(opts, y)
    M = int(np.prod(x.shape)) // Kd
    name = imp.opname(op)
    imp.b.op("fully_connected", name, _weight_inputs(imp, name, w, ws, bias, x, y),
             [y.tensor], M=M, K=Kd, N=N, x_zp=x.zp, y_zp=y.zp, act_min=lo, act_max=hi)


def _weight_inputs(imp, name: str, rows: np.ndarray, ws, bias, x, y) -> list[str]:
    """A fully-connected or conv layer's constants — int8 weight rows packed for the kernel, the bias with the
    input zero point folded in, the per-channel requantisation — added to the graph; returns the op's inputs."""
    m, s = _multipliers(x.scale, ws, y.scale)
    imp.b.const(f"{name}.weight", K.pack_fc_weights(rows).reshape(rows.shape), QParams(tuple(map(float, ws)), 0, 0))
    imp.b.const(f"{name}.bias", _folded_bias(imp, bias, rows, x.zp))
    imp.b.const(f"{name}.mult", m)
    imp.b.const(f"{name}.shift", s)
    return [x.tensor, f"{name}.weight", f"{name}.bias", f"{name}.mult", f"{name}.shift"]


@dataclass(frozen=True)
class Padded:
    """A PAD output: convolutions take it as their padding (TFLite pads int8 with the zero point, which
    is what conv2d_s8's padding reads as)."""
    a: Act
    pads: tuple          # ((before, after) per dimension)


def pad(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]))
    pads = tuple(tuple(int(v) for v in row) for row in imp.const(int(op.inputs[1])).reshape(-1, 2))
    ys, yz = imp.qparams(int(op.outputs[0]))
    if len(x.shape) != 4 or any(pads[i] != (0, 0) for i in (0, 3)) or int(yz[0]) != x.zp or \
            np.float32(ys[0]) != np.float32(x.scale) or len(op.inputs) > 2 and op.inputs[2] >= 0:
        raise imp.fail("PAD is supported only as the spatial zero padding of a convolution's NHWC input")
    imp.env[int(op.outputs[0])] = Padded(x, pads)


def _conv_input(imp: Import, op) -> tuple[Act, tuple]:
    v = imp.value(int(op.inputs[0]))
    if isinstance(v, Padded):
        return v.a, v.pads[1] + v.pads[2]
    return imp.act(int(op.inputs[0])), (0, 0, 0, 0)


def _same_pad(size: int, out: int, k: int, stride: int, dilation: int) -> int:
    """TFLite's SAME padding before the image (ComputePaddingHeightWidth): half the total, rounded down."""
    return max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0) // 2


def depthwise_conv_2d(imp: Import, op, opts):
    """DEPTHWISE_CONV_2D with any depth multiplier, strides, dilation and padding (a PAD in front folded
    in): depthwise_s8. A one-channel image with a square kernel, equal strides and padding is an
    ordinary convolution with one input channel (the same arithmetic): conv2d_s8, the faster kernel."""
    x, extra = _conv_input(imp, op)
    w = imp.const(int(op.inputs[1]))
    if w is None or w.ndim != 4 or w.shape[0] != 1:
        raise imp.fail("the weights must be a constant (1, kh, kw, channels) tensor")
    if len(x.shape) != 4 or x.shape[0] != 1:
        raise imp.fail(f"input {x.shape} is not a batch-1 NHWC image")
    _, H, W, C = x.shape
    _, kh, kw, Co = w.shape
    y = imp.out(int(op.outputs[0]))
    _, Hout, Wout, _ = y.shape
    sh, sw, dh, dw = opts.strideH, opts.strideW, opts.dilationHFactor, opts.dilationWFactor
    if Co % C or y.shape[3] != Co:
        raise imp.fail(f"{Co} weight channels for an input of {C} channels and an output of {y.shape[3]}")
    same = opts.padding == fb.Padding.SAME
    pad_h = extra[0] + (_same_pad(H + extra[0] + extra[1], Hout, kh, sh, dh) if same else 0)
    pad_w = extra[2] + (_same_pad(W + extra[2] + extra[3], Wout, kw, sw, dw) if same else 0)
    if C == 1 and kh == kw and sh == sw and dh == dw == 1 and pad_h == pad_w and \
            (Hout - 1) * sh + kh <= H + 2 * pad_h and (Wout - 1) * sw + kw <= W + 2 * pad_w:
        conv_2d(imp, op, opts, w.transpose(3, 1, 2, 0))
        return
    w, ws, bias = _weights(imp, op, x, 3, w)
    m, s = _multipliers(x.scale, ws, y.scale)
    lo, hi = imp.act_range(opts, y)
    name = imp.opname(op)
    imp.b.const(f"{name}.weight", np.ascontiguousarray(w.reshape(kh, kw, Co)), QParams(tuple(map(float, ws)), 0, 2))
    imp.b.const(f"{name}.bias", bias.astype(np.int32))
    imp.b.const(f"{name}.mult", m)
    imp.b.const(f"{name}.shift", s)
    imp.b.op("tfl_depthwise", name, [x.tensor] + [f"{name}.{k}" for k in ("weight", "bias", "mult", "shift")],
             [y.tensor], H=H, W=W, C=C, dm=Co // C, Hout=Hout, Wout=Wout, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw,
             pad_h=pad_h, pad_w=pad_w, x_zp=x.zp, y_zp=y.zp, act_min=lo, act_max=hi)


def conv_2d(imp: Import, op, opts, weights=None):
    x, extra = _conv_input(imp, op)
    w, ws, bias = _weights(imp, op, x, 0, weights)
    Cout, kh, kw, Cin = w.shape
    if kh != kw or opts.strideH != opts.strideW or opts.dilationHFactor != 1 or opts.dilationWFactor != 1:
        raise imp.fail(f"only square kernels with equal strides and no dilation are supported "
                       f"(kernel {kh}x{kw}, stride {opts.strideH}x{opts.strideW})")
    if len(x.shape) != 4 or x.shape[0] != 1 or x.shape[3] != Cin:
        raise imp.fail(f"input {x.shape} is not a batch-1 NHWC image of {Cin} channels")
    _, H, W, _ = x.shape
    y = imp.out(int(op.outputs[0]))
    _, Hout, Wout, _ = y.shape
    st = opts.strideH
    Hp, Wp = H + extra[0] + extra[1], W + extra[2] + extra[3]
    pad_h = max((Hout - 1) * st + kh - Hp, 0) // 2 if opts.padding == fb.Padding.SAME else 0
    pad_w = max((Wout - 1) * st + kw - Wp, 0) // 2 if opts.padding == fb.Padding.SAME else 0
    pad_h, pad_w = pad_h + extra[0], pad_w + extra[2]
    # conv2d_s8 pads pad rows/columns before and as many after as the output needs
    if pad_h != pad_w or (Hout - 1) * st + kh > H + 2 * pad_h or (Wout - 1) * st + kw > W + 2 * pad_w:
        raise imp.fail(f"padding {extra} / {pad_h} (rows) and {pad_w} (columns) is not supported "
                       "(equal before rows and columns, at most as much after)")
    P, Kp = kh * kw * Cin, K.conv_patch_len(kh, Cin)
    if Kp > K.CONV_PATCH_MAX:
        raise imp.fail(f"a {kh}x{kw}x{Cin} patch is longer than the conv kernel's {K.CONV_PATCH_MAX}")
    rows = np.zeros((Cout, Kp), np.int8)
    rows[:, :P] = w.reshape(Cout, P)
    lo, hi = imp.act_range(opts, y)
    name = imp.opname(op)
    imp.b.op("conv2d", name, _weight_inputs(imp, name, rows, ws, bias, x, y),
             [y.tensor], H=H, W=W, Cin=Cin, Cout=Cout, Hout=Hout, Wout=Wout, ksize=kh, stride=st, pad=pad_h,
             x_zp=x.zp, y_zp=y.zp, act_min=lo, act_max=hi)


def binary(imp: Import, op, opts):
    kind = OP_NAMES[imp.codes[op.opcodeIndex]]
    a, b = imp.act(int(op.inputs[0])), imp.act(int(op.inputs[1]))
    y = imp.out(int(op.outputs[0]))
    if max(len(a.shape), len(b.shape), len(y.shape)) > 4:
        raise imp.fail("broadcasting over more than 4 dimensions is not supported")
    lo, hi = imp.act_range(opts, y) if opts is not None else (-128, 127)
    name = imp.opname(op)
    imp.b.const(f"{name}.dims", T.broadcast_dims(y.shape, a.shape, b.shape))
    imp.b.const(f"{name}.params", T.binary_params(kind, a.scale, b.scale, y.scale, a.zp, b.zp, y.zp, lo, hi))
    imp.b.op("tfl_binary", name, [a.tensor, b.tensor, f"{name}.dims", f"{name}.params"], [y.tensor],
             op=T.BINARY_OPS[kind])


def mean(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]), int16=True)
    axes = sorted({int(a) % len(x.shape) for a in np.ravel(imp.const(int(op.inputs[1])))})
    axes = [a for a in axes if x.shape[a] != 1] or axes[:1]     # a size-1 axis reduces to itself
    if axes != list(range(axes[0], axes[-1] + 1)):
        raise imp.fail(f"MEAN over non-adjacent axes {axes} is not supported")
    y = imp.out(int(op.outputs[0]), int16=True)
    if y.dtype != x.dtype:
        raise imp.fail(f"MEAN from {x.dtype} to {y.dtype} is not supported")
    outer = int(np.prod(x.shape[:axes[0]]))
    n = int(np.prod(x.shape[axes[0]:axes[-1] + 1]))
    inner = int(np.prod(x.shape[axes[-1] + 1:]))
    m, s = T.mean_params(x.scale, y.scale, n)
    imp.b.op("tfl_mean", imp.opname(op), [x.tensor], [y.tensor], outer=outer, n=n, inner=inner, x_zp=x.zp,
             mult=m, shift=s, y_zp=y.zp, int16=int(x.dtype == "int16"))


def average_pool_2d(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]))
    y = imp.out(int(op.outputs[0]))
    if len(x.shape) != 4 or x.shape[0] != 1:
        raise imp.fail(f"input {x.shape} is not a batch-1 NHWC image")
    _same_q(imp, x, y)
    _, H, W, C = x.shape
    _, Hout, Wout, _ = y.shape
    kh, kw, sh, sw = opts.filterHeight, opts.filterWidth, opts.strideH, opts.strideW
    same = opts.padding == fb.Padding.SAME
    pad_h = max((Hout - 1) * sh + kh - H, 0) // 2 if same else 0
    pad_w = max((Wout - 1) * sw + kw - W, 0) // 2 if same else 0
    lo, hi = imp.act_range(opts, y)
    imp.b.op("tfl_avg_pool", imp.opname(op), [x.tensor], [y.tensor], H=H, W=W, C=C, Hout=Hout, Wout=Wout, kh=kh,
             kw=kw, sh=sh, sw=sw, pad_h=pad_h, pad_w=pad_w, act_min=lo, act_max=hi)


def softmax(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]))
    y = imp.out(int(op.outputs[0]))
    if y.zp != -128 or np.float32(y.scale) != np.float32(1 / 256):
        raise imp.fail(f"int8 SOFTMAX output must have scale 1/256 and zero point -128 (has {y.scale}, {y.zp})")
    m, ls, dmin = T.softmax_params(x.scale, opts.beta)
    depth = x.shape[-1]
    imp.b.op("tfl_softmax", imp.opname(op), [x.tensor], [y.tensor], rows=int(np.prod(x.shape)) // depth,
             depth=depth, mult=m, left_shift=ls, diff_min=dmin)


def quantize(imp: Import, op, opts):
    """QUANTIZE between int8 and int16 activations (or an int8 rescale)."""
    x = imp.act(int(op.inputs[0]), int16=True)
    if x.dtype == "int8" and imp.sg.tensors[int(op.outputs[0])].type == fb.TensorType.INT8:
        return pointwise(imp, op, opts)
    y = imp.out(int(op.outputs[0]), int16=True)
    if x.dtype == y.dtype:
        raise imp.fail("an int16 -> int16 QUANTIZE is not supported")
    m, s = T.requant_params(x.scale, y.scale)
    imp.b.op("tfl_requant", imp.opname(op), [x.tensor], [y.tensor], n=int(np.prod(x.shape)), x_zp=x.zp, mult=m,
             shift=s, y_zp=y.zp, to16=int(y.dtype == "int16"))


def pointwise(imp: Import, op, opts):
    kind = OP_NAMES[imp.codes[op.opcodeIndex]]
    x = imp.act(int(op.inputs[0]))
    y = imp.out(int(op.outputs[0]))
    if kind == "LOGISTIC":
        if y.zp != -128:
            raise imp.fail("int8 LOGISTIC output must have zero point -128")
        table = T.logistic_table(x.scale, x.zp)
    elif kind == "TANH":
        if y.zp != 0:
            raise imp.fail("int8 TANH output must have zero point 0")
        table = T.tanh_table(x.scale, x.zp)
    elif kind == "RSQRT":
        table = T.rsqrt_table(x.scale, x.zp, y.scale, y.zp)
    elif kind == "GELU":        # not in TFLite Micro: LiteRT's table (tinyshield eval compares with LiteRT)
        imp.meta["not_in_micro"] = "GELU"
        table = T.litert_gelu_table(x.scale, x.zp, y.scale, y.zp, bool(getattr(opts, "approximate", False)))
    else:
        table = T.requant_table(x.scale, x.zp, y.scale, y.zp)
    name = imp.opname(op)
    imp.b.const(f"{name}.table", table)
    imp.b.op("lut", name, [x.tensor, f"{name}.table"], [y.tensor], n=int(np.prod(x.shape)))


def reshape(imp: Import, op, opts):
    v = imp.value(int(op.inputs[0]))
    x = v if isinstance(v, Act) else imp.act(int(op.inputs[0]))
    o = int(op.outputs[0])
    ys, yz = imp.qparams(o)
    if len(ys) and (np.float32(ys[0]) != np.float32(x.scale) or int(yz[0]) != x.zp):
        raise imp.fail("a reshape that changes the quantisation is not supported")
    imp.env[o] = replace(x, shape=imp.shape(o))


def transpose(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]))
    perm = [int(p) for p in np.ravel(imp.const(int(op.inputs[1])))]
    y = imp.out(int(op.outputs[0]))
    if len(perm) > K.PERMUTE_DIMS:
        raise imp.fail(f"a {len(perm)}-d transpose is not supported (at most {K.PERMUTE_DIMS})")
    _permute(imp, op, x, y, perm)


def _gather(imp: Import, op, x: Act, y: Act, idx: np.ndarray) -> None:
    """y = x.flat[idx] for an idx that is a strided view of x (a slice): one permute_s8 gather."""
    idx = np.asarray(idx, dtype=np.int64).reshape(y.shape or (1,))
    base = int(idx.flat[0]) if idx.size else 0
    strides = [int(np.take(idx, 1, axis=a).flat[0]) - base if n > 1 else 0 for a, n in enumerate(idx.shape)]
    grid = base + sum(np.arange(n).reshape([-1 if b == a else 1 for b in range(idx.ndim)]) * st
                      for a, (n, st) in enumerate(zip(idx.shape, strides)))
    if not np.array_equal(grid, idx) or len(idx.shape) > K.PERMUTE_DIMS:
        raise imp.fail("the copy is not a strided view of its input")
    name = imp.opname(op)
    imp.b.const(f"{name}.dims", K.permute_dims(idx.shape, strides))
    imp.b.op("permute", name, [x.tensor, f"{name}.dims"], [y.tensor], offset=base, nd=K.PERMUTE_DIMS, n=int(idx.size))


def strided_slice(imp: Import, op, opts):
    x = imp.act(int(op.inputs[0]))
    begin, end, step = (np.ravel(imp.const(int(op.inputs[k]))).astype(int) for k in (1, 2, 3))
    if opts.ellipsisMask or opts.newAxisMask or getattr(opts, "offset", False):
        raise imp.fail("STRIDED_SLICE with ellipsis, new-axis or offset masks is not supported")
    sl = []
    for a in range(len(x.shape)):
        b = None if opts.beginMask >> a & 1 else int(begin[a])
        e = None if opts.endMask >> a & 1 else int(end[a])
        if opts.shrinkAxisMask >> a & 1:
            sl.append(int(begin[a]))
        else:
            sl.append(slice(b, e, int(step[a])))
    idx = np.arange(int(np.prod(x.shape))).reshape(x.shape)[tuple(sl)]
    y = imp.out(int(op.outputs[0]))
    if int(np.prod(y.shape)) != idx.size:
        raise imp.fail(f"the slice has {idx.size} elements, its output {y.shape}")
    _same_q(imp, x, y)
    _gather(imp, op, x, y, idx)


def _same_q(imp: Import, x: Act, y: Act) -> None:
    if np.float32(x.scale) != np.float32(y.scale) or x.zp != y.zp:
        raise imp.fail("a copy that changes the quantisation is not supported (TFLite Micro requires the same)")


def concatenation(imp: Import, op, opts):
    if getattr(opts, "fusedActivationFunction", 0) != fb.ActivationFunctionType.NONE:
        raise imp.fail("CONCATENATION with a fused activation is not supported")
    y = imp.out(int(op.outputs[0]))
    parts = [imp.act(int(i)) for i in op.inputs]
    axis = int(opts.axis) % len(y.shape)
    rows = int(np.prod(y.shape[:axis]))
    attrs, off = {}, 0
    for p, a in enumerate(parts):
        _same_q(imp, a, y)
        w = int(np.prod(a.shape[axis:]))
        attrs.update({f"w{p}": w, f"o{p}": off, f"zp{p}": a.zp, f"m{p}": 1 << 30, f"s{p}": 1})
        off += w
    imp.b.op("concat", imp.opname(op), [a.tensor for a in parts], [y.tensor], rows=rows, width=off,
             parts=len(parts), y_zp=y.zp, **attrs)


def gather(imp: Import, op, opts):
    """GATHER of int8 table rows by the model's int32 token ids: embedding_s8 (an id outside the table,
    where TFLite Micro stops with an error, reads row 0)."""
    table = imp.const(int(op.inputs[0]))
    ids = imp.value(int(op.inputs[1]))
    if table is None or table.dtype != np.int8 or table.ndim != 2 or not isinstance(ids, Act) or \
            ids.dtype != "int32" or int(opts.axis) != 0 or getattr(opts, "batchDims", 0):
        raise imp.fail("GATHER is supported as an int8 (vocab, d) table looked up by the int32 input ids")
    s, z = imp.qparams(int(op.inputs[0]))
    y = imp.out(int(op.outputs[0]))
    if np.float32(s[0]) != np.float32(y.scale) or int(z[0]) != y.zp:
        raise imp.fail("GATHER output quantisation differs from its table's")
    name = imp.opname(op)
    imp.b.const(f"{name}.table", np.ascontiguousarray(table))
    V, d = table.shape
    imp.b.op("embedding", name, [ids.tensor, f"{name}.table"], [y.tensor], L=int(np.prod(ids.shape)), d=d, vocab=V)


def _permute(imp: Import, op, x: Act, y: Act, perm, suffix: str = "") -> None:
    strides = [int(np.prod(x.shape[d + 1:])) for d in range(len(x.shape))]
    shape = [x.shape[p] for p in perm]
    name = imp.opname(op) + suffix
    imp.b.const(f"{name}.dims", K.permute_dims(shape, [strides[p] for p in perm]))
    imp.b.op("permute", name, [x.tensor, f"{name}.dims"], [y.tensor], offset=0, nd=K.PERMUTE_DIMS,
             n=int(np.prod(shape)))


def batch_matmul(imp: Import, op, opts):
    """y[b] = lhs[b] rhs[b] as matmul_qk_s8 per batch (which takes rhs as (N, K) rows): an rhs that
    is (K, N) (adj_y false) is transposed once into a buffer of its own, as TFLite Micro does."""
    a, b = imp.act(int(op.inputs[0])), imp.act(int(op.inputs[1]))
    y = imp.out(int(op.outputs[0]))
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise imp.fail("operands must have at least 2 dimensions")
    if opts.adjX:
        a = _transposed(imp, op, a, ".lhs_t")
    if not opts.adjY:
        b = _transposed(imp, op, b, ".rhs_t")
    M, Kd = a.shape[-2:]
    N = b.shape[-2]
    ba, bb = int(np.prod(a.shape[:-2])), int(np.prod(b.shape[:-2]))
    batches = int(np.prod(y.shape[:-2]))
    if ba not in (1, batches) or bb not in (1, batches):
        raise imp.fail(f"batch dimensions {a.shape[:-2]} and {b.shape[:-2]} broadcast only when one is 1")
    real = float(np.float32(np.float32(a.scale) * np.float32(b.scale))) / float(np.float32(y.scale))
    m, s = Q.quantize_multiplier(real)
    imp.b.op("tfl_batch_matmul", imp.opname(op), [a.tensor, b.tensor], [y.tensor], batches=batches, M=M, K=Kd,
             N=N, a_step=M * Kd if ba > 1 else 0, b_step=N * Kd if bb > 1 else 0, a_zp=a.zp, b_zp=b.zp, mult=m,
             shift=s, y_zp=y.zp)


def _transposed(imp: Import, op, x: Act, suffix: str) -> Act:
    """x with its last two dimensions swapped, in a new tensor."""
    nd = len(x.shape)
    perm = list(range(nd - 2)) + [nd - 1, nd - 2]
    shape = tuple(x.shape[p] for p in perm)
    t = Act(f"t{imp.index}{suffix}", shape, x.scale, x.zp)
    imp.b.act(t.tensor, shape, Q.ActQ(x.scale, x.zp))
    _permute(imp, op, x, t, perm, suffix)
    return t


RULES = {
    "FULLY_CONNECTED": fully_connected, "CONV_2D": conv_2d, "DEPTHWISE_CONV_2D": depthwise_conv_2d, "PAD": pad,
    "AVERAGE_POOL_2D": average_pool_2d,
    "ADD": binary, "SUB": binary, "MUL": binary, "SQUARED_DIFFERENCE": binary,
    "MEAN": mean, "SOFTMAX": softmax, "LOGISTIC": pointwise, "TANH": pointwise, "RSQRT": pointwise, "GELU": pointwise,
    "QUANTIZE": quantize,
    "RESHAPE": reshape, "SQUEEZE": reshape, "EXPAND_DIMS": reshape, "TRANSPOSE": transpose,
    "BATCH_MATMUL": batch_matmul, "STRIDED_SLICE": strided_slice, "CONCATENATION": concatenation,
    "GATHER": gather,
}


def lower_tflite(model, name: str | None = None) -> Graph:
    """A .tflite file (path or bytes) -> the int8 Graph computing what TFLite Micro computes."""
    data, where = read(model)
    m = validate(data, where)
    return Import(m, data, where, name or (Path(where).stem if where != "model bytes" else "tflite")).run()


def quantise_input(graph: Graph, x) -> np.ndarray:
    """A raw input -> the board's int8 input: int8 as is; float32 quantised as TFLite's QUANTIZE does
    (float32 x / scale, rounded half away from zero, plus the zero point, saturated)."""
    t = graph.tensors[graph.inputs[0]]
    x = np.asarray(x)
    n = int(np.prod(t.shape))
    if x.size != n:
        raise TinyshieldError(f"input must have {n} values of shape {tuple(graph.meta['input_shape'])}, got {x.shape}")
    if graph.meta["input_kind"] == "tflite-int32":
        if not np.issubdtype(x.dtype, np.integer):
            raise TinyshieldError(f"the model takes int32 token ids, got {x.dtype}")
        return x.astype(np.int32).reshape(t.shape)
    if graph.meta["input_kind"] == "tflite-int8":
        if x.dtype != np.int8:
            raise TinyshieldError(f"the model takes int8 input, got {x.dtype}: quantise it with scale "
                                  f"{graph.meta['input_q'][0]:g} and zero point {graph.meta['input_q'][1]}")
        return x.reshape(t.shape)
    scale, zp = graph.meta["input_q"]
    q = Q.round_half_away(x.astype(np.float32) / np.float32(scale)) + zp
    return np.clip(q, -128, 127).astype(np.int8).reshape(t.shape)


def dequantise_output(graph: Graph, y) -> np.ndarray:
    """The board's int8 output as the model returns it: float32 (y - zp) * scale after a DEQUANTIZE."""
    if not graph.meta.get("dequantize"):
        return np.asarray(y)
    scale, zp = graph.meta["output_q"]
    return ((np.asarray(y).astype(np.int32) - zp).astype(np.float32) * np.float32(scale))


def micro_outputs(model, xs, long_softmax: bool = False) -> tuple[list[np.ndarray], int]:
    """TFLite Micro (the interpreter, on this machine) on raw inputs: its outputs and its arena bytes.
    `long_softmax`: run int8 softmaxes over >= 512 entries too (see edge.litert.runtime: only for inputs
    known not to tie 512 scores at a row's maximum)."""
    from edge.litert.runtime import MicroInterpreter

    data, where = read(model)
    mi = MicroInterpreter(data, long_softmax=long_softmax)
    outs, arena = [], 0
    for x in xs:
        d = mi.interp.get_input_details(0)
        r = mi.run_full(np.asarray(x).reshape(d["shape"]))
        outs.append(r.outputs[0])
        arena = max(arena, r.arena_bytes)
    return outs, arena


def litert_outputs(model, xs) -> list[np.ndarray]:
    """LiteRT's interpreter (its builtin kernels, no XNNPACK delegate) on raw inputs: the reference for a
    model with an operator TFLite Micro lacks (GELU)."""
    from edge.litert.runtime import Interpreter

    it = Interpreter(read(model)[0], xnnpack=False)
    shape = tuple(int(s) for s in it.inputs[0]["shape"])
    return [np.asarray(it.run(np.asarray(x).reshape(shape))) for x in xs]


def largest_difference(graph: Graph, device_outputs, ref) -> int:
    """The largest difference, in steps of the output's scale, between the board's outputs and an
    interpreter's."""
    scale = graph.meta["output_q"][0]
    return max((int(np.rint(np.abs(np.asarray(dequantise_output(graph, y), np.float64).reshape(-1)
                                   - np.asarray(r, np.float64).reshape(-1)).max(initial=0) /
                            (scale if graph.meta.get("dequantize") else 1)))
                for y, r in zip(device_outputs, ref)), default=0)


def agreement(graph: Graph, device_outputs, micro) -> list[int]:
    """Indices where the board's output (as the model returns it) differs from the interpreter's (TFLite
    Micro's, or LiteRT's for a model TFLite Micro cannot run) in any bit."""
    return [i for i, (y, r) in enumerate(zip(device_outputs, micro))
            if not np.array_equal(np.asarray(dequantise_output(graph, y)).reshape(-1).view(np.uint8),
                                  np.asarray(r).reshape(-1).view(np.uint8))]
