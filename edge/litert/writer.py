"""Write .tflite models with the flatbuffer object API: a small graph builder that tracks shapes.

    b = Builder("linear")
    x = b.input("x", (1, 4))
    y = b.fully_connected(x, b.const("w", w), b.const("b", bias))
    model_bytes = b.finish(outputs=[y])

Every op helper takes tensor ids, creates its output tensor (shape inferred, dtype/quantisation
given or inherited) and returns its id. Constant data is stored 16-byte aligned, as the TFLite
converter does, so kernels may read it in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np

from base.errors import TinyshieldError
from edge.litert.schema import IDENTIFIER, SCHEMA_VERSION, TENSOR_TYPES, fb

OPS = fb.BuiltinOperator
ACT = {None: fb.ActivationFunctionType.NONE, "relu": fb.ActivationFunctionType.RELU,
       "relu6": fb.ActivationFunctionType.RELU6}
# ops whose first registered kernel version is above 1 (BROADCAST_TO's version 1 was never a builtin)
VERSIONS = {OPS.BROADCAST_TO: 2}


@dataclass(frozen=True)
class Quant:
    """Affine quantisation of a tensor: real = scale * (q - zero_point); per-channel along `axis`."""
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @staticmethod
    def per_tensor(scale: float, zero_point: int = 0) -> "Quant":
        return Quant((float(scale),), (int(zero_point),))

    def to_fb(self) -> fb.QuantizationParametersT:
        q = fb.QuantizationParametersT()
        # float32 is what the file holds; kernels derive their multipliers from these exact values
        q.scale = [float(np.float32(s)) for s in self.scale]
        q.zeroPoint = [int(z) for z in self.zero_point]
        q.quantizedDimension = self.axis
        return q


class _AlignedBuffer(fb.BufferT):
    """A BufferT whose data vector starts on a 16-byte boundary."""

    def __init__(self, data: np.ndarray | None = None):
        super().__init__()
        self.raw = None if data is None else np.ascontiguousarray(data).view(np.uint8).ravel()

    def Pack(self, builder):
        data = None
        if self.raw is not None and self.raw.size:
            builder.StartVector(1, self.raw.size, 16)
            builder.head -= self.raw.size
            builder.Bytes[builder.head:builder.head + self.raw.size] = self.raw.tobytes()
            data = builder.EndVector()
        fb.BufferStart(builder)
        if data is not None:
            fb.BufferAddData(builder, data)
        return fb.BufferEnd(builder)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quant: Quant | None
    data: np.ndarray | None


class Builder:
    """One subgraph. Tensor ids are indices into the subgraph's tensor list."""

    def __init__(self, name: str = "tinyshield"):
        self.name = name
        self.tensors: list[TensorInfo] = []
        self.operators: list[fb.OperatorT] = []
        self.op_codes: list[int] = []     # builtin code of each operator
        self.op_sources: list[str] = []   # model module each op came from (summaries, errors)
        self.opcodes: dict[int, int] = {}
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self._names: set[str] = set()
        self.source = ""                  # set by exporters while lowering one module

    # ---- tensors -------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        n, i = name, 1
        while n in self._names:
            n, i = f"{name}_{i}", i + 1
        self._names.add(n)
        return n

    def tensor(self, name: str, shape, dtype=np.float32, quant: Quant | None = None,
               data: np.ndarray | None = None) -> int:
        dtype = np.dtype(dtype)
        if dtype not in TENSOR_TYPES:
            raise TinyshieldError(f"tensor {name}: dtype {dtype} has no .tflite equivalent")
        self.tensors.append(TensorInfo(self._unique(name), tuple(int(s) for s in shape), dtype, quant, data))
        return len(self.tensors) - 1

    def const(self, name: str, array, dtype=None, quant: Quant | None = None) -> int:
        a = np.asarray(array, dtype=dtype)
        if dtype is None and a.dtype == np.float64:
            a = a.astype(np.float32)
        if dtype is None and a.dtype == np.int64:  # index/shape constants: .tflite wants int32
            a = a.astype(np.int32)
        return self.tensor(name, a.shape, a.dtype, quant, np.ascontiguousarray(a))

    def input(self, name: str, shape, dtype=np.float32, quant: Quant | None = None) -> int:
        t = self.tensor(name, shape, dtype, quant)
        self.inputs.append(t)
        return t

    def shape(self, t: int) -> tuple[int, ...]:
        return self.tensors[t].shape

    def dtype(self, t: int) -> np.dtype:
        return self.tensors[t].dtype

    def quant(self, t: int) -> Quant | None:
        return self.tensors[t].quant

    def _out(self, like: int, shape, name: str, dtype=None, quant: Quant | None | str = "inherit") -> int:
        q = self.tensors[like].quant if quant == "inherit" else quant
        return self.tensor(name, shape, dtype or self.tensors[like].dtype, q)

    # ---- operators -----------------------------------------------------------------------
    def op(self, code: int, inputs: list[int], outputs: list[int], options=None, options_type: int = 0) -> None:
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        o = fb.OperatorT()
        o.opcodeIndex = self.opcodes[code]
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = options_type, options
        self.operators.append(o)
        self.op_codes.append(code)
        self.op_sources.append(self.source)

    def fully_connected(self, x: int, w: int, b: int | None, act: str | None = None, name: str = "fc",
                        out_dtype=None, out_quant: Quant | None | str = "inherit") -> int:
        """y = x @ w.T + b over the last axis of x (keep_num_dims); w is (out, in) as in torch."""
        n_out, n_in = self.shape(w)
        if self.shape(x)[-1] != n_in:
            raise TinyshieldError(f"{name}: input has {self.shape(x)[-1]} features, weight expects {n_in}")
        y = self._out(x, self.shape(x)[:-1] + (n_out,), name, out_dtype, out_quant)
        opt = fb.FullyConnectedOptionsT()
        opt.fusedActivationFunction = ACT[act]
        opt.keepNumDims = True
        self.op(OPS.FULLY_CONNECTED, [x, w, -1 if b is None else b], [y], opt,
                fb.BuiltinOptions.FullyConnectedOptions)
        return y

    def batch_matmul(self, a: int, b: int, adj_y: bool = False, name: str = "matmul",
                     out_quant: Quant | None | str = "inherit", adj_x: bool = False) -> int:
        sa, sb = self.shape(a), self.shape(b)
        m, n = (sa[-1] if adj_x else sa[-2]), (sb[-2] if adj_y else sb[-1])
        y = self._out(a, tuple(np.broadcast_shapes(sa[:-2], sb[:-2])) + (m, n), name, quant=out_quant)
        opt = fb.BatchMatMulOptionsT()
        opt.adjX, opt.adjY = adj_x, adj_y
        self.op(OPS.BATCH_MATMUL, [a, b], [y], opt, fb.BuiltinOptions.BatchMatMulOptions)
        return y

    def _binary(self, code, opt_cls, opt_type, a, b, name, act=None, out_quant="inherit", out_dtype=None):
        shape = tuple(np.broadcast_shapes(self.shape(a), self.shape(b)))
        y = self._out(a, shape, name, out_dtype, out_quant)
        opt = opt_cls()
        if hasattr(opt, "fusedActivationFunction"):
            opt.fusedActivationFunction = ACT[act]
        self.op(code, [a, b], [y], opt, opt_type)
        return y

    def add(self, a, b, name="add", act=None, out_quant="inherit"):
        return self._binary(OPS.ADD, fb.AddOptionsT, fb.BuiltinOptions.AddOptions, a, b, name, act, out_quant)

    def sub(self, a, b, name="sub", out_quant="inherit"):
        return self._binary(OPS.SUB, fb.SubOptionsT, fb.BuiltinOptions.SubOptions, a, b, name, None, out_quant)

    def mul(self, a, b, name="mul", out_quant="inherit"):
        return self._binary(OPS.MUL, fb.MulOptionsT, fb.BuiltinOptions.MulOptions, a, b, name, None, out_quant)

    def div(self, a, b, name="div"):
        return self._binary(OPS.DIV, fb.DivOptionsT, fb.BuiltinOptions.DivOptions, a, b, name)

    def minimum(self, a, b, name="min"):
        return self._binary(OPS.MINIMUM, fb.MaximumMinimumOptionsT, fb.BuiltinOptions.MaximumMinimumOptions,
                            a, b, name)

    def maximum(self, a, b, name="max"):
        return self._binary(OPS.MAXIMUM, fb.MaximumMinimumOptionsT, fb.BuiltinOptions.MaximumMinimumOptions,
                            a, b, name)

    def squared_difference(self, a, b, name="sqdiff", out_quant="inherit"):
        return self._binary(OPS.SQUARED_DIFFERENCE, fb.SquaredDifferenceOptionsT,
                            fb.BuiltinOptions.SquaredDifferenceOptions, a, b, name, None, out_quant)

    def _unary(self, code, x, name, out_quant="inherit", options=None, options_type=0, out_dtype=None):
        y = self._out(x, self.shape(x), name, out_dtype, out_quant)
        self.op(code, [x], [y], options, options_type)
        return y

    def rsqrt(self, x, name="rsqrt", out_quant="inherit"):
        return self._unary(OPS.RSQRT, x, name, out_quant)

    def sqrt(self, x, name="sqrt"):
        return self._unary(OPS.SQRT, x, name)

    def logistic(self, x, name="sigmoid", out_quant="inherit"):
        return self._unary(OPS.LOGISTIC, x, name, out_quant)

    def tanh(self, x, name="tanh", out_quant="inherit"):
        return self._unary(OPS.TANH, x, name, out_quant)

    def relu(self, x, name="relu"):
        return self._unary(OPS.RELU, x, name)

    def gelu(self, x, approximate: bool = False, name="gelu", out_quant="inherit"):
        opt = fb.GeluOptionsT()
        opt.approximate = approximate
        return self._unary(OPS.GELU, x, name, out_quant, opt, fb.BuiltinOptions.GeluOptions)

    def softmax(self, x, name="softmax", out_quant="inherit"):
        opt = fb.SoftmaxOptionsT()
        opt.beta = 1.0
        return self._unary(OPS.SOFTMAX, x, name, out_quant, opt, fb.BuiltinOptions.SoftmaxOptions)

    def cast(self, x, dtype, name="cast"):
        return self._unary(OPS.CAST, x, name, None, out_dtype=np.dtype(dtype))

    def quantize(self, x, quant: Quant, dtype=np.int8, name="quantize"):
        return self._unary(OPS.QUANTIZE, x, name, quant, out_dtype=np.dtype(dtype))

    def dequantize(self, x, name="dequantize"):
        return self._unary(OPS.DEQUANTIZE, x, name, None, out_dtype=np.dtype(np.float32))

    def l2_normalize(self, x, name="l2norm"):
        opt = fb.L2NormOptionsT()
        return self._unary(OPS.L2_NORMALIZATION, x, name, None, opt, fb.BuiltinOptions.L2NormOptions)

    def reshape(self, x, shape, name="reshape"):
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) != int(np.prod(self.shape(x))):
            raise TinyshieldError(f"{name}: cannot reshape {self.shape(x)} to {shape}")
        s = self.const(f"{name}/shape", np.array(shape, np.int32))
        y = self._out(x, shape, name)
        opt = fb.ReshapeOptionsT()
        opt.newShape = list(shape)
        self.op(OPS.RESHAPE, [x, s], [y], opt, fb.BuiltinOptions.ReshapeOptions)
        return y

    def transpose(self, x, perm, name="transpose"):
        p = self.const(f"{name}/perm", np.array(perm, np.int32))
        y = self._out(x, tuple(self.shape(x)[i] for i in perm), name)
        self.op(OPS.TRANSPOSE, [x, p], [y], fb.TransposeOptionsT(), fb.BuiltinOptions.TransposeOptions)
        return y

    def strided_slice(self, x, begin, end, strides, shrink_axis_mask: int = 0, name="slice"):
        """x[begin:end:strides] per axis; axes in `shrink_axis_mask` (bit i = axis i) are dropped."""
        shape = [len(range(b, e, s)) for b, e, s in zip(begin, end, strides)]
        shape = tuple(d for i, d in enumerate(shape) if not shrink_axis_mask >> i & 1)
        ins = [x] + [self.const(f"{name}/{k}", np.array(v, np.int32))
                     for k, v in (("begin", begin), ("end", end), ("strides", strides))]
        y = self._out(x, shape, name)
        opt = fb.StridedSliceOptionsT()
        opt.shrinkAxisMask = shrink_axis_mask
        self.op(OPS.STRIDED_SLICE, ins, [y], opt, fb.BuiltinOptions.StridedSliceOptions)
        return y

    def concatenation(self, xs, axis: int, name="concat"):
        shapes = [self.shape(x) for x in xs]
        axis %= len(shapes[0])
        shape = shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]
        y = self._out(xs[0], shape, name)
        opt = fb.ConcatenationOptionsT()
        opt.axis = axis
        self.op(OPS.CONCATENATION, list(xs), [y], opt, fb.BuiltinOptions.ConcatenationOptions)
        return y

    def broadcast_to(self, x, shape, name="broadcast"):
        s = self.const(f"{name}/shape", np.array(shape, np.int32))
        y = self._out(x, tuple(shape), name)
        self.op(OPS.BROADCAST_TO, [x, s], [y])
        return y

    def gather(self, table, indices, name="gather"):
        opt = fb.GatherOptionsT()
        opt.axis, opt.batchDims = 0, 0
        y = self._out(table, self.shape(indices) + self.shape(table)[1:], name)
        self.op(OPS.GATHER, [table, indices], [y], opt, fb.BuiltinOptions.GatherOptions)
        return y

    def _reduce(self, code, x, axes, name, out_quant="inherit"):
        nd = len(self.shape(x))
        axes = sorted(a % nd for a in axes)
        a = self.const(f"{name}/axis", np.array(axes, np.int32))
        shape = tuple(1 if i in axes else s for i, s in enumerate(self.shape(x)))
        y = self._out(x, shape, name, quant=out_quant)
        opt = fb.ReducerOptionsT()
        opt.keepDims = True
        self.op(code, [x, a], [y], opt, fb.BuiltinOptions.ReducerOptions)
        return y

    def mean(self, x, axes, name="mean", out_quant="inherit"):
        return self._reduce(OPS.MEAN, x, axes, name, out_quant)

    def sum(self, x, axes, name="sum", out_quant="inherit"):
        return self._reduce(OPS.SUM, x, axes, name, out_quant)

    def pad(self, x, paddings, name="pad"):
        p = self.const(f"{name}/paddings", np.array(paddings, np.int32))
        shape = tuple(s + a + b for s, (a, b) in zip(self.shape(x), paddings))
        y = self._out(x, shape, name)
        self.op(OPS.PAD, [x, p], [y], fb.PadOptionsT(), fb.BuiltinOptions.PadOptions)
        return y

    def conv2d(self, x, w, b, stride, act: str | None = None, name="conv",
               out_quant: Quant | None | str = "inherit", dilation=(1, 1)) -> int:
        """VALID convolution, NHWC input, weights (out, kh, kw, in); stride an int or (sh, sw)."""
        n, h, wd, c = self.shape(x)
        o, kh, kw, ci = self.shape(w)
        if ci != c:
            raise TinyshieldError(f"{name}: input has {c} channels, weight expects {ci}")
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        dh, dw = dilation
        shape = (n, (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1, o)
        y = self._out(x, shape, name, quant=out_quant)
        opt = fb.Conv2DOptionsT()
        opt.padding = fb.Padding.VALID
        opt.strideH, opt.strideW = sh, sw
        opt.dilationHFactor, opt.dilationWFactor = dh, dw
        opt.fusedActivationFunction = ACT[act]
        self.op(OPS.CONV_2D, [x, w, b], [y], opt, fb.BuiltinOptions.Conv2DOptions)
        return y

    def depthwise_conv2d(self, x, w, b, stride, depth_multiplier: int = 1, padding: str = "VALID",
                         act: str | None = None, name="dwconv", out_quant: Quant | None | str = "inherit",
                         dilation=(1, 1)) -> int:
        """Depthwise convolution, NHWC input, weights (1, kh, kw, in * depth_multiplier) as TFLite stores
        them; stride an int or (sh, sw); padding "VALID" or "SAME"."""
        n, h, wd, c = self.shape(x)
        _, kh, kw, co = self.shape(w)
        if co != c * depth_multiplier:
            raise TinyshieldError(f"{name}: {co} output channels, expected {c} x {depth_multiplier}")
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        dh, dw = dilation
        if padding == "SAME":
            hw = (-(-h // sh), -(-wd // sw))
        else:
            hw = ((h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1)
        y = self._out(x, (n, *hw, co), name, quant=out_quant)
        opt = fb.DepthwiseConv2DOptionsT()
        opt.padding = fb.Padding.SAME if padding == "SAME" else fb.Padding.VALID
        opt.strideH, opt.strideW = sh, sw
        opt.depthMultiplier = depth_multiplier
        opt.dilationHFactor, opt.dilationWFactor = dh, dw
        opt.fusedActivationFunction = ACT[act]
        self.op(OPS.DEPTHWISE_CONV_2D, [x, w, b], [y], opt, fb.BuiltinOptions.DepthwiseConv2DOptions)
        return y

    def pruned(self) -> "Builder":
        """A copy without the ops nothing reads and the tensors no op uses (an exporter may emit a value
        and then fuse its consumer into a single op, e.g. a norm that becomes L2_NORMALIZATION)."""
        live = set(self.outputs) | set(self.inputs)
        keep = []
        for k in reversed(range(len(self.operators))):
            op = self.operators[k]
            if any(t in live for t in op.outputs):
                keep.append(k)
                live.update(t for t in op.inputs if t >= 0)
        ids = {t: i for i, t in enumerate(sorted(live))}
        nb = Builder(self.name)
        nb.tensors = [self.tensors[t] for t in sorted(live)]
        nb._names = {t.name for t in nb.tensors}
        nb.inputs, nb.outputs = [ids[t] for t in self.inputs], [ids[t] for t in self.outputs]
        for k in reversed(keep):
            op = self.operators[k]
            nb.source = self.op_sources[k]
            nb.op(self.op_codes[k], [ids[t] if t >= 0 else -1 for t in op.inputs], [ids[t] for t in op.outputs],
                  op.builtinOptions, op.builtinOptionsType)
        return nb

    # ---- serialisation -------------------------------------------------------------------
    def finish(self, outputs: list[int] | None = None, description: str = "tinyshield") -> bytes:
        """Serialise to .tflite bytes (file identifier TFL3); `outputs` defaults to `self.outputs`."""
        outputs = self.outputs if outputs is None else outputs
        if not outputs:
            raise TinyshieldError(f"{self.name}: the graph has no outputs")
        buffers = [_AlignedBuffer()]  # buffer 0: the empty sentinel every .tflite starts with
        tensors = []
        for t in self.tensors:
            ft = fb.TensorT()
            ft.name, ft.shape, ft.type = t.name, list(t.shape), TENSOR_TYPES[t.dtype]
            if t.quant is not None:
                ft.quantization = t.quant.to_fb()
            if t.data is not None:
                ft.buffer = len(buffers)
                buffers.append(_AlignedBuffer(t.data))
            else:
                ft.buffer = 0
            tensors.append(ft)
        sg = fb.SubGraphT()
        sg.tensors, sg.operators = tensors, self.operators
        sg.inputs, sg.outputs = list(self.inputs), list(outputs)
        sg.name = self.name
        m = fb.ModelT()
        m.version, m.description = SCHEMA_VERSION, description
        m.subgraphs, m.buffers = [sg], buffers
        m.operatorCodes = []
        for code, _ in sorted(self.opcodes.items(), key=lambda kv: kv[1]):
            oc = fb.OperatorCodeT()
            oc.builtinCode = code
            # codes above 127 live only in the new field; the old int8 field holds the placeholder
            oc.deprecatedBuiltinCode = min(code, OPS.PLACEHOLDER_FOR_GREATER_OP_CODES)
            oc.version = VERSIONS.get(code, 1)
            m.operatorCodes.append(oc)
        size = sum(int(t.data.nbytes) for t in self.tensors if t.data is not None)
        b = flatbuffers.Builder(size + 64 * 1024 + 256 * len(self.tensors))
        b.Finish(m.Pack(b), file_identifier=IDENTIFIER)
        return bytes(b.Output())
