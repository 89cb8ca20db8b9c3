"""Capture a model once: `torch.export` (or a saved `.pt2`) -> core ATen graph, and calibration on it.

Every deployment path starts here (shape learned from ExecuTorch's export -> to_edge): the user's
`nn.Module` is the one definition of the forward pass; the captured graph is what the board, LiteRT
and the enclave lower. Batch size 1 and static shapes: a microcontroller runs one input at a time.

`Captured` keeps the ExportedProgram decomposed to core ATen ops, and for each node where it comes
from in the user's code (module path and source line, from the export's stack traces), so that every
later error can point there. `calibrate` runs the captured graph itself on calibration inputs and
records each node's range.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from base.errors import TinyshieldError
from base.progress import progress

_OWN_FILES = re.compile(r"/torch/|/edge/capture\.py|/mcu/")


@dataclass(frozen=True)
class Where:
    """Where a graph node comes from in the user's model."""
    module: str          # module path, e.g. "encoder.layer.0.attention.self.query" ("" = the top module)
    source: str          # "file.py:123 (code)" of the user's line, or ""

    def __str__(self) -> str:
        parts = [f"module {self.module or '<top>'}"] + ([f"at {self.source}"] if self.source else [])
        return ", ".join(parts)


@dataclass
class Captured:
    program: torch.export.ExportedProgram      # decomposed to core ATen
    example: tuple                             # the example inputs (batch size 1)
    consts: dict[str, torch.Tensor] = field(default_factory=dict)   # placeholder name -> parameter/buffer/constant
    user_inputs: list[str] = field(default_factory=list)            # placeholder names of the model inputs

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def where(self, node: torch.fx.Node) -> Where:
        return where(node)

    def run(self, *inputs, observe=None):
        """Run the captured graph on `inputs` (batch size 1); `observe(node, value)` sees every node's output."""
        args = {**self.consts, **dict(zip(self.user_inputs, inputs))}
        interp = _Recorder(self.program.graph_module, observe, set(self.user_inputs))
        flat = [args[n.name] for n in self.graph.nodes if n.op == "placeholder"]
        return interp.run(*flat)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, observe, user_inputs):
        super().__init__(gm)
        self.observe, self.user_inputs = observe, user_inputs

    def run_node(self, n):
        out = super().run_node(n)
        if self.observe is not None and (n.op == "call_function" or n.name in self.user_inputs):
            self.observe(n, out)
        return out


def where(node: torch.fx.Node) -> Where:
    stack = node.meta.get("nn_module_stack") or {}
    module = ""
    if stack:
        module = list(stack.values())[-1][0]
        module = re.sub(r"^L\['self'\]\.?", "", module).replace("L['self']", "")
        module = re.sub(r"\._modules\['([^']+)'\]", r".\1", module)
    source = ""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    user = [f for f in frames if not _OWN_FILES.search(f[0])]
    if user:
        f, line, code = user[-1]
        source = f"{f}:{line} ({code.strip()})"
    return Where(module, source)


def op_name(node: torch.fx.Node) -> str:
    """The ATen operator of a node without namespace and overload: "addmm", "native_layer_norm", ..."""
    name = str(node.target)
    return name.split(".")[1] if name.startswith("aten.") else getattr(node.target, "__name__", name)


def rule_table() -> tuple[dict, object]:
    """A table of per-operator rules and the decorator that fills it: `RULES, rule = rule_table()`, then
    `@rule("addmm", "mm")` above a function. Every lowering of the captured graph is such a table."""
    table: dict = {}

    def rule(*names):
        def wrap(fn):
            for n in names:
                table[n] = fn
            return fn
        return wrap
    return table, rule


def map_nodes(x, f):
    """A node's args/kwargs with every fx Node replaced by f(node) (lists, tuples and dicts kept)."""
    if isinstance(x, torch.fx.Node):
        return f(x)
    if isinstance(x, (list, tuple)):
        return type(x)(map_nodes(v, f) for v in x)
    if isinstance(x, dict):
        return {k: map_nodes(v, f) for k, v in x.items()}
    return x


def _decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    return ep.run_decompositions()


