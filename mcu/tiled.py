"""Tiled kernels of the `tiled` schedule (numpy reference; C twins in mcu/firmware/kernels/tiled.c).

Only attention needs a kernel of its own: everything else the tiled schedule does (FFN per chunk
of tokens, residual + LayerNorm per row block, embedding per block of tokens) is the ordinary
kernels of `mcu.kernels` called on row slices.

`attention_s8` computes one head for one block of queries without ever holding the Lq x Lk score
matrix. It streams over key tiles in three exact-integer passes, using the *same* softmax pieces
as the untiled `softmax_s16` (mcu.kernels.softmax_rowmax / softmax_exp / softmax_probs):
  pass 1: s = scores of the tile (as matmul_qk_s8 computes them), m = running max over valid keys;
  pass 2: S = sum of e_j = lut[m - s_j] over all tiles (exact int32);
  pass 3: p_j = min(32767, round(e_j 2^15 / S)), acc += p_j (v_j - v_zp) (exact int32);
then y = sat8(MBQM(acc) + y_zp). Every quantity is the one the untiled schedule computes, so the
result is bit-identical for any tile size. When one tile covers all keys (kt >= Lk) the scores are
computed once and reused by passes 2 and 3; otherwise each pass recomputes them (3x the QK MACs,
traded for a bq x kt score tile instead of bq x Lk).

`attention_kv_s8` is the same head with K and V never stored: each key tile's K (and, in pass 3,
V) rows are projected from the layer input x on the fly by the fully connected kernel, `pt` rows at
a time into one small scratch buffer, with the K / V projections' own weights, so the integers are
those the stored K and V would hold. It lets the schedule keep only x (the "recompute" choice): the
K / V projection is paid once per pass and query block instead of once per layer.
"""
from __future__ import annotations

import numpy as np

from base.quant import multiply_by_quantized_multiplier as mbqm
from mcu.kernels import fc_s8, matmul_qk_s8, register, softmax_exp, softmax_probs, view2d

ATTENTION_PARAMS = (
    ("q", "const i8*"), ("k", "const i8*"), ("v", "const i8*"), ("mask", "const i8*"), ("lut", "const i32*"),
    ("y", "i8*"), ("s_tile", "i8*"), ("acc", "i32*"), ("stats", "i32*"),
    ("Lq", "int"), ("Lk", "int"), ("dh", "int"), ("kt", "int"),
    ("q_stride", "int"), ("k_stride", "int"), ("v_stride", "int"), ("y_stride", "int"),
    ("q_zp", "int"), ("k_zp", "int"), ("qk_mult", "int"), ("qk_shift", "int"), ("s_zp", "int"),
    ("v_zp", "int"), ("pv_mult", "int"), ("pv_shift", "int"), ("y_zp", "int"),
)


ATTENTION_KV_PARAMS = (
    ("q", "const i8*"), ("x", "const i8*"),
    ("wk", "const i8*"), ("bk", "const i32*"), ("mk", "const i32*"), ("sk", "const i32*"),
    ("wv", "const i8*"), ("bv", "const i32*"), ("mv", "const i32*"), ("sv", "const i32*"),
    ("mask", "const i8*"), ("lut", "const i32*"),
    ("y", "i8*"), ("s_tile", "i8*"), ("acc", "i32*"), ("stats", "i32*"), ("kv", "i8*"),
    ("Lq", "int"), ("Lk", "int"), ("dh", "int"), ("kt", "int"), ("pt", "int"), ("d_in", "int"),
    ("q_stride", "int"), ("x_stride", "int"), ("y_stride", "int"),
    ("k_min", "int"), ("k_max", "int"), ("v_min", "int"), ("v_max", "int"),
    ("q_zp", "int"), ("k_zp", "int"), ("qk_mult", "int"), ("qk_shift", "int"), ("s_zp", "int"),
    ("v_zp", "int"), ("pv_mult", "int"), ("pv_shift", "int"), ("y_zp", "int"),
)


