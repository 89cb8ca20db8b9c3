"""The row-block schedule of an imported .tflite graph: runs of row-local ops computed block by block.

An op is *row-local* when row r of its output depends only on row r of its row-indexed inputs (and on
inputs it reads whole): FULLY_CONNECTED over tokens, elementwise ops, MEAN / SOFTMAX over the last
axis, and BATCH_MATMUL over the rows of one batch (its right operand read whole). A chain of such ops
over the same rows (a LayerNorm written out, an FFN, q k^T -> scale -> softmax -> times v per head)
is run `rows` rows at a time: every op of the chain for rows 0..r-1, then for the next block, and so
on. A tensor made and used only inside the chain lives in a block-sized buffer; the others are whole
tensors read and written at the block's offset. The kernels and their arguments per row are the
layerwise schedule's, so the outputs are bit-identical; only the arena shrinks (the L x 4d FFN
hidden and the h x L x L attention scores never exist whole).

After the view passes of mcu.tflite_views, a head's matmul reads q, k and v where their projections
wrote them, so one chain runs a whole encoder layer per block of query rows: q projection -> q k^T ->
scale -> softmax -> times v -> output projection -> residual -> LayerNorm -> FFN -> residual ->
LayerNorm, with k and v (read whole by every row) made before it; and the layer's output is written
over its input, row for row, when nothing reads that input later (`in_place`). A layer then needs
its input/output, k and v, and a few blocks of rows.

`row_tiled(graph, rows)` is a pure function graph -> Schedule; `search_rows` picks the block size,
trading arena for fewer calls (`block_score`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mcu.graph import Buffer, Call, Const, Graph, Op, Ref, Schedule
from mcu.lower import calls_for
from mcu.planner import plan as make_plan

SIZE = {"int8": 1, "int16": 2, "int32": 4}


@dataclass
class Rows:
    """How an op is row-local: R rows; per input tensor its row width (0: read whole) ; output width."""
    R: int
    widths: dict          # tensor -> elements per row (0 = not row-indexed)
    out: int              # output elements per row
    batch_rows: int = 0   # BATCH_MATMUL: rows per batch (blocks must not cross batches)


def _binary_rows(g: Graph, op: Op, R: int | None) -> Rows | None:
    dims = g.tensors[op.inputs[2]].data.astype(np.int64)
    size, sa, sb = dims[:4], dims[4:8], dims[8:12]
    n = int(np.prod(size))
    full = [int(np.prod(size[i + 1:])) if size[i] > 1 else 0 for i in range(4)]
    def kind(s):
        s = [int(v) if size[i] > 1 else 0 for i, v in enumerate(s)]
        if s == full:
            return "full"
        if not any(s):
            return "scalar"
        return s
    ka, kb = kind(sa), kind(sb)
    if all(k in ("full", "scalar") for k in (ka, kb)):            # elementwise: any split
        R = R or n
        if n % R:
            return None
        w = n // R
        return Rows(R, {op.inputs[0]: w if ka == "full" else 0, op.inputs[1]: w if kb == "full" else 0}, w)
    W, rows = int(size[3]), n // int(size[3])
    if R is not None and R != rows:
        return None
    widths = {}
    for t, k, s in ((op.inputs[0], ka, sa), (op.inputs[1], kb, sb)):
        s = [int(v) if size[i] > 1 else 0 for i, v in enumerate(s)]
        if k == "full":
            widths[t] = W
        elif s[3] == 0 and s[:3] == [int(np.prod(size[i + 1:3])) if size[i] > 1 else 0 for i in range(3)]:
            widths[t] = 1                                             # one value per row
        elif not any(s[:3]):
            widths[t] = 0                                             # the same for every row
        else:
            return None
    if op.inputs[0] == op.inputs[1]:
        return None
    return Rows(rows, widths, W)


def row_local(g: Graph, op: Op, R: int | None = None) -> Rows | None:
    """How `op` is row-local (for R rows when R is given), or None."""
    a, k = op.attrs, op.kind
    if k == "fully_connected":
        return Rows(a["M"], {op.inputs[0]: a["K"]}, a["N"])
    if k == "lut":
        n = a["n"]
        R = R or n
        return Rows(R, {op.inputs[0]: n // R}, n // R) if n % R == 0 else None
    if k == "tfl_binary":
        return _binary_rows(g, op, R)
    if k == "tfl_mean" and a["inner"] == 1:
        return Rows(a["outer"], {op.inputs[0]: a["n"]}, 1)
    if k == "tfl_softmax":
        R = R or a["rows"]
        w = a["rows"] // R * a["depth"]
        return Rows(R, {op.inputs[0]: w}, w) if a["rows"] % R == 0 else None
    if k == "tfl_matmul":
        A, B, Y = op.inputs[0], op.inputs[1], op.outputs[0]
        M = a["M"]
        if A == B or _numel(g, A) != M * a["a_stride"] or _numel(g, Y) != M * a["y_stride"]:
            return None
        return Rows(M, {A: a["a_stride"], B: 0}, a["y_stride"])
    if k == "tfl_batch_matmul" and (a["a_step"] or a["batches"] == 1):
        return Rows(a["batches"] * a["M"], {op.inputs[0]: a["K"], op.inputs[1]: 0}, a["N"], batch_rows=a["M"])
    return None


def _numel(g: Graph, t: str) -> int:
    return int(np.prod(g.tensors[t].shape, dtype=np.int64))


def _feeds_whole(g: Graph) -> set[int]:
    """Ops whose output some row-local op reads whole (k and v for every query row)."""
    made = {t: i for i, op in enumerate(g.ops) for t in op.outputs}
    out = set()
    for op in g.ops:
        r = row_local(g, op)
        if r is not None:
            out |= {made[t] for t, w in r.widths.items() if w == 0 and t in made}
    return out


def steps(g: Graph, cuts: frozenset = frozenset(), max_pending: int = 8) -> list[tuple]:
    """The op order of the schedule: ("op", i) or ("chain", [i...], R). While a chain is open, an op that
    is not row-local waits; when the chain closes, the waiting ops that do not depend on it run before
    it (e.g. the transpose of v that the chain's attention reads), the others after it (e.g. the head
    split of the q it made). A chain also closes after an op in `cuts`, and ops whose output a row-local
    op reads whole (k, v) never share a chain with the others (they must be complete before the query
    rows' chain starts). The order is otherwise the graph's."""
    out: list[tuple] = []
    chain: list[int] = []
    pending: list[int] = []
    R = None
    tainted: set = set()            # tensors that depend on the open chain
    feeds = _feeds_whole(g)

    def close():
        nonlocal chain, pending, R, tainted
        if len(chain) > 1:
            reads = {t for i in chain for t in g.ops[i].inputs}
            hoist = [i for i in pending if not set(g.ops[i].inputs) & tainted and set(g.ops[i].outputs) & reads]
            out.extend(("op", i) for i in hoist)
            out.append(("chain", chain, R))
            out.extend(("op", i) for i in pending if i not in hoist)
        else:
            out.extend(("op", i) for i in sorted(chain + pending))
        chain, pending, R, tainted = [], [], None, set()

    for i, op in enumerate(g.ops):
        if chain:
            r = row_local(g, op, R)
            blocked = {o for j in pending if set(g.ops[j].inputs) & tainted for o in g.ops[j].outputs}
            made = {o for j in chain for o in g.ops[j].outputs}
            if r is not None and (i in feeds) == (chain[0] in feeds) and not set(op.inputs) & blocked and \
                    not any(w == 0 and t in made for t, w in r.widths.items()):
                chain.append(i)
                tainted |= set(op.outputs)
                if i in cuts:
                    close()
                continue
            if r is None and row_local(g, op) is None and len(pending) < max_pending:
                pending.append(i)
                if set(op.inputs) & tainted:
                    tainted |= set(op.outputs)
                continue
            close()
        first = row_local(g, op)
        if first is None:
            out.append(("op", i))
        else:
            chain, R, tainted = [i], first.R, set(op.outputs)
    close()
    return out


def chains(g: Graph, cuts: frozenset = frozenset()) -> list[tuple[list[int], int]]:
    return [(s[1], s[2]) for s in steps(g, cuts) if s[0] == "chain"]


def row_tiled(g: Graph, rows: int, cuts: frozenset = frozenset()) -> Schedule:
    """The schedule running every chain `rows` rows at a time (other ops as layerwise). The schedule's
    graph is a copy of `g` with the block-shaped broadcast tables added as constants."""
    g = replace(g, tensors=dict(g.tensors))
    T = g.tensors
    readers: dict[str, set] = {}
    for i, op in enumerate(g.ops):
        for t in op.inputs:
            readers.setdefault(t, set()).add(i)

    order = steps(g, cuts)
    root = in_place(g, order)

    def loc(name, offset=0):
        return Const(name, offset) if T[name].kind == "const" else Ref(root.get(name, name), offset)

    calls, buffers = [], {}
    for step in order:
        if step[0] == "op":
            calls += calls_for(g, g.ops[step[1]], loc)
            continue
        _, idx, R = step
        ops = [g.ops[j] for j in idx]
        info = [row_local(g, o, R) for o in ops]
        block = max(1, min(rows, R))
        for r in info:
            if r.batch_rows:
                while r.batch_rows % block:
                    block -= 1
        inside = set(idx)
        local = {o.outputs[0] for o in ops if readers.get(o.outputs[0], set()) <= inside
                 and o.outputs[0] not in g.outputs}
        width = {o.outputs[0]: r.out for o, r in zip(ops, info)}
        scratch = f"rows{len(buffers)}.{ops[0].name}"
        places, size = _block_plan(ops, local, {t: block * width[t] * SIZE[T[t].dtype] for t in local})
        if size:
            buffers[scratch] = Buffer(scratch, size, "activation")
        where = {t: Ref(scratch, off) for t, off in places.items()}
        for r0 in range(0, R, block):
            rb = min(block, R - r0)
            for o, r in zip(ops, info):
                calls += _block_calls(g, o, r, r0, rb, where, loc)
    used = {a.buffer for c in calls for a in c.args if isinstance(a, Ref)}
    for name in used - set(buffers):
        buffers[name] = Buffer(name, T[name].nbytes, T[name].kind)
    for n in g.inputs + g.outputs:
        buffers.setdefault(n, Buffer(n, T[n].nbytes, T[n].kind))
    return Schedule("tiled", g, buffers, calls, {"rows": rows, "cuts": sorted(cuts), "in_place": root})


def summary(s: Schedule) -> str:
    """One line on what the row-block schedule found in an imported graph (for `tinyshield plan`)."""
    g = s.graph
    order = steps(g, frozenset(s.params.get("cuts", ())))
    chained = [i for st in order if st[0] == "chain" for i in st[1]]
    mm = [i for i, op in enumerate(g.ops) if op.kind in ("tfl_matmul", "tfl_batch_matmul")]
    copies = sum(op.kind == "permute" for op in g.ops)
    text = (f"row blocks of {s.params['rows']}: {sum(st[0] == 'chain' for st in order)} chains over "
            f"{len(chained)} of {len(g.ops)} ops (the rest layerwise); ")
    if not mm:
        text += "no attention (batch matmul) found"
    else:
        text += (f"{sum(i in set(chained) for i in mm)} of {len(mm)} attention matmuls inside query-row chains, "
                 f"{copies} transpose cop{'y' if copies == 1 else 'ies'} kept")
    n = len(s.params.get("in_place", {}))
    return text + (f"; {n} chain output(s) written over their input" if n else "; nothing written in place")


def in_place(g: Graph, order: list[tuple]) -> dict[str, str]:
    """Chain outputs written over a chain input, row for row: tensor -> the buffer it shares.

    A chain's output O may take the bytes of a whole tensor X the chain reads by rows when X is read
    by nothing after the chain starts but the chain's ops before the one writing O (so in every
    block the rows of X are read before the same rows of O are written, and later blocks read only
    later rows), no chain op reads X whole, and rows of X and O are the same bytes. The residual
    stream of an encoder layer then stays in one buffer."""
    position = {}
    for p, st in enumerate(order):
        for i in (st[1] if st[0] == "chain" else [st[1]]):
            position[i] = p
    readers: dict[str, set] = {}
    for i, op in enumerate(g.ops):
        for t in op.inputs:
            readers.setdefault(t, set()).add(i)
    root: dict[str, str] = {}
    for p, st in enumerate(order):
        if st[0] != "chain":
            continue
        idx, R = st[1], st[2]
        info = {i: row_local(g, g.ops[i], R) for i in idx}
        writer = {}
        for i in idx:
            for t in g.ops[i].outputs:
                writer.setdefault(t, []).append(i)
        taken = set()
        for i in idx:
            O = g.ops[i].outputs[0]
            if len(g.ops[i].outputs) != 1 or len(writer[O]) != 1 or O in g.outputs or \
                    not readers.get(O, set()) - set(idx):
                continue
            for X in dict.fromkeys(t for j in idx[:idx.index(i)] for t, w in info[j].widths.items() if w):
                x = g.tensors[X]
                if X in taken or X in writer or x.kind not in ("activation", "input") or X in g.outputs or \
                        x.nbytes != g.tensors[O].nbytes or x.dtype != g.tensors[O].dtype:
                    continue
                later = {j for j in readers.get(X, ()) if position[j] >= p}
                if later <= set(idx[:idx.index(i)]) and all(info[j].widths.get(X) for j in later):
                    root[O] = root.get(X, X)
                    taken.add(X)
                    break
    return root


def _block_plan(ops: list[Op], local: set, sizes: dict) -> tuple[dict, int]:
    """Offsets of the chain's block tensors in one scratch buffer: tensors whose uses within one block
    (from the op making it to the last op reading it) do not overlap share bytes (largest first,
    lowest offset that fits)."""
    span = {}
    for p, o in enumerate(ops):
        for t in o.outputs:
            if t in local:
                span.setdefault(t, [p, p])      # a tensor several ops write (heads) lives from the first
        for t in o.inputs:
            if t in span:
                span[t][1] = p
    placed: list[tuple[int, int, list]] = []
    offsets = {}
    for t in sorted(span, key=lambda t: -sizes[t]):
        n = -(-sizes[t] // 4) * 4
        off = 0
        for o2, n2, s2 in sorted((o2, n2, s2) for o2, n2, s2 in placed if s2[0] <= span[t][1] and span[t][0] <= s2[1]):
            if off + n <= o2:
                break
            off = max(off, o2 + n2)
        placed.append((off, n, span[t]))
        offsets[t] = off
    return offsets, max((o + n for o, n, _ in placed), default=0)


def _at(g, t: str, r0: int, width: int, where: dict, loc):
    """Where rows r0.. of tensor t are: its place in the block buffer, or the whole tensor at the row's offset."""
    if t in where:
        return where[t]
    return loc(t, r0 * width * SIZE[g.tensors[t].dtype])


