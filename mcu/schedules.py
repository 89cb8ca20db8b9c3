"""Schedule passes: an int8 `Graph` -> a `Schedule` (kernel calls over arena buffers).

- `layerwise(graph)`: every op produces its whole output tensor into a buffer of its own, in graph
  order — what TFLite Micro does. The baseline.
- `tiled(graph, budget=..., tiles=...)`: the same integers, computed block of rows by block of rows.
  1. Ops that work row by row (fully connected, residual add (+ LayerNorm), pointwise tables, embedding
     lookup, and attention seen from its queries) are fused into *segments* run one block of
     `rows` tokens at a time, so their intermediates exist only for one block: the q projection,
     the per-head context, the FFN's L x 4d hidden layer, the embedding rows.
  2. Attention (matmul_qk + softmax + matmul_pv) becomes `attention_s8` per head and query block,
     streaming over key tiles of `kt` keys: the h x L x L score and probability tensors never exist.
  3. Re-ordering: the K and V projections, which attention needs for *all* tokens, are hoisted out
     of the block loop and run just before it (splitting a segment there); the Q projection moves
     into the loop, next to its only use.
  4. In place: a segment whose output has the shape of an input that dies in the segment writes
     over it (block j's rows are read only by block j, before the block writes them), so one
     L x d hidden state is carried through all layers; a GELU table lookup overwrites its input.
  Peak = X + K + V (3 L d bytes) + one block's scratch: the floor of an exact schedule that stores K, V.
  5. Recompute (per layer, `Tiles.recompute`): the layer keeps only its input X; its K and V
     projections are fused into attention (`attention_kv_s8`), which projects the key/value rows it
     needs from X per query block, a few rows at a time. X is then read whole by every block, so the
     layer's output takes a second L x d buffer: peak = 2 L d + one block's scratch, paid for with
     the K/V projection once per pass (1 or 3) and query block instead of once.
- `search_tiles(graph, budget)`: the block/tile sizes with the fewest MACs (recomputed scores
  count), then the fewest calls, whose live-set peak fits the budget; without a budget, the same
  choice among the sizes within 10% of the smallest peak; when nothing fits, the smallest peak.
  When nothing fits with K and V stored, the layers' K/V are recomputed, then kept again layer by
  layer wherever that still fits (`kv="auto"`; "keep" and "recompute" force one choice).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from base.errors import TinyshieldError
from mcu.graph import Buffer, Call, Const, Graph, Op, Ref, Schedule
from mcu.kernels import pack_fc_weights
from mcu.lower import add_call, add_layernorm_call, calls_for, embedding_call, fc_call, lut_call
from mcu.planner import lower_bound, plan
from mcu.tiled import attention_macs, attention_scratch, kv_macs


def _whole_loc(graph: Graph):
    def loc(name, offset=0):
        t = graph.tensors[name]
        return Const(name, offset) if t.kind == "const" else Ref(name, offset)
    return loc


def layerwise(graph: Graph) -> Schedule:
    """One buffer per activation tensor, each op's calls on whole tensors, in graph order."""
    buffers = {n: Buffer(n, t.nbytes, t.kind) for n, t in graph.tensors.items() if t.kind != "const"}
    loc = _whole_loc(graph)
    calls = [c for op in graph.ops for c in calls_for(graph, op, loc)]
    return Schedule("layerwise", graph, buffers, calls, {})


# ---------------------------------------------------------------- units: ops as the tiled pass sees them

@dataclass(frozen=True)
class Tiles:
    rows: int       # tokens per block: attention queries, FFN / LayerNorm / embedding rows
    kt: int         # keys per tile of the streaming softmax (>= L: scores computed once per block)
    recompute: tuple[int, ...] = ()   # attention layers (0, 1, ... in graph order) that recompute K/V


KV_ROWS = 32        # key/value rows attention_kv_s8 projects per fc call (its scratch: KV_ROWS x dh)


