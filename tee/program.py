"""A model as the enclave sees it: its captured graph, with the linear layers (outsourced) picked out.

`of(model, inputs)` captures the model (`edge.capture`, core ATen) and finds every node that multiplies an
activation by constant weights -- `addmm`/`mm` with a constant right operand, a 2-D convolution as an
im2col matmul -- each a named linear map (W: out x in, b), named by its module path. Linear nodes reading
the same tensor (Q, K and V) are fused into one call. `forward(prog, inputs, lin)` runs every other node
with torch, in place, and calls `lin(name, x)` for the linear ones. The modes differ only in what `lin`
does, so every mode and every model runs the same code; no model family is written out here.
A private low-rank term the graph adds to an outsourced call's output (x B^T A^T of a sliced model's adapter) is
folded into the call (`_low_rank`) and computed while the accelerator works; the plan (`_plan`) binds values of
weights alone at build time and skips reshapes that change nothing, so the enclave runs few Python steps.

`pipelined(prog, inputs, submit, chunks)` is the same pass with the rows (tokens) cut into `chunks` parts
wherever the graph is provably row-wise (linear layers, pointwise ops, LayerNorm over the last dim, adds of
row-aligned tensors, reshapes that keep the last dim): `submit(name, x, rows)` starts a linear layer on one
part and returns a function that waits for its result. Parts are computed lazily, so while the accelerator
works on part c the enclave finishes part c - 1 and sends the next layer's part -- the two processes
overlap instead of taking turns. Any other node (attention's reshapes into heads, pooling) takes the whole
tensor, which waits for every part.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from edge.capture import Captured, capture, where
from base.errors import TinyshieldError

Lin = Callable[[str, torch.Tensor], torch.Tensor]  # (name, rows x in) -> rows x out, bias included
Pending = Callable[[], torch.Tensor]               # waits for a submitted layer's result
Submit = Callable[[str, torch.Tensor, slice], Pending]   # (name, part of the input, which rows of it) -> pending
ENCLAVE_THREADS = 1      # the enclave's torch threads (tee/enclave.py); the reference `forward` uses as many

aten = torch.ops.aten


def eager(lin: Lin) -> Submit:
    """A synchronous `lin` as a `submit` (it computes at once)."""
    return lambda name, x, rows: (lambda y=lin(name, x): y)


def parts(n: int, chunks: int) -> list[slice]:
    """`n` rows cut into at most `chunks` nearly equal consecutive parts."""
    size = -(-n // max(1, chunks))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ---------------------------------------------------------------- finding the linear layers

@dataclass
class Linear:
    name: str
    nodes: list[torch.fx.Node]    # the matmul nodes this one call replaces (Q, K, V: three)
    x: torch.fx.Node              # the input of the call (rows x in; a convolution's image)
    w: np.ndarray                 # (out, in) float32
    b: np.ndarray                 # (out,) float32
    rows: int                     # rows per call for the captured input shapes
    conv: dict | None = None      # stride/padding/dilation/kernel of a convolution run as im2col
    addend: Addend | None = None  # private low-rank terms the enclave adds to the call's output (`_low_rank`)


@dataclass
class Addend:
    """x B^T A^T for every low-rank adapter on a call's outputs, as two matmuls: x times every adapter's B^T side by
    side (Q, K and V read the same x), then times each A^T in its own rows and its projection's columns."""
    down: torch.Tensor            # (in, sum of ranks)
    up: torch.Tensor              # (sum of ranks, out), zero outside each adapter's block


@dataclass
class Program:
    cap: Captured
    layers: dict[str, Linear]                       # call order
    member: dict[str, tuple[Linear, slice]] = field(default_factory=dict)   # node -> (call, its output columns)
    plan: list = field(default_factory=list)        # the graph's nodes, ready to run (`_plan`)
    inputs: list[str] = field(default_factory=list) # input names, in the order the model's forward takes them


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TRANSPOSES = (aten.permute.default, aten.t.default, aten.transpose.int)


def _constants(cap: Captured) -> dict[str, torch.Tensor]:
    """Every node computed from weights alone (e.g. W^T feeding addmm), folded to its value."""
    env = {n: v for n, v in cap.consts.items()}
    for n in cap.graph.nodes:
        if n.op != "call_function" or n.target not in _TRANSPOSES + _VIEWS:
            continue
        if all(a.name in env for a in n.all_input_nodes):
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a.name])
            env[n.name] = n.target(*args, **kwargs)
    return env


