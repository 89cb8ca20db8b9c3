"""Run .tflite models: LiteRT (ai-edge-litert, `tflite_runtime` as fallback) and TFLite Micro.

Both runners validate the flatbuffer in Python first (`edge.litert.validate`), so a truncated or
corrupt file raises TinyshieldError instead of crashing the process.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from base import quant as Q
from base.errors import TinyshieldError
from edge.litert.validate import validate


def read_model(model: bytes | bytearray | str | Path) -> tuple[bytes, str]:
    """(bytes, where) from bytes or a path."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), "model bytes"
    p = Path(model)
    if not p.is_file():
        raise TinyshieldError(f"{p}: .tflite file not found")
    return p.read_bytes(), str(p)


def quantise_input(x: np.ndarray, detail: dict, ties: str) -> np.ndarray:
    """A float input for an int8/uint8-input model, quantised with the tensor's own scale and zero point as the
    runtime's own QUANTIZE op would: the division in float32, then ties rounded as that runtime does —
    "away" from zero for TFLite Micro (its reference kernel, TfLiteRound), to "even" for LiteRT (its optimised
    kernel, measured on ai-edge-litert 2.3.0 with and without XNNPACK; tests/test_litert_int8.py)."""
    dt = np.dtype(detail["dtype"])
    if dt in (np.int8, np.uint8) and x.dtype == np.float32:
        qp = detail.get("quantization_parameters", {})
        scale, zp = np.float32(qp["scales"][0]), int(qp["zero_points"][0])
        r = x / scale
        q = Q.round_half_away(r) if ties == "away" else np.rint(r).astype(np.int64)
        return Q.saturate(q + zp, dt)
    return x


def dequantise_output(y: np.ndarray, detail: dict) -> np.ndarray:
    """An int8/uint8/int16 output as float32 reals (the tensor's scale and zero point); others unchanged."""
    if np.dtype(detail["dtype"]) in (np.int8, np.uint8, np.int16):
        qp = detail.get("quantization_parameters", {})
        return (y.astype(np.float32) - int(qp["zero_points"][0])) * float(qp["scales"][0])
    return y


def _litert_module():
    try:
        from ai_edge_litert import interpreter as lite
        return lite, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as lite  # numpy<2 only; kept as a fallback
        return lite, "tflite_runtime"
    except ImportError as e:
        raise TinyshieldError("no LiteRT runtime: pip install ai-edge-litert (or tflite-runtime)") from e


class Interpreter:
    """A LiteRT interpreter over one model.

    `Interpreter(model_bytes_or_path, threads=N).run(x)` -> output array (or a list when the
    model has several outputs). `x` may be one array or a list, in the model's input order;
    arrays are cast to the input dtype. `xnnpack=False` uses LiteRT's builtin (optimised) kernels
    only; `reference_kernels=True` its reference kernels, whose int8 requantisation is TFLite's
    single-rounding one (see edge.litert.linear.single_rounding_mbqm).
    """

    def __init__(self, model, threads: int | None = None, xnnpack: bool = True, preserve_all: bool = False,
                 reference_kernels: bool = False, input_shapes: list[tuple[int, ...]] | None = None):
        data, where = read_model(model)
        self.model = validate(data, where)
        self.where = where
        lite, self.runtime = _litert_module()
        if threads is not None and threads < 1:
            raise TinyshieldError(f"threads must be >= 1, got {threads}")
        kwargs = {"model_content": data, "num_threads": threads}
        if reference_kernels:
            kwargs["experimental_op_resolver_type"] = lite.OpResolverType.BUILTIN_REF
        elif not xnnpack:
            kwargs["experimental_op_resolver_type"] = lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if preserve_all:
            kwargs["experimental_preserve_all_tensors"] = True
        try:
            self.interp = lite.Interpreter(**kwargs)
            for d, shape in zip(self.interp.get_input_details(), input_shapes or []):
                self.interp.resize_tensor_input(d["index"], list(shape))   # e.g. another batch size
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise TinyshieldError(f"{where}: LiteRT cannot load the model: {e}") from e
        self.inputs = self.interp.get_input_details()
        self.outputs = self.interp.get_output_details()

    def run(self, x):
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != len(self.inputs):
            raise TinyshieldError(f"{self.where}: model takes {len(self.inputs)} inputs, got {len(xs)}")
        for d, a in zip(self.inputs, xs):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(int(s) for s in d["shape"]):
                raise TinyshieldError(
                    f"{self.where}: input {d['name']} has shape {tuple(int(s) for s in d['shape'])}, got {tuple(a.shape)}")
            self.interp.set_tensor(d["index"], np.ascontiguousarray(a, dtype=d["dtype"]))
        try:
            self.interp.invoke()
            out = [self.interp.get_tensor(d["index"]).copy() for d in self.outputs]
        except (ValueError, RuntimeError) as e:
            raise TinyshieldError(f"{self.where}: LiteRT failed to run the model: {e}") from e
        return out[0] if len(out) == 1 else out

    def tensor(self, name: str) -> np.ndarray:
        """An intermediate tensor by name (needs preserve_all=True)."""
        for d in self.interp.get_tensor_details():
            if d["name"] == name:
                return self.interp.get_tensor(d["index"]).copy()
        raise TinyshieldError(f"{self.where}: no tensor named {name!r}")


