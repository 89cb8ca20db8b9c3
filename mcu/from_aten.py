"""The captured graph (core ATen, edge.capture) -> the int8 `Graph`: post-training quantisation of any
tiny transformer whose ops we have kernels for.

One walk over the ATen nodes in order, each op handled by a small rule (`RULES`). Values are symbolic:
- `torch.Tensor`: a constant (parameters, and anything computed from constants only: folded by
  running the op itself);
- `Act`: an int8 activation as a strided *view* of a graph tensor with its own scale and zero point.
  View ops (view, permute, transpose, expand, select, slice, squeeze, clone ...) only change the view,
  computed by torch itself on a stand-in tensor, so head splits, `flatten(2).transpose(1, 2)` over an
  HWC conv output or MultiheadAttention's packed projections cost nothing. Multiplying by a positive
  scalar only changes the scale. An op that needs its input whole and contiguous copies a view that
  is not (`permute_s8`).
- patterns that become one kernel are *pending* values, fused by the op that consumes them:
  `Sum` (a + b, becomes add_layernorm when a LayerNorm takes it), `PlusConst` (a + constant table:
  position embeddings), `Scores` -> `Probs` (q k^T, scaled, key mask, softmax; with V: the attention
  kernels), `Masked`/`MaskedSum`/`Count` (masked mean pooling); a pending value used any other way is
  computed on its own (add_s8, ...).
- `Ids`, `Mask`: the token ids input and key masks derived from it (`ids == 0` is padding), however
  the model spells them (bool, 0/1 floats, additive -inf/-1e9 biases, MultiheadAttention's
  key_padding_mask plumbing).
Ranges come from `edge.capture.calibrate` (the captured graph itself run on calibration inputs), so
each int8 tensor's scale is the range of the ATen node it stands for. Anything without a rule is
refused with the op, the module path and the user's source line, before any code is generated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from base import quant as Q
from edge.capture import Captured, Ranges, map_nodes, rule_table, op_name, where
from base.errors import TinyshieldError
from mcu import kernels as K
from mcu import lower as L
from mcu.graph import Graph


# ---------------------------------------------------------------- symbolic values

@dataclass(frozen=True)
class Act:
    tensor: str
    shape: tuple
    strides: tuple
    offset: int
    scale: float
    zp: int
    node: str = ""              # the ATen node it stands for (for ranges and messages)
    relu: bool = False          # already clamped at zero (a fused ReLU)

    @property
    def q(self) -> Q.ActQ:
        return Q.ActQ(self.scale, self.zp)


@dataclass(frozen=True)
class Ids:
    tensor: str
    shape: tuple


@dataclass(frozen=True)
class Mask:
    """A per-key mask derived from the ids: `valid` is an int8 (L,) graph tensor, 1 = real token."""
    valid: str
    kind: str          # "bool" | "01" (0/1 numbers) | "bias" (0 / large negative, added to scores)
    true_at: str       # where the bool is True / the 0-1 value is 1 / the bias is 0: "valid" | "pad"
    shape: tuple


@dataclass
class Sum:
    a: Act
    b: Act
    node: str


@dataclass
class PlusConst:
    a: Act
    c: torch.Tensor
    node: str


@dataclass
class Scores:
    q: Act             # (h, Lq, dh)
    kt: Act            # (h, dh, Lk)
    factor: float
    node: str
    mask: Mask | None = None


@dataclass
class Probs:
    s: Scores


@dataclass
class Masked:
    a: Act
    mask: Mask


@dataclass
class MaskedSum:
    a: Act
    mask: Mask


@dataclass
class Count:
    mask: Mask


@dataclass(frozen=True)
class ShapeOnly:
    """A part of the token ids (e.g. `ids[:, :1]`) that the model uses only for its shape, as in
    `zeros_like(ids[:, :1], dtype=bool)` (the always-valid CLS slot of a key mask)."""
    shape: tuple


class RowsAllMasked:
    """`softmax(...).where(all keys masked, 0)`: the softmax kernel already gives 0 there."""


ZERO = "zero-like"


# ---------------------------------------------------------------- the lowering

def _contig_strides(shape) -> tuple:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= int(d)
    return tuple(reversed(out))


def _squeeze_lead(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


class Lowering:
    def __init__(self, cap: Captured, ranges: Ranges, name: str, special: dict | None = None):
        self.cap, self.ranges = cap, ranges
        self.b = L.Builder(name)
        self.env: dict[str, object] = {}
        self.nodes = {n.name: n for n in cap.graph.nodes}
        self.names: dict[str, int] = {}
        self.special = special or {}      # module path -> its own lookup lowering (e.g. a CLR word table)
        self.ones_mask: dict[int, str] = {}
        self.cat_consts: dict[str, list] = {}   # concat output -> its constant parts (see _fold_cat_consts)
        self.folded_bn: set[str] = set()        # BatchNorm nodes folded into the conv before them
        self.meta: dict = {}

    # -------------------------------------------------- helpers
    def fail(self, node, what: str, fix: str = "") -> TinyshieldError:
        w = where(node)
        return TinyshieldError(f"{what} (node {node.name}: {node.target}, {w})" + (f": {fix}" if fix else ""))

    def opname(self, node, suffix: str = "") -> str:
        w = where(node)
        base = (w.module or node.name) + suffix
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        name = base if n == 0 else f"{base}#{n}"
        if w.source:    # so that tinyshield validate can point at the user's line
            self.meta.setdefault("where", {})[name] = w.source
        return name

    def note_float(self, a: Act, node_name: str) -> None:
        """Record that tensor a.tensor holds the float value of ATen node `node_name` (its layout, scale
        and zero point as `a` sees it), for comparing device tensors with the float model. The first
        node producing a tensor wins (later views of it, or a rescale, are the same bytes)."""
        t = self.b.tensors.get(a.tensor)
        seen = self.meta.setdefault("node_of", {})
        if t is None or a.tensor in seen or a.offset != 0 or int(np.prod(a.shape)) != int(np.prod(t.shape)):
            return
        seen[a.tensor] = (node_name, tuple(int(v) for v in a.shape), tuple(int(v) for v in a.strides),
                          float(a.scale), int(a.zp))

    def q_of(self, node_name: str, symmetric=False) -> Q.ActQ:
        lo, hi = self.ranges.range(node_name)
        return Q.choose_activation_qparams(lo, hi, symmetric=symmetric)

    def new_act(self, name: str, shape, q: Q.ActQ, node: str, dtype="int8", relu=False) -> Act:
        phys = _squeeze_lead(shape)
        self.b.act(name, phys, q, dtype=dtype)
        return Act(name, tuple(int(s) for s in shape), _contig_strides(shape), 0, q.scale, q.zero_point, node, relu)

    def is_whole(self, a: Act) -> bool:
        t = self.b.tensors[a.tensor]
        n = int(np.prod(a.shape, dtype=np.int64))
        return a.offset == 0 and n == int(np.prod(t.shape, dtype=np.int64)) and \
            all(st == cs for st, cs, d in zip(a.strides, _contig_strides(a.shape), a.shape) if d != 1)

    def whole(self, a: Act, node) -> Act:
        """`a` as a whole contiguous tensor of its own, copying the view when it is not one."""
        if self.is_whole(a):
            return a
        shape = [int(s) for s in a.shape]
        strides = [int(s) for s in a.strides]
        while len(shape) > 1 and shape[0] == 1:
            shape, strides = shape[1:], strides[1:]
        if len(shape) > 6:
            raise self.fail(node, f"a {len(shape)}-d copy is not supported (at most 6 dimensions)")
        name = self.opname(node, ".copy")
        out = self.new_act(f"{name}.out", a.shape, a.q, a.node, relu=a.relu)
        dims = self.b.const(f"{name}.dims", K.permute_dims(shape, strides))
        self.b.op("permute", name, [a.tensor, dims], [out.tensor], offset=a.offset, nd=len(shape),
                  n=int(np.prod(shape)))
        return out

    def rows(self, a: Act, M: int) -> Act:
        """A whole tensor read as M rows: its graph shape becomes (M, rest), so that schedules that work
        block by block of rows (tiled) see the rows the kernel sees (e.g. an HWC conv output read as tokens)."""
        t = self.b.tensors[a.tensor]
        n = int(np.prod(t.shape))
        if a.tensor != "input" and n % M == 0:      # the graph input keeps the layout the device is given
            t.shape = (M, n // M)
        return a

    def view(self, a: Act, fn) -> Act | None:
        """Apply a torch view op to `a`'s view; None when the result would not be a view (needs a copy)."""
        t = self.b.tensors[a.tensor]
        base = torch.empty(int(np.prod(t.shape, dtype=np.int64)), dtype=torch.int8)
        try:
            r = fn(base.as_strided(a.shape, a.strides, a.offset))
        except RuntimeError:
            return None
        if r.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            return None
        return replace(a, shape=tuple(r.shape), strides=tuple(r.stride()), offset=int(r.storage_offset()))

    def act(self, v, node) -> Act:
        """A pending value computed on its own as an int8 tensor."""
        if isinstance(v, Act):
            return v
        if isinstance(v, Sum):
            return self.emit_add(v.a, v.b, v.node)
        if isinstance(v, PlusConst):
            return self.emit_add_const(v, node)
        if isinstance(v, Scores):
            raise self.fail(node, "a matmul of two activations is supported only as attention "
                                  "(q k^T, optional scale and key mask, softmax, then times v)")
        raise self.fail(node, f"{type(v).__name__} values cannot be used here")

    # -------------------------------------------------- the walk
    def run(self) -> Graph:
        g = self.cap.graph
        inputs = []
        for n in g.nodes:
            if n.op == "placeholder":
                if n.name in self.cap.consts:
                    self.env[n.name] = self.cap.consts[n.name]
                else:
                    inputs.append(self.input(n))
            elif n.op == "call_function":
                self.env[n.name] = v = self.call(n)
                # A fused ReLU sits in the producer's tensor: that tensor is the ReLU node's value
                if isinstance(v, Act) and (not v.relu or op_name(n) == "relu"):
                    self.note_float(v, n.name)
            elif n.op == "output":
                outs = n.args[0]
                if len(outs) != 1:
                    raise self.fail(n, f"the model returns {len(outs)} tensors; a board model returns one")
                out = self.env[outs[0].name]
                if isinstance(out, torch.Tensor):
                    raise self.fail(n, "the model's output does not depend on its input")
                out = self.whole(self.act(out, n), n)
                self.rename(out.tensor, "output")
                self.meta["output_q"] = (out.scale, out.zp)
                self.meta["output_shape"] = tuple(int(s) for s in outs[0].meta["val"].shape)
        graph = self.b.graph(inputs, ["output"], self.meta)
        return eliminate_dead(graph)

    def rename(self, old: str, new: str) -> None:
        t = self.b.tensors.pop(old)
        t.name = new
        self.b.tensors[new] = t
        if old in self.meta.get("node_of", {}):
            self.meta["node_of"][new] = self.meta["node_of"].pop(old)
        for op in self.b.ops:
            op.inputs = [new if x == old else x for x in op.inputs]
            op.outputs = [new if x == old else x for x in op.outputs]

    def input(self, n) -> str:
        val = n.meta["val"]
        if val.dtype in (torch.int64, torch.int32):
            if val.ndim != 2:
                raise self.fail(n, f"integer input of shape {tuple(val.shape)}: token ids must be (1, L)")
            t = self.b.act("input", (int(val.shape[1]),), None, dtype="int32")
            self.env[n.name] = Ids(t, tuple(val.shape))
            self.meta.update(input_kind="ids", seq_len=int(val.shape[1]))
            return t
        if not val.is_floating_point():
            raise self.fail(n, f"input dtype {val.dtype} is not supported (float or int64 token ids)")
        q = self.q_of(n.name)
        shape = tuple(int(s) for s in val.shape)
        if len(shape) == 4:         # NCHW: stored HWC on the board, what the conv kernel reads
            _, C, H, W = shape
            self.b.act("input", (H, W, C), q)
            self.env[n.name] = Act("input", shape, (H * W * C, 1, W * C, C), 0, q.scale, q.zero_point, n.name)
            self.meta["input_layout"] = "nchw->hwc"
        else:
            self.env[n.name] = replace(self.new_act("input", shape, q, n.name), node=n.name)
        self.meta.update(input_kind="float", input_q=(q.scale, q.zero_point), input_shape=shape)
        return "input"

    def call(self, n):
        args = map_nodes(n.args, lambda a: self.env[a.name])
        kwargs = map_nodes(n.kwargs, lambda a: self.env[a.name])
        op = op_name(n)
        if _all_const(args, kwargs) and op not in NO_FOLD:
            return n.target(*args, **kwargs)           # constant folding: run the op itself
        rule = RULES.get(op)
        if rule is None:
            raise self.fail(n, f"operator aten.{op} is not supported on the board",
                            "see the supported operators in mcu/from_aten.py, or rewrite that part of the model")
        return rule(self, n, *args, **kwargs)

    # -------------------------------------------------- emitters
    def emit_add(self, a: Act, b: Act, node_name: str) -> Act:
        node = self.nodes[node_name]
        if int(np.prod(a.shape)) < int(np.prod(b.shape)):
            a, b = b, a                     # the broadcast operand is b (add is symmetric)
        a, b = self.whole(a, node), self.whole(b, node)
        sa, sb = _squeeze_lead(a.shape), _squeeze_lead(b.shape)
        if sa != sb and tuple(sa[len(sa) - len(sb):]) != sb:
            raise self.fail(node, f"adding activations of shapes {a.shape} and {b.shape} is not supported "
                                  "(only equal shapes, or b repeated over a's leading dimensions)")
        return self.emit_add_tensors(a, b.tensor, b.q, node, b_n=int(np.prod(b.shape)))

    def emit_add_tensors(self, a: Act, b_tensor: str, bq: Q.ActQ, node, b_n: int) -> Act:
        q = self.q_of(node.name)
        name = self.opname(node, ".add")
        y = self.new_act(f"{name}.out", a.shape, q, node.name)
        p = K.add_params(a.scale, bq.scale, q.scale)
        n = int(np.prod(a.shape))
        self.b.op("add", name, [a.tensor, b_tensor], [y.tensor], n=n, b_n=b_n, a_zp=a.zp, b_zp=bq.zero_point,
                  y_zp=q.zero_point, **p)
        self.note_float(y, node.name)
        return y

    def emit_add_const(self, v: PlusConst, node) -> Act:
        node = self.nodes[v.node]
        a = self.whole(v.a, node)
        c = torch.broadcast_to(v.c, a.shape).double().numpy()
        cq, cqp = L._const_q(c.reshape(_squeeze_lead(a.shape)))
        name = self.opname(node, ".const")
        self.b.const(name, cq, cqp)
        return self.emit_add_tensors(a, name, Q.ActQ(cqp.scale[0], 0), node, b_n=cq.size)


