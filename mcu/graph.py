"""The integer graph IR and the schedule format shared by the reference executor, the memory
planner and the C code generator.

Two levels:
- `Graph`: what the int8 model computes — tensors (shape, dtype, quantisation) and ops in
  topological order, each op naming where it comes from in the model (`Op.name`).
- `Schedule`: how it is computed — a flat list of kernel `Call`s over named arena `Buffer`s and
  constant (flash) tensors. A schedule pass (layerwise, tiled) lowers a graph to a schedule. The
  numpy reference executor and the generated C run the *same* call list: every kernel exists once
  in numpy (`mcu.kernels`) and once in C (`mcu/firmware/kernels/`), with the same flat-buffer
  signature, so bit-exactness is checked kernel by kernel and for whole schedules.

Kernel calling convention (numpy and C alike): arguments are, in order, as listed in `Call.args`:
`Ref` -> a flat view/pointer into an arena buffer (at a byte offset), `Const` -> a flat
view/pointer to a constant tensor's data, `int` -> a 32-bit integer scalar. Outputs are written
in place into `Ref` arguments; kernels allocate nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32}
# The dtype codes of the firmware contract (tsh_model_info_t's input_dtype / output_dtype, the INFO
# reply): the dtypes a model's input and output may have. Codegen, the host model, the serial link
# and the device runner all read this one table.
IO_DTYPE_CODES = {"int8": 0, "uint8": 1, "int16": 2, "int32": 3}
IO_DTYPE_NAMES = {code: name for name, code in IO_DTYPE_CODES.items()}


@dataclass(frozen=True)
class QParams:
    """Affine quantisation: real = scale * (q - zero_point). Per-channel when `axis` is set."""
    scale: tuple[float, ...]
    zero_point: int = 0
    axis: int | None = None


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str                      # key of DTYPES
    kind: str = "activation"        # "const" (flash), "input", "output", "activation"
    q: QParams | None = None
    data: np.ndarray | None = None  # constants only

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize


@dataclass
class Op:
    kind: str                       # "fully_connected", "batch_matmul", "softmax", "layernorm", ...
    name: str                       # where it comes from in the model, e.g. "encoder.layer.0.attention.self.query"
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)  # integer parameters (multipliers, shifts, zero points, ...)


@dataclass
class Graph:
    name: str
    tensors: dict[str, Tensor]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    meta: dict = field(default_factory=dict)

    def const_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.kind == "const")


@dataclass(frozen=True)
class Ref:
    """A view into an arena buffer, starting `offset` bytes in."""
    buffer: str
    offset: int = 0


@dataclass(frozen=True)
class Const:
    """A constant (flash) tensor of the graph, starting `offset` bytes in (e.g. one head's rows)."""
    tensor: str
    offset: int = 0


@dataclass
class Buffer:
    name: str
    nbytes: int
    kind: str = "activation"        # "input", "output", "activation", "scratch"


@dataclass
class Call:
    kernel: str                     # name in mcu.kernels and tsh_<kernel> in C
    args: tuple                     # Ref | Const | int, in the kernel's parameter order
    op: str                         # Op.name it implements (for profiles and error messages)
    macs: int = 0


@dataclass
class Schedule:
    name: str                       # "layerwise", "tiled", ...
    graph: Graph
    buffers: dict[str, Buffer]
    calls: list[Call]
    params: dict = field(default_factory=dict)  # tile sizes and other choices of the pass

    def lifetimes(self) -> dict[str, tuple[int, int]]:
        """First and last call index touching each buffer. Graph inputs live from 0, outputs to the end."""
        span: dict[str, list[int]] = {}
        for i, c in enumerate(self.calls):
            for a in c.args:
                if isinstance(a, Ref):
                    s = span.setdefault(a.buffer, [i, i])
                    s[0], s[1] = min(s[0], i), max(s[1], i)
        end = len(self.calls) - 1
        for name, b in self.buffers.items():
            s = span.setdefault(name, [0, end])
            if b.kind == "input":
                s[0] = 0
            if b.kind == "output":
                s[1] = end
        return {k: (v[0], v[1]) for k, v in span.items()}

    def macs(self) -> int:
        return sum(c.macs for c in self.calls)
