"""The int8 graph's op kinds: how each is built (`Builder`, `fc`, `conv`, `add_layernorm`, the CLR
table) and how each becomes kernel calls (`calls_for`, used by every schedule pass). Models reach
this graph through the captured-graph lowering (mcu.from_aten), never by hand.

Op kinds (inputs -> outputs; integer attributes in `Op.attrs`; consts are graph tensors):

| kind             | inputs                                    | outputs        | kernel(s)                       |
|------------------|-------------------------------------------|----------------|---------------------------------|
| `conv2d`         | x (H,W,Cin) i8, weight (Cout, k*k*Cin padded to 4) packed like fc, bias i32 (x zero point folded in), mult, shift | y (Hout,Wout,Cout) i8 | conv2d_s8 |
| `fully_connected`| x (M,K) i8, weight (N,K) i8 packed by kernels.pack_fc_weights, bias i32 (x zero point folded in), mult i32[N], shift i32[N] | y (M,N) i8 | fc_s8 |
| `matmul_qk`      | q (L,d) i8, k (L,d) i8                    | scores (h,L,L) i8 | matmul_qk_s8, once per head  |
| `softmax`        | scores (h,L,L) i8, mask (L) i8, lut i32[256] | probs (h,L,L) i16 | softmax_s16 (all rows at once) |
| `matmul_pv`      | probs (h,L,L) i16, v (L,d) i8             | context (L,d) i8 | matmul_pv_s8, once per head    |
| `add_layernorm`  | a (M,d) i8, b (M,d) i8 (may be const), gm i32[d], gs i32[d], beta i32[d] | y (M,d) i8 | add_layernorm_s8 |
| `lut`            | x i8, table i8[256]                       | y i8           | lut_s8 (GELU)                   |
| `mean_pool`      | x (L,d) i8, mask (L) i8                   | y (1,d) i8     | mean_pool_s8                    |
| `embedding`      | ids (L) i32, table (V,d) i8               | y (L,d) i8     | embedding_s8                    |
| `embedding_clr`  | ids, slot u16[V], clusters i32[k*9], u i8, v i8, u_mult i32[V], v_mult i32 | y (L,d) i8 | embedding_clr_s8 (CLR table) |
| `pad_mask`       | ids (L) i32                               | mask (L) i8    | pad_mask                        |
| `add`            | a i8, b i8 (b[i % b_n]: row broadcast)    | y i8           | add_s8 (TFLite ADD)             |
| `mul`            | a i8, b i8 (b[i % b_n])                   | y i8           | mul_s8 (TFLite MUL)             |
| `permute`        | x i8 (at `offset`), dims i32[12]          | y i8 contiguous | permute_s8 (views made real)   |
| `concat`         | parts i8 (rows x w_p each)                | y (rows, sum w_p) i8 | requant_s8 per part       |

Heads live side by side in the columns of q, k, v and context (head h = columns h*dh .. h*dh+dh-1),
exactly as in the float model; scores/probs are (h, L, L) row-major. Op and tensor names follow the
user's module paths: `<module>.weight`, `<module>.bias`, `<module>.mult`, `<module>.shift`, and the
activation `<module>.out`; attention adds `<module>.scores`, `.probs`, `.context`.
Graph input: `input` (an int8 image HWC, int8 features, or int32 ids (L,) with 0 = [PAD]); output
`output` (int8, its float scale in `graph.meta["output_q"]`).

Quantisation: activations per tensor, asymmetric, ranges = min/max over the calibration inputs
of the captured graph's nodes; weights symmetric per output channel; biases int32. See base.quant and
mcu.kernels for the integer arithmetic.
"""
from __future__ import annotations

import math

import numpy as np

from base import quant as Q
from base.errors import InternalError, TinyshieldError
from mcu import kernels as K
from mcu.graph import Call, Graph, Op, QParams, Tensor

BIAS_LIMIT = 1 << 30      # accumulators stay inside int32: |bias| <= 2^30 and K*255*127 < 2^30
MAX_K = (1 << 30) // (255 * 127)



# ---------------------------------------------------------------- building graphs

