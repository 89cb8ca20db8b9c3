/* Helium (MVE) paths of the linear kernels: the same integers as tsh_linear.c (twins of mcu/kernels.py),
 * on Armv8.1-M vector instructions. VMLADAVA.S8 multiplies 16 int8 pairs and adds their sum to a scalar
 * accumulator in one instruction; the requantisation stays scalar (the helpers of tsh_fixedpoint.h). */
#include "tsh_mve.h"

#if TSH_USE_MVE
#include "tsh_fixedpoint.h"

/* ---- fully connected ----
 * The weights keep the layout of mcu.kernels.pack_fc_weights (channel pairs interleaved per 4 k): a
 * de-interleaving load VLD2.32 of 32 bytes of a pair gives 16 consecutive k of each of its two rows.
 * Three input rows x one channel pair per step of 16 k: two loads of weights, three of inputs, six
 * VMLADAVA (96 MACs in 11 instructions). The K % 16 tail (one to three groups of 4 k, then nothing: the
 * path takes K % 4 == 0) is a byte gather of each row's groups and zeroing loads of the inputs, both
 * predicated on the tail's length. Two pairs' accumulators (3 rows x 4 channels) are requantised as
 * three vectors of four channels. */

/* offsets of row 0's bytes in the tail groups of a pair (row 1: +4) */
static const uint8_t fc_tail_offsets[16] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};

/* acc[0..5] = bias + three rows (p0, p1, p2) . one channel pair (rows 0, 1 of acc[2r], acc[2r+1]) */
static inline void fc_pair3(const int8_t *p0, const int8_t *p1, const int8_t *p2, const int8_t *wp, int32_t K16,
                            int32_t rem, int32_t b0, int32_t b1, int32_t *acc)
{
    int32_t a0 = b0, a1 = b1, a2 = b0, a3 = b1, a4 = b0, a5 = b1;
    for (int32_t s = 0; s < K16; s++) {
        int32x4x2_t wv = vld2q_s32((const int32_t *)(const void *)wp);
        int8x16_t w0 = vreinterpretq_s8_s32(wv.val[0]), w1 = vreinterpretq_s8_s32(wv.val[1]);
        int8x16_t v0 = vld1q_s8(p0), v1 = vld1q_s8(p1), v2 = vld1q_s8(p2);
        a0 = vmladavaq_s8(a0, v0, w0);
        a1 = vmladavaq_s8(a1, v0, w1);
        a2 = vmladavaq_s8(a2, v1, w0);
        a3 = vmladavaq_s8(a3, v1, w1);
        a4 = vmladavaq_s8(a4, v2, w0);
        a5 = vmladavaq_s8(a5, v2, w1);
        wp += 32;
        p0 += 16;
        p1 += 16;
        p2 += 16;
    }
    if (rem) {
        const mve_pred16_t pt = vctp8q((uint32_t)rem);
        const uint8x16_t off0 = vld1q_u8(fc_tail_offsets), off1 = vaddq_n_u8(off0, 4);
        int8x16_t w0 = vldrbq_gather_offset_z_s8(wp, off0, pt), w1 = vldrbq_gather_offset_z_s8(wp, off1, pt);
        int8x16_t v0 = vld1q_z_s8(p0, pt), v1 = vld1q_z_s8(p1, pt), v2 = vld1q_z_s8(p2, pt);
        a0 = vmladavaq_s8(a0, v0, w0);
        a1 = vmladavaq_s8(a1, v0, w1);
        a2 = vmladavaq_s8(a2, v1, w0);
        a3 = vmladavaq_s8(a3, v1, w1);
        a4 = vmladavaq_s8(a4, v2, w0);
        a5 = vmladavaq_s8(a5, v2, w1);
    }
    acc[0] = a0; acc[1] = a1; acc[4] = a2; acc[5] = a3; acc[8] = a4; acc[9] = a5;
}

/* bias + x . w over K for one plainly stored channel */
static inline int32_t fc_dot(const int8_t *x, const int8_t *w, int32_t K, int32_t acc)
{
    for (int32_t k = 0; k < K; k += 16) {
        mve_pred16_t p = vctp8q((uint32_t)(K - k));
        acc = vmladavaq_p_s8(acc, vld1q_z_s8(x + k, p), vld1q_z_s8(w + k, p), p);
    }
    return acc;
}

