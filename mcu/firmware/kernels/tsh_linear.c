/* Linear algebra kernels: fully connected, attention matmuls, conv2d (twins of mcu/kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

static inline int8_t requant_clamp(int32_t acc, int32_t mult, int32_t shift, int32_t zp, int32_t lo, int32_t hi)
{
    return tsh_add_clamp8(tsh_mbqm(acc, mult, shift), zp, lo, hi);
}

#if TSH_USE_DSP
/* Two rows x two output channels at a time, four k per step: each 32-bit load brings four int8
 * values, SXTB16 splits them into the (0,2) and (1,3) halfword pairs and SMLAD does two MACs.
 * Both operands are split the same way, so the pairs line up. */
static void fc_block2x2(const int8_t *x0, const int8_t *x1, const int8_t *w0, const int8_t *w1, int32_t K,
                        int32_t *a00, int32_t *a01, int32_t *a10, int32_t *a11)
{
    int32_t s00 = *a00, s01 = *a01, s10 = *a10, s11 = *a11;
    int32_t k = 0;
    for (; k + 4 <= K; k += 4) {
        int32_t xv0 = tsh_read32(x0 + k), xv1 = tsh_read32(x1 + k);
        int32_t wv0 = tsh_read32(w0 + k), wv1 = tsh_read32(w1 + k);
        int32_t x0a = tsh_sxtb16(xv0), x0b = tsh_sxtb16_ror8(xv0);
        int32_t x1a = tsh_sxtb16(xv1), x1b = tsh_sxtb16_ror8(xv1);
        int32_t w0a = tsh_sxtb16(wv0), w0b = tsh_sxtb16_ror8(wv0);
        int32_t w1a = tsh_sxtb16(wv1), w1b = tsh_sxtb16_ror8(wv1);
        s00 = tsh_smlad(x0a, w0a, s00);
        s00 = tsh_smlad(x0b, w0b, s00);
        s01 = tsh_smlad(x0a, w1a, s01);
        s01 = tsh_smlad(x0b, w1b, s01);
        s10 = tsh_smlad(x1a, w0a, s10);
        s10 = tsh_smlad(x1b, w0b, s10);
        s11 = tsh_smlad(x1a, w1a, s11);
        s11 = tsh_smlad(x1b, w1b, s11);
    }
    for (; k < K; k++) {
        s00 += x0[k] * w0[k];
        s01 += x0[k] * w1[k];
        s10 += x1[k] * w0[k];
        s11 += x1[k] * w1[k];
    }
    *a00 = s00; *a01 = s01; *a10 = s10; *a11 = s11;
}

static int32_t dot_s8(const int8_t *x, const int8_t *w, int32_t K, int32_t acc)
{
    int32_t k = 0;
    for (; k + 4 <= K; k += 4) {
        int32_t xv = tsh_read32(x + k), wv = tsh_read32(w + k);
        acc = tsh_smlad(tsh_sxtb16(xv), tsh_sxtb16(wv), acc);
        acc = tsh_smlad(tsh_sxtb16_ror8(xv), tsh_sxtb16_ror8(wv), acc);
    }
    for (; k < K; k++) acc += x[k] * w[k];
    return acc;
}
#else
static int32_t dot_s8(const int8_t *x, const int8_t *w, int32_t K, int32_t acc)
{
    for (int32_t k = 0; k < K; k++) acc += x[k] * w[k];
    return acc;
}
#endif

void tsh_fc_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
               const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
               int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    int32_t m = 0;
#if TSH_USE_DSP
    for (; m + 2 <= M; m += 2) {
        const int8_t *x0 = x + m * x_stride, *x1 = x0 + x_stride;
        int8_t *y0 = y + m * y_stride, *y1 = y0 + y_stride;
        int32_t n = 0;
        for (; n + 2 <= N; n += 2) {
            int32_t a00 = bias[n], a01 = bias[n + 1], a10 = bias[n], a11 = bias[n + 1];
            fc_block2x2(x0, x1, w + n * K, w + (n + 1) * K, K, &a00, &a01, &a10, &a11);
            y0[n] = requant_clamp(a00, mult[n], shift[n], y_zp, act_min, act_max);
            y0[n + 1] = requant_clamp(a01, mult[n + 1], shift[n + 1], y_zp, act_min, act_max);
            y1[n] = requant_clamp(a10, mult[n], shift[n], y_zp, act_min, act_max);
            y1[n + 1] = requant_clamp(a11, mult[n + 1], shift[n + 1], y_zp, act_min, act_max);
        }
        for (; n < N; n++) {
            y0[n] = requant_clamp(dot_s8(x0, w + n * K, K, bias[n]), mult[n], shift[n], y_zp, act_min, act_max);
            y1[n] = requant_clamp(dot_s8(x1, w + n * K, K, bias[n]), mult[n], shift[n], y_zp, act_min, act_max);
        }
    }
