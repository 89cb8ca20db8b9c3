/* Tiled kernels of the `tiled` schedule: C twins of mcu/tiled.py, bit for bit.
 *
 * tsh_attention_s8: one head, one block of Lq queries, softmax(q k^T) v streamed over key tiles of
 * kt keys, never holding the Lq x Lk score matrix. Three exact-integer passes (row max, sum of
 * exponentials, probabilities and P.V), the same integers as matmul_qk_s8 + softmax_s16 +
 * matmul_pv_s8 compute on whole rows, so the result does not depend on the tile size.
 * Accumulators fit int32: |sum_j p_j (v_j - v_zp)| <= (2^15 + Lk / 2) * 255 and S <= Lk * 2^15.
 * The score tile is computed by tsh_matmul_qk_s8 itself (with its DSP path on Cortex-M).
 *
 * tsh_attention_kv_s8: the same head with K and V never stored: the key and value rows a pass needs
 * are projected from the layer input x by tsh_fc_s8, pt rows at a time, into one scratch buffer.
 *
 * Plain C99, no allocation: the score tile, the accumulators, the row statistics (with one row of
 * int16 probabilities) and the K/V rows are arena scratch passed in by the caller. */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

/* Where a head's key and value rows come from: stored (k, v) or projected from x into buf. */
struct kv_src {
    const int8_t *k, *v;
    int32_t k_stride, v_stride;
    const int8_t *x;                        /* NULL: stored rows */
    int32_t x_stride, d_in, pt;
    int8_t *buf;
    const int8_t *wk, *wv;
    const int32_t *bk, *mk, *sk, *bv, *mv, *sv;
    int32_t k_zp, v_zp, k_min, k_max, v_min, v_max;
};

/* Scores of keys j0 .. j0+n-1 into s_tile (row stride kt). */
static void scores(const struct kv_src *src, const int8_t *q, int8_t *s_tile, int32_t Lq, int32_t j0, int32_t n,
                   int32_t dh, int32_t kt, int32_t q_stride, int32_t q_zp, int32_t qk_mult, int32_t qk_shift,
                   int32_t s_zp)
{
    if (!src->x) {
        tsh_matmul_qk_s8(q, src->k + j0 * src->k_stride, s_tile, Lq, n, dh, q_stride, src->k_stride, kt, q_zp,
                         src->k_zp, qk_mult, qk_shift, s_zp);
        return;
    }
    for (int32_t c = 0; c < n; c += src->pt) {
        int32_t m = n - c < src->pt ? n - c : src->pt;
        tsh_fc_s8(src->x + (j0 + c) * src->x_stride, src->wk, src->bk, src->mk, src->sk, src->buf, m, src->d_in,
                  dh, src->x_stride, dh, src->k_zp, src->k_min, src->k_max);
        tsh_matmul_qk_s8(q, src->buf, s_tile + c, Lq, m, dh, q_stride, dh, kt, q_zp, src->k_zp, qk_mult, qk_shift,
                         s_zp);
    }
}

/* Value rows of keys j0 .. j0+n-1 (n <= chunk()): a pointer and its row stride. */
static const int8_t *values(const struct kv_src *src, int32_t j0, int32_t n, int32_t dh, int32_t *stride)
{
    if (!src->x) {
        *stride = src->v_stride;
        return src->v + j0 * src->v_stride;
    }
    tsh_fc_s8(src->x + j0 * src->x_stride, src->wv, src->bv, src->mv, src->sv, src->buf, n, src->d_in, dh,
              src->x_stride, dh, src->v_zp, src->v_min, src->v_max);
    *stride = dh;
    return src->buf;
}

/* a[t] += sum_j p_j (v_j[t] - v_zp) over n keys: the P.V loop of tsh_matmul_pv_s8 (SMLAD on two
 * keys x four columns), accumulating in int32 instead of requantising. */
static void pv_accumulate(const int16_t *p, const int8_t *v, int32_t n, int32_t dh, int32_t v_stride, int32_t v_zp,
                          int32_t *a)
{
    int32_t psum = 0, t = 0;
    for (int32_t j = 0; j < n; j++) psum += p[j];
#if TSH_USE_DSP
    for (; t + 4 <= dh; t += 4) {
        int32_t s4[4];
        tsh_pv4(p, v + t, n, v_stride, s4);
        a[t] += s4[0] - v_zp * psum;
        a[t + 1] += s4[1] - v_zp * psum;
        a[t + 2] += s4[2] - v_zp * psum;
        a[t + 3] += s4[3] - v_zp * psum;
    }
#endif
    for (; t < dh; t++) {
        int32_t s = 0;
        for (int32_t j = 0; j < n; j++) s += p[j] * v[j * v_stride + t];
        a[t] += s - v_zp * psum;
    }
}

