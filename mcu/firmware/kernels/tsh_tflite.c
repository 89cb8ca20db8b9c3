/* TFLite Micro's int8 reference arithmetic for imported .tflite models (twins of mcu/tflite_kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

enum { TSH_ADD = 0, TSH_SUB = 1, TSH_MUL = 2, TSH_SQDIFF = 3 };

void tsh_binary_s8(const int8_t *a, const int8_t *b, int8_t *y, const int32_t *dims, const int32_t *p, int32_t op)
{
    const int32_t a_zp = p[0], b_zp = p[1], y_zp = p[2], ls = p[3], am = p[4], ash = p[5], bm = p[6], bsh = p[7];
    const int32_t ym = p[8], ysh = p[9], lo = p[10], hi = p[11];
    int32_t i = 0;
    for (int32_t d0 = 0; d0 < dims[0]; d0++)
        for (int32_t d1 = 0; d1 < dims[1]; d1++)
            for (int32_t d2 = 0; d2 < dims[2]; d2++) {
                const int8_t *ar = a + d0 * dims[4] + d1 * dims[5] + d2 * dims[6];
                const int8_t *br = b + d0 * dims[8] + d1 * dims[9] + d2 * dims[10];
                for (int32_t d3 = 0; d3 < dims[3]; d3++, i++) {
                    int32_t av = ar[d3 * dims[7]] - a_zp, bv = br[d3 * dims[11]] - b_zp, raw;
                    if (op == TSH_MUL) {
                        raw = av * bv;
                    } else {
                        int32_t sa = tsh_mbqm(av * (1 << ls), am, ash), sb = tsh_mbqm(bv * (1 << ls), bm, bsh);
                        int64_t r = op == TSH_ADD ? (int64_t)sa + sb : (int64_t)sa - sb;
                        if (op == TSH_SQDIFF) r = r * r;
                        raw = r > INT32_MAX ? INT32_MAX : (r < INT32_MIN ? INT32_MIN : (int32_t)r);
                    }
                    y[i] = tsh_add_clamp8(tsh_mbqm(raw, ym, ysh), y_zp, lo, hi);
                }
            }
}

/* ---- gemmlowp fixed point (Q-formats named by their integer bits) */

static inline int32_t fp_pot(int32_t x, int32_t e)      /* SaturatingRoundingMultiplyByPOT */
{
    if (e < 0) return tsh_rdbpot(x, -e);
    if (e == 0) return x;
    int32_t t = (int32_t)(((uint32_t)1 << (31 - e)) - 1u);
    if (x > t) return INT32_MAX;
    if (x < -t) return INT32_MIN;
    return (int32_t)((uint32_t)x << e);
}

static int32_t fp_exp_quarter(int32_t a)
{
    int32_t x = a + (1 << 28);
    int32_t x2 = tsh_srdhm(x, x), x3 = tsh_srdhm(x2, x), x4 = tsh_srdhm(x2, x2);
    int32_t poly = fp_pot(tsh_srdhm(fp_pot(x4, -2) + x3, 715827883) + x2, -1);
    return 1895147668 + tsh_srdhm(1895147668, x + poly);
}

static int32_t fp_exp_neg(int32_t a, int32_t int_bits)
{
    static const int32_t mult[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242};
    const int32_t frac = 31 - int_bits, quarter = 1 << (frac - 2);
    int32_t a_mod = (a & (quarter - 1)) - quarter;
    int32_t r = fp_exp_quarter(fp_pot(a_mod, int_bits));
    int32_t rem = a_mod - a;
    for (int32_t e = -2; e <= 4; e++)
        if (int_bits > e && (rem & (1 << (frac + e)))) r = tsh_srdhm(r, mult[e + 2]);
    if (int_bits > 5 && a < -(1 << (frac + 5))) r = 0;
    return a == 0 ? INT32_MAX : r;
}

static int32_t fp_one_over_one_plus_x(int32_t a)
{
    int64_t s = (int64_t)a + INT32_MAX;
    int32_t h = (int32_t)((s + (s >= 0 ? 1 : -1)) / 2);
    int32_t x = 1515870810 + tsh_srdhm(h, -1010580540);
    for (int i = 0; i < 3; i++) {
        int32_t e = (1 << 29) - tsh_srdhm(h, x);
        x = x + fp_pot(tsh_srdhm(x, e), 2);
    }
    return fp_pot(x, 1);
}

