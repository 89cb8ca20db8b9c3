/* Residual add fused with LayerNorm, all integer (twin of mcu.kernels.add_layernorm_s8):
 * x = (a - za) ca + (b - zb) cb; mu = round(sum x / d); var = floor(sum (x - mu)^2 / d) + eps;
 * sigma = max(1, isqrt(var)); inv = round(2^40 / sigma); n = RDBPOT64((x - mu) inv, 28) (units 2^-12);
 * y = sat8(MBQM(n, gm[c], gs[c]) + beta[c] + zy). x is recomputed per pass rather than stored. */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

void tsh_add_layernorm_s8(const int8_t *a, const int8_t *b, const int32_t *gm, const int32_t *gs,
                          const int32_t *beta, int8_t *y, int32_t M, int32_t d, int32_t a_zp, int32_t b_zp,
                          int32_t ca, int32_t cb, int32_t eps, int32_t y_zp)
{
    for (int32_t r = 0; r < M; r++) {
        const int8_t *ar = a + r * d, *br = b + r * d;
        int8_t *yr = y + r * d;
        int64_t sum = 0;
        for (int32_t c = 0; c < d; c++)
            sum += (int64_t)((ar[c] - a_zp) * ca + (br[c] - b_zp) * cb);
        int64_t mu = tsh_div_round(sum, d);
        int64_t sq = 0;
        for (int32_t c = 0; c < d; c++) {
            int64_t xc = (int64_t)((ar[c] - a_zp) * ca + (br[c] - b_zp) * cb) - mu;
            sq += xc * xc;
        }
        int64_t sigma = tsh_isqrt64(sq / d + eps);
        if (sigma < 1) sigma = 1;
        int64_t inv = (((int64_t)1 << 40) + sigma / 2) / sigma;
        for (int32_t c = 0; c < d; c++) {
            int64_t xc = (int64_t)((ar[c] - a_zp) * ca + (br[c] - b_zp) * cb) - mu;
            int32_t n = (int32_t)tsh_rdbpot64(xc * inv, 28);
            int64_t out = (int64_t)tsh_mbqm(n, gm[c], gs[c]) + beta[c] + y_zp;
            yr[c] = (int8_t)(out < -128 ? -128 : (out > 127 ? 127 : out));
        }
    }
}
