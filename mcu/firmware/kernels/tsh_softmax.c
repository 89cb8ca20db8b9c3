/* Integer softmax (twin of mcu.kernels.softmax_s16): per row over the unmasked keys,
 * m = max s_j, e_j = lut[m - s_j], S = sum e_j, p_j = min(32767, round(e_j 2^15 / S)). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"
#include "tsh_mve.h"

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

#if TSH_USE_MVE
/* One row of the short path on Helium (returns 0 for S < 2, left to the scalar loop): the maximum by
 * VMAXV over 16 scores; e_j gathered from the table four at a time (parked as uint16 in the output
 * row) and summed; p_j = floor((e_j 2^15 + S / 2) / S) without a division: q = VMULH(x, floor((2^32 - 1)
 * / S)) is q or q - 1 (x < 2^32, so the estimate is below x / S by less than 1), one compare of the
 * remainder corrects it. */
static int softmax_row_mve(const int8_t *si, const int32_t *lut, int16_t *pi, int32_t n)
{
    int8_t m8 = -128;
    for (int32_t j = 0; j < n; j += 16) {
        mve_pred16_t p = vctp8q((uint32_t)(n - j));
        m8 = vmaxvq_p_s8(m8, vld1q_z_s8(si + j, p), p);
    }
    const int32x4_t m = vdupq_n_s32(m8);
    uint16_t *ei = (uint16_t *)pi;
    uint32_t tot = 0;
    for (int32_t j = 0; j < n; j += 4) {
        mve_pred16_t p = vctp32q((uint32_t)(n - j));
        uint32x4_t d = vreinterpretq_u32_s32(vsubq_s32(m, vldrbq_z_s32(si + j, p)));
        uint32x4_t e = vldrwq_gather_shifted_offset_z_u32((const uint32_t *)(const void *)lut, d, p);
        tot = vaddvaq_p_u32(tot, e, p);
        vstrhq_p_u32(ei + j, e, p);
    }
    if (tot < 2) return 0;
    const uint32_t half = tot / 2, r = 0xffffffffu / tot;
    for (int32_t j = 0; j < n; j += 4) {
        mve_pred16_t p = vctp32q((uint32_t)(n - j));
        uint32x4_t x = vaddq_n_u32(vshlq_n_u32(vldrhq_z_u32(ei + j, p), 15), half);
        uint32x4_t q = vmulhq_u32(x, vdupq_n_u32(r));
        uint32x4_t rem = vsubq_u32(x, vmulq_n_u32(q, tot));
        q = vaddq_m_n_u32(q, q, 1, vcmpcsq_n_u32(rem, tot));
        vstrhq_p_u32(ei + j, vminq_u32(q, vdupq_n_u32(32767)), p);
    }
    return 1;
}
#endif

/* The common masks: every key valid, or the first n valid and the rest padding. Each row's e_j
 * (<= 2^15 when every table entry is) is parked in its output row between the two passes. */
static void softmax_prefix(const int8_t *s, const int32_t *lut, int16_t *p, int32_t Lq, int32_t Lk, int32_t n,
                           int32_t s_stride, int32_t p_stride)
{
    for (int32_t i = 0; i < Lq; i++) {
        const int8_t *si = s + i * s_stride;
        int16_t *pi = p + i * p_stride;
        uint16_t *ei = (uint16_t *)pi;
#if TSH_USE_MVE
        if (softmax_row_mve(si, lut, pi, n)) {
            if (n < Lk) memset(pi + n, 0, (size_t)(Lk - n) * sizeof *pi);
            continue;
        }
#endif
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