def _block_calls(g: Graph, op: Op, r: Rows, r0: int, rb: int, where: dict, loc) -> list[Call]:
    """The calls of `op` for rows r0 .. r0 + rb - 1 (`where`: the block tensors' places)."""
    a, i, o = op.attrs, op.inputs, op.outputs
    y = _at(g, o[0], r0, r.out, where, loc)
    x = lambda t: _at(g, t, r0, r.widths.get(t, 0), where, loc) if r.widths.get(t, 0) else loc(t)  # noqa: E731
    if op.kind == "fully_connected":
        return [Call("fc_s8", (x(i[0]), loc(i[1]), loc(i[2]), loc(i[3]), loc(i[4]), y, rb, a["K"], a["N"], a["K"],
                               a["N"], a["y_zp"], a["act_min"], a["act_max"]), op.name, rb * a["K"] * a["N"])]
    if op.kind == "lut":
        return [Call("lut_s8", (x(i[0]), loc(i[1]), y, rb * r.out), op.name, 0)]
    if op.kind == "tfl_binary":
        from mcu.tflite_kernels import broadcast_dims
        shape = lambda w: (rb, w) if w else (1, 1)  # noqa: E731
        wa, wb = r.widths[i[0]], r.widths[i[1]]
        full_dims = g.tensors[i[2]].data
        # an operand read whole keeps its original last-axis stride (a vector over the row, or a scalar)
        sa = shape(wa) if wa else (1, r.out if full_dims[7] else 1)
        sb = shape(wb) if wb else (1, r.out if full_dims[11] else 1)
        name = f"{i[2]}.rows{rb}"
        if name not in g.tensors:
            from mcu.graph import Tensor
            d = broadcast_dims((rb, r.out), sa, sb)
            g.tensors[name] = Tensor(name, d.shape, "int32", "const", None, d)
        return [Call("binary_s8", (x(i[0]), x(i[1]), y, Const(name), loc(i[3]), a["op"]), op.name, 0)]
    if op.kind == "tfl_mean":
        return [Call("mean_s16" if a.get("int16") else "mean_s8",
                     (x(i[0]), y, rb, a["n"], 1, a["x_zp"], a["mult"], a["shift"], a["y_zp"]), op.name, 0)]
    if op.kind == "tfl_softmax":
        return [Call("softmax_s8", (x(i[0]), y, rb * r.out // a["depth"], a["depth"], a["mult"], a["left_shift"],
                                    a["diff_min"]), op.name, 0)]
    if op.kind == "tfl_matmul":
        at = lambda ref, n: replace(ref, offset=ref.offset + n)  # noqa: E731
        N, Kd = a["N"], a["K"]
        return [Call("matmul_kn_s8" if a["b_kn"] else "matmul_qk_s8",
                     (at(x(i[0]), a["a_off"]), at(loc(i[1]), a["b_off"]), at(y, a["y_off"]), rb, N, Kd, a["a_stride"],
                      a["b_stride"], a["y_stride"], a["a_zp"], a["b_zp"], a["mult"], a["shift"], a["y_zp"]),
                     op.name, rb * N * Kd)]
    if op.kind == "tfl_batch_matmul":
        b = r0 // a["M"]            # blocks never cross a batch
        Kd, N = a["K"], a["N"]
        return [Call("matmul_qk_s8", (x(i[0]), loc(i[1], b * a["b_step"]), y, rb, N, Kd, Kd, Kd, N, a["a_zp"], a["b_zp"],
                                      a["mult"], a["shift"], a["y_zp"]), op.name, rb * N * Kd)]
    raise ValueError(op.kind)