def _root(n: torch.fx.Node) -> torch.fx.Node:
    """The tensor a chain of reshapes starts from: Q, K and V each reshape the same hidden states."""
    while n.op == "call_function" and n.target in _VIEWS:
        n = n.args[0]
    return n


def _find(cap: Captured, only: frozenset[str] | None = None) -> Program:
    """`only`: module paths whose linears may be outsourced (None: every one); the others stay graph nodes."""
    const = _constants(cap)
    is_const = lambda a: isinstance(a, torch.fx.Node) and a.name in const
    found = []   # (node, x, W, b, conv)
    for n in cap.graph.nodes:
        if n.op != "call_function" or (only is not None and where(n).module not in only):
            continue
        if n.target in (aten.addmm.default, aten.mm.default):
            b, x, wt = n.args[:3] if n.target == aten.addmm.default else (None, *n.args[:2])
            if is_const(wt) and not is_const(x) and (b is None or is_const(b)) and not n.kwargs:
                w = const[wt.name].T
                bias = const[b.name] if b is not None else torch.zeros(w.shape[0])
                if bias.shape == (w.shape[0],):
                    found.append((n, x, w, bias, None))
        elif n.target == aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, _, groups = n.args
            if is_const(w) and not is_const(x) and (b is None or is_const(b)) and not transposed and groups == 1 \
                    and const[w.name].ndim == 4:
                wt = const[w.name]
                conv = {"kernel": tuple(wt.shape[2:]), "stride": stride, "padding": padding, "dilation": dilation}
                bias = const[b.name] if b is not None else torch.zeros(wt.shape[0])
                found.append((n, x, wt.flatten(1), bias, conv))
    # matmuls of one tensor (after reshapes) become one call: Q, K and V share their input rows
    groups: dict = {}
    for item in found:
        n, x, w, _, conv = item
        key = (n.name,) if conv else (_root(x).name, tuple(x.meta["val"].shape))
        groups.setdefault(key, []).append(item)
    prog, names = Program(cap, {}), set()
    for items in sorted(groups.values(), key=lambda g: _order(cap, g[0][0])):
        nodes = [i[0] for i in items]
        name = _name([where(n).module for n in nodes], names)
        w = torch.cat([i[2] for i in items]).detach().float().contiguous()
        b = torch.cat([i[3] for i in items]).detach().float()
        x, conv = items[0][1], items[0][4]
        out = nodes[0].meta["val"].shape
        rows = out[0] * math.prod(out[2:]) if conv else x.meta["val"].numel() // w.shape[1]
        layer = Linear(name, nodes, x, w.numpy().copy(), b.numpy().copy(), rows, conv)
        prog.layers[name] = layer
        col = 0
        for n, (_, _, wi, _, _) in zip(nodes, items):
            prog.member[n.name] = (layer, slice(col, col + wi.shape[0]))
            col += wi.shape[0]
    _low_rank(prog, const)
    prog.plan = _plan(cap.graph, prog.member, const)
    if not prog.layers:
        raise TinyshieldError("the model has no linear layer to outsource (no matmul or convolution by constant "
                              "weights): run it enclave-only on the device instead")
    return prog


