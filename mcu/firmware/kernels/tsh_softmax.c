/* Integer softmax (twin of mcu.kernels.softmax_s16): per row over the unmasked keys,
 * m = max s_j, e_j = lut[m - s_j], S = sum e_j, p_j = min(32767, round(e_j 2^15 / S)). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

/* max of row[0..n) (at least -128): four scores a word */
static int32_t row_max_s8(const int8_t *row, int32_t n)
{
    int32_t j = 0, m = -128;
    if (n >= 4) {
        uint32_t mw = 0x80808080u;
        for (; j + 4 <= n; j += 4) mw = tsh_max_s8x4(mw, (uint32_t)tsh_read32(row + j));
        for (int32_t b = 0; b < 32; b += 8) {
            int32_t v = (int8_t)(uint8_t)(mw >> b);
            if (v > m) m = v;
        }
    }
    for (; j < n; j++)
        if (row[j] > m) m = row[j];
    return m;
}

/* The common masks: every key valid, or the first n valid and the rest padding. Each row's e_j
 * (<= 2^15 when every table entry is) is parked in its output row between the two passes. */
static void softmax_prefix(const int8_t *s, const int32_t *lut, int16_t *p, int32_t Lq, int32_t Lk, int32_t n,
                           int32_t s_stride, int32_t p_stride)
{
    for (int32_t i = 0; i < Lq; i++) {
        const int8_t *si = s + i * s_stride;
        int16_t *pi = p + i * p_stride;
        uint16_t *ei = (uint16_t *)pi;
        int32_t m = row_max_s8(si, n);
        uint32_t tot = 0;
        for (int32_t j = 0; j < n; j++) {
            uint32_t e = (uint32_t)lut[m - si[j]];
            tot += e;
            ei[j] = (uint16_t)e;
        }
        if (tot == 0) {
            memset(pi, 0, (size_t)n * sizeof *pi);
        } else {
            uint32_t half = tot / 2;
            for (int32_t j = 0; j < n; j++) {
                uint32_t q = ((uint32_t)ei[j] * 32768u + half) / tot;
                pi[j] = (int16_t)(q > 32767u ? 32767u : q);
            }
        }
        if (n < Lk) memset(pi + n, 0, (size_t)(Lk - n) * sizeof *pi);
    }
}

void tsh_softmax_s16(const int8_t *s, const int8_t *mask, const int32_t *lut, int16_t *p, int32_t Lq,
                     int32_t Lk, int32_t s_stride, int32_t p_stride)
{
    /* valid keys a prefix [0, n), every table entry in [0, 2^15]: the short path */
    int32_t n = 0, prefix = 1;
    while (n < Lk && mask[n] != 0) n++;
    for (int32_t j = n; j < Lk && prefix; j++) prefix = mask[j] == 0;
    for (int32_t k = 0; k < 256 && prefix; k++) prefix = (uint32_t)lut[k] <= 32768u;
    if (prefix && Lk <= 65536) {
        softmax_prefix(s, lut, p, Lq, Lk, n, s_stride, p_stride);
        return;
    }
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
