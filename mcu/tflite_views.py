"""Passes over an imported .tflite graph that let attention read views instead of copies, so that the
row-block schedule (mcu.tflite_schedule) can run a layer a block of query rows at a time.

- `matmul_views`: every BATCH_MATMUL becomes one `tfl_matmul` per batch that reads its operands where
  they are — through the TRANSPOSE copies in front of it (a head of q, k or v is a block of columns
  of the (L, d) tensor its projection made) — and writes its output where the TRANSPOSE after it
  would have put it (a head of the attention output). Index arrays decide: a chain of permutes is
  left out only when the gather it composes to is a plain strided view (unit stride along a row),
  otherwise the copies stay. The scores and probabilities between two matmuls (scaled, soft-maxed:
  ops to which the order of rows does not matter) are laid out query-major, (L, heads, L) instead
  of (heads, L, L), so that row r of every tensor from q to the attention output is query r's.
- `early_operands`: the ops making a matmul's right operand (k and v, read whole by every query row)
  move to right after their own inputs are made, so they run before the query rows' chain.

Both are pure functions Graph -> Graph whose outputs are bit-identical with the input graph's; the
tensor names of what they keep are the graph's.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from mcu import kernels as K
from mcu.graph import Graph, Op


def _index(g: Graph):
    producer = {t: i for i, op in enumerate(g.ops) for t in op.outputs}
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(g.ops):
        for t in dict.fromkeys(op.inputs):
            readers.setdefault(t, []).append(i)
    return producer, readers


def _numel(g: Graph, t: str) -> int:
    return int(np.prod(g.tensors[t].shape, dtype=np.int64))


def _gather(g: Graph, op: Op) -> np.ndarray:
    """Element f of a permute's output is element _gather[f] of its input."""
    idx = K.permute_index(g.tensors[op.inputs[1]].data, op.attrs["nd"])[:op.attrs["n"]]
    return idx + op.attrs["offset"]


def _back(g: Graph, t: str, producer, readers) -> tuple[str, np.ndarray, list[int]]:
    """Follow permutes back from t while each tensor passed is read by the next op alone: (the source,
    where each element of t is in it, the permutes passed)."""
    idx, passed = np.arange(_numel(g, t)), []
    while t in producer and g.ops[producer[t]].kind == "permute" and len(readers.get(t, ())) == 1 \
            and t not in g.outputs:
        i = producer[t]
        p = g.ops[i]
        if g.tensors[p.inputs[0]].dtype != "int8":
            break
        idx, t = _gather(g, p)[idx], p.inputs[0]
        passed.append(i)
    return t, idx, passed


def _forward(g: Graph, t: str, readers) -> tuple[str, np.ndarray, list[int]]:
    """Follow permutes forward from t while t is read by one permute that moves every element once:
    (the last tensor, where each element of t lands in it, the permutes passed)."""
    pos, passed = np.arange(_numel(g, t)), []
    while len(readers.get(t, ())) == 1 and g.ops[readers[t][0]].kind == "permute" and t not in g.outputs:
        r = readers[t][0]
        gi = _gather(g, g.ops[r])
        if gi.size != pos.size or not np.array_equal(np.sort(gi), np.arange(gi.size)):
            break
        inv = np.empty_like(gi)
        inv[gi] = np.arange(gi.size)
        pos, t = inv[pos], g.ops[r].outputs[0]
        passed.append(r)
    return t, pos, passed


def _strides(idx: np.ndarray, shape: tuple) -> tuple[int, list[int]] | None:
    """(offset, strides) when idx (in row-major order of shape) is offset + sum_k i_k strides_k, else None."""
    a = idx.reshape(shape)
    off = int(a.flat[0])
    st = [int(a[tuple(int(k == j) for k in range(len(shape)))]) - off if shape[j] > 1 else 0
          for j in range(len(shape))]
    expect = off + sum(np.ix_(*[np.arange(n) * s for n, s in zip(shape, st)]))
    return (off, st) if np.array_equal(a, expect) else None


def _binary_elementwise(g: Graph, op: Op, t: str) -> bool:
    """A tfl_binary op that reads t whole and element by element and its other operand as one value
    (or as t itself): the order of t's elements does not matter to it."""
    dims = g.tensors[op.inputs[2]].data.astype(np.int64)
    size = dims[:4]
    full = [int(np.prod(size[k + 1:])) if size[k] > 1 else 0 for k in range(4)]
    def kind(s):
        s = [int(v) if size[k] > 1 else 0 for k, v in enumerate(s)]
        return "full" if s == full else "scalar" if not any(s) else None
    ka, kb = kind(dims[4:8]), kind(dims[8:12])
    ours = [k for name, k in zip(op.inputs[:2], (ka, kb)) if name == t]
    other = [k for name, k in zip(op.inputs[:2], (ka, kb)) if name != t]
    return int(np.prod(size)) == _numel(g, t) and all(k == "full" for k in ours) and all(k == "scalar" for k in other)