int tsh_mve_fc_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
                  const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
                  int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    /* VLD2.32 needs word-aligned pairs: 2 K bytes apart, from a word-aligned start */
    if (K % 4 != 0 || ((uintptr_t)w & 3u) != 0) return 0;
    int32_t K16 = K / 16, rem = K % 16, N2 = N / 2 * 2;
    int32_t acc[12];   /* 3 rows x 4 channels */
    for (int32_t m = 0; m < M; m += 3) {
        int32_t rows = M - m < 3 ? M - m : 3;
        const int8_t *x0 = x + m * x_stride;
        const int8_t *x1 = rows > 1 ? x0 + x_stride : x0, *x2 = rows > 2 ? x0 + 2 * x_stride : x0;
        int8_t *y0 = y + m * y_stride;
        int32_t n = 0;
        if (rows == 3) {   /* whole blocks of four channels: no predicates, no branches */
            for (; n + 4 <= N2; n += 4) {
                fc_pair3(x0, x1, x2, w + n * K, K16, rem, bias[n], bias[n + 1], acc);
                fc_pair3(x0, x1, x2, w + (n + 2) * K, K16, rem, bias[n + 2], bias[n + 3], acc + 2);
                int32x4_t sh = vld1q_s32(shift + n), mu = vld1q_s32(mult + n);
                int32x4_t left = vmaxq_s32(sh, vdupq_n_s32(0)), negright = vminq_s32(sh, vdupq_n_s32(0));
                vstrbq_s32(y0 + n, tsh_mve_rq4(vld1q_s32(acc), left, mu, negright, y_zp, act_min, act_max));
                vstrbq_s32(y0 + y_stride + n,
                           tsh_mve_rq4(vld1q_s32(acc + 4), left, mu, negright, y_zp, act_min, act_max));
                vstrbq_s32(y0 + 2 * y_stride + n,
                           tsh_mve_rq4(vld1q_s32(acc + 8), left, mu, negright, y_zp, act_min, act_max));
            }
        }
        for (; n < N; n += 4) {
            int32_t nc = N - n < 4 ? N - n : 4;   /* channels of this group */
            for (int32_t j = 0; j < nc; j += 2) {
                if (n + j < N2) {
                    fc_pair3(x0, x1, x2, w + (n + j) * K, K16, rem, bias[n + j], bias[n + j + 1], acc + j);
                } else {   /* the odd last channel, stored plainly after the pairs */
                    acc[j] = fc_dot(x0, w + N2 * K, K, bias[N2]);
                    acc[4 + j] = fc_dot(x1, w + N2 * K, K, bias[N2]);
                    acc[8 + j] = fc_dot(x2, w + N2 * K, K, bias[N2]);
                }
            }
            const mve_pred16_t pc = vctp32q((uint32_t)nc);
            int32x4_t sh = vldrwq_z_s32(shift + n, pc), mu = vldrwq_z_s32(mult + n, pc);
            int32x4_t left = vmaxq_s32(sh, vdupq_n_s32(0)), negright = vminq_s32(sh, vdupq_n_s32(0));
            for (int32_t r = 0; r < rows; r++) {
                int32x4_t q = tsh_mve_rq4(vld1q_s32(acc + 4 * r), left, mu, negright, y_zp, act_min, act_max);
                vstrbq_p_s32(y0 + r * y_stride + n, q, pc);
            }
        }
    }
    return 1;
}

/* ---- attention ----
 * matmul_qk: four queries x one key per step of 16 t: one key load, its sum (VADDVA), four query loads
 * and four VMLADAVA; sum (q - zq)(k - zk) = sum q k - zk sum q - zq sum k + dh zq zk, the four scores of
 * a key requantised as one vector and scattered down the key's column. A dh % 16 tail is one more step
 * on zeroing loads predicated on its length; heads of dh <= 16 keep the four queries in registers. */
