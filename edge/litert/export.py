"""Lower a captured graph (edge.capture: torch.export -> core ATen) to a .tflite graph of builtin ops.

    model_bytes = export_model(load_minilm(), seq_len=128)          # ids (1, 128) int32 -> (1, 384)
    model_bytes = export_model(vit, batch=1)                         # (1, 1, 28, 28) -> (1, 10) logits
    model_bytes = export_captured(edge.capture.load("model.pt2", batch_one=False))

Every model goes the same way: `build_model` captures it with a batch-B example (text models: int32
token ids (B, L), 0 = [PAD]; a BertModel gets the `head` wrapper of edge.models.bert: "sentence",
"mean" or "hidden"), and `build_captured` walks the ATen nodes in order, one small rule per op
(`RULES`), emitting builtin ops through the flatbuffer writer. Values are symbolic:
- `torch.Tensor`: a constant (parameters, and any op whose inputs are all constants: folded by
  running the op itself in torch);
- `Val`: a graph tensor with a *lazy layout*: its logical (torch) value is the stored tensor reshaped
  (`perm` None) or permuted (`perm`). Views, permutes and NCHW <-> NHWC cost nothing until an op needs
  the logical layout; then one RESHAPE or TRANSPOSE materialises it. So conv stems stay NHWC, a
  transpose that feeds a matmul becomes BATCH_MATMUL's adj flag, and Linear layers run
  FULLY_CONNECTED (keep_num_dims) on (B, L, d) without the (B*L, d) reshapes around ATen's addmm.
- Masks (bool or 0/1 ints in torch) are float 0/1 tensors: `ids != 0` is MINIMUM(CAST(ids), 1), as
  the int8 quantiser expects of a mask path; `where(mask, a, b)` is b + mask * (a - b) with infinite
  constants as -/+1e9 (0 * inf would be NaN), so a row whose keys are all [PAD] attends uniformly
  instead of giving torch's zeros.

Op choices: addmm/mm/bmm with constant weights -> FULLY_CONNECTED (the transpose folded into the
weight, a ReLU consumer fused), bmm of two activations -> BATCH_MATMUL, convolution -> PAD +
CONV_2D (torch pads both sides; TFLite SAME pads after), native_layer_norm -> MEAN,
SQUARED_DIFFERENCE, ADD(eps), RSQRT, SUB, MUL, MUL(gamma), ADD(beta), gelu -> GELU ("exact" erf or
"tanh" form) or x * LOGISTIC(1.702 x) (`gelu="sigmoid"`, for runtimes without GELU such as TFLite
Micro), x / norm(x) -> L2_NORMALIZATION. Anything else raises TinyshieldError naming the op, the
module path and the user's source line.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge.capture import Captured, capture, map_nodes, rule_table, op_name, where
from base.errors import TinyshieldError
from edge.litert.writer import Builder

GELU_MODES = ("exact", "tanh", "sigmoid")
BIG = 1e9       # stands for an infinite constant in masks (see the module docstring)


@dataclass(frozen=True)
class Val:
    t: int                        # builder tensor id
    shape: tuple                  # the logical (torch) shape
    perm: tuple | None = None     # logical = stored.permute(perm); None: logical = stored.reshape(shape)


def _inverse(perm) -> list:
    return [perm.index(i) for i in range(len(perm))]


class Exporter:
    def __init__(self, cap: Captured, gelu: str = "exact", name: str = "model"):
        if gelu not in GELU_MODES:
            raise TinyshieldError(f"unknown GELU form {gelu!r}: use one of {', '.join(GELU_MODES)}")
        self.cap, self.gelu = cap, gelu
        self.b = Builder(name)
        self.env: dict[str, object] = {}
        self.fused: set[str] = set()          # nodes folded into their producer (a ReLU into FC/conv)
        self.reshaped: dict[int, int] = {}    # RESHAPE output -> its input (chains collapse to one)
        self.dense_of: dict[Val, int] = {}    # each value materialised once (a key mask used by every layer)
        self.plus_const: dict[Val, tuple] = {}  # ADD(value, constant) result -> (value, constant)

    # -------------------------------------------------- errors
    def fail(self, n, what: str = "") -> TinyshieldError:
        w = where(n)
        stack = n.meta.get("nn_module_stack") or {}
        kind = str(list(stack.values())[-1][1]).rsplit(".", 1)[-1].strip("'>") if stack else ""
        op = str(n.target).removeprefix("aten.")
        subject = f"{w.module}: {kind} is" if w.module else "the model: its own forward pass is"
        return TinyshieldError(
            f"cannot export {subject} not supported by the .tflite exporter "
            f"(aten.{op}{': ' + what if what else ''}; node {n.name}{', at ' + w.source if w.source else ''})")

    # -------------------------------------------------- the walk
    def run(self) -> Builder:
        for n in self.cap.graph.nodes:
            if n.op == "placeholder":
                self.env[n.name] = self.cap.consts[n.name] if n.name in self.cap.consts else self.input(n)
            elif n.op == "call_function":
                self.b.source = where(n).module
                self.env[n.name] = self.call(n)
            elif n.op == "output":
                self.b.source = ""
                for o in _flat(n.args[0]):
                    v = self.env[o.name]
                    if not isinstance(v, Val):
                        raise self.fail(n, "the model's output does not depend on its input")
                    self.b.outputs.append(self.dense(v))
        return self.b.pruned()

    def input(self, n) -> Val:
        val = n.meta["val"]
        if val.dtype in (torch.int64, torch.int32):
            dtype = np.int32             # token ids; .tflite gathers with int32 indices
        elif val.is_floating_point():
            dtype = np.float32
        else:
            raise self.fail(n, f"input dtype {val.dtype} (float or integer ids)")
        shape = tuple(int(s) for s in val.shape)
        return Val(self.b.input(n.name, shape, dtype), shape)

    def call(self, n):
        args = map_nodes(n.args, lambda a: self.env[a.name])
        kwargs = map_nodes(n.kwargs, lambda a: self.env[a.name])
        op = op_name(n)
        if not any(isinstance(v, Val) for v in _flat([args, kwargs])) and op not in SHAPE_ONLY:
            return n.target(*args, **kwargs)            # constants only: run the op itself
        rule = RULES.get(op)
        if rule is None:
            raise self.fail(n, "no .tflite lowering for this op; rewrite that part of the model")
        return rule(self, n, *args, **kwargs)

    # -------------------------------------------------- layouts
    def reshape(self, t: int, shape, name: str) -> int:
        t = self.reshaped.get(t, t)
        if tuple(self.b.shape(t)) == tuple(shape):
            return t
        y = self.b.reshape(t, shape, name=name)
        self.reshaped[y] = t
        return y

    def transpose(self, t: int, perm, name: str) -> int:
        """stored.permute(perm) as a tensor; a RESHAPE when only size-1 axes move."""
        shape = self.b.shape(t)
        perm = [int(p) for p in perm]
        if perm == list(range(len(perm))):
            return t
        out = [shape[p] for p in perm]
        moved = [p for p in perm if shape[p] != 1]
        if moved == sorted(moved):
            return self.reshape(t, out, name=name)
        src = self.reshaped.get(t, t)
        if len(moved) < len(perm) and self.b.shape(src) == tuple(shape[p] for p in sorted(moved)):
            # the same transpose without the size-1 axes, on the tensor before they were added
            small = [sorted(moved).index(p) for p in moved]
            return self.reshape(self.b.transpose(src, small, name=name), out, f"{name}/reshape")
        return self.b.transpose(t, perm, name=name)

    def dense(self, v: Val, name: str = "") -> int:
        """The tensor holding v's logical value in its logical layout."""
        if v not in self.dense_of:
            name = name or self.b.tensors[v.t].name
            self.dense_of[v] = (self.transpose(v.t, v.perm, f"{name}/transpose") if v.perm is not None
                                else self.reshape(v.t, v.shape, f"{name}/reshape"))
        return self.dense_of[v]

    def view(self, v: Val, fn, name: str) -> Val | None:
        """Apply torch view op `fn` to v's layout (torch itself works out the strides); None when the
        result is no longer a reshape-then-permute of one contiguous tensor (it needs a copy)."""
        shape = self.b.shape(v.t)
        base = torch.empty(int(np.prod(shape, dtype=np.int64)), dtype=torch.int8).view(shape)
        logical = base.reshape(v.shape) if v.perm is None else base.permute(v.perm)
        try:
            r = fn(logical)
        except RuntimeError:
            return None
        if r.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() or r.storage_offset():
            return None
        rs, st = tuple(int(s) for s in r.shape), tuple(int(s) for s in r.stride())
        big = sorted((i for i, s in enumerate(rs) if s != 1), key=lambda i: -st[i])
        sizes = [rs[i] for i in big]
        if r.numel() != base.numel() or [st[i] for i in big] != [int(np.prod(sizes[k + 1:])) for k in range(len(big))]:
            return None                     # a broadcast or a window: not one whole tensor's layout
        if big == sorted(big):
            return Val(v.t, rs)                               # logical order: a plain (lazy) reshape
        # size-1 axes sit right after their logical predecessor (or first), so stored shapes stay natural
        key = {i: (-st[i], 0, i) for i in big}
        for i in (i for i, s in enumerate(rs) if s == 1):
            prev = [j for j in big if j < i]
            key[i] = (key[prev[-1]][0], 1, i) if prev else (-math.inf, 0, i)
        order = sorted(range(len(rs)), key=key.__getitem__)
        stored = tuple(rs[i] for i in order)
        t = self.reshape(v.t, stored, name)
        return Val(t, rs, tuple(order.index(i) for i in range(len(rs))))

    def view_or_copy(self, v: Val, fn, name: str) -> Val:
        r = self.view(v, fn, name)
        if r is None and v.perm is not None:
            # Materialise with the last two axes still swapped when that keeps the innermost stored axis
            # innermost: a transposed matmul operand then stays a view (BATCH_MATMUL's adj flag).
            n = len(v.shape)
            swap = tuple(range(n - 2)) + (n - 1, n - 2)
            p2 = [v.perm[i] for i in swap]
            if n >= 2 and v.perm[-1] != n - 1 and p2[-1] == n - 1:
                r = self.view(Val(self.transpose(v.t, p2, f"{name}/transpose"), v.shape, swap), fn, name)
        if r is None:
            r = self.view(Val(self.dense(v, name), v.shape), fn, name)
        return r

    def rows(self, v: Val, name: str) -> tuple[int, callable]:
        """A tensor whose last stored axis is v's last logical axis (for ops over the last axis), and
        how to wrap an output of that op (same layout, last axis of a new size) as a Val."""
        n = len(v.shape)
        stored = self.b.shape(v.t)
        if (v.perm is None and stored[-1:] == v.shape[-1:]) or (v.perm is not None and v.perm[-1] == n - 1):
            return v.t, lambda t: Val(t, v.shape[:-1] + (self.b.shape(t)[-1],), v.perm)
        k = next((k for k in range(len(stored)) if v.perm is None and int(np.prod(stored[k:])) == v.shape[-1]), None)
        if k is not None:               # merge the trailing stored axes into rows: (B, L, h, dh) -> (B, L, d)
            t = self.reshape(v.t, stored[:k] + (v.shape[-1],), f"{name}/rows")
            return t, lambda y: Val(y, v.shape[:-1] + (self.b.shape(y)[-1],))
        t = self.dense(v, name)
        return t, lambda y: Val(y, v.shape[:-1] + (self.b.shape(y)[-1],))

    def like(self, v: Val, t: int) -> Val:
        return Val(t, v.shape, v.perm)

    def const(self, c, name: str) -> int:
        c = torch.as_tensor(c).detach().cpu()
        c = c.float() if c.is_floating_point() or c.dtype == torch.bool else c   # masks are float 0/1 here
        return self.b.const(name, c.numpy())

    # -------------------------------------------------- elementwise
    def binary(self, fn, x, y, name: str) -> Val:
        """x (op) y with torch broadcasting; either may be a constant (tensor or scalar)."""
        assert isinstance(x, Val) or isinstance(y, Val), "constant operations are folded before the rules run"
        if isinstance(x, Val) and isinstance(y, Val):
            if x.perm is not None and x.perm == y.perm and x.shape == y.shape:
                return self.like(x, fn(x.t, y.t, name=name))
            if x.perm is None and y.perm is None and x.shape == y.shape and self.b.shape(x.t) == self.b.shape(y.t):
                return self.like(x, fn(x.t, y.t, name=name))
            xd, yd = self.broadcastable(x), self.broadcastable(y)
            return Val(fn(xd, yd, name=name), tuple(np.broadcast_shapes(x.shape, y.shape)))
        v, c, first = (x, y, True) if isinstance(x, Val) else (y, x, False)
        c = torch.as_tensor(c, dtype=torch.float32)
        if fn == self.b.add and v in self.plus_const:
            v, c0 = self.plus_const[v]          # (x + c0) + c: one ADD of x and c0 + c
            c = c0 + c
        out_shape = tuple(np.broadcast_shapes(v.shape, tuple(c.shape)))
        if c.numel() == 1:                                  # a scalar fits any layout
            vt, ct, wrap = v.t, self.const(c.reshape(1), f"{name}/c"), lambda t: Val(t, out_shape, v.perm)
            if out_shape != v.shape:
                vt, wrap = self.dense(v), lambda t: Val(t, out_shape)
        elif v.perm is not None and out_shape == v.shape:  # the constant in the stored axis order
            full = c.reshape((1,) * (len(v.shape) - c.ndim) + tuple(c.shape))
            vt, ct, wrap = v.t, self.const(full.permute(_inverse(list(v.perm))), f"{name}/c"), lambda t: self.like(v, t)
        else:
            vt, ct, wrap = self.dense(v), self.const(c, f"{name}/c"), lambda t: Val(t, out_shape)
        y = wrap(fn(vt, ct, name=name) if first else fn(ct, vt, name=name))
        if fn == self.b.add and y.shape == v.shape:
            self.plus_const[y] = (v, c)
        return y

    def broadcastable(self, v: Val) -> int:
        """A tensor that broadcasts like v: its stored tensor when that is v without leading size-1 axes
        (numpy broadcasting aligns from the right), else v materialised."""
        stored = self.b.shape(v.t)
        if v.perm is None and len(stored) <= len(v.shape) and (1,) * (len(v.shape) - len(stored)) + stored == v.shape:
            return v.t
        return self.dense(v)

    def unary(self, v: Val, fn, name: str) -> Val:
        return self.like(v, fn(v.t, name=name))

    def scale(self, v, s: float, name: str):
        return self.binary(self.b.mul, v, torch.tensor(s), name)


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [v for e in x for v in _flat(e)]
    if isinstance(x, dict):
        return _flat(list(x.values()))
    return [x]