@dataclass
class Unit:
    ops: list[Op]
    kind: str                       # op kind, or "attention" for matmul_qk + softmax + matmul_pv
    rows: int                       # number of rows it iterates over (0: not row-wise)
    row_inputs: list[str]           # tensors indexed by row (block j reads rows of block j only)
    whole_inputs: list[str]         # tensors read in full by every block (K, V, mask)
    inputs: list[str]
    outputs: list[str]
    name: str = ""


def _units(graph: Graph) -> list[Unit]:
    ops, out, i = graph.ops, [], 0
    T = graph.tensors
    while i < len(ops):
        op = ops[i]
        a = op.attrs
        if (op.kind == "matmul_qk" and i + 2 < len(ops) and ops[i + 1].kind == "softmax"
                and ops[i + 2].kind == "matmul_pv" and ops[i + 1].inputs[0] == op.outputs[0]
                and ops[i + 2].inputs[0] == ops[i + 1].outputs[0]):
            sm, pv = ops[i + 1], ops[i + 2]
            q, k = op.inputs
            v = pv.inputs[1]
            mask, lut = sm.inputs[1], sm.inputs[2]
            out.append(Unit([op, sm, pv], "attention", a["L"], [q], [k, v, mask], [q, k, v, mask, lut],
                            list(pv.outputs), pv.name))
            i += 3
            continue
        rows, row_in = 0, []
        if op.kind == "fully_connected" and a["M"] > 1:
            rows, row_in = a["M"], [op.inputs[0]]
        elif op.kind == "add_layernorm" and a["M"] > 1:
            rows, row_in = a["M"], op.inputs[:2]
        elif op.kind == "lut" and len(T[op.inputs[0]].shape) == 2 and T[op.inputs[0]].shape[0] > 1:
            rows, row_in = T[op.inputs[0]].shape[0], [op.inputs[0]]
        elif op.kind == "embedding" and a["L"] > 1:
            rows, row_in = a["L"], [op.inputs[0]]
        elif (op.kind == "add" and len(T[op.outputs[0]].shape) == 2 and T[op.outputs[0]].shape[0] > 1
              and (a["b_n"] == a["n"] or T[op.outputs[0]].shape[1] % a["b_n"] == 0)):
            # a residual add (pre-LN blocks): row by row; a broadcast b (one row repeated) is read whole
            rows = T[op.outputs[0]].shape[0]
            row_in = list(op.inputs) if a["b_n"] == a["n"] else [op.inputs[0]]
            whole_in = [] if a["b_n"] == a["n"] else [op.inputs[1]]
            out.append(Unit([op], op.kind, rows, row_in, whole_in, list(op.inputs), list(op.outputs), op.name))
            i += 1
            continue
        out.append(Unit([op], op.kind, rows, row_in, [], list(op.inputs), list(op.outputs), op.name))
        i += 1
    return out


def _head_slice_ok(dh: int, K: int, heads: int) -> bool:
    """Is head h's block of output channels (rows h*dh ..) a contiguous slice of the packed fc weights?"""
    W = (np.arange(heads * dh * K) % 251 - 125).astype(np.int8).reshape(heads * dh, K)
    packed = pack_fc_weights(W)
    return all(np.array_equal(packed[h * dh * K:(h + 1) * dh * K], pack_fc_weights(W[h * dh:(h + 1) * dh]))
               for h in range(heads))


