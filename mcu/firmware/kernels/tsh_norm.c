/* Residual add fused with LayerNorm, all integer (twin of mcu.kernels.add_layernorm_s8):
 * x = (a - za) ca + (b - zb) cb; mu = round(sum x / d); var = floor(sum (x - mu)^2 / d) + eps;
 * sigma = max(1, isqrt(var)); inv = round(2^40 / sigma); n = RDBPOT64((x - mu) inv, 28) (units 2^-12);
 * y = sat8(MBQM(n, gm[c], gs[c]) + beta[c] + zy). x is recomputed per pass rather than stored. */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

#define TSH_LN_GROUP 16   /* rows normalised together: their statistics live on the stack */

void tsh_add_layernorm_s8(const int8_t *a, const int8_t *b, const int32_t *gm, const int32_t *gs,
                          const int32_t *beta, int8_t *y, int32_t M, int32_t d, int32_t a_zp, int32_t b_zp,
                          int32_t ca, int32_t cb, int32_t eps, int32_t y_zp)
{
    int32_t mu[TSH_LN_GROUP];
    int64_t inv[TSH_LN_GROUP];
    for (int32_t r0 = 0; r0 < M; r0 += TSH_LN_GROUP) {
        int32_t rows = M - r0 < TSH_LN_GROUP ? M - r0 : TSH_LN_GROUP;
        /* statistics per row: |x| <= 255 * 2^13, so x and x - mu fit int32; sums in int64 */
        for (int32_t r = 0; r < rows; r++) {
            const int8_t *ar = a + (r0 + r) * d, *br = b + (r0 + r) * d;
            int64_t sum = 0, sq = 0;
            for (int32_t c = 0; c < d; c++) sum += (ar[c] - a_zp) * ca + (br[c] - b_zp) * cb;
            int32_t m = (int32_t)tsh_div_round(sum, d);
            for (int32_t c = 0; c < d; c++) {
                int32_t xc = (ar[c] - a_zp) * ca + (br[c] - b_zp) * cb - m;
                sq += (int64_t)xc * xc;
            }
            int64_t sigma = tsh_isqrt64(sq / d + eps);
            if (sigma < 1) sigma = 1;
            mu[r] = m;
            inv[r] = (((int64_t)1 << 40) + sigma / 2) / sigma;
        }
        /* channel by channel, so the channel's requantisation is set up once for the group:
         * y = sat8(MBQM(n, gm, gs) + beta + y_zp) is tsh_rq with zero point beta + y_zp */
        for (int32_t c = 0; c < d; c++) {
            int64_t zp = (int64_t)beta[c] + y_zp;
            int big = zp > INT32_MAX - 256 || zp < INT32_MIN + 256;   /* tsh_rq needs room for the clamp */
            tsh_rq_t q = tsh_rq_make(gm[c], gs[c], big ? 0 : (int32_t)zp, -128, 127);
            for (int32_t r = 0; r < rows; r++) {
                int32_t i = (r0 + r) * d + c;
                int32_t xc = (a[i] - a_zp) * ca + (b[i] - b_zp) * cb - mu[r];
                int32_t n = (int32_t)tsh_rdbpot64((int64_t)xc * inv[r], 28);
                if (big) {
                    int64_t out = (int64_t)tsh_mbqm(n, gm[c], gs[c]) + zp;
                    y[i] = (int8_t)(out < -128 ? -128 : (out > 127 ? 127 : out));
                } else {
                    y[i] = tsh_rq(&q, n);
                }
            }
        }
    }
}
