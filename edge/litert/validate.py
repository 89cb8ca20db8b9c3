"""Check a .tflite buffer before any native interpreter touches it.

Native interpreters trust their input: TFLite Micro has no flatbuffer verifier at all, and a
truncated or corrupted file can crash the process instead of raising. So every model is parsed
here first, in Python (where a bad offset is an exception, not a segfault), and its references
are checked: tensor, buffer and opcode indices in range, constant data as long as the shape says.
"""
from __future__ import annotations

import numpy as np

from base.errors import TinyshieldError
from edge.litert.schema import IDENTIFIER, NUMPY_TYPES, OP_NAMES, fb


MAX_TENSOR_BYTES = 1 << 31


def _bad(where: str, what: str) -> TinyshieldError:
    return TinyshieldError(f"{where}: not a valid .tflite model ({what}); re-export it with `tinyshield export`")


def validate(model: bytes, where: str = "model") -> fb.ModelT:
    """Parse and check `model`; returns the unpacked ModelT or raises TinyshieldError."""
    if not isinstance(model, (bytes, bytearray, memoryview)):
        raise TinyshieldError(f"{where}: expected .tflite bytes, got {type(model).__name__}")
    buf = bytes(model)
    if len(buf) < 16:
        raise _bad(where, f"only {len(buf)} bytes")
    if buf[4:8] != IDENTIFIER:
        raise _bad(where, f"file identifier is {buf[4:8]!r}, expected {IDENTIFIER!r}")
    root = int.from_bytes(buf[0:4], "little")
    if root + 4 > len(buf):
        raise _bad(where, f"root table offset {root} past the end of {len(buf)} bytes (truncated?)")
    try:
        m = fb.ModelT.InitFromObj(fb.Model.GetRootAs(buf, 0))
    except Exception as e:  # struct.error / IndexError / ValueError on out-of-range offsets
        raise _bad(where, f"flatbuffer does not parse: {type(e).__name__}: {e} (truncated or corrupt?)") from e
    _check(m, buf, where)
    return m


def _check(m: fb.ModelT, buf: bytes, where: str) -> None:
    if m.version != 3:
        raise _bad(where, f"schema version {m.version}, expected 3")
    if not m.subgraphs:
        raise _bad(where, "no subgraphs")
    nbuf = len(m.buffers or [])
    ncodes = len(m.operatorCodes or [])
    for oc in m.operatorCodes or []:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        if code not in OP_NAMES:
            raise _bad(where, f"unknown builtin operator code {code}")
    for si, sg in enumerate(m.subgraphs):
        tensors = sg.tensors or []
        nt = len(tensors)
        for ti, t in enumerate(tensors):
            try:
                name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            except UnicodeDecodeError:
                raise _bad(where, f"tensor {ti} has a name that is not UTF-8") from None
            if t.type not in NUMPY_TYPES:
                raise _bad(where, f"tensor {ti} ({name}) has unsupported type {t.type}")
            shape = list(t.shape) if t.shape is not None else []
            if any(s < 0 for s in shape):
                raise _bad(where, f"tensor {ti} ({name}) has a negative dimension {shape}")
            if int(np.prod(shape, dtype=np.float64)) * NUMPY_TYPES[t.type].itemsize >= MAX_TENSOR_BYTES:
                raise _bad(where, f"tensor {ti} ({name}) of shape {shape} is larger than 2 GB")
            q = t.quantization
            if q is not None and q.scale is not None and len(q.scale):
                nz = 0 if q.zeroPoint is None else len(q.zeroPoint)
                if nz != len(q.scale):
                    raise _bad(where, f"tensor {ti} ({name}) has {len(q.scale)} scales but {nz} zero points")
                if len(q.scale) > 1 and not (0 <= q.quantizedDimension < len(shape)
                                             and shape[q.quantizedDimension] == len(q.scale)):
                    raise _bad(where, f"tensor {ti} ({name}) has {len(q.scale)} per-channel scales that do not "
                                      f"match dimension {q.quantizedDimension} of {shape}")
                if not all(np.isfinite(q.scale)):
                    raise _bad(where, f"tensor {ti} ({name}) has a non-finite scale")
            if not 0 <= t.buffer < max(nbuf, 1):
                raise _bad(where, f"tensor {ti} ({name}) points at buffer {t.buffer} of {nbuf}")
            data = m.buffers[t.buffer].data if nbuf else None
            n = len(data) if data is not None else 0
            if nbuf and not n and (m.buffers[t.buffer].offset or 0) > 1:    # data stored after the flatbuffer
                off, n = int(m.buffers[t.buffer].offset), int(m.buffers[t.buffer].size or 0)
                if off + n > len(buf):
                    raise _bad(where, f"tensor {ti} ({name}) has data at bytes {off}..{off + n}, past the end of "
                                      f"{len(buf)} bytes (truncated?)")
            if n:
                need = int(np.prod(shape, dtype=np.int64)) * NUMPY_TYPES[t.type].itemsize
                if n != need:
                    raise _bad(where, f"tensor {ti} ({name}) has {n} bytes of data, shape {shape} needs {need}")
        if sg.inputs is None or not len(sg.inputs) or sg.outputs is None or not len(sg.outputs):
            raise _bad(where, f"subgraph {si} declares no inputs or no outputs")
        for ti in list(sg.inputs) + list(sg.outputs):
            if not 0 <= ti < nt:
                raise _bad(where, f"subgraph {si} input/output tensor {ti} out of range ({nt} tensors)")
        for oi, op in enumerate(sg.operators or []):
            if not 0 <= op.opcodeIndex < ncodes:
                raise _bad(where, f"operator {oi} uses opcode {op.opcodeIndex} of {ncodes}")
            ins = list(op.inputs if op.inputs is not None else [])
            outs = list(op.outputs if op.outputs is not None else [])
            for ti in ins + outs:
                if not -1 <= ti < nt or (ti == -1 and ti in outs):
                    raise _bad(where, f"operator {oi} refers to tensor {ti} ({nt} tensors)")
            code = max(m.operatorCodes[op.opcodeIndex].builtinCode, m.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
            problem = _shape_problem(OP_NAMES[code], [None if i < 0 else _shape(tensors[i]) for i in ins],
                                     [_shape(tensors[i]) for i in outs])
            if problem:
                raise _bad(where, f"operator {oi} ({OP_NAMES[code]}): {problem}")


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in (t.shape if t.shape is not None else []))