def _fuse_kv(graph: Graph, units: list[Unit], recompute: tuple[int, ...]) -> list[Unit]:
    """The attention units numbered in `recompute` take over their K and V projections
    ("attention_kv": K/V rows recomputed from the projections' input, never stored)."""
    if not recompute:
        return units
    atts = [u for u in units if u.kind == "attention"]
    bad = sorted(i for i in recompute if not 0 <= i < len(atts))
    if bad:
        raise TinyshieldError(f"graph {graph.name}: no attention layer {bad[0]} to recompute K/V for "
                              f"(it has {len(atts)}: 0..{len(atts) - 1})")
    producer = {t: u for u in units for t in u.outputs}
    readers: dict[str, int] = {}
    for u in units:
        for t in set(u.inputs):
            readers[t] = readers.get(t, 0) + 1
    swap, drop = {}, set()
    for i in sorted(set(recompute)):
        a = atts[i]
        q, k, v, mask, lut = a.inputs
        pk, pv = producer.get(k), producer.get(v)
        qk = a.ops[0].attrs
        if not (pk and pv and pk.kind == pv.kind == "fully_connected" and pk.rows == pv.rows == qk["L"]
                and pk.inputs[0] == pv.inputs[0] and readers[k] == readers[v] == 1
                and pk.ops[0].attrs["y_zp"] == qk["k_zp"] and pv.ops[0].attrs["y_zp"] == a.ops[2].attrs["v_zp"]
                and _head_slice_ok(qk["dh"], pk.ops[0].attrs["K"], qk["heads"])):
            raise TinyshieldError(
                f"attention {a.name}: K and V are not per-head slices of fully connected projections of one "
                f"input read only here, so they cannot be recomputed; keep them (kv='keep')")
        x = pk.inputs[0]
        swap[id(a)] = Unit(pk.ops + pv.ops + a.ops, "attention_kv", a.rows, [q], [x, mask],
                           [q, x, *pk.inputs[1:], *pv.inputs[1:], mask, lut], list(a.outputs), a.name)
        drop |= {id(pk), id(pv)}
    return [swap.get(id(u), u) for u in units if id(u) not in drop]


def _segments(units: list[Unit]) -> list[tuple[str, list[Unit]]]:
    """Execution order: ("whole", [unit]) or ("rows", [units]) run block by block.

    A row segment is cut where a unit needs a tensor whole (attention's K and V) that the segment
    itself produces: the producers are hoisted out and run whole right after the part of the
    segment their inputs come from."""
    out: list[tuple[str, list[Unit]]] = []
    cur: list[Unit] = []

    def flush():
        if cur:
            out.append(("rows", list(cur)))
            cur.clear()

    for u in units:
        if not u.rows:
            flush()
            out.append(("whole", [u]))
            continue
        if cur and u.rows != cur[0].rows:
            flush()
        made = {t for c in cur for t in c.outputs}
        need = [t for t in u.whole_inputs if t in made]
        if need and u.kind == "attention_kv":
            # it reads its layer input whole: the segment ends where that input is made
            cut = max(j + 1 for j, c in enumerate(cur) if set(c.outputs) & set(need))
            tail = cur[cut:]
            del cur[cut:]
            flush()
            cur[:] = tail
        elif need:
            producers = [c for c in cur if set(c.outputs) & set(need)]
            deps = {t for p in producers for t in p.inputs}
            cut = max((j + 1 for j, c in enumerate(cur) if set(c.outputs) & deps), default=0)
            head = cur[:cut]
            tail = [c for c in cur[cut:] if c not in producers]
            cur[:] = head
            flush()
            out.extend(("whole", [p]) for p in producers)
            cur[:] = tail
        cur.append(u)
    flush()
    return out


def _row_bytes(graph: Graph, t: str) -> int:
    ten = graph.tensors[t]
    return ten.nbytes // ten.shape[0]


# ---------------------------------------------------------------- the tiled pass

