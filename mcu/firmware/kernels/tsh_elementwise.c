/* Elementwise add and mul, requantising copies and strided gathers (twins of mcu/kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

#define TSH_ADD_LEFT_SHIFT 20   /* |a - zp| <= 255, so (a - zp) << 20 < 2^28 fits int32 */
#define TSH_PERMUTE_DIMS 6

static inline int32_t tsh_sat32(int64_t v)
{
    return v > INT32_MAX ? INT32_MAX : (v < INT32_MIN ? INT32_MIN : (int32_t)v);
}

/* b is a row of b_n repeated over a: walk a in chunks of b_n instead of a modulo per element */
void tsh_add_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t n, int32_t b_n, int32_t a_zp, int32_t b_zp,
                int32_t a_mult, int32_t a_shift, int32_t b_mult, int32_t b_shift, int32_t y_mult, int32_t y_shift,
                int32_t y_zp, int32_t act_min, int32_t act_max)
{
    if (b_n < 1) return;
    tsh_rq_t q = tsh_rq_make(y_mult, y_shift, y_zp, act_min, act_max);
    for (int32_t i0 = 0; i0 < n; i0 += b_n) {
        int32_t m = n - i0 < b_n ? n - i0 : b_n;
        for (int32_t j = 0; j < m; j++) {
            int32_t sa = tsh_mbqm((a[i0 + j] - a_zp) * (1 << TSH_ADD_LEFT_SHIFT), a_mult, a_shift);
            int32_t sb = tsh_mbqm((b[j] - b_zp) * (1 << TSH_ADD_LEFT_SHIFT), b_mult, b_shift);
            /* saturated: only extreme multipliers get here, TFLite would overflow */
            y[i0 + j] = tsh_rq(&q, tsh_sat32((int64_t)sa + sb));
        }
    }
}

void tsh_mul_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t n, int32_t b_n, int32_t a_zp, int32_t b_zp,
                int32_t y_mult, int32_t y_shift, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    if (b_n < 1) return;
    tsh_rq_t q = tsh_rq_make(y_mult, y_shift, y_zp, act_min, act_max);
    for (int32_t i0 = 0; i0 < n; i0 += b_n) {
        int32_t m = n - i0 < b_n ? n - i0 : b_n;
        for (int32_t j = 0; j < m; j++) y[i0 + j] = tsh_rq(&q, (a[i0 + j] - a_zp) * (b[j] - b_zp));
    }
}

void tsh_requant_s8(const int8_t *x, int8_t *y, int32_t rows, int32_t cols, int32_t x_stride, int32_t y_stride,
                    int32_t x_zp, int32_t mult, int32_t shift, int32_t y_zp)
{
    if (cols <= 0) return;
    /* real factor 1.0 between equal zero points: MBQM is the identity, so plain row copies
     * (memmove: an in-place rescale passes x == y) */
    if (mult == (1 << 30) && shift == 1 && x_zp == y_zp) {
        for (int32_t r = 0; r < rows; r++) memmove(y + r * y_stride, x + r * x_stride, (size_t)cols);
        return;
    }
    tsh_rq_t q = tsh_rq_make(mult, shift, y_zp, -128, 127);
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *xr = x + r * x_stride;
        int8_t *yr = y + r * y_stride;
        for (int32_t c = 0; c < cols; c++) yr[c] = tsh_rq(&q, xr[c] - x_zp);
    }
}

/* Rows of the innermost dimension, the five outer indices counted like an odometer (the input
 * offset follows them incrementally: no multiplications per row). */
void tsh_permute_s8(const int8_t *x, int8_t *y, const int32_t *dims, int32_t nd)
{
    int32_t s[TSH_PERMUTE_DIMS], t[TSH_PERMUTE_DIMS], idx[TSH_PERMUTE_DIMS] = {0};
    for (int32_t k = 0; k < TSH_PERMUTE_DIMS; k++) {
        int32_t used = k >= TSH_PERMUTE_DIMS - nd;
        s[k] = used ? dims[k] : 1;
        t[k] = used ? dims[TSH_PERMUTE_DIMS + k] : 0;
        if (s[k] <= 0) return;      /* an empty output */
    }
    int32_t n = s[TSH_PERMUTE_DIMS - 1], step = t[TSH_PERMUTE_DIMS - 1], off = 0;
    for (;;) {
        const int8_t *src = x + off;
        if (step == 1) {
            memcpy(y, src, (size_t)n);
        } else {
            for (int32_t j = 0; j < n; j++) y[j] = src[j * step];
        }
        y += n;
        int32_t k = TSH_PERMUTE_DIMS - 2;
        while (k >= 0 && ++idx[k] == s[k]) {
            off -= (s[k] - 1) * t[k];
            idx[k--] = 0;
        }
        if (k < 0) return;
        off += t[k];
    }
}