#endif
    for (; m < M; m++) {
        const int8_t *xr = x + m * x_stride;
        int8_t *yr = y + m * y_stride;
        for (int32_t n = 0; n < N; n++)
            yr[n] = requant_clamp(dot_s8(xr, w + n * K, K, bias[n]), mult[n], shift[n], y_zp, act_min, act_max);
    }
}

void tsh_matmul_qk_s8(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                      int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                      int32_t mult, int32_t shift, int32_t s_zp)
{
    /* sum (q - zq)(k - zk) = sum q k - zk sum q - zq sum k + dh zq zk: the row sums are computed once */
    for (int32_t i = 0; i < Lq; i++) {
        const int8_t *qi = q + i * q_stride;
        int32_t qsum = 0;
        for (int32_t t = 0; t < dh; t++) qsum += qi[t];
        for (int32_t j = 0; j < Lk; j++) {
            const int8_t *kj = k + j * k_stride;
            int32_t ksum = 0;
            for (int32_t t = 0; t < dh; t++) ksum += kj[t];
            int32_t acc = dot_s8(qi, kj, dh, 0) - k_zp * qsum - q_zp * ksum + dh * q_zp * k_zp;
            s[i * s_stride + j] = tsh_add_clamp8(tsh_mbqm(acc, mult, shift), s_zp, -128, 127);
        }
    }
}

void tsh_matmul_pv_s8(const int16_t *p, const int8_t *v, int8_t *y, int32_t Lq, int32_t Lk, int32_t dh,
                      int32_t p_stride, int32_t v_stride, int32_t y_stride, int32_t v_zp, int32_t mult,
                      int32_t shift, int32_t y_zp)
{
    for (int32_t i = 0; i < Lq; i++) {
        const int16_t *pi = p + i * p_stride;
        int32_t psum = 0;
        for (int32_t j = 0; j < Lk; j++) psum += pi[j];
        for (int32_t t = 0; t < dh; t++) {
            int32_t acc = 0;
            for (int32_t j = 0; j < Lk; j++) acc += pi[j] * v[j * v_stride + t];
            y[i * y_stride + t] = tsh_add_clamp8(tsh_mbqm(acc - v_zp * psum, mult, shift), y_zp, -128, 127);
        }
    }
}

void tsh_conv2d_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
                   const int32_t *shift, int8_t *y, int32_t H, int32_t W, int32_t Cin, int32_t Cout,
                   int32_t Hout, int32_t Wout, int32_t ksize, int32_t stride, int32_t pad, int32_t x_zp,
                   int32_t y_zp, int32_t act_min, int32_t act_max)
{
    for (int32_t oh = 0; oh < Hout; oh++)
        for (int32_t ow = 0; ow < Wout; ow++)
            for (int32_t co = 0; co < Cout; co++) {
                int32_t acc = bias[co];
                const int8_t *wc = w + co * ksize * ksize * Cin;
                for (int32_t kh = 0; kh < ksize; kh++) {
                    int32_t ih = oh * stride - pad + kh;
                    if (ih < 0 || ih >= H) continue;
                    for (int32_t kw = 0; kw < ksize; kw++) {
                        int32_t iw = ow * stride - pad + kw;
                        if (iw < 0 || iw >= W) continue;
                        const int8_t *xp = x + (ih * W + iw) * Cin;
                        const int8_t *wp = wc + (kh * ksize + kw) * Cin;
                        int32_t wsum = 0;   /* padded taps are skipped: they are real zeros */
                        for (int32_t ci = 0; ci < Cin; ci++) wsum += wp[ci];
                        acc += dot_s8(xp, wp, Cin, 0) - x_zp * wsum;
                    }
                }
                y[(oh * Wout + ow) * Cout + co] = requant_clamp(acc, mult[co], shift[co], y_zp, act_min, act_max);
            }
}