def _query_major(g: Graph, readers) -> dict[str, tuple[int, int, int]]:
    """Tensors between two batch matmuls to lay out query-major: name -> (batches, M, N) of the
    producing matmul's output, which is stored (M, batches, N)."""
    out = {}
    for op in g.ops:
        if op.kind != "tfl_batch_matmul" or op.attrs["batches"] < 2:
            continue
        B, M, N = op.attrs["batches"], op.attrs["M"], op.attrs["N"]
        region, todo, consumers, ok = [], [op.outputs[0]], 0, True
        while todo and ok:
            t = todo.pop()
            region.append(t)
            ok = t not in g.outputs and g.tensors[t].dtype == "int8" and _numel(g, t) == B * M * N
            for r in readers.get(t, ()):
                nxt = g.ops[r]
                if nxt.kind == "lut" or (nxt.kind == "tfl_softmax" and nxt.attrs["depth"] == N) or \
                        (nxt.kind == "tfl_binary" and _binary_elementwise(g, nxt, t)):
                    todo.append(nxt.outputs[0])
                elif nxt.kind == "tfl_batch_matmul" and nxt.inputs[0] == t != nxt.inputs[1] and \
                        (nxt.attrs["batches"], nxt.attrs["M"], nxt.attrs["K"], nxt.attrs["a_step"]) == (B, M, N, M * N):
                    consumers += 1
                else:
                    ok = False
        if ok and consumers:
            out.update({t: (B, M, N) for t in region})
    return out


def _layout(shape3) -> np.ndarray:
    """Where element (b, m, n) of a query-major tensor of logical shape (B, M, N) is stored."""
    B, M, N = shape3
    return (np.arange(M)[None, :, None] * B * N + np.arange(B)[:, None, None] * N + np.arange(N)).ravel()


def matmul_views(g: Graph) -> Graph:
    """The graph with each batch matmul split per batch into `tfl_matmul` ops on strided views (see the
    module's doc); permutes only matmuls read, or only a matmul's output feeds, are left out."""
    producer, readers = _index(g)
    relaid = _query_major(g, readers)
    tensors = dict(g.tensors)
    for t, (B, M, N) in relaid.items():
        tensors[t] = replace(tensors[t], shape=(M, B, N))
    replaced: dict[int, list[Op]] = {}
    dropped: set[int] = set()
    for i, op in enumerate(g.ops):
        if op.kind != "tfl_batch_matmul":
            continue
        a = op.attrs
        B, M, Kd, N = a["batches"], a["M"], a["K"], a["N"]

        def view(t, shape, inner_axes, forward=False):
            """(tensor, offset, strides, permutes passed) for reading (or writing) t through permutes."""
            src, idx, passed = (_forward(g, t, readers) if forward else _back(g, t, producer, readers))
            if src in relaid:
                idx = _layout(relaid[src])[idx]
            found = _strides(idx, shape)
            if found is None or not any(found[1][k] == 1 or shape[k] == 1 for k in inner_axes):
                found, src, passed = _strides(np.arange(int(np.prod(shape))), shape), t, []
                if t in relaid:
                    found = _strides(_layout(relaid[t]), shape)
            return src, found[0], found[1], passed

        bA = B if a["a_step"] else 1
        bB = B if a["b_step"] else 1
        A, a_off, (a_b, a_m, _), pa = view(op.inputs[0], (bA, M, Kd), [2])
        Bt, b_off, (b_b, b_n, b_k), pb = view(op.inputs[1], (bB, N, Kd), [2, 1])
        Y, y_off, (y_b, y_m, _), py = view(op.outputs[0], (B, M, N), [2], forward=True)
        kn = not (b_k == 1 or Kd == 1)
        dropped.update(pa + pb + py)
        replaced[i] = [Op("tfl_matmul", op.name, [A, Bt], [Y], dict(
            M=M, N=N, K=Kd, a_off=a_off + b * a_b * (bA > 1), a_stride=a_m, b_off=b_off + b * b_b * (bB > 1),
            b_stride=b_n if not kn else b_k, b_kn=int(kn), y_off=y_off + b * y_b, y_stride=y_m, a_zp=a["a_zp"],
            b_zp=a["b_zp"], mult=a["mult"], shift=a["shift"], y_zp=a["y_zp"])) for b in range(B)]
    ops = []
    for i, op in enumerate(g.ops):
        if i not in dropped:
            ops.extend(replaced.get(i, [op]))
    used = {t for op in ops for t in op.inputs + op.outputs} | set(g.inputs) | set(g.outputs)
    return replace(g, tensors={n: t for n, t in tensors.items() if n in used}, ops=ops)


def early_operands(g: Graph) -> Graph:
    """The graph with each op making a `tfl_matmul`'s right operand moved to right after the last op
    making one of its inputs (after other ops moved there before it)."""
    early = {op.inputs[1] for op in g.ops if op.kind == "tfl_matmul"}
    order: list[Op] = []
    moved: set[int] = set()
    for op in g.ops:
        if not set(op.outputs) & early:
            order.append(op)
            continue
        made = [k for k, o in enumerate(order) if set(o.outputs) & set(op.inputs)]
        k = made[-1] + 1 if made else 0
        while k < len(order) and id(order[k]) in moved:
            k += 1
        order.insert(k, op)
        moved.add(id(op))
    return replace(g, ops=order)


def attention_views(g: Graph) -> Graph:
    """Both passes, in order."""
    return early_operands(matmul_views(g))
