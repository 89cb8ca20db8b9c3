/* Tiled kernels of the `tiled` schedule: C twins of mcu/tiled.py, bit for bit.
 *
 * tsh_attention_s8: one head, one block of Lq queries, softmax(q k^T) v streamed over key tiles of
 * kt keys, never holding the Lq x Lk score matrix. Three exact-integer passes (row max, sum of
 * exponentials, probabilities and P.V), the same integers as matmul_qk_s8 + softmax_s16 +
 * matmul_pv_s8 compute on whole rows, so the result does not depend on the tile size.
 * Accumulators fit int32: |sum_j p_j (v_j - v_zp)| <= (2^15 + Lk / 2) * 255 and S <= Lk * 2^15.
 * The score tile is computed by tsh_matmul_qk_s8 itself (with its DSP path on Cortex-M).
 * Plain C99, no allocation: the score tile, the accumulators and the row statistics are arena
 * scratch passed in by the caller. */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

void tsh_attention_s8(const int8_t *q, const int8_t *k, const int8_t *v, const int8_t *mask,
                      const int32_t *lut, int8_t *y, int8_t *s_tile, int32_t *acc, int32_t *stats,
                      int32_t Lq, int32_t Lk, int32_t dh, int32_t kt, int32_t q_stride, int32_t k_stride,
                      int32_t v_stride, int32_t y_stride, int32_t q_zp, int32_t k_zp, int32_t qk_mult,
                      int32_t qk_shift, int32_t s_zp, int32_t v_zp, int32_t pv_mult, int32_t pv_shift,
                      int32_t y_zp)
{
    int32_t *m = stats, *tot = stats + Lq;
    if (kt > Lk) kt = Lk;
    if (kt < 1) kt = 1;
    int one_tile = kt >= Lk;

    /* pass 1: row maxima over the valid keys (-128 when a row has none) */
    for (int32_t i = 0; i < Lq; i++) m[i] = -128;
    for (int32_t j0 = 0; j0 < Lk; j0 += kt) {
        int32_t n = Lk - j0 < kt ? Lk - j0 : kt;
        tsh_matmul_qk_s8(q, k + j0 * k_stride, s_tile, Lq, n, dh, q_stride, k_stride, kt, q_zp, k_zp, qk_mult,
                         qk_shift, s_zp);
        for (int32_t i = 0; i < Lq; i++)
            for (int32_t j = 0; j < n; j++)
                if (mask[j0 + j] != 0 && s_tile[i * kt + j] > m[i]) m[i] = s_tile[i * kt + j];
    }
    /* pass 2: S = sum_j lut[m - s_j] */
    for (int32_t i = 0; i < Lq; i++) tot[i] = 0;
    for (int32_t j0 = 0; j0 < Lk; j0 += kt) {
        int32_t n = Lk - j0 < kt ? Lk - j0 : kt;
        if (!one_tile)
            tsh_matmul_qk_s8(q, k + j0 * k_stride, s_tile, Lq, n, dh, q_stride, k_stride, kt, q_zp, k_zp, qk_mult,
                         qk_shift, s_zp);
        for (int32_t i = 0; i < Lq; i++)
            for (int32_t j = 0; j < n; j++)
                if (mask[j0 + j] != 0) {
                    int32_t d = m[i] - s_tile[i * kt + j];
                    tot[i] += lut[d < 0 ? 0 : (d > 255 ? 255 : d)];
                }
    }
    /* pass 3: p_j = min(32767, round(e_j 2^15 / S)), acc += p_j (v_j - v_zp) */
    for (int32_t i = 0; i < Lq * dh; i++) acc[i] = 0;
    for (int32_t j0 = 0; j0 < Lk; j0 += kt) {
        int32_t n = Lk - j0 < kt ? Lk - j0 : kt;
        if (!one_tile)
            tsh_matmul_qk_s8(q, k + j0 * k_stride, s_tile, Lq, n, dh, q_stride, k_stride, kt, q_zp, k_zp, qk_mult,
                         qk_shift, s_zp);
        for (int32_t i = 0; i < Lq; i++) {
            if (tot[i] <= 0) continue;
            int32_t *a = acc + i * dh;
            for (int32_t j = 0; j < n; j++) {
                if (mask[j0 + j] == 0) continue;
                int32_t d = m[i] - s_tile[i * kt + j];
                int64_t e = lut[d < 0 ? 0 : (d > 255 ? 255 : d)];
                int64_t p = (e * 32768 + tot[i] / 2) / tot[i];
                if (p > 32767) p = 32767;
                if (p == 0) continue;
                const int8_t *vj = v + (j0 + j) * v_stride;
                for (int32_t t = 0; t < dh; t++)
                    a[t] += (int32_t)p * ((int32_t)vj[t] - v_zp);
            }
        }
    }
    for (int32_t i = 0; i < Lq; i++)
        for (int32_t t = 0; t < dh; t++)
            y[i * y_stride + t] = tsh_sat8(tsh_mbqm(acc[i * dh + t], pv_mult, pv_shift) + y_zp);
}