static int32_t clz32(uint32_t x)
{
    int32_t n = 0;
    if (x == 0) return 32;
    while (!(x & 0x80000000u)) { x <<= 1; n++; }
    return n;
}

void tsh_softmax_s8(const int8_t *x, int8_t *y, int32_t rows, int32_t depth, int32_t mult, int32_t left_shift,
                    int32_t diff_min)
{
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *xr = x + r * depth;
        int8_t *yr = y + r * depth;
        int32_t mx = -128;
        for (int32_t c = 0; c < depth; c++) mx = xr[c] > mx ? xr[c] : mx;
        int32_t sum = 0;
        for (int32_t c = 0; c < depth; c++) {
            int32_t d = xr[c] - mx;
            if (d >= diff_min) sum += tsh_rdbpot(fp_exp_neg(tsh_srdhm(d * (1 << left_shift), mult), 5), 12);
        }
        int32_t head = clz32((uint32_t)sum);
        int32_t bits = 12 - head;
        int32_t scale = fp_one_over_one_plus_x((int32_t)(((uint32_t)sum << head) - 0x80000000u));
        for (int32_t c = 0; c < depth; c++) {
            int32_t d = xr[c] - mx;
            if (d >= diff_min) {
                int32_t e = fp_exp_neg(tsh_srdhm(d * (1 << left_shift), mult), 5);
                yr[c] = (int8_t)tsh_clamp(tsh_rdbpot(tsh_srdhm(scale, e), bits + 31 - 8) - 128, -128, 127);
            } else {
                yr[c] = -128;
            }
        }
    }
}

/* MEAN over the middle axis of (outer, n, inner): the int32 sum less n zero points, requantised; one body for
 * int8 and int16 activations (SAT adds the output zero point and saturates to the type). */
#define TSH_MEAN(NAME, T, SAT)                                                                                \
    void NAME(const T *x, T *y, int32_t outer, int32_t n, int32_t inner, int32_t x_zp, int32_t mult,          \
              int32_t shift, int32_t y_zp)                                                                    \
    {                                                                                                         \
        for (int32_t o = 0; o < outer; o++)                                                                   \
            for (int32_t i = 0; i < inner; i++) {                                                             \
                int32_t sum = 0;                                                                              \
                const T *p = x + o * n * inner + i;                                                           \
                for (int32_t k = 0; k < n; k++) sum += p[k * inner];                                          \
                y[o * inner + i] = SAT(tsh_mbqm(sum - n * x_zp, mult, shift), y_zp);                          \
            }                                                                                                 \
    }

static inline int8_t add_sat8(int32_t v, int32_t zp) { return tsh_add_clamp8(v, zp, -128, 127); }

TSH_MEAN(tsh_mean_s8, int8_t, add_sat8)

/* ---- int16 activations */

/* v + zp saturated to int16, in 64 bits so extreme values cannot overflow */
static inline int16_t add_sat16(int32_t v, int32_t zp)
{
    int64_t r = (int64_t)v + zp;
    return (int16_t)(r < -32768 ? -32768 : (r > 32767 ? 32767 : r));
}

TSH_MEAN(tsh_mean_s16, int16_t, add_sat16)

void tsh_requant_s8_s16(const int8_t *x, int16_t *y, int32_t n, int32_t x_zp, int32_t mult, int32_t shift, int32_t y_zp)
{
    for (int32_t i = 0; i < n; i++) y[i] = add_sat16(tsh_mbqm(x[i] - x_zp, mult, shift), y_zp);
}

void tsh_requant_s16_s8(const int16_t *x, int8_t *y, int32_t n, int32_t x_zp, int32_t mult, int32_t shift, int32_t y_zp)
{
    for (int32_t i = 0; i < n; i++) y[i] = tsh_add_clamp8(tsh_mbqm(x[i] - x_zp, mult, shift), y_zp, -128, 127);
}