def _finish(ep: torch.export.ExportedProgram, example: tuple, batch_one: bool = True) -> Captured:
    ep = _decompose(ep)
    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    consts, user = {}, []
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            user.append(name)
        else:
            consts[name] = state[spec.target].detach()
    for x in example:
        if not isinstance(x, torch.Tensor):
            raise TinyshieldError(f"model inputs must be tensors, got {type(x).__name__}")
        if batch_one and (x.ndim == 0 or x.shape[0] != 1):
            raise TinyshieldError(f"model inputs must have batch size 1 (a board runs one input at a time), "
                                  f"got shape {tuple(x.shape)}: export with one example, e.g. x[:1]")
    return Captured(ep, tuple(example), consts, user)


def capture(model: torch.nn.Module, example_inputs, batch_one: bool = True) -> Captured:
    """torch.export the model on batch-size-1 example inputs (static shapes) and decompose to core ATen.
    `batch_one=False` accepts any batch size (the .tflite exporter bakes a batch B into its graph)."""
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    model = model.eval()
    try:
        ep = torch.export.export(model, example)
    except Exception as e:   # torch raises many types here; the user needs the first line and the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyshieldError(f"torch.export could not capture {type(model).__name__}: {first} -- make the forward "
                              "pass traceable (no data-dependent Python control flow), or export it yourself and "
                              "pass the .pt2") from None
    return _finish(ep, example, batch_one)


def load(path: str | Path, batch_one: bool = True) -> Captured:
    """A saved ExportedProgram (`torch.export.save`, .pt2); its example inputs come from the file."""
    p = Path(path)
    if not p.is_file():
        raise TinyshieldError(f"{p}: no such file (a .pt2 written by torch.export.save)")
    if not zipfile.is_zipfile(p):
        raise TinyshieldError(f"{p}: not a .pt2 archive (corrupt or truncated?): re-export it with torch.export.save")
    try:
        ep = torch.export.load(p)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyshieldError(f"{p}: cannot load the exported program ({first}): the file is corrupt, truncated or "
                              "from another torch version; re-export it with torch.export.save") from None
    example = ep.example_inputs[0] if ep.example_inputs else None
    if not example:
        raise TinyshieldError(f"{p}: the exported program carries no example inputs; export it with "
                              "torch.export.export(model, (x,)) and save that")
    return _finish(ep, tuple(example), batch_one)


# ---------------------------------------------------------------- calibration

@dataclass
class Ranges:
    """Per node name: [min, max] of its float output over the calibration inputs."""
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def see(self, node, value) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
            return
        v = value.detach()
        finite = v[torch.isfinite(v)]       # -inf masks are structure, not range
        if finite.numel() == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        n = node.name
        self.lo[n] = min(self.lo.get(n, lo), lo)
        self.hi[n] = max(self.hi.get(n, hi), hi)

    def range(self, name: str) -> tuple[float, float]:
        if name not in self.lo:
            raise TinyshieldError(f"no calibration data reached node {name}")
        return self.lo[name], self.hi[name]


@torch.no_grad()
def calibrate(cap: Captured, inputs, label: str = "calibrating") -> Ranges:
    """Run the captured graph on each calibration input (a sequence of per-input tuples or arrays,
    each with a leading batch dimension of 1 or none) and record every node's range."""
    r = Ranges()
    items = list(inputs)
    if not items:
        raise TinyshieldError("calibration needs at least one input")
    with progress(disable=len(items) < 64) as bar:
        task = bar.add_task(label, total=len(items), info="")
        for x in items:
            args = x if isinstance(x, tuple) else (x,)
            args = tuple(_as_input(a, e) for a, e in zip(args, cap.example))
            cap.run(*args, observe=r.see)
            r.count += 1
            bar.advance(task)
    return r


def _as_input(a, example: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a)).to(example.dtype)
    if t.shape != example.shape:
        if t.shape == example.shape[1:]:
            t = t[None]
        else:
            raise TinyshieldError(f"calibration input of shape {tuple(t.shape)} does not match the model's "
                                  f"input shape {tuple(example.shape)}")
    return t