class Builder:
    def __init__(self, name: str):
        self.name = name
        self.tensors: dict[str, Tensor] = {}
        self.ops: list[Op] = []

    def act(self, name, shape, q: Q.ActQ | None, dtype="int8", kind="activation") -> str:
        qp = QParams((float(q.scale),), int(q.zero_point)) if q is not None else None
        self.tensors[name] = Tensor(name, tuple(int(s) for s in shape), dtype, kind, qp)
        return name

    def const(self, name, data: np.ndarray, q: QParams | None = None) -> str:
        dtype = {np.dtype(np.int8): "int8", np.dtype(np.int16): "int16", np.dtype(np.int32): "int32",
                 np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16"}[data.dtype]
        self.tensors[name] = Tensor(name, tuple(data.shape), dtype, "const", q, np.ascontiguousarray(data))
        return name

    def op(self, kind, name, inputs, outputs, **attrs):
        self.ops.append(Op(kind, name, list(inputs), list(outputs), {k: _int(v) for k, v in attrs.items()}))

    def graph(self, inputs, outputs, meta) -> Graph:
        for n in outputs:
            self.tensors[n].kind = "output"
        for n in inputs:
            self.tensors[n].kind = "input"
        return Graph(self.name, self.tensors, self.ops, list(inputs), list(outputs), meta)


def _int(v):
    return int(v) if isinstance(v, (int, np.integer)) else v


def _aq(t: Tensor) -> Q.ActQ:
    return Q.ActQ(t.q.scale[0], t.q.zero_point)


def fc(b: Builder, name: str, w: np.ndarray, bias: np.ndarray | None, x: str, out_q: Q.ActQ, M: int,
       relu=False, out_name: str | None = None, xq: Q.ActQ | None = None) -> str:
    """y = x w^T + bias (w (N, K) float) as a `fully_connected` op; ReLU fused as act_min = zero point."""
    N, Kd = w.shape
    if Kd > MAX_K:
        raise TinyshieldError(f"{name}: {Kd} inputs would overflow the int32 accumulator (at most {MAX_K})")
    xq = xq or _aq(b.tensors[x])
    wq, ws = Q.quantize_weights_per_channel(w, axis=0)
    bias = np.zeros(N) if bias is None else bias
    bq = Q.quantize_bias(bias, xq.scale, ws).astype(np.int64) - xq.zero_point * wq.astype(np.int64).sum(1)
    m, s = Q.quantize_multipliers(xq.scale * ws / out_q.scale)
    y = b.act(out_name or f"{name}.out", (M, N), out_q)
    # stored in the kernel's packed layout (mcu.kernels.pack_fc_weights); the tensor keeps shape (N, K)
    b.const(f"{name}.weight", K.pack_fc_weights(wq).reshape(N, Kd), QParams(tuple(ws.tolist()), 0, 0))
    b.const(f"{name}.bias", np.clip(bq, -BIAS_LIMIT, BIAS_LIMIT).astype(np.int32))
    b.const(f"{name}.mult", m)
    b.const(f"{name}.shift", s)
    lo = out_q.zero_point if relu else -128
    b.op("fully_connected", name, [x, f"{name}.weight", f"{name}.bias", f"{name}.mult", f"{name}.shift"], [y],
         M=M, K=Kd, N=N, x_zp=xq.zero_point, y_zp=out_q.zero_point, act_min=lo, act_max=127)
    return y


def conv(b: Builder, name: str, w: np.ndarray, bias: np.ndarray | None, stride: int, pad: int, x: str, H: int,
         W: int, out_q: Q.ActQ, relu: bool, xq: Q.ActQ | None = None) -> str:
    """A square 2-d convolution (w (Cout, Cin, k, k) float) on an HWC input as a `conv2d` op."""
    Cout, Cin, k, _ = w.shape
    Hout, Wout = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    xq = xq or _aq(b.tensors[x])
    wq, ws = Q.quantize_weights_per_channel(w, axis=0)
    P, Kp = k * k * Cin, K.conv_patch_len(k, Cin)
    if Kp > K.CONV_PATCH_MAX:
        raise TinyshieldError(f"{name}: a {k}x{k}x{Cin} patch is longer than the conv kernel's {K.CONV_PATCH_MAX}")
    rows = np.zeros((Cout, Kp), dtype=np.int8)
    rows[:, :P] = wq.transpose(0, 2, 3, 1).reshape(Cout, P)      # (kh, kw, ci) order, zero tail
    bias = np.zeros(Cout) if bias is None else bias
    bq = (Q.quantize_bias(bias, xq.scale, ws).astype(np.int64)
          - xq.zero_point * rows.astype(np.int64).sum(1))
    m, s = Q.quantize_multipliers(xq.scale * ws / out_q.scale)
    y = b.act(f"{name}.out", (Hout, Wout, Cout), out_q)
    b.const(f"{name}.weight", K.pack_fc_weights(rows).reshape(Cout, Kp), QParams(tuple(ws.tolist()), 0, 0))
    b.const(f"{name}.bias", np.clip(bq, -BIAS_LIMIT, BIAS_LIMIT).astype(np.int32))
    b.const(f"{name}.mult", m)
    b.const(f"{name}.shift", s)
    b.op("conv2d", name, [x, f"{name}.weight", f"{name}.bias", f"{name}.mult", f"{name}.shift"], [y],
         H=H, W=W, Cin=Cin, Cout=Cout, Hout=Hout, Wout=Wout, ksize=k, stride=stride, pad=pad,
         x_zp=xq.zero_point, y_zp=out_q.zero_point, act_min=out_q.zero_point if relu else -128, act_max=127)
    return y


def add_layernorm(b: Builder, name: str, gamma: np.ndarray, beta: np.ndarray, eps: float, a: str, res: str | None,
                  out_q: Q.ActQ, M: int, qa: Q.ActQ | None = None, qb: Q.ActQ | None = None,
                  out_name: str | None = None) -> str:
    """LayerNorm(a + res) as one `add_layernorm` op; without `res`, LayerNorm(a) (b = a with weight 0)."""
    qa = qa or _aq(b.tensors[a])
    one = 1 << K.LN_IN_BITS
    if res is None:
        res, qb, ca, cb = a, qa, one, 0
        unit = qa.scale / ca
    else:
        qb = qb or _aq(b.tensors[res])
        r = qb.scale / qa.scale
        ca, cb = (one, int(round(r * one))) if r <= 1 else (int(round(one / r)), one)
        unit = qa.scale / ca if ca else qb.scale / cb
    d = len(gamma)
    eps = int(min(Q.INT32_MAX, round(eps / unit ** 2)))
    reals = np.asarray(gamma, dtype=np.float64) / (out_q.scale * (1 << K.LN_OUT_BITS))
    m, s = Q.quantize_multipliers(np.abs(reals))
    m = np.where(reals < 0, -m.astype(np.int64), m).astype(np.int32)
    y = b.act(out_name or f"{name}.out", (M, d), out_q)
    b.const(f"{name}.mult", m)
    b.const(f"{name}.shift", s)
    b.const(f"{name}.bias", Q.saturate(Q.round_half_away(np.asarray(beta, dtype=np.float64) / out_q.scale), np.int32))
    b.op("add_layernorm", name, [a, res, f"{name}.mult", f"{name}.shift", f"{name}.bias"], [y],
         M=M, d=d, a_zp=qa.zero_point, b_zp=qb.zero_point, ca=ca, cb=cb, eps=eps, y_zp=out_q.zero_point)
    return y


def _const_q(data: np.ndarray) -> tuple[np.ndarray, QParams]:
    """A constant activation-like table (embeddings, positions): int8, symmetric, per tensor."""
    aq = Q.choose_activation_qparams(float(data.min()), float(data.max()), symmetric=True)
    return Q.quantize(data, aq.scale, 0), QParams((aq.scale,), 0)


# ---------------------------------------------------------------- CLR word table (its own lookup kernel)

def _shared_shift_multipliers(reals: np.ndarray) -> tuple[np.ndarray, int]:
    """Multipliers m_i with one shift: reals_i ~= m_i 2^(shift - 31), m_i < 2^31 (a row of scales)."""
    reals = np.asarray(reals, dtype=np.float64)
    mx = float(reals.max()) if reals.size else 0.0
    if mx <= 0:
        return np.zeros(reals.shape, np.int32), 0
    shift = max(-31, math.frexp(mx)[1])
    if shift > 30:
        raise TinyshieldError(f"CLR scale {mx:g} too large to requantise")
    m = np.clip(Q.round_half_away(reals * 2.0 ** (31 - shift)), 0, Q.INT32_MAX)
    return m.astype(np.int32), shift


def _clr_embedding(b: Builder, emb, ids: str, L: int, clr=None) -> str:
    """The int8 CLR table (edge.compress.clr.QuantCLR) as constants + one `embedding_clr` op."""
    from mcu.kernels import CLR_FIELDS

    if clr is None:
        from edge.compress.clr import QuantCLR
        clr = QuantCLR.from_float(emb)
    lay = clr.layout
    V, d = lay.vocab_size, lay.dim
    if V > 65536:
        raise TinyshieldError(f"CLR vocabulary of {V} tokens does not fit the uint16 slot index (at most 65536)")
    table = clr.table().double().numpy()
    s_out = max(float(np.abs(table).max()), 1e-12) / 127.0
    rows, us_, vs_, um = [], [], [], np.zeros(V, np.int32)
    vm_all, u_off, v_off = [], 0, 0
    for c, (start, n, r, dense) in enumerate(zip(lay.starts, lay.sizes, lay.ranks, lay.dense)):
        uq = clr.u[c].numpy().astype(np.int8)
        usc = clr.u_scale[c].double().numpy()
        vm_off, vsh = sum(len(x) for x in vm_all), 0
        if dense:
            real2 = usc / s_out
        else:
            vq = clr.v[c].numpy().astype(np.int8)
            vsc = clr.v_scale[c].double().numpy()
            vmax = float(vsc.max())
            gain = max(0, min(8, 29 - int(r * 127 * 127).bit_length()))   # fraction bits kept after stage 1
            m1, vsh = _shared_shift_multipliers(vsc / vmax * 2.0 ** gain)
            vm_all.append(m1)
            vs_.append(vq.ravel())
            real2 = usc * vmax / (2.0 ** gain * s_out)
        m2, ush = _shared_shift_multipliers(real2)
        um[int(start):int(start) + n] = m2
        rows.append([int(start), n, r if not dense else d, int(dense), u_off, v_off, vm_off, ush, vsh])
        us_.append(uq.ravel())
        u_off += uq.size
        v_off += 0 if dense else clr.v[c].numel()
    name = "embeddings.word_embeddings"
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    b.const(f"{name}.slot", np.asarray(lay.slot).astype(np.uint16))
    b.const(f"{name}.clusters", np.array(rows, dtype=np.int32).reshape(-1))
    b.const(f"{name}.u", cat(us_, np.int8))
    b.const(f"{name}.v", cat(vs_, np.int8))
    b.const(f"{name}.u_mult", um)
    b.const(f"{name}.v_mult", cat(vm_all, np.int32))
    if len(rows[0]) != len(CLR_FIELDS):
        raise InternalError(f"{name}: CLR cluster rows have {len(rows[0])} fields, the kernel reads {len(CLR_FIELDS)}")
    words = b.act(f"{name}.out", (L, d), Q.ActQ(s_out, 0))
    b.op("embedding_clr", name, [ids] + [f"{name}.{k}" for k in ("slot", "clusters", "u", "v", "u_mult", "v_mult")],
         [words], L=L, d=d, vocab=V, nclusters=len(rows))
    return words


# ---------------------------------------------------------------- op -> kernel calls

# The calls of the ops a schedule may run on a block of rows: `ptrs` are the located tensors (the op's
# inputs, then its outputs), the count says how many rows (or elements) the call covers. calls_for
# (whole tensors) and the tiled pass (blocks of rows) both build these calls here.

def fc_call(op: Op, ptrs, M: int) -> Call:
    a = op.attrs
    return Call("fc_s8", (*ptrs, M, a["K"], a["N"], a["K"], a["N"], a["y_zp"], a["act_min"], a["act_max"]),
                op.name, M * a["K"] * a["N"])


def add_layernorm_call(op: Op, ptrs, M: int) -> Call:
    a = op.attrs
    return Call("add_layernorm_s8", (*ptrs, M, a["d"], a["a_zp"], a["b_zp"], a["ca"], a["cb"], a["eps"], a["y_zp"]),
                op.name, 0)


def lut_call(op: Op, ptrs, n: int) -> Call:
    return Call("lut_s8", (*ptrs, n), op.name, 0)


def add_call(op: Op, ptrs, n: int, b_n: int) -> Call:
    a = op.attrs
    return Call("add_s8", (*ptrs, n, b_n, a["a_zp"], a["b_zp"], a["a_mult"], a["a_shift"], a["b_mult"], a["b_shift"],
                           a["y_mult"], a["y_shift"], a["y_zp"], -128, 127), op.name, 0)


def embedding_call(op: Op, ptrs, L: int) -> Call:
    a = op.attrs
    return Call("embedding_s8", (*ptrs, L, a["d"], a["vocab"]), op.name, 0)


def calls_for(graph: Graph, op: Op, loc) -> list[Call]:
    """The kernel calls computing `op` when every tensor is whole: `loc(tensor, byte_offset)` returns
    where a tensor lives (a `Ref` for activations, a `Const` for constants). Schedule passes use it
    for every op they do not transform."""
    a, i, o = op.attrs, op.inputs, op.outputs
    k = op.kind
    ptrs = tuple(loc(t) for t in (*i, *o))
    if k == "fully_connected":
        return [fc_call(op, ptrs, a["M"])]
    if k == "conv2d":
        return [Call("conv2d_s8", (loc(i[0]), loc(i[1]), loc(i[2]), loc(i[3]), loc(i[4]), loc(o[0]),
                                   a["H"], a["W"], a["Cin"], a["Cout"], a["Hout"], a["Wout"], a["ksize"],
                                   a["stride"], a["pad"], a["x_zp"], a["y_zp"], a["act_min"], a["act_max"]),
                     op.name, a["Hout"] * a["Wout"] * a["Cout"] * a["ksize"] ** 2 * a["Cin"])]
    if k == "matmul_qk":
        L, dh, h = a["L"], a["dh"], a["heads"]
        return [Call("matmul_qk_s8", (loc(i[0], hh * dh), loc(i[1], hh * dh), loc(o[0], hh * L * L), L, L, dh,
                                      h * dh, h * dh, L, a["q_zp"], a["k_zp"], a["mult"], a["shift"], a["s_zp"]),
                     op.name, L * L * dh) for hh in range(h)]
    if k == "softmax":
        L, h = a["L"], a["heads"]
        return [Call("softmax_s16", (loc(i[0]), loc(i[1]), loc(i[2]), loc(o[0]), h * L, L, L, L), op.name, 0)]
    if k == "matmul_pv":
        L, dh, h = a["L"], a["dh"], a["heads"]
        return [Call("matmul_pv_s8", (loc(i[0], 2 * hh * L * L), loc(i[1], hh * dh), loc(o[0], hh * dh), L, L, dh,
                                      L, h * dh, h * dh, a["v_zp"], a["mult"], a["shift"], a["y_zp"]),
                     op.name, L * L * dh) for hh in range(h)]
    if k == "add_layernorm":
        return [add_layernorm_call(op, ptrs, a["M"])]
    if k == "lut":
        return [lut_call(op, ptrs, a["n"])]
    if k == "mean_pool":
        return [Call("mean_pool_s8", (loc(i[0]), loc(i[1]), loc(o[0]), a["L"], a["d"], a["x_zp"], a["mult"],
                                      a["shift"], a["y_zp"]), op.name, 0)]
    if k == "embedding":
        return [embedding_call(op, ptrs, a["L"])]
    if k == "embedding_clr":
        return [Call("embedding_clr_s8", (*(loc(t) for t in i), loc(o[0]), a["L"], a["d"], a["vocab"], a["nclusters"]),
                     op.name, 0)]
    if k == "pad_mask":
        return [Call("pad_mask", (loc(i[0]), loc(o[0]), a["L"]), op.name, 0)]
    if k == "add":
        return [add_call(op, ptrs, a["n"], a["b_n"])]
    if k == "mul":
        return [Call("mul_s8", (loc(i[0]), loc(i[1]), loc(o[0]), a["n"], a["b_n"], a["a_zp"], a["b_zp"], a["y_mult"],
                                a["y_shift"], a["y_zp"], -128, 127), op.name, 0)]
    if k == "permute":
        return [Call("permute_s8", (loc(i[0], a["offset"]), loc(o[0]), loc(i[1]), K.PERMUTE_DIMS), op.name, 0)]
    if k == "concat":
        return [Call("requant_s8", (loc(i[p]), loc(o[0], a[f"o{p}"]), a["rows"], a[f"w{p}"], a[f"w{p}"], a["width"],
                                    a[f"zp{p}"], a[f"m{p}"], a[f"s{p}"], a["y_zp"]), op.name, 0)
                for p in range(a["parts"])]
    if k.startswith("tfl_"):           # TFLite Micro's arithmetic for imported .tflite models
        from mcu.tflite_kernels import calls_for as tflite_calls
        return tflite_calls(op, loc)
    raise TinyshieldError(f"op kind {k!r} (op {op.name}) has no kernel: supported are {', '.join(OP_KINDS)}")


OP_KINDS = ("conv2d", "fully_connected", "matmul_qk", "softmax", "matmul_pv", "add_layernorm", "lut",
            "mean_pool", "embedding", "embedding_clr", "pad_mask", "add", "mul", "permute", "concat")