# ---- TFLite Micro ----------------------------------------------------------------------------

_ARENA_RE = re.compile(r"Arena allocation total (\d+) bytes")


def _capture_fd2(fn):
    """Run fn() with the C-level stderr redirected to a temp file; returns (result, text)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace")


@dataclass
class MicroRun:
    outputs: list[np.ndarray]
    arena_bytes: int          # what the recording allocator says the model needed
    log: str                  # print_allocations() text


class MicroInterpreter:
    """TFLite Micro (the `tflite-micro` package) over one model, with the arena it really used.

    `MicroInterpreter(model_bytes).run(x)` -> output array; `.arena_bytes` after the first run.
    Constants stored after the flatbuffer (ai-edge-quantizer's external buffers), which TFLite Micro
    does not read, are inlined first (edge.litert.flat.inline_buffers).
    """

    def __init__(self, model, arena_size: int | None = None, long_softmax: bool = False):
        try:
            from tflite_micro.python.tflite_micro import runtime as tflm
        except ImportError as e:
            raise TinyshieldError("TFLite Micro is not installed: pip install tflite-micro") from e
        data, where = read_model(model)
        m = validate(data, where)
        self.where = where
        from edge.litert.flat import has_external_buffers, inline_buffers
        if has_external_buffers(m):     # TFLite Micro would silently read arena garbage as the weights
            data = inline_buffers(data, where)
            m = validate(data, where)
        if not long_softmax:
            _refuse_long_int8_softmax(m, where)
        sg = m.subgraphs[0]
        self.n_inputs, self.n_outputs = len(sg.inputs), len(sg.outputs)
        # generous by default; the real need is measured and reported by print_allocations()
        self.arena_size = arena_size or max(4 * len(data), 1 << 20) + _activation_bytes(m)
        def load():
            try:
                return tflm.Interpreter.from_bytes(data, arena_size=self.arena_size), None
            except (ValueError, RuntimeError) as e:
                return None, e

        (self.interp, err), text = _capture_fd2(load)
        if err is not None:
            # TFLite Micro says why on stderr (e.g. "Didn't find op for builtin opcode 'GELU'")
            why = " ".join(l.strip() for l in text.splitlines() if l.strip() and not l.startswith("["))[-600:]
            raise TinyshieldError(f"{where}: TFLite Micro cannot load the model: {err}"
                                  + (f" ({why})" if why else "")) from err
        self.arena_bytes: int | None = None

    def run(self, x) -> np.ndarray | list[np.ndarray]:
        outs = self.run_full(x).outputs
        return outs[0] if self.n_outputs == 1 else outs

    def run_full(self, x) -> MicroRun:
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != self.n_inputs:
            raise TinyshieldError(f"{self.where}: model takes {self.n_inputs} inputs, got {len(xs)}")

        def go():
            for i, a in enumerate(xs):
                d = self.interp.get_input_details(i)
                self.interp.set_input(np.ascontiguousarray(a, dtype=d["dtype"]).reshape(d["shape"]), i)
            self.interp.invoke()
            self.interp.print_allocations()
            return [self.interp.get_output(i).copy() for i in range(self.n_outputs)]

        try:
            outs, log = _capture_fd2(go)
        except (ValueError, RuntimeError) as e:
            raise TinyshieldError(f"{self.where}: TFLite Micro failed to run the model: {e}") from e
        hit = _ARENA_RE.search(log)
        if hit is None:
            raise TinyshieldError(f"{self.where}: TFLite Micro printed no arena total:\n{log[-500:]}")
        self.arena_bytes = int(hit.group(1))
        return MicroRun(outs, self.arena_bytes, log)


# TFLite Micro's int8 SOFTMAX divides by 2^(bits of the exp sum + 23); once a row's exp sum reaches
# 2^9 (>= 512 entries all at the row maximum, e.g. a fully padded attention row at L >= 512) that
# exponent is 32 and gemmlowp's RoundingDivideByPOT check aborts the whole process.
LONG_SOFTMAX = 512


def _refuse_long_int8_softmax(m, where: str) -> None:
    from edge.litert.schema import OP_NAMES, fb
    codes = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.operatorCodes]
    tensors = m.subgraphs[0].tensors
    for op in m.subgraphs[0].operators:
        if OP_NAMES[codes[op.opcodeIndex]] != "SOFTMAX":
            continue
        t = tensors[op.inputs[0]]
        if t.type == fb.TensorType.INT8 and t.shape is not None and len(t.shape) and t.shape[-1] >= LONG_SOFTMAX:
            raise TinyshieldError(
                f"{where}: int8 SOFTMAX over {int(t.shape[-1])} entries: TFLite Micro aborts the process when "
                f">= {LONG_SOFTMAX} of them tie for the maximum (e.g. a fully padded input). Use L < {LONG_SOFTMAX}, "
                "a float softmax (int8 mode hybrid), or MicroInterpreter(..., long_softmax=True) for inputs you control")


def _activation_bytes(m) -> int:
    """Sum of all non-constant tensor sizes: an upper bound on what the arena can need for them."""
    from edge.litert.schema import NUMPY_TYPES
    total = 0
    for t in m.subgraphs[0].tensors:
        data = m.buffers[t.buffer].data if m.buffers else None
        if data is None or not len(data):
            total += int(np.prod(t.shape if t.shape is not None else [], dtype=np.int64)) * NUMPY_TYPES[t.type].itemsize
    return total + 64 * 1024


def _smallest_gather_table(m) -> int:
    """Rows of the smallest GATHER table (token ids must stay below it); large when there is none."""
    from edge.litert.schema import OP_NAMES
    codes = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.operatorCodes]
    rows = [int(m.subgraphs[0].tensors[op.inputs[0]].shape[0]) for op in m.subgraphs[0].operators
            if OP_NAMES[codes[op.opcodeIndex]] == "GATHER"]
    return min(rows) if rows else 1 << 30


def tflm_arena_bytes(model) -> int:
    """Bytes of TFLite Micro arena `model` needs: one inference (recording allocator) on a varied
    input — token ids 1..999, random values otherwise — so no softmax row is degenerate."""
    data, where = read_model(model)
    mi = MicroInterpreter(data, long_softmax=True)
    rng = np.random.default_rng(0)
    vocab = _smallest_gather_table(validate(data, where))
    xs = []
    for i in range(mi.n_inputs):
        d = mi.interp.get_input_details(i)
        dt = np.dtype(d["dtype"])
        if dt.kind in "iu":
            lo, hi = (1, min(1000, vocab - 1)) if dt == np.int32 else (np.iinfo(dt).min, np.iinfo(dt).max)
            xs.append(rng.integers(lo, hi, size=d["shape"], endpoint=True).astype(dt))
        else:
            xs.append(rng.random(d["shape"]).astype(dt))
    return mi.run_full(xs).arena_bytes