def _low_rank(prog: Program, const: dict[str, torch.Tensor]) -> None:
    """Fold each low-rank term the graph adds to an outsourced call's output -- y = x W0^T + b + (x B^T) A^T, B and A
    enclave-held weights, x the call's own input (edge.models.sliced.Adapted) -- into the call (`Linear.addend`):
    the sum becomes one of the call's outputs, and the adapter's dozen graph steps (two matmuls per projection,
    reshapes, the add on row parts) become two matmuls per call on all its rows, run while the accelerator computes."""
    def single(n):
        return next(iter(n.users)) if len(n.users) == 1 else None

    def shape(n):
        return tuple(n.meta["val"].shape) if isinstance(n, torch.fx.Node) and _meta(n) is not None else None

    def weight(n):      # n = mm(activation, constant weight), kept in the enclave
        return n.op == "call_function" and n.target == aten.mm.default and n.name not in prog.member \
            and not n.kwargs and isinstance(n.args[1], torch.fx.Node) and n.args[1].name in const

    for layer in prog.layers.values():
        if layer.conv:
            continue
        root, terms = _root(layer.x), []
        for n in layer.nodes:
            cols = prog.member[n.name][1]
            v = single(n)
            add = single(v) if v is not None and v.target in _VIEWS and shape(v) and shape(v)[-1] == shape(n)[-1] \
                else None
            if add is None or add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2:
                continue
            other = add.args[1] if add.args[0] is v else add.args[0]
            if not isinstance(other, torch.fx.Node) or shape(other) != shape(v) or shape(add) != shape(v):
                continue
            up = _root(other)
            down = _root(up.args[0]) if weight(up) and isinstance(up.args[0], torch.fx.Node) else None
            if down is None or not weight(down) or not isinstance(down.args[0], torch.fx.Node) \
                    or _root(down.args[0]) is not root or shape(down.args[0]) != (layer.rows, layer.w.shape[1]):
                continue
            bt, at = const[down.args[1].name], const[up.args[1].name]
            if bt.shape != (layer.w.shape[1], at.shape[0]) or at.shape[1] != cols.stop - cols.start:
                continue
            terms.append((add, cols, bt, at))
        if not terms:
            continue
        ranks = [bt.shape[1] for _, _, bt, _ in terms]
        up = torch.zeros(sum(ranks), len(layer.b))
        r0 = 0
        for (_, cols, _, at), r in zip(terms, ranks):
            up[r0:r0 + r, cols] = at
            r0 += r
        layer.addend = Addend(torch.cat([bt for _, _, bt, _ in terms], 1).float().contiguous(), up)
        for add, cols, _, _ in terms:
            prog.member[add.name] = (layer, cols)    # the sum, read from the call's output columns


def _order(cap: Captured, node) -> int:
    return next(i for i, n in enumerate(cap.graph.nodes) if n is node)


def _name(modules: list[str], taken: set) -> str:
    """`encoder.layer.0.attention.self.query+key+value` for a fused call (the modules' common parent, then each
    one's own path: `...self.query.base+key.base+value.base`); unique (#2 for a module called again)."""
    head = modules[0] or "<top>"
    if len(modules) > 1:
        split = [m.split(".") for m in modules]
        common = 0
        while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
            common += 1
        parent = ".".join(split[0][:common]) + "." if common else ""
        head = parent + "+".join(".".join(p[common:]) for p in split)
    name, i = head, 1
    while name in taken:
        i += 1
        name = f"{head}#{i}"
    taken.add(name)
    return name


_programs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def of(model: torch.nn.Module | Program, inputs: dict[str, np.ndarray], only: frozenset[str] | None = None) -> Program:
    """The model captured for inputs of these shapes (captured once per model, shapes and `only`).
    The inputs are passed to the model's forward in the order of the dict. `only`: module paths of the linears
    that may be outsourced (None: all)."""
    if isinstance(model, Program):
        return model
    key = (tuple(sorted((k, tuple(np.shape(v))) for k, v in inputs.items())), only)
    cache = _programs.setdefault(model, {})
    if key not in cache:
        example = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values())
        with torch.no_grad():
            cache[key] = from_captured(capture(model.eval(), example, batch_one=False), list(inputs), only)
    return cache[key]


def from_captured(cap: Captured, inputs: list[str], only: frozenset[str] | None = None) -> Program:
    """A graph captured elsewhere (a user's .pt2), its inputs named `inputs` in order."""
    prog = _find(cap, only)
    prog.inputs = list(inputs)
    return prog