def attention_scratch(Lq: int, kt: int, dh: int) -> dict[str, int]:
    """Bytes of the three scratch buffers `attention_s8` needs for a block of Lq queries (stats: the
    row maxima and sums, int32, then one row of kt int16 probabilities)."""
    return {"s_tile": Lq * kt, "acc": 4 * Lq * dh, "stats": 4 * (2 * Lq + (kt + 1) // 2)}


def attention_macs(Lq: int, Lk: int, dh: int, kt: int) -> int:
    """MACs of one call: QK once per pass (1 pass when one tile covers the keys, else 3) plus PV."""
    passes = 1 if kt >= Lk else 3
    return passes * Lq * Lk * dh + Lq * Lk * dh


def kv_macs(Lk: int, d_in: int, dh: int, kt: int) -> int:
    """Projection MACs of one `attention_kv_s8` call: K once per pass (1 or 3), V once."""
    passes = 1 if kt >= Lk else 3
    return (passes + 1) * Lk * d_in * dh


def attention_s8(q, k, v, mask, lut, y, s_tile, acc, stats, Lq, Lk, dh, kt, q_stride, k_stride, v_stride,
                 y_stride, q_zp, k_zp, qk_mult, qk_shift, s_zp, v_zp, pv_mult, pv_shift, y_zp):
    """One head, one block of queries: y = softmax(q k^T) v, streamed over key tiles of kt."""
    kt = max(1, min(kt, Lk))
    tiles = [(j0, min(kt, Lk - j0)) for j0 in range(0, Lk, kt)]
    valid_all = mask[:Lk] != 0
    S_tile = view2d(s_tile, Lq, kt, kt)
    m, tot = stats[:Lq], stats[Lq:2 * Lq]
    A = acc[:Lq * dh].reshape(Lq, dh)

    def scores(j0, n):   # the untiled score kernel itself, on one tile of keys
        matmul_qk_s8(q, k[j0 * k_stride:], s_tile, Lq, n, dh, q_stride, k_stride, kt, q_zp, k_zp, qk_mult,
                     qk_shift, s_zp)
        return S_tile[:, :n], valid_all[j0:j0 + n][None, :]

    # pass 1: row maxima over valid keys (-128 when a row has none, as softmax_rowmax does)
    m[:] = -128
    for j0, n in tiles:
        s, valid = scores(j0, n)
        m[:] = np.maximum(m, np.where(valid, s.astype(np.int64), -128).max(axis=1))
    # pass 2: exact sums of the exponentials
    tot[:] = 0
    for j0, n in tiles:
        s, valid = scores(j0, n) if len(tiles) > 1 else (S_tile[:, :n], valid_all[j0:j0 + n][None, :])
        tot[:] += softmax_exp(s, valid, m, lut).sum(axis=1)
    # pass 3: probabilities and the P.V accumulation
    A[:] = 0
    for j0, n in tiles:
        s, valid = scores(j0, n) if len(tiles) > 1 else (S_tile[:, :n], valid_all[j0:j0 + n][None, :])
        p = softmax_probs(softmax_exp(s, valid, m, lut), tot)
        V = view2d(v[j0 * v_stride:], n, dh, v_stride).astype(np.int64) - v_zp
        A[:] += p @ V
    view2d(y, Lq, dh, y_stride)[...] = np.clip(mbqm(A.astype(np.int64), pv_mult, pv_shift) + y_zp, -128, 127)


register("attention_s8", attention_s8, ATTENTION_PARAMS)


def attention_kv_s8(q, x, wk, bk, mk, sk, wv, bv, mv, sv, mask, lut, y, s_tile, acc, stats, kv, Lq, Lk, dh, kt,
                    pt, d_in, q_stride, x_stride, y_stride, k_min, k_max, v_min, v_max, q_zp, k_zp, qk_mult,
                    qk_shift, s_zp, v_zp, pv_mult, pv_shift, y_zp):
    """`attention_s8` with K and V projected from x (rows x_stride apart, d_in wide) by fc_s8, pt rows
    at a time through the `kv` scratch. The reference projects every row once and reuses it: the
    integers do not depend on how often the C twin recomputes them."""
    pt = max(1, min(pt, Lk))

    def project(w, b, m, s, zp, lo, hi):
        out = np.empty(Lk * dh, np.int8)
        for j0 in range(0, Lk, pt):
            n = min(pt, Lk - j0)
            fc_s8(x[j0 * x_stride:], w, b, m, s, kv, n, d_in, dh, x_stride, dh, zp, lo, hi)
            out[j0 * dh:(j0 + n) * dh] = kv[:n * dh]
        return out

    k = project(wk, bk, mk, sk, k_zp, k_min, k_max)
    v = project(wv, bv, mv, sv, v_zp, v_min, v_max)
    attention_s8(q, k, v, mask, lut, y, s_tile, acc, stats, Lq, Lk, dh, kt, q_stride, dh, dh, y_stride,
                 q_zp, k_zp, qk_mult, qk_shift, s_zp, v_zp, pv_mult, pv_shift, y_zp)


register("attention_kv_s8", attention_kv_s8, ATTENTION_KV_PARAMS)
