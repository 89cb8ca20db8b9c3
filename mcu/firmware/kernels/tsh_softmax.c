/* Integer softmax (twin of mcu.kernels.softmax_s16): per row over the unmasked keys,
 * m = max s_j, e_j = lut[m - s_j], S = sum e_j, p_j = min(32767, round(e_j 2^15 / S)). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

void tsh_softmax_s16(const int8_t *s, const int8_t *mask, const int32_t *lut, int16_t *p, int32_t Lq,
                     int32_t Lk, int32_t s_stride, int32_t p_stride)
{
    for (int32_t i = 0; i < Lq; i++) {
        const int8_t *si = s + i * s_stride;
        int16_t *pi = p + i * p_stride;
        int32_t m = -128, tot = 0;
        for (int32_t j = 0; j < Lk; j++)
            if (mask[j] != 0 && si[j] > m) m = si[j];
        for (int32_t j = 0; j < Lk; j++)
            if (mask[j] != 0) tot += lut[m - si[j]];
        for (int32_t j = 0; j < Lk; j++) {
            int32_t pj = 0;
            if (mask[j] != 0 && tot > 0) {
                /* e_j <= 2^15, so e_j * 2^15 + S / 2 fits an unsigned 32-bit value when S < 2^31 */
                uint32_t e = (uint32_t)lut[m - si[j]];
                uint32_t q = (e * 32768u + (uint32_t)tot / 2u) / (uint32_t)tot;
                pj = q > 32767u ? 32767 : (int32_t)q;
            }
            pi[j] = (int16_t)pj;
        }
    }
}