def linears(prog: Program) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every outsourced linear map in call order: name -> (W (out, in) float32, b (out,) float32)."""
    return {k: (layer.w, layer.b) for k, layer in prog.layers.items()}


def rows_per_call(prog: Program) -> dict[str, int]:
    """How many rows each linear call gets for the captured input shapes (blinded pads are made for this)."""
    return {k: layer.rows for k, layer in prog.layers.items()}


# ---------------------------------------------------------------- running it

class Parts:
    """A tensor of `shape` held as row parts (rows = every dim but the last), each computed when first asked for."""

    def __init__(self, shape, slices: list[slice], make: list[Callable[[], torch.Tensor]]):
        self.shape, self.slices, self.make = torch.Size(shape), slices, make
        self.got: list = [None] * len(make)

    def part(self, c: int) -> torch.Tensor:
        if self.got[c] is None:
            self.got[c] = self.make[c]()
        return self.got[c]

    def whole(self) -> torch.Tensor:
        if len(self.slices) == 1:
            return self.part(0).reshape(self.shape)
        return torch.cat([self.part(c) for c in range(len(self.slices))]).reshape(self.shape)


# ops that act on each row alone (given the row-alignment checks in `_rowwise`)
_POINTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.gelu.default,
              aten.relu.default, aten.tanh.default, aten.erf.default, aten.sigmoid.default, aten.neg.default,
              aten.exp.default, aten.rsqrt.default, aten.sqrt.default, aten.pow.Tensor_Scalar, aten.clone.default,
              aten.add.Scalar, aten.mul.Scalar, aten.native_layer_norm.default}


def _getter(a, value: Callable[[torch.fx.Node], object]):
    """env -> the value of `a` (a node, a literal, or lists and tuples of them): args fetched without fx's
    generic tree walk, which cost more than the small ops themselves. `value(node)`: ("const", tensor) for a
    value fixed at build time, bound here; else ("env", name) of the node whose value it is."""
    if isinstance(a, torch.fx.Node):
        kind, v = value(a)
        if kind == "const":
            return lambda env: v
        return lambda env: env[v]
    if isinstance(a, (list, tuple)) and any(isinstance(x, (torch.fx.Node, list, tuple)) for x in a):
        gs, kind = [_getter(x, value) for x in a], type(a)
        return lambda env: kind(g(env) for g in gs)
    if isinstance(a, dict) and a:
        gs = {k: _getter(v, value) for k, v in a.items()}
        return lambda env: {k: g(env) for k, g in gs.items()}
    return lambda env: a


@dataclass
class _Step:
    node: torch.fx.Node
    args: Callable                 # env -> (args, kwargs)
    inputs: list[str]              # names of the values it reads from env (constants are bound in `args`)
    free: list[str]                # values no later node reads
    out: object = None             # its output's shape (a tuple of shapes for several outputs), None if no tensor


def _shape(v):
    if isinstance(v, torch.Tensor):
        return torch.Size(v.shape)
    if isinstance(v, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(torch.Size(t.shape) for t in v)
    return None


def _meta(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same(graph: torch.fx.Graph, member: dict) -> tuple[dict, dict]:
    """(same, rewired): `same` maps a node that is another node's value under another name to that node -- a
    reshape or expand to the shape it already has, or a reshape of a reshape back to the shape of the first one's
    input; `rewired` gives a reshape of a reshape of a contiguous tensor new args that read that tensor directly
    (the middle reshape is then often unused). Linear calls, their inputs and their outputs (column slices of a
    fused call, not contiguous) are left as they are."""
    inputs = {layer.x for layer, _ in member.values()}
    same, rewired = {}, {}
    res = lambda n: same.get(n, n)
    for n in graph.nodes:
        if n.op != "call_function" or n.name in member or n in inputs or \
                n.target not in _VIEWS + (aten.expand.default,) or not isinstance(n.args[0], torch.fx.Node):
            continue
        src, out = res(n.args[0]), _meta(n)
        if out is None or _meta(src) is None:
            continue
        if _meta(src).shape == out.shape:
            same[n] = src
            continue
        if n.target not in _VIEWS or src.op != "call_function" or src.target not in _VIEWS or src.name in member \
                or not isinstance(src.args[0], torch.fx.Node):
            continue
        root = res(src.args[0])
        if root.name in member or _meta(root) is None or not _meta(root).is_contiguous():
            continue
        if _meta(root).shape == out.shape:
            same[n] = root
        else:
            rewired[n] = ((root, *n.args[1:]), n.kwargs)
    return same, rewired


def _plan(graph: torch.fx.Graph, member: dict, const: dict[str, torch.Tensor]) -> list[_Step]:
    """The nodes the output needs, in order: a linear node reads only its call's input (so W^T and the
    reshapes feeding the fused K and V calls are never run), and each value is dropped after its last use.
    Values of weights alone (parameters, and W^T of a private adapter) are bound at build time, contiguous, so
    they are no steps; neither are reshapes and expands that change nothing (`_same`)."""
    same, rewired = _same(graph, member)
    res = lambda n: same.get(n, n)
    args_of = lambda n: rewired.get(n, (n.args, n.kwargs))
    fixed: dict[str, object] = {}

    def value(n):
        name = res(n).name
        if name not in const:
            return "env", name
        if name not in fixed:    # a transposed weight becomes a contiguous one: small matmuls by it run faster
            v = const[name]
            fixed[name] = v.contiguous() if isinstance(v, torch.Tensor) else v
        return "const", fixed[name]

    def deps(n):
        if n.name in member:
            return [res(member[n.name][0].x)]
        found = []
        torch.fx.node.map_arg(args_of(n), found.append)
        return [res(a) for a in found if res(a).name not in const]

    nodes = list(graph.nodes)
    needed, stack = set(), [nodes[-1]]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(deps(n))
    nodes = [n for n in nodes if (n in needed or n.op == "placeholder") and n.name not in const and n not in same]
    last = {a.name: i for i, n in enumerate(nodes) for a in deps(n)}
    free = [[] for _ in nodes]
    for name, i in last.items():
        free[i].append(name)
    return [_Step(n, _getter(args_of(n), value), [a.name for a in deps(n)], free[i], _shape(n.meta.get("val")))
            for i, n in enumerate(nodes)]


class _Run:
    def __init__(self, prog: Program, submit: Submit, chunks: int):
        self.prog, self.submit, self.chunks = prog, submit, chunks
        self.calls: dict[str, object] = {}     # fused call -> its result (Parts, or a tensor for a convolution)
        self.env: dict[str, object] = {}

    def run(self, values: dict[str, torch.Tensor]):
        env = self.env
        for step in self.prog.plan:
            n = step.node
            if n.op == "placeholder":
                env[n.name] = values[n.name]
            elif n.op == "output":
                return torch.fx.node.map_aggregate(step.args(env)[0][0], _whole)
            else:
                env[n.name] = self.run_node(n, step)
            for name in step.free:
                del env[name]

    def run_node(self, n, step: _Step):
        if n.name in self.prog.member:
            return self._linear(step, *self.prog.member[n.name])
        args, kwargs = step.args(self.env)
        env = self.env
        held = [env[a] for a in step.inputs if type(env[a]) is Parts]
        if not held:
            return n.target(*args, **kwargs)
        p, out = held[0], step.out
        if n.target in _VIEWS and isinstance(out, torch.Size) and out[-1] == p.shape[-1] \
                and out.numel() == p.shape.numel() and args[0] is p:
            return Parts(out, p.slices, [functools.partial(p.part, c) for c in range(len(p.slices))])
        # Only ops whose every output element is computed the same way whatever the row count are run per part.
        # Not a float matmul (a private adapter's x.B): BLAS picks its kernel, and so its summation order, by the
        # row count, so row parts can differ from the whole product in the last bit (seen on AVX-512 machines).
        if n.target in _POINTWISE and self._rowwise(n, out, args, kwargs, p):
            return self._per_part(n, out, args, kwargs, p)
        args, kwargs = torch.fx.node.map_aggregate((args, kwargs), _whole)
        return n.target(*args, **kwargs)

    def _rowwise(self, n, outs, args, kwargs, p: Parts) -> bool:
        """Each output row depends on the same row of the inputs only: tensors are parts cut the same way,
        whole tensors of the same shape (a residual), or constants broadcast along the last dim."""
        outs = outs if isinstance(outs, tuple) and not isinstance(outs, torch.Size) else (outs,)
        rows = p.shape[:-1].numel()
        if not all(isinstance(o, torch.Size) and len(o) and o[:-1].numel() == rows for o in outs):
            return False
        if n.target == aten.native_layer_norm.default and len(args[1]) != 1:
            return False
        for a in _flat((args, kwargs)):
            if isinstance(a, Parts):
                if a.slices != p.slices:
                    return False
            elif isinstance(a, torch.Tensor) and a.numel() > 1 and a.shape != p.shape \
                    and a.numel() != a.shape[-1]:
                return False
        return True

    def _per_part(self, n, out, args, kwargs, p: Parts):
        rows = p.shape[:-1].numel()

        def arg(a, c):
            if type(a) is Parts:
                return a.part(c)
            if isinstance(a, torch.Tensor) and a.numel() > 1 and a.shape == p.shape:
                return a.reshape(rows, -1)[p.slices[c]]    # a whole row-aligned tensor: its rows of part c
            return a

        def one(c):   # the args of these ops are flat (LayerNorm's shape is a list of ints)
            return n.target(*[arg(a, c) for a in args], **{k: arg(v, c) for k, v in kwargs.items()})

        if not isinstance(out, torch.Size):   # LayerNorm: (y, mean, rstd), each row-wise
            whole = Parts(torch.Size([rows, 1]), p.slices, [functools.partial(one, c) for c in range(len(p.slices))])
            return tuple(Parts(o, p.slices, [functools.partial(lambda c, i: whole.part(c)[i], c, i)
                                                   for c in range(len(p.slices))]) for i, o in enumerate(out))
        return Parts(out, p.slices, [functools.partial(one, c) for c in range(len(p.slices))])

    def _linear(self, step: _Step, layer: Linear, cols: slice):
        if layer.name not in self.calls:
            x = self.env[step.inputs[0]]
            if layer.conv:
                self.calls[layer.name] = self._conv(layer, _whole(x))
            else:
                if not isinstance(x, Parts):
                    flat = x.reshape(-1, layer.w.shape[1])
                    rows = parts(flat.shape[0], self.chunks)
                    x = Parts(flat.shape, rows, [functools.partial(lambda r: flat[r], r) for r in rows])
                # part c is sent as soon as it is ready: this is where the enclave and the accelerator overlap
                pending = [self.submit(layer.name, x.part(c), r) for c, r in enumerate(x.slices)]
                if layer.addend is not None:
                    # computed on all rows at once, while the accelerator works: a GEMM's bits may depend on its
                    # row count, and the reference runs the rows as one part
                    a = layer.addend
                    extra = torch.mm(torch.mm(x.whole().reshape(-1, a.down.shape[0]), a.down), a.up)
                    pending = [_plus(p, extra[r]) for p, r in zip(pending, x.slices)]
                self.calls[layer.name] = Parts((x.shape[:-1].numel(), len(layer.b)), x.slices, pending)
        y = self.calls[layer.name]
        out = step.out
        if layer.conv:
            return y[:, cols]
        return Parts(out, y.slices, [functools.partial(lambda c: y.part(c)[:, cols], c) for c in range(len(y.slices))])

    def _conv(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        c = layer.conv
        cols = F.unfold(x, c["kernel"], dilation=c["dilation"], padding=c["padding"], stride=c["stride"])
        y = self.submit(layer.name, cols.transpose(1, 2).reshape(-1, cols.shape[1]), slice(0, layer.rows))()
        out = layer.nodes[0].meta["val"].shape     # (B, out, H', W')
        return y.reshape(out[0], -1, out[1]).transpose(1, 2).reshape(out)


def _plus(wait: Pending, extra: torch.Tensor) -> Pending:
    return lambda: wait() + extra


def _flat(tree) -> list:
    out = []
    torch.fx.node.map_aggregate(tree, lambda a: out.append(a))
    return out


def _whole(a):
    return a.whole() if isinstance(a, Parts) else a


def forward(model, inputs: dict[str, np.ndarray], lin: Lin) -> np.ndarray:
    """The model's output for `inputs` with every linear layer computed by `lin`, its float ops on one thread as
    in the enclave: a float GEMM's summation order can depend on the thread count (e.g. 128 x 1536 by 1536 x 4
    here), and the reference must be the enclave's arithmetic bit for bit."""
    own = torch.get_num_threads()
    torch.set_num_threads(ENCLAVE_THREADS)
    try:
        return pipelined(model, inputs, eager(lin), chunks=1)
    finally:
        torch.set_num_threads(own)


@torch.no_grad()
def pipelined(model, inputs: dict[str, np.ndarray], submit: Submit, chunks: int = 2) -> np.ndarray:
    """`forward` with the rows in `chunks` parts wherever the graph is row-wise, each linear layer started by `submit`."""
    prog = of(model, inputs)
    cap = prog.cap
    if set(inputs) != set(prog.inputs):
        raise TinyshieldError(f"the model takes inputs {prog.inputs}, got {sorted(inputs)}")
    xs = [torch.from_numpy(np.ascontiguousarray(inputs[k])).to(e.dtype) for k, e in zip(prog.inputs, cap.example)]
    out = _Run(prog, submit, chunks).run(dict(zip(cap.user_inputs, xs)))
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
    return out.numpy()


def plain_lin(params: dict[str, tuple[np.ndarray, np.ndarray]]) -> Lin:
    """The in-enclave fp32 linear (enclave-only mode, and the plaintext reference)."""
    t = {k: (torch.from_numpy(w), torch.from_numpy(b)) for k, (w, b) in params.items()}
    return lambda name, x: torch.addmm(t[name][1], x, t[name][0].T)