def _scalar(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return None


def _finite(c):
    """A constant with +-inf as +-BIG (masks are finite biases here; see the module docstring)."""
    c = torch.as_tensor(c, dtype=torch.float32)
    return torch.nan_to_num(c, posinf=BIG, neginf=-BIG)


# ---------------------------------------------------------------- rules

RULES, rule = rule_table()
SHAPE_ONLY = {"full_like", "zeros_like", "ones_like", "empty_like"}   # of an input: constants of its shape


IDENTITY_OPS = ("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "dropout")


@rule(*IDENTITY_OPS)
def _identity(ex, n, x, *a, **kw):
    return x                # values are never written in place: a copy is the same value


@rule("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten",
      "unflatten", "unfold")
def _view(ex, n, x, *args, **kw):
    return ex.view_or_copy(x, lambda t: n.target(t, *args, **kw), n.name)


@rule("expand")
def _expand(ex, n, x, *args, **kw):
    shape = tuple(int(s) for s in n.meta["val"].shape)
    if shape == x.shape:
        return x
    r = ex.view(x, lambda t: n.target(t, *args, **kw), n.name)
    return r if r is not None else Val(ex.b.broadcast_to(ex.dense(x), shape, name=n.name), shape)


@rule("select", "slice")
def _slice(ex, n, x, dim, start=None, end=None, step=1):
    nd = len(x.shape)
    dim %= nd
    size = x.shape[dim]
    if op_name(n) == "select":
        start, end, step = start % size, start % size + 1, 1
    else:
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else min(end + size if end < 0 else end, size)
        if (start, end, step) == (0, size, 1):
            return x
    if x.perm is None:
        x = Val(ex.dense(x), x.shape)
    perm = x.perm or tuple(range(nd))
    sd = perm[dim]                                      # the stored axis
    stored = ex.b.shape(x.t)
    begin, stop, strides = [0] * nd, list(stored), [1] * nd
    begin[sd], stop[sd], strides[sd] = start, end, step
    shrink = 1 << sd if op_name(n) == "select" else 0
    t = ex.b.strided_slice(x.t, begin, stop, strides, shrink, name=n.name)
    shape = tuple(int(s) for s in n.meta["val"].shape)
    if not shrink:
        return Val(t, shape, x.perm)
    rest = [p - (p > sd) for p in perm if p != sd]
    return Val(t, shape, None if rest == sorted(rest) else tuple(rest))


@rule("_to_copy", "to")
def _to_copy(ex, n, x, *a, dtype=None, **kw):
    src = n.args[0].meta["val"].dtype
    if dtype is None or dtype == src:
        return x
    if ex.b.dtype(x.t) == np.int32:
        if dtype.is_floating_point:
            return ex.like(x, ex.b.cast(x.t, np.float32, name=n.name))
        return x                                        # int64 <-> int32 ids
    if dtype == torch.bool and src.is_floating_point:
        raise ex.fail(n, "a float tensor converted to bool (compare it instead)")
    return x            # floats, and masks (float 0/1 here) as ints or floats


@rule("eq", "ne")
def _eq(ex, n, x, other):
    s = _scalar(other)
    if isinstance(x, Val) and ex.b.dtype(x.t) == np.int32 and s == 0:
        # ids are >= 0 and 0 is [PAD]: min(id, 1) is the 0/1 mask of real tokens
        f = ex.b.cast(x.t, np.float32, name=f"{n.name}/ids")
        m = ex.b.minimum(f, ex.const(torch.ones(1), f"{n.name}/one"), name=f"{n.name}/valid")
        m = ex.like(x, m)
        return m if op_name(n) == "ne" else ex.binary(ex.b.sub, torch.ones(1), m, n.name)
    if isinstance(x, Val) and s is not None and math.isinf(s):
        # infinities never flow through the exported graph (masks are finite, see the docstring)
        return torch.full(tuple(n.meta["val"].shape), op_name(n) == "ne")
    raise ex.fail(n, "comparisons are supported as key masks: token ids == 0 or != 0 (0 = [PAD])")


@rule("logical_not", "bitwise_not")
def _not(ex, n, x):
    return ex.binary(ex.b.sub, torch.ones(1), x, n.name)


@rule("full_like", "zeros_like", "ones_like", "empty_like")
def _full_like(ex, n, x, *a, **kw):
    val = n.meta["val"]
    fill = {"zeros_like": 0, "ones_like": 1, "empty_like": 0}.get(op_name(n), a[0] if a else kw.get("fill_value"))
    return torch.full(tuple(val.shape), fill, dtype=val.dtype)


@rule("where")
def _where(ex, n, cond, a, b):
    if isinstance(cond, torch.Tensor):
        if bool(cond.all()):
            return a
        if not bool(cond.any()):
            return b
        cond = cond.float()
    a = a if isinstance(a, Val) else _finite(a)
    b = b if isinstance(b, Val) else _finite(b)
    diff = a - b if not isinstance(a, Val) and not isinstance(b, Val) else ex.binary(ex.b.sub, a, b, f"{n.name}/diff")
    picked = ex.binary(ex.b.mul, cond, diff, f"{n.name}/pick")        # b + cond * (a - b)
    if not isinstance(b, Val) and not bool(b.any()):
        return picked
    return ex.binary(ex.b.add, picked, b, n.name)


@rule("masked_fill")
def _masked_fill(ex, n, x, mask, value):
    return _where(ex, n, mask, torch.as_tensor(value), x)


# ---- arithmetic

@rule("add", "sub")
def _add(ex, n, x, y, alpha=1):
    if alpha != 1:
        y = ex.scale(y, alpha, f"{n.name}/alpha") if isinstance(y, Val) else y * alpha
    return ex.binary(ex.b.add if op_name(n) == "add" else ex.b.sub, x, y, n.name)


@rule("rsub")
def _rsub(ex, n, x, y, alpha=1):
    return _add(ex, n, y, x) if alpha == 1 else _add(ex, n, y, ex.scale(x, alpha, f"{n.name}/alpha"))


@rule("mul")
def _mul(ex, n, x, y):
    return ex.binary(ex.b.mul, x, y, n.name)


@rule("div")
def _div(ex, n, x, y, rounding_mode=None):
    if rounding_mode is not None:
        raise ex.fail(n, "integer division")
    if _l2_normalize_of(n):
        t, wrap = ex.rows(x, n.name)
        return wrap(ex.b.l2_normalize(t, name=n.name))
    s = _scalar(y)
    if s is not None and not isinstance(y, Val):
        return ex.scale(x, 1.0 / s, n.name)             # MUL: an int8 kernel exists for it, DIV has none
    return ex.binary(ex.b.div, x, y, n.name)


def _l2_normalize_of(n) -> bool:
    """div(x, clamp(norm(x, 2, last axis))) (F.normalize) is one L2_NORMALIZATION."""
    d = n.args[1]
    while isinstance(d, torch.fx.Node) and op_name(d) in ("expand", "clamp", "clamp_min"):
        if op_name(d) != "expand" and (len(d.args) > 2 or float(d.args[1]) > 1e-6):
            return False
        d = d.args[0]
    if not isinstance(d, torch.fx.Node) or op_name(d) != "linalg_vector_norm" or d.args[0] is not n.args[0]:
        return False
    nd = len(n.meta["val"].shape)
    ord_, dims = (list(d.args) + [2, None])[1:3]
    return ord_ == 2 and dims is not None and [x % nd for x in dims] == [nd - 1]


@rule("linalg_vector_norm")
def _norm(ex, n, x, ord=2, dim=None, keepdim=False, **kw):
    if ord != 2:
        raise ex.fail(n, "only the 2-norm")
    sq = ex.binary(ex.b.mul, x, x, f"{n.name}/square")
    return ex.unary(_reduce(ex, n, ex.b.sum, sq, dim, keepdim, f"{n.name}/sum"), ex.b.sqrt, n.name)


@rule("clamp", "clamp_min", "clamp_max", "hardtanh")
def _clamp(ex, n, x, lo=None, hi=None, **kw):
    if op_name(n) == "clamp_max":
        lo, hi = None, lo
    if lo is not None:
        x = ex.binary(ex.b.maximum, x, torch.tensor(float(lo)), f"{n.name}/min" if hi is not None else n.name)
    if hi is not None:
        x = ex.binary(ex.b.minimum, x, torch.tensor(float(hi)), n.name)
    return x


@rule("pow")
def _pow(ex, n, x, e):
    if e == 2:
        return ex.binary(ex.b.mul, x, x, n.name)
    if e == 0.5:
        return ex.unary(x, ex.b.sqrt, n.name)
    raise ex.fail(n, f"power {e} (2 and 0.5 are supported)")


@rule("neg")
def _neg(ex, n, x):
    return ex.scale(x, -1.0, n.name)


@rule("sqrt", "rsqrt")
def _sqrt(ex, n, x):
    return ex.unary(x, ex.b.sqrt if op_name(n) == "sqrt" else ex.b.rsqrt, n.name)


def _reduce(ex, n, fn, x, dims, keepdim, name):
    nd = len(x.shape)
    dims = list(range(nd)) if not dims else [d % nd for d in dims]
    t = fn(ex.dense(x), dims, name=name)                  # keeps dims: (..., 1, ...)
    shape = tuple(1 if i in dims else s for i, s in enumerate(x.shape))
    return Val(t, shape if keepdim else tuple(s for i, s in enumerate(x.shape) if i not in dims))


@rule("mean")
def _mean(ex, n, x, dims=None, keepdim=False, **kw):
    return _reduce(ex, n, ex.b.mean, x, dims, keepdim, n.name)


@rule("sum")
def _sum(ex, n, x, dims=None, keepdim=False, **kw):
    return _reduce(ex, n, ex.b.sum, x, dims, keepdim, n.name)


# ---- pointwise functions

@rule("relu")
def _relu(ex, n, x):
    return x if n.name in ex.fused else ex.unary(x, ex.b.relu, n.name)


@rule("sigmoid")
def _sigmoid(ex, n, x):
    return ex.unary(x, ex.b.logistic, n.name)


@rule("tanh")
def _tanh(ex, n, x):
    return ex.unary(x, ex.b.tanh, n.name)


@rule("silu")
def _silu(ex, n, x):
    return ex.binary(ex.b.mul, x, ex.unary(x, ex.b.logistic, f"{n.name}/sigmoid"), n.name)


@rule("gelu")
def _gelu(ex, n, x, approximate="none"):
    if ex.gelu == "sigmoid":        # x * sigmoid(1.702 x): TFLite Micro has no GELU kernel
        s = ex.unary(ex.scale(x, 1.702, f"{n.name}/scaled"), ex.b.logistic, f"{n.name}/sigmoid")
        return ex.binary(ex.b.mul, x, s, n.name)
    tanh = approximate == "tanh" or ex.gelu == "tanh"
    return ex.unary(x, lambda t, name: ex.b.gelu(t, approximate=tanh, name=name), n.name)


@rule("_softmax", "softmax")
def _softmax(ex, n, x, dim, *a):
    if dim % len(x.shape) != len(x.shape) - 1:
        raise ex.fail(n, "softmax over an axis other than the last")
    t, wrap = ex.rows(x, n.name)
    return wrap(ex.b.softmax(t, name=n.name))


@rule("native_layer_norm")
def _layer_norm(ex, n, x, shape, w, b, eps):
    if len(shape) != 1:
        raise ex.fail(n, "LayerNorm over more than the last axis")
    if isinstance(w, Val) or isinstance(b, Val):
        raise ex.fail(n, "LayerNorm with computed (not constant) weights")
    bb, name = ex.b, n.name
    t, wrap = ex.rows(x, name)
    mu = bb.mean(t, [-1], name=f"{name}/mean")
    var = bb.mean(bb.squared_difference(t, mu, name=f"{name}/sqdiff"), [-1], name=f"{name}/var")
    r = bb.rsqrt(bb.add(var, ex.const(torch.tensor([eps]), f"{name}/eps"), name=f"{name}/var_eps"),
                 name=f"{name}/rsqrt")
    y = bb.mul(bb.sub(t, mu, name=f"{name}/centre"), r, name=f"{name}/norm")
    if w is not None:
        y = bb.mul(y, ex.const(w, f"{name}.weight"), name=f"{name}/gamma")
    if b is not None:
        y = bb.add(y, ex.const(b, f"{name}.bias"), name=name)
    return wrap(y), None, None


@rule("getitem")
def _getitem(ex, n, x, i):
    return x[i]


@rule("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async")
def _assert(ex, n, *a, **kw):
    return None         # export-time checks of shapes and dtypes: nothing to run


# ---- matrix ops

def _relu_after(ex, n) -> str | None:
    """The ReLU this node feeds through views only, if it is the single consumer (fused into the op)."""
    cur = n
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if op_name(u) == "relu":
            ex.fused.add(u.name)
            return "relu"
        if op_name(u) not in ("view", "_unsafe_view", "clone", "alias", "reshape"):
            return None
        cur = u
    return None


def _fc(ex, n, x: Val, w: torch.Tensor, bias) -> Val:
    """x @ w (+ bias) with constant w (K, N): FULLY_CONNECTED over x's last axis."""
    w = w.detach().float()
    N = w.shape[1]
    if bias is not None and isinstance(bias, torch.Tensor) and bias.numel() == N:
        bias = bias.reshape(N)
    fc_bias = bias if bias is None or bias.ndim == 1 else None
    t, wrap = ex.rows(x, n.name)
    act = _relu_after(ex, n) if bias is None or fc_bias is not None else None
    y = ex.b.fully_connected(t, ex.const(w.T.contiguous(), f"{n.name}.weight"),
                             None if fc_bias is None else ex.const(fc_bias, f"{n.name}.bias"), act, name=n.name)
    y = wrap(y)
    shape = tuple(int(s) for s in n.meta["val"].shape)
    y = y if y.shape == shape else Val(ex.dense(y), shape)
    return y if fc_bias is not None or bias is None else ex.binary(ex.b.add, y, bias, f"{n.name}/bias")


@rule("addmm", "mm")
def _addmm(ex, n, *args, beta=1, alpha=1):
    bias, x, w = args if op_name(n) == "addmm" else (None, *args)
    if isinstance(bias, Val):
        raise ex.fail(n, "a computed (not constant) bias")
    if isinstance(w, torch.Tensor):
        return _fc(ex, n, x, w * alpha, None if bias is None else bias * beta)
    if beta != 1 or alpha != 1:
        raise ex.fail(n, "addmm of activations with beta/alpha != 1")
    if not isinstance(x, Val):
        raise ex.fail(n, "a constant times an activation (put the weights on the right)")
    y = _bmm(ex, n, x, w)
    return y if bias is None else ex.binary(ex.b.add, y, bias, f"{n.name}/bias")


def _operand(ex, v: Val, name: str) -> tuple[int, bool, int]:
    """A matmul operand as (tensor, adj, the tensor before a reshape of its batch axes): a trailing
    transpose becomes the adj flag."""
    nd = len(v.shape)
    if v.perm is not None and v.perm == tuple(range(nd - 2)) + (nd - 1, nd - 2):
        t, adj = v.t, True
    else:
        t, adj = ex.dense(v, name), False
    src = ex.reshaped.get(t, t)
    return t, adj, src if ex.b.shape(src)[-2:] == ex.b.shape(t)[-2:] else t


@rule("bmm")
def _bmm(ex, n, a, b):
    if isinstance(b, torch.Tensor):
        if bool((b == b[:1]).all()):                    # the same weights for every batch: a Linear
            return _fc(ex, n, a, b[0], None)
        raise ex.fail(n, "a matmul with different constant matrices per batch")
    if not isinstance(a, Val):
        raise ex.fail(n, "a constant times an activation (put the weights on the right)")
    (ta, adj_x, sa), (tb, adj_y, sb) = _operand(ex, a, f"{n.name}/a"), _operand(ex, b, f"{n.name}/b")
    if ex.b.shape(sa)[:-2] == ex.b.shape(sb)[:-2]:
        ta, tb = sa, sb         # the same batch axes (B, heads) on both sides: no reshape to ATen's 3-d bmm
    return Val(ex.b.batch_matmul(ta, tb, adj_y=adj_y, adj_x=adj_x, name=n.name),
               tuple(int(s) for s in n.meta["val"].shape))


@rule("convolution")
def _conv(ex, n, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or groups != 1 or len(stride) != 2:
        raise ex.fail(n, "only 2-d convolutions with groups=1 (no transposed, grouped or 1-d ones)")
    if isinstance(w, Val) or isinstance(b, Val):
        raise ex.fail(n, "a convolution with computed (not constant) weights")
    # NHWC: an (N, C, H, W) value laid out NHWC is perm (0, 3, 1, 2); anything else is transposed once
    if x.perm == (0, 3, 1, 2):
        t = x.t
    else:
        t = ex.transpose(x.t, [x.perm[i] for i in (0, 2, 3, 1)], f"{n.name}/nhwc") if x.perm else \
            ex.transpose(ex.dense(x), (0, 2, 3, 1), f"{n.name}/nhwc")
    ph, pw = (int(p) for p in padding)
    if ph or pw:
        t = ex.b.pad(t, [(0, 0), (ph, ph), (pw, pw), (0, 0)], name=f"{n.name}/pad")
    wt = w.detach().float().permute(0, 2, 3, 1).contiguous()      # (O, I, kh, kw) -> (O, kh, kw, I)
    bias = torch.zeros(w.shape[0]) if b is None else b
    y = ex.b.conv2d(t, ex.const(wt, f"{n.name}.weight"), ex.const(bias, f"{n.name}.bias"),
                    tuple(int(s) for s in stride), _relu_after(ex, n), name=n.name,
                    dilation=tuple(int(d) for d in dilation))
    return Val(y, tuple(int(s) for s in n.meta["val"].shape), (0, 3, 1, 2))


@rule("embedding")
def _embedding(ex, n, weight, ids, *a):
    if isinstance(weight, Val) or not isinstance(ids, Val):
        raise ex.fail(n, "embedding lookups need a constant table and token ids")
    t = ex.b.gather(ex.const(weight, f"{where(n).module or n.name}.weight"), ex.dense(ids), name=n.name)
    return Val(t, tuple(int(s) for s in n.meta["val"].shape))


@rule("cat")
def _cat(ex, n, parts, dim=0):
    ts = [ex.dense(p) if isinstance(p, Val) else ex.const(p, f"{n.name}/part{i}") for i, p in enumerate(parts)]
    return Val(ex.b.concatenation(ts, dim, name=n.name), tuple(int(s) for s in n.meta["val"].shape))


# ---------------------------------------------------------------- entry points

def build_captured(cap: Captured, gelu: str = "exact", name: str = "model") -> Builder:
    """The fp32 .tflite graph (not yet serialised) of a captured model."""
    with torch.no_grad():
        return Exporter(cap, gelu, name).run()


def export_captured(cap: Captured, gelu: str = "exact", description: str = "tinyshield") -> bytes:
    """fp32 .tflite bytes of a captured model (e.g. `edge.capture.load("model.pt2", batch_one=False)`)."""
    return build_captured(cap, gelu).finish(description=description)


def _config(model: nn.Module):
    return getattr(model, "config", None) or getattr(getattr(model, "bert", None), "config", None)


def _dense_tables(model: nn.Module) -> nn.Module:
    """A CLR-compressed word table (edge.compress) exported as the dense table it reconstructs: its lookup
    equals a lookup in that table, LiteRT has no clustered low-rank gather, and the per-cluster Python
    loop of its forward pass cannot be captured."""
    tables = [p for p, m in model.named_modules() if hasattr(m, "layout") and hasattr(m, "table")]
    if not tables:
        return model
    model = copy.deepcopy(model)
    for path in tables:
        with torch.no_grad():
            model.set_submodule(path, nn.Embedding.from_pretrained(model.get_submodule(path).table().float()))
    return model


def example_input(model: nn.Module, seq_len: int | None, batch: int, input_shape=None) -> torch.Tensor:
    """What the model is captured on: token ids (B, L) for text models (their config has a vocabulary),
    images (B, C, H, W) for image models (an image size), else a float tensor of `input_shape`."""
    if input_shape is not None:
        return torch.randn(tuple(input_shape))
    cfg = _config(model)
    if hasattr(cfg, "vocab_size"):
        if seq_len is None or seq_len < 1:
            raise TinyshieldError("text models export for a fixed sequence length: give seq_len (--seq-len L)")
        if seq_len > cfg.max_position_embeddings:
            raise TinyshieldError(f"sequence length {seq_len} exceeds the model's {cfg.max_position_embeddings} "
                                  "positions")
        return torch.ones(batch, seq_len, dtype=torch.long)
    if hasattr(cfg, "image_size"):
        return torch.rand(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    raise TinyshieldError(f"cannot export {type(model).__name__}: give input_shape (the shape of its input, "
                          "batch first) or capture it yourself and use export_captured")


def build_model(model: nn.Module, seq_len: int | None = None, batch: int = 1, gelu: str = "exact",
                head: str = "sentence", input_shape=None) -> Builder:
    """The fp32 graph of a model, not yet serialised (int8 export quantises it). A BertModel's output
    is chosen by `head` (edge.models.bert.with_head)."""
    from edge.models.bert import BertModel, with_head
    if gelu not in GELU_MODES:
        raise TinyshieldError(f"unknown GELU form {gelu!r}: use one of {', '.join(GELU_MODES)}")
    model = model.eval()
    x = example_input(model, seq_len, batch, input_shape)
    if isinstance(model, BertModel):
        model = with_head(model, head)
    cap = capture(_dense_tables(model), (x,), batch_one=False)
    return build_captured(cap, gelu, type(model).__name__)


def export_model(model: nn.Module, seq_len: int | None = None, batch: int = 1, gelu: str = "exact",
                 head: str = "sentence", input_shape=None) -> bytes:
    """fp32 .tflite bytes of a model (see the module docstring for inputs and outputs)."""
    return build_model(model, seq_len, batch, gelu, head, input_shape).finish()