static void attention(const struct kv_src *src, const int8_t *q, const int8_t *mask, const int32_t *lut, int8_t *y,
                      int8_t *s_tile, int32_t *acc, int32_t *stats, int32_t Lq, int32_t Lk, int32_t dh, int32_t kt,
                      int32_t q_stride, int32_t y_stride, int32_t q_zp, int32_t qk_mult, int32_t qk_shift,
                      int32_t s_zp, int32_t pv_mult, int32_t pv_shift, int32_t y_zp)
{
    int32_t *m = stats, *tot = stats + Lq;
    int16_t *prow = (int16_t *)(stats + 2 * Lq);       /* one query's probabilities over a chunk of keys */
    int32_t v_zp = src->v_zp;
    if (kt > Lk) kt = Lk;
    if (kt < 1) kt = 1;
    int one_tile = kt >= Lk;

    /* One tile covers every key and K/V are stored: no tile adds to the accumulators, so `acc`
     * (4 Lq dh bytes) can hold the int16 probabilities of g query rows at a time instead; then the
     * untiled softmax and P.V kernels run on them (their blocked Cortex-M paths, the same integers
     * as the three passes below) and write y directly. */
    int32_t g = one_tile && !src->x ? (int32_t)(2 * Lq * dh / Lk) : 0;
    if (g >= 1) {
        int16_t *p = (int16_t *)acc;
        scores(src, q, s_tile, Lq, 0, Lk, dh, kt, q_stride, q_zp, qk_mult, qk_shift, s_zp);
        for (int32_t i0 = 0; i0 < Lq; i0 += g) {
            int32_t n = Lq - i0 < g ? Lq - i0 : g;
            tsh_softmax_s16(s_tile + i0 * kt, mask, lut, p, n, Lk, kt, Lk);
            tsh_matmul_pv_s8(p, src->v, y + i0 * y_stride, n, Lk, dh, Lk, src->v_stride, y_stride, v_zp, pv_mult,
                             pv_shift, y_zp);
        }
        return;
    }

    /* pass 1: row maxima over the valid keys (-128 when a row has none) */
    for (int32_t i = 0; i < Lq; i++) m[i] = -128;
    for (int32_t j0 = 0; j0 < Lk; j0 += kt) {
        int32_t n = Lk - j0 < kt ? Lk - j0 : kt;
        scores(src, q, s_tile, Lq, j0, n, dh, kt, q_stride, q_zp, qk_mult, qk_shift, s_zp);
        for (int32_t i = 0; i < Lq; i++)
            for (int32_t j = 0; j < n; j++)
                if (mask[j0 + j] != 0 && s_tile[i * kt + j] > m[i]) m[i] = s_tile[i * kt + j];
    }
    /* pass 2: S = sum_j lut[m - s_j] */
    for (int32_t i = 0; i < Lq; i++) tot[i] = 0;
    for (int32_t j0 = 0; j0 < Lk; j0 += kt) {
        int32_t n = Lk - j0 < kt ? Lk - j0 : kt;
        if (!one_tile) scores(src, q, s_tile, Lq, j0, n, dh, kt, q_stride, q_zp, qk_mult, qk_shift, s_zp);
        for (int32_t i = 0; i < Lq; i++)
            for (int32_t j = 0; j < n; j++)
                if (mask[j0 + j] != 0) {
                    int32_t d = m[i] - s_tile[i * kt + j];
                    tot[i] += lut[d < 0 ? 0 : (d > 255 ? 255 : d)];
                }
    }
    /* pass 3: p_j = min(32767, round(e_j 2^15 / S)), acc += p_j (v_j - v_zp), value rows chunk by chunk
     * (e_j <= 2^15 and S <= Lk 2^15, so e_j 2^15 + S / 2 fits an unsigned 32-bit value for Lk < 2^16) */
    for (int32_t i = 0; i < Lq * dh; i++) acc[i] = 0;
    int32_t chunk = src->x && src->pt < kt ? src->pt : kt;
    for (int32_t j0 = 0; j0 < Lk; j0 += kt) {
        int32_t n = Lk - j0 < kt ? Lk - j0 : kt;
        if (!one_tile) scores(src, q, s_tile, Lq, j0, n, dh, kt, q_stride, q_zp, qk_mult, qk_shift, s_zp);
        for (int32_t c = 0; c < n; c += chunk) {
            int32_t cn = n - c < chunk ? n - c : chunk, vs;
            const int8_t *vc = values(src, j0 + c, cn, dh, &vs);
            for (int32_t i = 0; i < Lq; i++) {
                if (tot[i] <= 0) continue;
                uint32_t S = (uint32_t)tot[i];
                for (int32_t j = 0; j < cn; j++) {
                    int32_t pj = 0;
                    if (mask[j0 + c + j] != 0) {
                        int32_t d = m[i] - s_tile[i * kt + c + j];
                        uint32_t e = (uint32_t)lut[d < 0 ? 0 : (d > 255 ? 255 : d)];
                        uint32_t pq = (e * 32768u + S / 2u) / S;
                        pj = pq > 32767u ? 32767 : (int32_t)pq;
                    }
                    prow[j] = (int16_t)pj;
                }
                pv_accumulate(prow, vc, cn, dh, vs, v_zp, acc + i * dh);
            }
        }
    }
    for (int32_t i = 0; i < Lq; i++)
        for (int32_t t = 0; t < dh; t++)
            y[i * y_stride + t] = tsh_sat8(tsh_mbqm(acc[i * dh + t], pv_mult, pv_shift) + y_zp);
}