def _all_const(args, kwargs) -> bool:
    vals = list(args) + list(kwargs.values())
    flat = []
    for v in vals:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    return not any(isinstance(v, (Act, Ids, Mask, Sum, PlusConst, Scores, Probs, Masked, MaskedSum, Count,
                                  RowsAllMasked, ShapeOnly)) for v in flat)


NO_FOLD = {"full_like", "zeros_like", "ones_like"}   # shape-only ops on an input: constants of its shape


def _scalar(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
        return float(v)
    return None


def _uniform(v) -> float | None:
    """A scalar, or a constant float tensor holding one value everywhere (`full_like(mask, 0.0)`)."""
    s = _scalar(v)
    if s is None and isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 0 \
            and bool((v == v.reshape(-1)[0]).all()):
        return float(v.reshape(-1)[0])
    return s


def eliminate_dead(g: Graph) -> Graph:
    """Drop ops whose outputs nobody reads (e.g. a sigmoid folded into SiLU) and unused tensors."""
    while True:
        used = set(g.outputs) | {i for op in g.ops for i in op.inputs}
        keep = [op for op in g.ops if any(o in used for o in op.outputs)]
        if len(keep) == len(g.ops):
            break
        g.ops = keep
    live = set(g.inputs) | set(g.outputs) | {t for op in g.ops for t in op.inputs + op.outputs}
    g.tensors = {k: v for k, v in g.tensors.items() if k in live}
    return g


# ---------------------------------------------------------------- rules

RULES, rule = rule_table()


VIEW_OPS = ("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "select", "slice",
            "unsqueeze", "squeeze", "alias", "clone", "contiguous", "flatten", "unflatten", "detach",
            "lift_fresh_copy", "unfold", "dropout")


IDENTITY_OPS = ("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "dropout")


@rule(*VIEW_OPS)
def _view(lw: Lowering, n, x, *args, **kw):
    if op_name(n) in IDENTITY_OPS:
        return x                            # values are never written in place: a copy is the same value
    if isinstance(x, Act):
        f = lambda t: n.target(t, *args, **kw)          # noqa: E731 -- torch computes the new view
        r = lw.view(x, f) or lw.view(lw.whole(x, n), f)   # not a view of x: a view of a contiguous copy
        if r is None:
            raise lw.fail(n, "this view op cannot be computed as a view of its input or of a contiguous copy")
        return r
    if isinstance(x, Ids):
        shape = tuple(n.meta["val"].shape)
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            return ShapeOnly(shape)     # a slice of the ids: only its shape may be used (zeros_like ...)
        return Ids(x.tensor, shape)
    if isinstance(x, Mask):
        return replace(x, shape=tuple(n.meta["val"].shape))
    if isinstance(x, (Scores, Probs)):
        return x                            # (h, L, L) <-> (1, h, L, L): heads stay the leading axis
    if isinstance(x, (Sum, PlusConst)):
        return _view(lw, n, lw.act(x, n), *args, **kw)
    if isinstance(x, (RowsAllMasked, Count)) or x is ZERO:
        return x
    if isinstance(x, ShapeOnly):
        return ShapeOnly(tuple(n.meta["val"].shape))
    raise lw.fail(n, f"cannot view a {type(x).__name__}")


@rule("_to_copy", "to")
def _to_copy(lw, n, x, *a, **kw):
    dtype = kw.get("dtype")
    if isinstance(x, Mask):
        if dtype is not None and dtype.is_floating_point or dtype in (torch.int64, torch.int32):
            return replace(x, kind="01" if x.kind == "bool" else x.kind)
        return x
    if isinstance(x, Act) and (dtype is None or dtype.is_floating_point):
        return x
    if isinstance(x, Ids) and dtype in (torch.int64, torch.int32):
        return x
    raise lw.fail(n, f"dtype conversion of a {type(x).__name__} to {dtype} is not supported")


# ---- ids and masks

@rule("eq", "ne")
def _eq(lw, n, x, other):
    if isinstance(x, Ids):
        if _scalar(other) != 0:
            raise lw.fail(n, "key padding masks must compare the ids with 0 (the [PAD] id)",
                          "pad with token id 0")
        if "pad_mask" not in lw.meta:
            lw.b.act("pad_mask", (x.shape[-1],), None)
            lw.b.op("pad_mask", "pad_mask", [x.tensor], ["pad_mask"], L=x.shape[-1])
            lw.meta["pad_mask"] = True
        return Mask("pad_mask", "bool", "pad" if op_name(n) == "eq" else "valid", tuple(n.meta["val"].shape))
    if isinstance(x, (Scores, Probs)) and op_name(n) == "eq" and _scalar(other) == -math.inf:
        return RowsAllMasked()
    raise lw.fail(n, f"comparison of a {type(x).__name__} is not supported")


@rule("logical_not", "bitwise_not")
def _not(lw, n, x):
    if isinstance(x, Mask) and x.kind == "bool":
        return replace(x, true_at="pad" if x.true_at == "valid" else "valid")
    if isinstance(x, RowsAllMasked):
        return x
    raise lw.fail(n, f"logical not of a {type(x).__name__} is not supported")


@rule("any", "all")
def _any(lw, n, x, *a, **kw):
    if isinstance(x, RowsAllMasked):
        return x
    raise lw.fail(n, "any/all are supported only in the fully-masked-row check of attention")


@rule("full_like", "zeros_like", "ones_like")
def _full_like(lw, n, x, *a, **kw):
    val = n.meta["val"]
    fill = {"zeros_like": 0.0, "ones_like": 1.0}.get(op_name(n), a[0] if a else kw.get("fill_value"))
    if isinstance(x, (Probs, Scores)) and fill == 0:
        return ZERO
    return torch.full(tuple(val.shape), fill, dtype=val.dtype)


@rule("where")
def _where(lw, n, cond, a, b):
    if isinstance(cond, RowsAllMasked) and a is ZERO and isinstance(b, Probs):
        return b
    if isinstance(cond, Mask) and cond.kind == "bool":
        # MultiheadAttention and TransformerEncoderLayer spell the bias as
        # where(mask, scalar_tensor(-inf), full_like(mask, 0.0)): the zero is a whole constant tensor
        sa, sb = _uniform(a), _uniform(b)
        if sa is not None and sb is not None:
            big, zero = (sa, sb) if sb == 0 else (sb, sa)
            if zero == 0 and big <= -1e4:
                # bias is 0 where cond is False (sa is the big one) -> true_at names where it is 0
                zero_at = cond.true_at if sa == 0 else ("pad" if cond.true_at == "valid" else "valid")
                return Mask(cond.valid, "bias", zero_at, tuple(n.meta["val"].shape))
    raise lw.fail(n, "where() is supported only to build an additive key mask (where(mask, -inf, 0))")


@rule("rsub")
def _rsub(lw, n, x, other, alpha=1):
    if isinstance(x, Mask) and x.kind == "01" and _scalar(other) == 1:
        return replace(x, true_at="pad" if x.true_at == "valid" else "valid")
    raise lw.fail(n, "rsub is supported only as 1 - mask")


@rule("sub")
def _sub(lw, n, x, y, alpha=1):
    if isinstance(y, Mask) and y.kind == "01" and _scalar(x) == 1:
        return replace(y, true_at="pad" if y.true_at == "valid" else "valid")
    if isinstance(x, (Act, Sum, PlusConst)) and isinstance(y, torch.Tensor):
        return _add(lw, n, x, -y * alpha)
    if isinstance(x, (Act, Sum, PlusConst)) and isinstance(y, (Act, Sum, PlusConst)) and alpha == 1:
        return Sum(lw.act(x, n), _negate(lw, n, y), n.name)      # x - y = x + (-y): add_s8 or add+LayerNorm
    raise lw.fail(n, f"subtracting a {type(y).__name__} from a {type(x).__name__} is not supported")


@rule("masked_fill")
def _masked_fill(lw, n, x, mask, value):
    if isinstance(x, Scores) and isinstance(mask, Mask) and _scalar(value) is not None and _scalar(value) <= -1e4:
        return replace(x, mask=replace(mask, kind="bias", true_at="valid" if mask.true_at == "pad" else "pad"))
    raise lw.fail(n, "masked_fill is supported only on attention scores with a key mask")


# ---- arithmetic

@rule("add")
def _add(lw, n, x, y, alpha=1):
    if alpha != 1:
        y = y * alpha if isinstance(y, torch.Tensor) else y
    if isinstance(y, (Scores, Act, Sum, PlusConst)) and not isinstance(x, (Scores, Act, Sum, PlusConst)):
        x, y = y, x
    if isinstance(x, Scores):
        if isinstance(y, Mask) and y.kind == "bias" and y.true_at == "valid":
            if x.mask is not None:
                raise lw.fail(n, "attention with two key masks is not supported")
            return replace(x, mask=y)
        if _uniform(y) == 0:        # an all-zero bias (e.g. an all-True boolean attn_mask) masks nothing
            return x
        raise lw.fail(n, "attention scores plus a constant (e.g. a causal or relative-position bias) is not "
                         "supported: only key padding masks built from the token ids")
    if isinstance(x, Mask) and isinstance(y, Mask):
        raise lw.fail(n, "adding two masks is not supported")
    if isinstance(x, Act) and isinstance(y, torch.Tensor) and x.tensor in lw.cat_consts:
        y = _fold_cat_consts(lw, n, x, y)
    if isinstance(x, (Act, Sum, PlusConst)) and isinstance(y, torch.Tensor):
        if isinstance(x, PlusConst):
            return PlusConst(x.a, x.c + y, n.name)
        x = lw.act(x, n)
        return PlusConst(x, y.detach().to(torch.float64), n.name)
    if isinstance(x, (Act, Sum, PlusConst)) and _scalar(y) is not None:
        return _add(lw, n, x, torch.tensor(float(y), dtype=torch.float64))
    if isinstance(x, (Act, Sum, PlusConst)) and isinstance(y, (Act, Sum, PlusConst)):
        return Sum(lw.act(x, n), lw.act(y, n), n.name)
    raise lw.fail(n, f"adding a {type(x).__name__} and a {type(y).__name__} is not supported")


@rule("mul")
def _mul(lw, n, x, y):
    if not isinstance(x, (Act, Scores, Sum, PlusConst, Mask)) and isinstance(y, (Act, Scores, Sum, PlusConst, Mask)):
        x, y = y, x
    s = _scalar(y)
    if isinstance(x, Scores) and s is not None and s > 0:
        return replace(x, factor=x.factor * s, node=n.name)
    if isinstance(x, (Act, Sum, PlusConst)) and s is not None:
        if s == 0:
            raise lw.fail(n, "multiplying an activation by 0 is not supported")
        a = lw.act(x, n) if s > 0 else _negate(lw, n, x)
        return replace(a, scale=a.scale * abs(s), node=n.name)
    if isinstance(x, Mask):
        if x.kind == "01" and s is not None and s <= -1e4 and x.true_at == "pad":
            return replace(x, kind="bias", true_at="valid")
        if isinstance(y, (Act, Sum, PlusConst)) and x.kind in ("01", "bool") and x.true_at == "valid":
            return Masked(lw.act(y, n), x)
    if isinstance(x, (Act, Sum, PlusConst)) and isinstance(y, Mask) and y.kind in ("01", "bool") \
            and y.true_at == "valid":
        return Masked(lw.act(x, n), y)
    if isinstance(x, (Act, Sum, PlusConst)) and isinstance(y, (Act, Sum, PlusConst)):
        return _mul_acts(lw, n)
    raise lw.fail(n, f"multiplying a {type(x).__name__} by a {type(y).__name__} is not supported")


def _mul_acts(lw, n):
    """x * sigmoid(x) is SiLU (one table); any other product of two activations is mul_s8."""
    a, b = n.args
    for p, s in ((a, b), (b, a)):
        if isinstance(s, torch.fx.Node) and op_name(s) == "sigmoid" and s.args[0] is p:
            return _table(lw, n, lw.env[p.name], torch.nn.functional.silu)
    x, y = (lw.whole(lw.act(lw.env[v.name], n), n) for v in (a, b))
    if x.shape != y.shape and int(np.prod(y.shape)) not in (int(np.prod(x.shape)), x.shape[-1]):
        raise lw.fail(n, f"multiplying activations of shapes {x.shape} and {y.shape} is not supported")
    q = lw.q_of(n.name)
    name = lw.opname(n, ".mul")
    out = lw.new_act(f"{name}.out", x.shape, q, n.name)
    m, sh = Q.quantize_multiplier(x.scale * y.scale / q.scale)
    lw.b.op("mul", name, [x.tensor, y.tensor], [out.tensor], n=int(np.prod(x.shape)), b_n=int(np.prod(y.shape)),
            a_zp=x.zp, b_zp=y.zp, y_mult=m, y_shift=sh, y_zp=q.zero_point)
    return out


@rule("div")
def _div(lw, n, x, y, **kw):
    s = _scalar(y)
    if s is not None and s > 0 and isinstance(x, (Scores, Act, Sum, PlusConst)):
        return _mul(lw, n, x, 1.0 / s)
    if isinstance(x, MaskedSum) and isinstance(y, Count):
        return _mean_pool(lw, n, x.a, x.mask.valid)
    raise lw.fail(n, f"dividing a {type(x).__name__} by a {type(y).__name__} is not supported")


@rule("clamp", "clamp_min")
def _clamp(lw, n, x, *a, **kw):
    if isinstance(x, Count):
        return x
    if isinstance(x, (Act, Sum, PlusConst)):     # e.g. hardswish's x * clamp(x + 3, 0, 6) / 6: a table
        return _table(lw, n, x, lambda v: torch.clamp(v, *a, **kw))
    raise lw.fail(n, "clamp is supported on activations and on the token count of a masked mean")


@rule("sum")
def _sum(lw, n, x, dims=None, keepdim=False, **kw):
    if isinstance(x, Masked):
        return MaskedSum(x.a, x.mask)
    if isinstance(x, Mask):
        return Count(x)
    raise lw.fail(n, "sum is supported only in masked mean pooling ((h * mask).sum(1) / mask.sum(1))")


@rule("mean")
def _mean(lw, n, x, dims, keepdim=False, **kw):
    x = lw.act(x, n)
    dims = [d % len(x.shape) for d in dims]
    lead = [i for i, s in enumerate(x.shape) if i not in dims]
    if len(dims) != 1 or [x.shape[i] for i in lead[:-1]] != [1] * (len(lead) - 1) or dims[0] > lead[-1]:
        raise lw.fail(n, f"mean over dims {dims} of a {x.shape} tensor is not supported (only over tokens: "
                         "mean(1) of (1, L, d))")
    L_ = x.shape[dims[0]]
    if L_ not in lw.ones_mask:
        lw.ones_mask[L_] = lw.b.const(f"ones_mask.{L_}", np.ones(L_, dtype=np.int8))
    return _mean_pool(lw, n, x, lw.ones_mask[L_])


def _mean_pool(lw, n, x: Act, mask: str):
    x = lw.whole(x, n)
    Lx, d = _squeeze_lead(x.shape)[-2:]
    x = lw.rows(x, Lx)
    q = lw.q_of(n.name)
    name = lw.opname(n, ".pool")
    y = lw.new_act(f"{name}.out", (1, d), q, n.name)
    m, s = Q.quantize_multiplier(x.scale / (q.scale * (1 << K.POOL_BITS)))
    lw.b.op("mean_pool", name, [x.tensor, mask], [y.tensor], L=Lx, d=d, x_zp=x.zp, mult=m, shift=s, y_zp=q.zero_point)
    return replace(y, shape=tuple(n.meta["val"].shape), strides=_contig_strides(n.meta["val"].shape))


# ---- linear layers

def _relu_after(n) -> torch.fx.Node | None:
    """The ReLU this node feeds through views only, if it is the single consumer (fused into the kernel)."""
    cur = n
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if op_name(u) == "relu":
            return u
        if op_name(u) not in ("view", "_unsafe_view", "clone", "alias"):
            return None
        cur = u
    return None


@rule("addmm", "mm")
def _addmm(lw, n, *args, beta=1, alpha=1):
    bias, x, w = args if op_name(n) == "addmm" else (None, *args)
    if isinstance(x, torch.Tensor) and not isinstance(w, torch.Tensor):
        raise lw.fail(n, "a matmul of a constant by an activation is not supported (weights on the right)")
    if not isinstance(w, torch.Tensor):
        raise lw.fail(n, "a matmul of two activations outside attention is not supported")
    if beta != 1 or alpha != 1:
        raise lw.fail(n, "addmm with beta/alpha != 1 is not supported")
    x = lw.whole(lw.act(x, n), n)
    W = w.detach().double().numpy().T           # (N, K)
    B = None if bias is None else torch.broadcast_to(bias, (W.shape[0],)).detach().double().numpy()
    relu = _relu_after(n)
    q = lw.q_of((relu or n).name)
    M = int(np.prod(x.shape[:-1]))
    name = lw.opname(n)
    y = L.fc(lw.b, name, W, B, lw.rows(x, M).tensor, q, M, relu=relu is not None, xq=x.q)
    return Act(y, (M, W.shape[0]), _contig_strides((M, W.shape[0])), 0, q.scale, q.zero_point, n.name, relu is not None)


@rule("convolution")
def _conv(lw, n, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or groups != 1 or any(d != 1 for d in dilation) or len(stride) != 2:
        raise lw.fail(n, "only 2-d convolutions with groups=1, dilation=1 are supported")
    if stride[0] != stride[1] or padding[0] != padding[1] or w.shape[2] != w.shape[3]:
        raise lw.fail(n, "only square kernels with equal strides and paddings are supported")
    x = lw.act(x, n)
    _, C, H, W_ = x.shape
    hwc = (H * W_ * C, 1, W_ * C, C)
    if not (x.offset == 0 and all(s == h for s, h, d in zip(x.strides, hwc, x.shape) if d != 1)
            and int(np.prod(lw.b.tensors[x.tensor].shape)) == H * W_ * C):
        # copy to HWC: the (1, H, W, C) permutation of the NCHW view
        x = lw.whole(lw.view(x, lambda t: t.permute(0, 2, 3, 1)), n)
        x = replace(x, shape=(1, C, H, W_), strides=hwc)
    out = n
    bn = _bn_after(n)
    if bn is not None:      # eval-mode BatchNorm right after the conv: folded into its weights and bias
        w, b = _fold_bn(lw, bn, w, b)
        out = next(u for u in bn.users if op_name(u) == "getitem" and u.args[1] == 0)
        lw.folded_bn.add(bn.name)
    relu = _relu_after(out)
    q = lw.q_of((relu or out).name)
    name = lw.opname(n)
    y = L.conv(lw.b, name, w.detach().double().numpy(), None if b is None else b.detach().double().numpy(),
               int(stride[0]), int(padding[0]), x.tensor, H, W_, q, relu is not None, xq=x.q)
    Ho, Wo, Co = lw.b.tensors[y].shape
    return Act(y, (1, Co, Ho, Wo), (Ho * Wo * Co, 1, Wo * Co, Co), 0, q.scale, q.zero_point, out.name, relu is not None)


def _bn_after(n) -> torch.fx.Node | None:
    u = next(iter(n.users)) if len(n.users) == 1 else None
    return u if u is not None and op_name(u) == "_native_batch_norm_legit_no_training" else None


def _fold_bn(lw, bn, w, b):
    """conv then BatchNorm (eval): w * g / sqrt(var + eps) per output channel, bias shifted to match."""
    gamma, beta, mean, var = (lw.env[a.name] if isinstance(a, torch.fx.Node) else None for a in bn.args[1:5])
    eps = bn.args[6]
    k = (gamma if gamma is not None else 1.0) / torch.sqrt(var + eps)
    b0 = b if b is not None else torch.zeros_like(mean)
    return w * k.reshape(-1, 1, 1, 1), (b0 - mean) * k + (beta if beta is not None else 0.0)


@rule("_native_batch_norm_legit_no_training")
def _batch_norm(lw, n, x, *a):
    if n.name in lw.folded_bn:
        return (x, None, None)
    raise lw.fail(n, "BatchNorm is supported only right after a conv2d (folded into it)")


@rule("embedding")
def _embedding(lw, n, weight, ids, *a):
    if not isinstance(ids, Ids):
        raise lw.fail(n, "embedding lookups are supported on the token ids input")
    if where(n).module in lw.special:
        return lw.special[where(n).module](lw, ids, n)
    wt, wq = L._const_q(weight.detach().double().numpy())
    name = lw.opname(n)
    lw.b.const(f"{name}.weight", wt, wq)
    Lx = ids.shape[-1]
    d = int(weight.shape[1])
    q = Q.ActQ(wq.scale[0], 0)
    y = lw.new_act(f"{name}.out", (*ids.shape, d), q, n.name)
    lw.b.op("embedding", name, [ids.tensor, f"{name}.weight"], [y.tensor], L=Lx, d=d, vocab=int(weight.shape[0]))
    return y


@rule("native_layer_norm")
def _layer_norm(lw, n, x, shape, w, b, eps):
    if len(shape) != 1:
        raise lw.fail(n, "LayerNorm over more than the last dimension is not supported")
    d = int(shape[0])
    out = next((u for u in n.users if op_name(u) == "getitem" and u.args[1] == 0), None)
    q = lw.q_of(out.name)
    gamma = np.ones(d) if w is None else w.detach().double().numpy()
    beta = np.zeros(d) if b is None else b.detach().double().numpy()
    name = lw.opname(n)
    if isinstance(x, Sum):
        a, r = lw.whole(x.a, n), lw.whole(x.b, n)
        M = int(np.prod(a.shape[:-1]))
        lw.rows(a, M), lw.rows(r, M)
        shape_ = a.shape
        y = L.add_layernorm(lw.b, name, gamma, beta, eps, a.tensor, r.tensor, q, int(np.prod(a.shape[:-1])),
                            qa=a.q, qb=r.q)
    elif isinstance(x, PlusConst):
        a = lw.rows(lw.whole(x.a, n), int(np.prod(x.a.shape[:-1])))
        c = torch.broadcast_to(x.c, a.shape).double().numpy().reshape(int(np.prod(a.shape[:-1])), d)
        ct, cq = L._const_q(c)
        lw.b.const(f"{name}.table", ct, cq)
        shape_ = a.shape
        y = L.add_layernorm(lw.b, name, gamma, beta, eps, a.tensor, f"{name}.table", q, int(np.prod(a.shape[:-1])),
                            qa=a.q, qb=Q.ActQ(cq.scale[0], 0))
    else:
        a = lw.whole(lw.act(x, n), n)
        lw.rows(a, int(np.prod(a.shape[:-1])))
        shape_ = a.shape
        y = L.add_layernorm(lw.b, name, gamma, beta, eps, a.tensor, None, q, int(np.prod(a.shape[:-1])), qa=a.q)
    return (Act(y, shape_, _contig_strides(shape_), 0, q.scale, q.zero_point, out.name), None, None)


@rule("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async")
def _assert(lw, n, *a, **kw):
    return None     # export-time checks of shapes and dtypes: nothing to run on the board


@rule("getitem")
def _getitem(lw, n, x, i):
    return x[i]


# ---- pointwise functions: one 256-entry table each

def _table(lw, n, x, fn, q: Q.ActQ | None = None) -> Act:
    x = lw.whole(lw.act(x, n), n)
    q = q or lw.q_of(n.name)
    levels = torch.tensor((np.arange(-128, 128) - x.zp) * x.scale, dtype=torch.float64)
    table = Q.quantize(fn(levels).numpy(), q.scale, q.zero_point)
    name = lw.opname(n, "." + op_name(n))
    t = lw.b.const(f"{name}.table", table)
    y = lw.new_act(f"{name}.out", x.shape, q, n.name)
    lw.b.op("lut", name, [x.tensor, t], [y.tensor], n=int(np.prod(x.shape)))
    return y


def _negate(lw, n, x) -> Act:
    """-x. int8 scales are positive, so a sign flip is a pass over the values: with the same scale and
    zero point -zp-1 the table is q -> -1-q, exact."""
    a = lw.whole(lw.act(x, n), n)
    return replace(_table(lw, n, a, torch.neg, Q.ActQ(a.scale, -a.zp - 1)), node=a.node)


@rule("neg")
def _neg(lw, n, x):
    return _negate(lw, n, x)


@rule("relu")
def _relu(lw, n, x):
    if isinstance(x, Act) and x.relu:
        return x
    return _table(lw, n, x, torch.relu)


@rule("gelu")
def _gelu(lw, n, x, approximate="none"):
    if approximate == "none" and isinstance(x, (Act, Sum, PlusConst)):
        # the exact-erf table of the hand-written path (base.quant rounding of the float64 GELU)
        x = lw.whole(lw.act(x, n), n)
        q = lw.q_of(n.name)
        name = lw.opname(n, ".gelu")
        t = lw.b.const(f"{name}.table", K.gelu_table(x.scale, x.zp, q.scale, q.zero_point))
        y = lw.new_act(f"{name}.out", x.shape, q, n.name)
        lw.b.op("lut", name, [x.tensor, t], [y.tensor], n=int(np.prod(x.shape)))
        return y
    return _table(lw, n, x, lambda v: torch.nn.functional.gelu(v, approximate=approximate))


for _name, _fn in {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": torch.nn.functional.silu,
                   "hardswish": torch.nn.functional.hardswish, "hardsigmoid": torch.nn.functional.hardsigmoid,
                   "elu": torch.nn.functional.elu, "leaky_relu": torch.nn.functional.leaky_relu,
                   "hardtanh": torch.nn.functional.hardtanh, "erf": torch.erf}.items():
    RULES[_name] = (lambda f: lambda lw, n, x, *a, **kw: _table(lw, n, x, lambda v: f(v, *a, **kw)))(_fn)


# ---- attention

@rule("bmm")
def _bmm(lw, n, a, b):
    if isinstance(a, Probs) and isinstance(b, (Act, Sum, PlusConst)):
        return _attention(lw, n, a.s, lw.act(b, n))
    if isinstance(a, (Act, Sum, PlusConst)) and isinstance(b, (Act, Sum, PlusConst)):
        return Scores(lw.act(a, n), lw.act(b, n), 1.0, n.name)
    raise lw.fail(n, f"batched matmul of a {type(a).__name__} and a {type(b).__name__} is not supported "
                     "(attention only: (q k^T) then softmax then times v)")


@rule("_softmax", "softmax")
def _softmax(lw, n, x, dim, *a):
    if isinstance(x, Scores) and dim in (-1, len(n.meta["val"].shape) - 1):
        return Probs(x)
    raise lw.fail(n, "softmax is supported on attention scores (q k^T) over the keys")


def _heads(lw, a: Act, n, transposed: bool):
    """(h, L, dh) view (or (h, dh, L) when transposed) -> (tensor, head step, row stride) if the kernels
    can read it in place: columns contiguous within a head; else None."""
    shape, st = _squeeze_lead(a.shape), a.strides[len(a.shape) - len(_squeeze_lead(a.shape)):]
    if len(shape) == 2:
        shape, st = (1, *shape), (0, *st)
    if len(shape) != 3:
        return None
    h, r, c = shape
    hs, rs, cs = st
    if transposed:
        r, c, rs, cs = c, r, cs, rs
    return (h, r, c, hs if h > 1 else 0, rs) if cs == 1 else None


def _standard(lw, a: Act, n, transposed: bool) -> tuple[Act, tuple]:
    """A (h, L, dh) operand laid out as the attention kernels read it: a (L, h*dh) tensor whose head
    hh starts at column hh*dh. Other layouts are copied into that one."""
    info = _heads(lw, a, n, transposed)
    t = lw.b.tensors[a.tensor]
    if info is not None:
        h, r, c, hs, rs = info
        if a.offset == 0 and rs == h * c and (h == 1 or hs == c) and tuple(t.shape) == (r, h * c):
            return a, info
    shape = _squeeze_lead(a.shape)
    if len(shape) == 2:
        shape = (1, *shape)
    h, r, c = shape
    if transposed:
        r, c = c, r
    perm = (1, 0, 2) if not transposed else (2, 0, 1)
    v = lw.view(a, lambda x: x.reshape(h, *(x.shape[-2:])).permute(*perm))   # (L, h, dh)
    if v is None:
        raise lw.fail(n, "this attention operand's layout cannot be read by the attention kernels")
    w = lw.whole(v, n)
    return w, (h, r, c, c, h * c)


def _attention(lw, n, s: Scores, v: Act) -> Act:
    q, qi = _standard(lw, s.q, n, False)
    k, ki = _standard(lw, s.kt, n, True)
    vv, vi = _standard(lw, v, n, False)
    h, Lq, dh = qi[0], qi[1], qi[2]
    Lk = ki[1]
    if ki[0] != h or vi[0] != h or ki[2] != dh or vi[1] != Lk:
        raise lw.fail(n, f"attention shapes do not match: q {s.q.shape}, k^T {s.kt.shape}, v {v.shape}")
    if Lq != Lk:
        raise lw.fail(n, "cross-attention (queries and keys of different lengths) is not supported")
    p = where(n).module or lw.opname(n)
    if s.mask is not None:
        mask = s.mask.valid
    else:
        if Lk not in lw.ones_mask:
            lw.ones_mask[Lk] = lw.b.const(f"ones_mask.{Lk}", np.ones(Lk, dtype=np.int8))
        mask = lw.ones_mask[Lk]
    qs = lw.q_of(s.node)
    sc = lw.b.act(lw.unique(f"{p}.scores"), (h, Lq, Lk), qs)
    m, sh = Q.quantize_multiplier(q.scale * k.scale * s.factor / qs.scale)
    lw.b.op("matmul_qk", sc, [q.tensor, k.tensor], [sc], heads=h, L=Lq, dh=dh, q_zp=q.zp, k_zp=k.zp, mult=m,
            shift=sh, s_zp=qs.zero_point)
    lut = lw.b.const(lw.unique(f"{p}.exp_lut"), K.exp_lut(qs.scale))
    pr = lw.b.act(lw.unique(f"{p}.probs"), (h, Lq, Lk), Q.ActQ(1.0 / K.EXP_ONE, 0), dtype="int16")
    lw.b.op("softmax", lw.unique(f"{p}.softmax"), [sc, mask, lut], [pr], heads=h, L=Lq)
    qc = lw.q_of(n.name)
    ctx = lw.b.act(lw.unique(f"{p}.context"), (Lq, h * dh), qc)
    m, sh = Q.quantize_multiplier(vv.scale / K.EXP_ONE / qc.scale)
    lw.b.op("matmul_pv", ctx, [pr, vv.tensor], [ctx], heads=h, L=Lq, dh=dh, v_zp=vv.zp, mult=m, shift=sh,
            y_zp=qc.zero_point)
    shape = tuple(n.meta["val"].shape)          # (h, L, dh)
    return Act(ctx, shape, (dh, h * dh, 1)[-len(shape):] if len(shape) == 3 else (h * Lq * dh, dh, h * dh, 1),
               0, qc.scale, qc.zero_point, n.name)


def _unique(self, name: str) -> str:
    n = self.names.get(name, 0)
    self.names[name] = n + 1
    return name if n == 0 else f"{name}#{n}"


Lowering.unique = _unique


# ---- concatenation (a CLS token)

@rule("cat")
def _cat(lw, n, parts, dim=0):
    shape = tuple(int(s) for s in n.meta["val"].shape)
    dim = dim % len(shape)
    if any(isinstance(p, Mask) for p in parts):
        return _cat_masks(lw, n, parts, shape)
    q = lw.q_of(n.name)
    name = lw.opname(n, ".cat")
    y = lw.new_act(f"{name}.out", shape, q, n.name)
    outer = int(np.prod(shape[:dim]))
    ins, attrs = [], {}
    off = 0
    for i, p in enumerate(parts):
        w = int(np.prod(p.shape[dim:])) if not isinstance(p, torch.Tensor) else int(np.prod(tuple(p.shape)[dim:]))
        if isinstance(p, torch.Tensor):
            data = Q.quantize(p.detach().double().numpy(), q.scale, q.zero_point).reshape(outer, w)
            t = lw.b.const(f"{name}.part{i}", np.ascontiguousarray(data))
            pq = q
            lw.cat_consts.setdefault(y.tensor, []).append((t, p.detach().double(), i))
        else:
            a = lw.whole(lw.act(p, n), n)
            t, pq = a.tensor, a.q
        m, sh = Q.quantize_multiplier(pq.scale / q.scale)
        ins.append(t)
        attrs[f"w{i}"], attrs[f"o{i}"], attrs[f"zp{i}"], attrs[f"m{i}"], attrs[f"s{i}"] = w, off, pq.zero_point, m, sh
        off += w
    lw.b.op("concat", name, ins, [y.tensor], rows=outer, width=off, parts=len(parts), y_zp=q.zero_point, **attrs)
    return y


def _fold_cat_consts(lw, n, x: Act, y: torch.Tensor) -> torch.Tensor:
    """`cat([cls, tokens]) + pos`: move the constant parts of the concat (the CLS token) into the
    added constant, and concatenate zeros in their place (exact in int8). The PlusConst table then
    carries cls + pos[0] at its own fine scale, instead of the CLS token rounded to the scale of the
    whole concat -- a small learned CLS vector (often ~0.02) would round to a few levels there, and a
    following LayerNorm (pre-LN blocks) blows that rounding up to the size of the row."""
    cat = lw.nodes[x.node]
    if op_name(cat) != "cat" or len(cat.users) != 1 or not lw.is_whole(x) \
            or tuple(x.shape) != tuple(cat.meta["val"].shape):
        return y
    dim = (cat.args[1] if len(cat.args) > 1 else 0) % len(x.shape)
    full = torch.zeros(x.shape, dtype=torch.float64)
    sizes = [int(a.meta["val"].shape[dim]) for a in cat.args[0]]
    for t, value, i in lw.cat_consts.pop(x.tensor):
        full.narrow(dim, sum(sizes[:i]), sizes[i]).copy_(torch.broadcast_to(value, full.narrow(dim, sum(sizes[:i]), sizes[i]).shape))
        const = lw.b.tensors[t]
        const.data = np.full_like(const.data, x.zp)
    return y.detach().double() + full


def _cat_masks(lw, n, parts, shape):
    """[always-valid prefix (a CLS token), key mask] -> one longer key mask."""
    name = lw.opname(n, ".mask")
    ins, attrs, off = [], {}, 0
    kind = next(p for p in parts if isinstance(p, Mask))
    for i, p in enumerate(parts):
        if isinstance(p, Mask):
            if (p.kind, p.true_at) != (kind.kind, kind.true_at):
                raise lw.fail(n, "concatenating masks of different kinds is not supported")
            t, w = p.valid, p.shape[-1]
        else:
            vals = p.detach().reshape(-1).double().numpy()
            valid = (vals != 0) if kind.true_at == "valid" else (vals == 0)
            if kind.kind == "bias":
                valid = vals == 0
            t = lw.b.const(f"{name}.part{i}", valid.astype(np.int8))
            w = vals.size
        ins.append(t)
        attrs.update({f"w{i}": w, f"o{i}": off, f"zp{i}": 0, f"m{i}": 1 << 30, f"s{i}": 1})
        off += w
    lw.b.act(f"{name}.out", (off,), None)
    lw.b.op("concat", name, ins, [f"{name}.out"], rows=1, width=off, parts=len(parts), y_zp=0, **attrs)
    return Mask(f"{name}.out", kind.kind, kind.true_at, shape)


# ---------------------------------------------------------------- entry point

def lower_module(model: torch.nn.Module, inputs, name: str | None = None, clr: dict | None = None) -> Graph:
    """Capture `model` on its first input, calibrate on all `inputs` (batch-first array or tensor), lower.

    A clustered low-rank word table (edge.compress.clr.CLREmbedding) has its own kernel, and its lookup
    loops over clusters in Python, which torch.export cannot trace: the model is captured with the dense
    table it reconstructs (the same float function) and that lookup is lowered as the CLR table. `clr`
    may give a table's int8 form (QuantCLR) by module path."""
    from edge.capture import calibrate, capture

    model, special = capturable(model, clr)
    xs = torch.as_tensor(np.asarray(inputs))
    if xs.ndim < 1 or len(xs) == 0:
        raise TinyshieldError(f"calibration needs at least one input (a batch-first array), got shape {tuple(xs.shape)}")
    cap = capture(model, (xs[:1],))
    ranges = calibrate(cap, [x[None] for x in xs])
    return lower_captured(cap, ranges, name or f"{type(model).__name__}-int8", special)


def capturable(model: torch.nn.Module, clr: dict | None = None):
    """(the module torch.export captures, special lowerings by module path): CLR word tables swapped
    for the dense table they reconstruct (see lower_module). The float reference of validation
    captures this same module."""
    import copy

    model = model.eval()
    tables = {p: m for p, m in model.named_modules() if hasattr(m, "layout") and hasattr(m, "table")}
    special = {}
    if tables:
        model = copy.deepcopy(model)
        for path, emb in tables.items():
            with torch.no_grad():
                model.set_submodule(path, torch.nn.Embedding.from_pretrained(emb.table().float()))
            special[path] = _clr_rule(emb, (clr or {}).get(path))
    return model, special


def _clr_rule(emb, quant):
    def lower_clr(lw: Lowering, ids: Ids, node) -> Act:
        y = L._clr_embedding(lw.b, emb, ids.tensor, ids.shape[-1], quant)
        t = lw.b.tensors[y]
        shape = (1, *t.shape)
        return Act(y, shape, _contig_strides(shape), 0, t.q.scale[0], t.q.zero_point, node.name)
    return lower_clr


def lower_captured(cap: Captured, ranges: Ranges, name: str = "model", special: dict | None = None) -> Graph:
    """The captured graph with its calibration ranges -> the int8 graph (input `input`, output `output`)."""
    lw = Lowering(cap, ranges, name, special)
    g = lw.run()
    g.meta.setdefault("calib", ranges.count)
    return g