class _Emitter:
    """Collects buffers and calls; whole tensors are named by tensor and renamed to their alias
    class (in-place chains) at the end."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.calls: list[Call] = []
        self.buffers: dict[str, Buffer] = {}
        self.alias: dict[str, str] = {}          # tensor -> tensor whose buffer it reuses

    def root(self, t: str) -> str:
        while t in self.alias:
            t = self.alias[t]
        return t

    def whole(self, t: str) -> None:
        ten = self.g.tensors[t]
        if ten.kind != "const" and t not in self.buffers and t not in self.alias:
            self.buffers[t] = Buffer(t, ten.nbytes, ten.kind)

    def chunk(self, name: str, nbytes: int) -> str:
        self.buffers[name] = Buffer(name, nbytes, "scratch")
        return name

    def finish(self, name: str, params: dict) -> Schedule:
        g = self.g
        # An in-place chain is one buffer, named after a graph output in it (the executor and the
        # firmware read outputs by name), else after its first tensor.
        classes: dict[str, list[str]] = {}
        for t in list(self.buffers) + list(self.alias):
            classes.setdefault(self.root(t), []).append(t)
        rename, buffers = {}, {}
        for r, members in classes.items():
            outs = [m for m in members if m in g.outputs]
            label = outs[0] if outs else r
            b = self.buffers[r]
            kind = "output" if outs else b.kind
            size = max([b.nbytes] + [g.tensors[m].nbytes for m in members if m in g.tensors])
            buffers[label] = Buffer(label, size, kind)
            for m in members:
                rename[m] = label

        def fix(a):
            return Ref(rename.get(a.buffer, a.buffer), a.offset) if isinstance(a, Ref) else a
        calls = [Call(c.kernel, tuple(fix(a) for a in c.args), c.op, c.macs) for c in self.calls]
        return Schedule(name, g, buffers, calls, params)


ELEMENTWISE = ("add_layernorm", "lut", "add")   # kernels that may write the row they read


def _alias_plan(graph: Graph, seg: list[Unit], later_inputs: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """In-place decisions for one row segment: (whole output -> input it overwrites,
    chunk-local lut output -> its chunk-local input)."""
    made = {t for u in seg for t in u.outputs}
    ins = [t for u in seg for t in u.inputs if t not in made]
    whole_read = {t for u in seg for t in u.whole_inputs}
    last_read = {}
    for j, u in enumerate(seg):
        for t in u.row_inputs:
            last_read[t] = j
    outs, used = {}, set()
    for j, u in enumerate(seg):
        for o in u.outputs:
            if o not in later_inputs and o not in graph.outputs:
                continue                                    # chunk-local, not a whole buffer
            for i in ins:
                ti, to = graph.tensors[i], graph.tensors[o]
                # The same call may read and overwrite a row only if it works element by element
                # within the row (add_layernorm, lut); a matmul reads a whole row per output.
                before = last_read.get(i, len(seg)) < j or (last_read.get(i) == j and u.kind in ELEMENTWISE)
                if (i not in used and ti.kind == "activation" and i not in whole_read and i not in later_inputs
                        and before and ti.nbytes == to.nbytes and ti.shape[0] == to.shape[0]):
                    outs[o] = i
                    used.add(i)
                    break
    local = {}
    for j, u in enumerate(seg):
        if u.kind == "lut":
            x, y = u.inputs[0], u.outputs[0]
            later = {t for v in seg[j + 1:] for t in v.inputs}
            if x in made and x not in later and x not in later_inputs and y not in later_inputs \
                    and y not in graph.outputs:
                local[y] = x
    return outs, local


def _rows_calls(e: _Emitter, u: Unit, r0: int, n: int, loc, scratch, kt: int) -> list[Call]:
    op, a = u.ops[0], u.ops[0].attrs
    i, o = op.inputs, op.outputs
    if u.kind == "fully_connected":
        return [fc_call(op, (loc(i[0]), *(Const(t) for t in i[1:5]), loc(o[0])), n)]
    if u.kind == "add_layernorm":
        return [add_layernorm_call(op, (loc(i[0]), loc(i[1]), *(Const(t) for t in i[2:5]), loc(o[0])), n)]
    if u.kind == "lut":
        cols = e.g.tensors[i[0]].shape[1]
        return [lut_call(op, (loc(i[0]), Const(i[1]), loc(o[0])), n * cols)]
    if u.kind == "add":
        cols = e.g.tensors[o[0]].shape[1]
        b_n = n * cols if a["b_n"] == a["n"] else a["b_n"]
        b = loc(i[1]) if a["b_n"] == a["n"] else whole(e, i[1])
        return [add_call(op, (loc(i[0]), b, loc(o[0])), n * cols, b_n)]
    if u.kind == "embedding":
        return [embedding_call(op, (loc(i[0]), Const(i[1]), loc(o[0])), n)]
    if u.kind == "attention":
        qk, pv = u.ops[0].attrs, u.ops[2].attrs
        h, L, dh = qk["heads"], qk["L"], qk["dh"]
        q, k, v, mask, lut = u.inputs
        ctx = u.outputs[0]
        d = h * dh
        kk = min(kt, L)
        sc = {name: scratch(f"{u.name}.{name}", nbytes) for name, nbytes in attention_scratch(n, kk, dh).items()}
        calls = []
        for hh in range(h):
            def at(ref, off=hh * dh):
                return type(ref)(ref.buffer if isinstance(ref, Ref) else ref.tensor, ref.offset + off)
            calls.append(Call("attention_s8", (
                at(loc(q)), at(whole(e, k)), at(whole(e, v)), whole(e, mask), Const(lut), at(loc(ctx)),
                Ref(sc["s_tile"]), Ref(sc["acc"]), Ref(sc["stats"]),
                n, L, dh, kt, d, d, d, d, qk["q_zp"], qk["k_zp"], qk["mult"], qk["shift"], qk["s_zp"],
                pv["v_zp"], pv["mult"], pv["shift"], pv["y_zp"]), u.name, attention_macs(n, L, dh, kt)))
        return calls
    if u.kind == "attention_kv":
        fk, fv, qk_op, _, pv_op = u.ops
        ka, va, qk, pv = fk.attrs, fv.attrs, qk_op.attrs, pv_op.attrs
        h, L, dh, d_in = qk["heads"], qk["L"], qk["dh"], ka["K"]
        q, x, wk, bk, mk, sk, wv, bv, mv, sv, mask, lut = u.inputs
        ctx = u.outputs[0]
        d = h * dh
        kk, pt = min(kt, L), min(KV_ROWS, kt, L)
        sizes = {**attention_scratch(n, kk, dh), "kv": pt * dh}
        sc = {name: scratch(f"{u.name}.{name}", nbytes) for name, nbytes in sizes.items()}
        calls = []
        for hh in range(h):
            w, c = hh * dh * d_in, 4 * hh * dh          # head hh's output channels: weight rows, per-channel i32
            q_h, y_h = loc(q), loc(ctx)
            calls.append(Call("attention_kv_s8", (
                Ref(q_h.buffer, q_h.offset + hh * dh), whole(e, x),
                Const(wk, w), Const(bk, c), Const(mk, c), Const(sk, c), Const(wv, w), Const(bv, c), Const(mv, c),
                Const(sv, c), whole(e, mask), Const(lut), Ref(y_h.buffer, y_h.offset + hh * dh),
                Ref(sc["s_tile"]), Ref(sc["acc"]), Ref(sc["stats"]), Ref(sc["kv"]),
                n, L, dh, kt, pt, d_in, d, d_in, d, ka["act_min"], ka["act_max"], va["act_min"], va["act_max"],
                qk["q_zp"], ka["y_zp"], qk["mult"], qk["shift"], qk["s_zp"], va["y_zp"], pv["mult"], pv["shift"],
                pv["y_zp"]), u.name, attention_macs(n, L, dh, kt) + kv_macs(L, d_in, dh, kt)))
        return calls
    raise TinyshieldError(f"op {op.name} ({op.kind}) cannot be run by rows")


def whole(e: _Emitter, t: str, offset: int = 0):
    if e.g.tensors[t].kind == "const":
        return Const(t, offset)
    return Ref(e.root(t), offset)


def tiled_with(graph: Graph, tiles: Tiles) -> Schedule:
    """The tiled schedule for fixed block/tile sizes."""
    if tiles.rows < 1 or tiles.kt < 1:
        raise TinyshieldError(f"tile sizes must be >= 1, got rows={tiles.rows} kt={tiles.kt}")
    e = _Emitter(graph)
    for t in graph.inputs:
        e.whole(t)
    order = _segments(_fuse_kv(graph, _units(graph), tiles.recompute))
    for s, (kind, seg) in enumerate(order):
        later_inputs = {t for _, later in order[s + 1:] for u in later for t in u.inputs}
        if kind == "whole":
            op_loc = lambda name, offset=0: whole(e, name, offset)   # noqa: E731
            for u in seg:
                for op in u.ops:
                    for t in op.outputs:
                        e.whole(t)
                    e.calls.extend(calls_for(graph, op, op_loc))
            continue
        made = {t for u in seg for t in u.outputs}
        keep = {t for t in made if t in later_inputs or t in graph.outputs}   # whole buffers
        outs, local = _alias_plan(graph, seg, later_inputs)
        for o, i in outs.items():
            e.alias[o] = i
        for t in keep:
            e.whole(t)
        R = seg[0].rows
        for r0 in range(0, R, tiles.rows):
            n = min(tiles.rows, R - r0)
            blk: dict[str, str] = {}

            def loc(t, r0=r0, n=n, blk=blk):
                ten = graph.tensors[t]
                rb = _row_bytes(graph, t)
                if ten.kind == "const":
                    return Const(t, r0 * rb)
                if t in made and t not in keep:                     # this block's rows only
                    src = local.get(t)
                    if src is not None and src in blk:
                        blk[t] = blk[src]
                    elif t not in blk:
                        blk[t] = e.chunk(f"{t}@{r0}", n * rb)
                    return Ref(blk[t])
                return Ref(e.root(t), r0 * rb)

            def scratch(name, nbytes, r0=r0):
                return e.chunk(f"{name}@{r0}", nbytes)

            for u in seg:
                e.calls.extend(_rows_calls(e, u, r0, n, loc, scratch, tiles.kt))
    return e.finish("tiled", {"rows": tiles.rows, "kt": tiles.kt, "recompute": list(tiles.recompute)})


# ---------------------------------------------------------------- tile search

@dataclass
class Candidate:
    rows: int
    kt: int
    peak: int           # live-set peak (bytes, 16-aligned buffers)
    macs: int
    calls: int
    recompute: tuple[int, ...] = ()     # attention layers whose K/V are recomputed


@dataclass
class Search:
    chosen: Candidate
    fits: bool
    budget: int | None
    candidates: list[Candidate] = field(default_factory=list)


def _powers(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    return out + [hi]


def attention_layers(graph: Graph) -> int:
    return sum(u.kind == "attention" for u in _units(graph))


def seq_rows(graph: Graph) -> int:
    """Tokens of the encoder (the row count the tiles divide)."""
    rows = [u.rows for u in _units(graph) if u.kind == "attention"]
    if not rows:
        raise TinyshieldError(f"graph {graph.name} has no attention: nothing to tile")
    return rows[0]


KT_CHOICES = (16, 64, 256)     # key tiles tried besides "all keys at once"
SLACK = 1.10                   # without a fitting budget: within 10% of the smallest peak, fewest MACs/calls
# (every call is a line of generated code: the smallest peak alone would pick 1-token blocks)


KV_CHOICES = ("auto", "keep", "recompute")


def _candidate(graph: Graph, tiles: Tiles, align: int) -> Candidate:
    s = tiled_with(graph, tiles)
    return Candidate(tiles.rows, tiles.kt, lower_bound(s, align), s.macs(), len(s.calls), tiles.recompute)


def _grid(graph: Graph, recompute: tuple[int, ...], align: int, budget: int | None = None) -> list[Candidate]:
    """Powers of two for the block rows x the key tiles; with a budget, also the fewest blocks that fit
    between the largest fitting power of two and the next (fewer blocks: fewer calls and, when K/V
    are recomputed, fewer MACs)."""
    L = seq_rows(graph)
    out = []
    for kt in sorted({k for k in KT_CHOICES if k < L} | {L}):
        row = [_candidate(graph, Tiles(rows, kt, recompute), align) for rows in _powers(1, L)]
        out += row
        fit = [c.rows for c in row if budget is not None and c.peak <= budget]
        if not fit or max(fit) >= L:
            continue
        # blocks b from ceil(L / (2 r)) (does not fit) to ceil(L / r) (fits): the fewest that fits
        r = max(fit)
        lo, hi = -(-L // (2 * r)) + 1, -(-L // r) - 1
        while lo <= hi:
            b = (lo + hi) // 2
            c = _candidate(graph, Tiles(-(-L // b), kt, recompute), align)
            out.append(c)
            if c.peak <= budget:
                hi = b - 1
            else:
                lo = b + 1
    return out


def search_tiles(graph: Graph, budget: int | None = None, align: int = 16, slack: float = SLACK,
                 kv: str = "auto") -> Search:
    """Fewest MACs (then fewest calls, then least memory) among the tile sizes whose live-set peak
    fits `budget`; without a budget, the fewest MACs/calls within `slack` of the smallest peak; when
    nothing fits the budget, the smallest peak. Recomputed attention scores and K/V count in the MACs.

    kv: "keep" stores every layer's K and V; "recompute" recomputes them in every layer; "auto" keeps
    them when some tile size fits, else recomputes them in every layer and then keeps them again in
    each layer (in order) where that still fits."""
    if kv not in KV_CHOICES:
        raise TinyshieldError(f"unknown K/V choice {kv!r}: use one of {', '.join(KV_CHOICES)}")
    every = tuple(range(attention_layers(graph)))
    cands = _grid(graph, every if kv == "recompute" else (), align, budget)
    fitting = [c for c in cands if budget is not None and c.peak <= budget]
    if kv == "auto" and budget is not None and not fitting and every:
        try:
            more = _grid(graph, every, align, budget)
        except TinyshieldError:
            more = []                   # K/V that cannot be recomputed: the refusal quotes the kept peak
        cands += more
        fitting = [c for c in more if c.peak <= budget]
        if fitting:
            best = min(fitting, key=lambda c: (c.macs, c.calls, c.peak))
            for i in every:             # keep K/V again wherever the budget allows
                trial = _candidate(graph, Tiles(best.rows, best.kt, tuple(j for j in best.recompute if j != i)), align)
                if trial.peak <= budget:
                    best = trial
                    cands.append(trial)
            return Search(best, True, budget, cands)
    if not fitting:
        # Nothing fits: the smallest peak (what a refusal should quote); no budget: trade a little
        # memory (slack) for fewer MACs and calls.
        least = min(c.peak for c in cands)
        pool = [c for c in cands if c.peak <= least * (slack if budget is None else 1.0)]
    else:
        pool = fitting
    best = min(pool, key=lambda c: (c.macs, c.calls, c.peak))
    return Search(best, bool(fitting), budget, cands)


def tiled(graph: Graph, budget: int | None = None, tiles: Tiles | None = None, align: int = 16,
          kv: str = "auto") -> Schedule:
    """The tiled schedule; tile sizes (and K/V recomputation) from `tiles`, else searched under
    `budget` (bytes) with the K/V choice `kv`."""
    search = None
    if tiles is None:
        search = search_tiles(graph, budget, align, kv=kv)
        c = search.chosen
        tiles = Tiles(c.rows, c.kt, c.recompute)
    s = tiled_with(graph, tiles)
    if search is not None:
        s.params.update(budget=budget, fits=search.fits, candidates=len(search.candidates))
    return s


SCHEDULES = ("layerwise", "tiled", "recompute")   # recompute: tiled with every layer's K/V recomputed


def schedule(graph: Graph, name: str, budget: int | None = None) -> Schedule:
    if name not in SCHEDULES:
        raise TinyshieldError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    if name == "layerwise":
        return layerwise(graph)
    return tiled(graph, budget=budget, kv="recompute" if name == "recompute" else "auto")


__all__ = ["layerwise", "tiled", "tiled_with", "search_tiles", "Tiles", "schedule", "plan"]