# What fewer calls are worth in arena: halving the number of calls (doubling the block) is worth up to
# 10% more arena. Calls on one or two rows are dear on the board (FULLY_CONNECTED's kernel takes rows in
# pairs, and every block re-reads the operands it reads whole: k, v, the weights), while at L >= 256 a
# doubling grows the arena by only a few percent (tools/bench/tflite.py measures both).
CALLS_HALVED_WORTH = 1.10


def block_score(arena_bytes: int, calls: int) -> float:
    """The search's cost of a block size: arena x calls^k, with k such that halving the calls pays for
    CALLS_HALVED_WORTH times the arena (log-scale, so it compares models of any size alike)."""
    return math.log(arena_bytes) + math.log2(CALLS_HALVED_WORTH) * math.log(max(calls, 1))


def search_rows(g: Graph, max_rows: int = 32, rounds: int = 2) -> Schedule:
    """The best row-block schedule of `g` after the attention view passes (mcu.tflite_views)."""
    from mcu.tflite_views import attention_views
    return _search(attention_views(g), max_rows, rounds)


def block_sizes(g: Graph, max_rows: int = 32) -> list[tuple[int, int, int]]:
    """(rows, planned arena bytes, calls) of the row-block schedule for rows 1, 2, 4, ... max_rows."""
    L = min(max((R for _, R in chains(g)), default=1), max_rows)
    out, r = [], 1
    while r <= L:
        s = row_tiled(g, r)
        out.append((r, make_plan(s).arena_bytes, len(s.calls)))
        r *= 2
    return out