int tsh_mve_matmul_qk_s8(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                         int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                         int32_t mult, int32_t shift, int32_t s_zp)
{
    int32_t D16 = dh / 16, rem = dh % 16;
    const mve_pred16_t pt = vctp8q((uint32_t)rem);
    const int32x4_t left = vdupq_n_s32(shift > 0 ? shift : 0), mu = vdupq_n_s32(mult);
    const int32x4_t negright = vdupq_n_s32(shift > 0 ? 0 : shift);
    const uint32x4_t rows_off = vmulq_n_u32(vidupq_n_u32(0, 1), (uint32_t)s_stride);
    int32_t acc[4];
    for (int32_t i = 0; i < Lq; i += 4) {
        int32_t rows = Lq - i < 4 ? Lq - i : 4;
        const int8_t *q0 = q + i * q_stride;
        const int8_t *q1 = rows > 1 ? q0 + q_stride : q0, *q2 = rows > 2 ? q0 + 2 * q_stride : q0;
        const int8_t *q3 = rows > 3 ? q0 + 3 * q_stride : q0;
        /* per query: dh zq zk - zk sum q */
        int32_t c[4];
        const int8_t *qr[4] = {q0, q1, q2, q3};
        for (int32_t r = 0; r < 4; r++) {
            int32_t sum = 0;
            for (int32_t t = 0; t < dh; t += 16) {
                mve_pred16_t p = vctp8q((uint32_t)(dh - t));
                sum = vaddvaq_p_s8(sum, vld1q_z_s8(qr[r] + t, p), p);
            }
            c[r] = dh * q_zp * k_zp - k_zp * sum;
        }
        const int32x4_t cv = vld1q_s32(c);
        const mve_pred16_t prow = vctp32q((uint32_t)rows);
        int8_t *si = s + i * s_stride;
        if (dh <= 16) {   /* one step: the four queries stay in registers, no loop per key */
            const mve_pred16_t pd = vctp8q((uint32_t)dh);
            const int8x16_t v0 = vld1q_z_s8(q0, pd), v1 = vld1q_z_s8(q1, pd), v2 = vld1q_z_s8(q2, pd);
            const int8x16_t v3 = vld1q_z_s8(q3, pd);
            const int8_t *kj = k;
            for (int32_t j = 0; j < Lk; j++, kj += k_stride) {
                int8x16_t kv = vld1q_z_s8(kj, pd);
                acc[0] = vmladavq_s8(v0, kv);
                acc[1] = vmladavq_s8(v1, kv);
                acc[2] = vmladavq_s8(v2, kv);
                acc[3] = vmladavq_s8(v3, kv);
                int32x4_t x = vaddq_n_s32(vaddq_s32(vld1q_s32(acc), cv), -q_zp * vaddvq_s8(kv));
                vstrbq_scatter_offset_p_s32(si + j, rows_off, tsh_mve_rq4(x, left, mu, negright, s_zp, -128, 127),
                                            prow);
            }
            continue;
        }
        for (int32_t j = 0; j < Lk; j++) {
            const int8_t *kj = k + j * k_stride, *p0 = q0, *p1 = q1, *p2 = q2, *p3 = q3;
            int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, ks = 0;
            for (int32_t g = 0; g < D16; g++) {
                int8x16_t kv = vld1q_s8(kj);
                ks = vaddvaq_s8(ks, kv);
                a0 = vmladavaq_s8(a0, vld1q_s8(p0), kv);
                a1 = vmladavaq_s8(a1, vld1q_s8(p1), kv);
                a2 = vmladavaq_s8(a2, vld1q_s8(p2), kv);
                a3 = vmladavaq_s8(a3, vld1q_s8(p3), kv);
                kj += 16;
                p0 += 16;
                p1 += 16;
                p2 += 16;
                p3 += 16;
            }
            if (rem) {
                int8x16_t kv = vld1q_z_s8(kj, pt);
                ks = vaddvaq_s8(ks, kv);
                a0 = vmladavaq_s8(a0, vld1q_z_s8(p0, pt), kv);
                a1 = vmladavaq_s8(a1, vld1q_z_s8(p1, pt), kv);
                a2 = vmladavaq_s8(a2, vld1q_z_s8(p2, pt), kv);
                a3 = vmladavaq_s8(a3, vld1q_z_s8(p3, pt), kv);
            }
            acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
            int32x4_t x = vaddq_n_s32(vaddq_s32(vld1q_s32(acc), cv), -q_zp * ks);
            vstrbq_scatter_offset_p_s32(si + j, rows_off, tsh_mve_rq4(x, left, mu, negright, s_zp, -128, 127), prow);
        }
    }
    return 1;
}