void tsh_attention_s8(const int8_t *q, const int8_t *k, const int8_t *v, const int8_t *mask,
                      const int32_t *lut, int8_t *y, int8_t *s_tile, int32_t *acc, int32_t *stats,
                      int32_t Lq, int32_t Lk, int32_t dh, int32_t kt, int32_t q_stride, int32_t k_stride,
                      int32_t v_stride, int32_t y_stride, int32_t q_zp, int32_t k_zp, int32_t qk_mult,
                      int32_t qk_shift, int32_t s_zp, int32_t v_zp, int32_t pv_mult, int32_t pv_shift,
                      int32_t y_zp)
{
    struct kv_src src = {0};
    src.k = k;
    src.v = v;
    src.k_stride = k_stride;
    src.v_stride = v_stride;
    src.k_zp = k_zp;
    src.v_zp = v_zp;
    attention(&src, q, mask, lut, y, s_tile, acc, stats, Lq, Lk, dh, kt, q_stride, y_stride, q_zp, qk_mult,
              qk_shift, s_zp, pv_mult, pv_shift, y_zp);
}

void tsh_attention_kv_s8(const int8_t *q, const int8_t *x, const int8_t *wk, const int32_t *bk, const int32_t *mk,
                         const int32_t *sk, const int8_t *wv, const int32_t *bv, const int32_t *mv,
                         const int32_t *sv, const int8_t *mask, const int32_t *lut, int8_t *y, int8_t *s_tile,
                         int32_t *acc, int32_t *stats, int8_t *kv, int32_t Lq, int32_t Lk, int32_t dh, int32_t kt,
                         int32_t pt, int32_t d_in, int32_t q_stride, int32_t x_stride, int32_t y_stride,
                         int32_t k_min, int32_t k_max, int32_t v_min, int32_t v_max, int32_t q_zp, int32_t k_zp,
                         int32_t qk_mult, int32_t qk_shift, int32_t s_zp, int32_t v_zp, int32_t pv_mult,
                         int32_t pv_shift, int32_t y_zp)
{
    struct kv_src src = {0};
    src.x = x;
    src.x_stride = x_stride;
    src.d_in = d_in;
    src.pt = pt < 1 ? 1 : (pt > Lk ? Lk : pt);
    src.buf = kv;
    src.wk = wk;
    src.bk = bk;
    src.mk = mk;
    src.sk = sk;
    src.wv = wv;
    src.bv = bv;
    src.mv = mv;
    src.sv = sv;
    src.k_zp = k_zp;
    src.v_zp = v_zp;
    src.k_min = k_min;
    src.k_max = k_max;
    src.v_min = v_min;
    src.v_max = v_max;
    attention(&src, q, mask, lut, y, s_tile, acc, stats, Lq, Lk, dh, kt, q_stride, y_stride, q_zp, qk_mult,
              qk_shift, s_zp, pv_mult, pv_shift, y_zp);
}