def _search(g: Graph, max_rows: int, rounds: int) -> Schedule:
    """The block size of the lowest `block_score` (the larger on a tie) over 1, 2, 4, ... max_rows rows;
    then chains cut where that shrinks the arena further (greedily, at ops whose output leaves the chain:
    a long chain keeps all its whole inputs and outputs live at once)."""
    rows = min(block_sizes(g, max_rows), key=lambda c: (block_score(c[1], c[2]), -c[0]))[0]
    cuts, arena = frozenset(), make_plan(row_tiled(g, rows)).arena_bytes
    for _ in range(rounds):
        trials = [(make_plan(row_tiled(g, rows, cuts | {i})).arena_bytes, i) for i in _exits(g, cuts)]
        if not trials or min(trials)[0] >= arena:
            break
        arena, i = min(trials)
        cuts = cuts | {i}
    return row_tiled(g, rows, cuts)


def _exits(g: Graph, cuts: frozenset) -> list[int]:
    """Chain ops (not last in their chain) whose output is read after the chain."""
    out = []
    for idx, _ in chains(g, cuts):
        inside = set(idx)
        for i in idx[:-1]:
            t = g.ops[i].outputs[0]
            if any(t in op.inputs for j, op in enumerate(g.ops) if j not in inside) or t in g.outputs:
                out.append(i)
    return out