/* matmul_pv: v - zv transposed once into int16 columns (rows of a multiple of 8 keys), at
 * most TSH_MVE_PV_ELEMS of them at a time on the stack; then per probability row and four columns, per 8
 * keys: one load of p, four of columns, four VMLADAVA.S16 (32 MACs in 9 instructions); the four results
 * requantised as one vector. */
#define TSH_MVE_PV_ELEMS 2048          /* int16 elements of transposed columns on the stack (4 KB) */

int tsh_mve_matmul_pv_s8(const int16_t *p, const int8_t *v, int8_t *y, int32_t Lq, int32_t Lk, int32_t dh,
                         int32_t p_stride, int32_t v_stride, int32_t y_stride, int32_t v_zp, int32_t mult,
                         int32_t shift, int32_t y_zp)
{
    int32_t L8 = (Lk + 7) / 8 * 8, cols = TSH_MVE_PV_ELEMS / L8 / 4 * 4;
    if (cols < 4) return 0;
    int16_t vt[TSH_MVE_PV_ELEMS];
    const int32x4_t left = vdupq_n_s32(shift > 0 ? shift : 0), mu = vdupq_n_s32(mult);
    const int32x4_t negright = vdupq_n_s32(shift > 0 ? 0 : shift);
    /* element j of column t at vt[t L8 + j]: byte offsets 2 L8 t of eight columns */
    const uint16x8_t col_off = vmulq_n_u16(vidupq_n_u16(0, 1), (uint16_t)(2 * L8));
    for (int32_t t0 = 0; t0 < dh; t0 += cols) {
        int32_t nt = dh - t0 < cols ? dh - t0 : cols;
        int32_t nt4 = (nt + 3) / 4 * 4;
        for (int32_t t = 0; t < nt4; t += 8) {   /* eight columns of each key row at a time */
            mve_pred16_t pc = vctp16q((uint32_t)(nt - t));
            for (int32_t j = 0; j < Lk; j++) {
                int16x8_t e = vsubq_n_s16(vldrbq_z_s16(v + j * v_stride + t0 + t, pc), (int16_t)v_zp);
                vstrhq_scatter_offset_p_s16(vt + t * L8 + j, col_off, e, pc);
            }
        }
        /* the padding keys and the columns past nt stay unwritten: they meet only zero lanes of p (the
         * zeroing load of the last step), and the columns past nt are not stored */
        for (int32_t t = 0; t < nt; t += 4) {
            const int16_t *c0 = vt + t * L8, *c1 = c0 + L8, *c2 = c1 + L8, *c3 = c2 + L8;
            const mve_pred16_t pc = vctp32q((uint32_t)(nt - t));
            for (int32_t i = 0; i < Lq; i++) {
                const int16_t *pi = p + i * p_stride;
                int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, j = 0;
                for (; j + 8 <= Lk; j += 8) {
                    int16x8_t pv = vld1q_s16(pi + j);
                    a0 = vmladavaq_s16(a0, pv, vld1q_s16(c0 + j));
                    a1 = vmladavaq_s16(a1, pv, vld1q_s16(c1 + j));
                    a2 = vmladavaq_s16(a2, pv, vld1q_s16(c2 + j));
                    a3 = vmladavaq_s16(a3, pv, vld1q_s16(c3 + j));
                }
                if (j < Lk) {
                    int16x8_t pv = vld1q_z_s16(pi + j, vctp16q((uint32_t)(Lk - j)));
                    a0 = vmladavaq_s16(a0, pv, vld1q_s16(c0 + j));
                    a1 = vmladavaq_s16(a1, pv, vld1q_s16(c1 + j));
                    a2 = vmladavaq_s16(a2, pv, vld1q_s16(c2 + j));
                    a3 = vmladavaq_s16(a3, pv, vld1q_s16(c3 + j));
                }
                int32_t acc[4] = {a0, a1, a2, a3};
                vstrbq_p_s32(y + i * y_stride + t0 + t, tsh_mve_rq4(vld1q_s32(acc), left, mu, negright, y_zp, -128, 127),
                             pc);
            }
        }
    }
    return 1;
}

#else
typedef int tsh_mve_unused;   /* no MVE on this target: an empty translation unit otherwise */
#endif