def _broadcast(a, b):
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


ELEMENTWISE = {"ADD", "SUB", "MUL", "SQUARED_DIFFERENCE", "MINIMUM", "MAXIMUM", "DIV"}
MIN_INPUTS = {"FULLY_CONNECTED": 2, "BATCH_MATMUL": 2, "GATHER": 2, "RESHAPE": 1, "TRANSPOSE": 2,
              "MEAN": 2, "SUM": 2, "CONV_2D": 2, "PAD": 2}
SAME_SHAPE = {"RSQRT", "LOGISTIC", "TANH", "RELU", "GELU", "SOFTMAX", "QUANTIZE", "DEQUANTIZE", "CAST",
              "L2_NORMALIZATION", "EXP"}


def _shape_problem(op: str, ins: list, outs: list) -> str | None:
    """Shape consistency of the ops the exporter writes. Native kernels check these too, but
    only after the arena is planned from the (possibly corrupt) shapes; here nothing runs yet."""
    size = lambda s: int(np.prod(s, dtype=np.int64))
    if not outs:
        return "no outputs"
    need = MIN_INPUTS.get(op, 2 if op in ELEMENTWISE else 1 if op in SAME_SHAPE else 0)
    if len(ins) < need or any(i is None for i in ins[:need]):
        return f"needs {need} inputs, has {len(ins)}"
    y = outs[0]
    if op == "FULLY_CONNECTED":
        x, w = ins[0], ins[1]
        if x is None or w is None or len(w) != 2 or w[1] == 0 or size(x) % w[1]:
            return f"input {x} does not fit weight {w}"
        if len(ins) > 2 and ins[2] is not None and size(ins[2]) != w[0]:
            return f"bias {ins[2]} does not fit weight {w}"
        if not y or y[-1] != w[0] or size(y) != size(x) // w[1] * w[0]:
            return f"output {y} does not fit input {x} and weight {w}"
    elif op in ELEMENTWISE:
        if len(ins) != 2 or None in ins or _broadcast(ins[0], ins[1]) != y:
            return f"inputs {ins} do not broadcast to output {y}"
    elif op in SAME_SHAPE:
        if not ins or ins[0] is None or ins[0] != y:
            return f"input {ins[0] if ins else None} and output {y} differ in shape"
    elif op in ("RESHAPE", "TRANSPOSE"):
        if not ins or ins[0] is None or size(ins[0]) != size(y):
            return f"input {ins[0] if ins else None} and output {y} differ in size"
    elif op == "BATCH_MATMUL":
        a, b = ins[0], ins[1]
        if a is None or b is None or len(a) < 2 or len(b) < 2 or y[-2:] not in ((a[-2], b[-1]), (a[-2], b[-2])):
            return f"operands {a} x {b} do not give output {y}"
    elif op == "GATHER":
        if len(ins) != 2 or None in ins or size(y) != size(ins[1]) * size(ins[0][1:]):
            return f"table {ins[0]} and indices {ins[1] if len(ins) > 1 else None} do not give output {y}"
    return None


def op_names(m: fb.ModelT) -> list[str]:
    """Builtin op names of subgraph 0, in execution order (for summaries and tests)."""
    codes = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.operatorCodes]
    return [OP_NAMES[codes[op.opcodeIndex]] for op in m.subgraphs[0].operators]