void tsh_avg_pool_s8(const int8_t *x, int8_t *y, int32_t H, int32_t W, int32_t C, int32_t Hout, int32_t Wout,
                     int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pad_h, int32_t pad_w, int32_t act_min,
                     int32_t act_max)
{
    for (int32_t oy = 0; oy < Hout; oy++) {
        int32_t y0 = oy * sh - pad_h, ya = y0 > 0 ? y0 : 0, yb = y0 + kh < H ? y0 + kh : H;
        for (int32_t ox = 0; ox < Wout; ox++) {
            int32_t x0 = ox * sw - pad_w, xa = x0 > 0 ? x0 : 0, xb = x0 + kw < W ? x0 + kw : W;
            int32_t n = (yb - ya) * (xb - xa);
            for (int32_t c = 0; c < C; c++) {
                int32_t acc = 0;
                for (int32_t iy = ya; iy < yb; iy++)
                    for (int32_t ix = xa; ix < xb; ix++) acc += x[(iy * W + ix) * C + c];
                if (n > 0) acc = acc > 0 ? (acc + n / 2) / n : (acc - n / 2) / n;
                y[(oy * Wout + ox) * C + c] = (int8_t)tsh_clamp(acc, act_min, act_max);
            }
        }
    }
}

/* One batch of BATCH_MATMUL with the right operand stored (K, N): y = (a - za)(b - zb), which is
 * tsh_matmul_pv_s8 (p . (v - zv), p int16) with p = a - za: rows of a are widened to int16 a few at a
 * time (the product and its sums are the same integers), so the P.V kernel's DSP path does the work. */
#define TSH_KN_WIDE 1024
void tsh_matmul_kn_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t M, int32_t N, int32_t K, int32_t a_stride,
                      int32_t b_stride, int32_t y_stride, int32_t a_zp, int32_t b_zp, int32_t mult, int32_t shift,
                      int32_t y_zp)
{
    if (K <= TSH_KN_WIDE) {
        int16_t wide[TSH_KN_WIDE];
        const int32_t per = TSH_KN_WIDE / K;
        for (int32_t i0 = 0; i0 < M; i0 += per) {
            const int32_t rows = M - i0 < per ? M - i0 : per;
            for (int32_t r = 0; r < rows; r++)
                for (int32_t k = 0; k < K; k++) wide[r * K + k] = (int16_t)(a[(i0 + r) * a_stride + k] - a_zp);
            tsh_matmul_pv_s8(wide, b, y + i0 * y_stride, rows, K, N, K, b_stride, y_stride, b_zp, mult, shift, y_zp);
        }
        return;
    }
    tsh_rq_t rq = tsh_rq_make(mult, shift, y_zp, -128, 127);
    for (int32_t i = 0; i < M; i++) {
        const int8_t *ai = a + i * a_stride;
        for (int32_t n = 0; n < N; n++) {
            int32_t acc = 0;
            for (int32_t k = 0; k < K; k++) acc += (ai[k] - a_zp) * (b[k * b_stride + n] - b_zp);
            y[i * y_stride + n] = tsh_rq(&rq, acc);
        }
    }
}

/* TFLite's DEPTHWISE_CONV_2D, per output channel: taps outside the image are skipped (padding adds
 * nothing once the input zero point is taken off), bias, per-channel requantisation. */
void tsh_depthwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult, const int32_t *shift,
                      int8_t *y, int32_t H, int32_t W, int32_t C, int32_t dm, int32_t Hout, int32_t Wout, int32_t kh,
                      int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t pad_h, int32_t pad_w,
                      int32_t x_zp, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    const int32_t Co = C * dm;
    for (int32_t oc = 0; oc < Co; oc++) {
        const int32_t c = oc / dm;
        const tsh_rq_t rq = tsh_rq_make(mult[oc], shift[oc], y_zp, act_min, act_max);
        for (int32_t oy = 0; oy < Hout; oy++) {
            for (int32_t ox = 0; ox < Wout; ox++) {
                int32_t acc = bias[oc];
                for (int32_t ky = 0; ky < kh; ky++) {
                    const int32_t iy = oy * sh - pad_h + ky * dh;
                    if (iy < 0 || iy >= H) continue;
                    for (int32_t kx = 0; kx < kw; kx++) {
                        const int32_t ix = ox * sw - pad_w + kx * dw;
                        if (ix < 0 || ix >= W) continue;
                        acc += (x[(iy * W + ix) * C + c] - x_zp) * w[(ky * kw + kx) * Co + oc];
                    }
                }
                y[(oy * Wout + ox) * Co + oc] = tsh_rq(&rq, acc);
            }
        }
    }
}
