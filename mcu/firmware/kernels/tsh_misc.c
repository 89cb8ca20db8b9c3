/* Pointwise tables, pooling and token inputs (twins of mcu/kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"
#include "tsh_mve.h"

/* four bytes a word (one load, four SXTB + LDRB, one store; y may be x itself) */
void tsh_lut_s8(const int8_t *x, const int8_t *table, int8_t *y, int32_t n)
{
#if TSH_USE_MVE
    /* Helium: sixteen table entries per byte gather, the index x + 128 being x with its top bit flipped */
    for (int32_t i = 0; i < n; i += 16) {
        mve_pred16_t p = vctp8q((uint32_t)(n - i));
        uint8x16_t idx = veorq_u8(vld1q_z_u8((const uint8_t *)x + i, p), vdupq_n_u8(0x80));
        vst1q_p_s8(y + i, vldrbq_gather_offset_z_s8(table, idx, p), p);
    }
    return;
#endif
    const uint8_t *t = (const uint8_t *)table + 128;   /* indexed by the signed input */
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t v = (uint32_t)tsh_read32(x + i);
        uint32_t r = (uint32_t)t[(int8_t)v] | (uint32_t)t[(int8_t)(v >> 8)] << 8 |
                     (uint32_t)t[(int8_t)(v >> 16)] << 16 | (uint32_t)t[(int8_t)(v >> 24)] << 24;
        memcpy(y + i, &r, sizeof r);
    }
    for (; i < n; i++) y[i] = table[x[i] + 128];
}

void tsh_mean_pool_s8(const int8_t *x, const int8_t *mask, int8_t *y, int32_t L, int32_t d, int32_t x_zp,
                      int32_t mult, int32_t shift, int32_t y_zp)
{
    int32_t n = 0;
    for (int32_t i = 0; i < L; i++) n += mask[i] != 0;
    for (int32_t c = 0; c < d; c++) {
        int32_t tot = 0;
        for (int32_t i = 0; i < L; i++)
            if (mask[i] != 0) tot += x[i * d + c] - x_zp;
        int32_t avg = (int32_t)tsh_div_round((int64_t)tot * 256, n > 0 ? n : 1);
        y[c] = tsh_add_clamp8(tsh_mbqm(avg, mult, shift), y_zp, -128, 127);
    }
}

void tsh_embedding_s8(const int32_t *ids, const int8_t *table, int8_t *y, int32_t L, int32_t d, int32_t vocab)
{
    for (int32_t i = 0; i < L; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= vocab) id = 0;
        memcpy(y + i * d, table + id * d, (size_t)d);
    }
}

/* MBQM (tsh_mbqm) when |x 2^left| < 2^30 and right <= 23 (one of them 0): no saturation anywhere, so
 * SRDHM(x 2^left, m) = floor((x 2^left m + 2^30) / 2^31) (SMULL and a shift; SMMULR of 2 x 2^left on
 * the Cortex-M4), then the rounding right shift with |h| <= 2^30 */
static inline int32_t clr_mbqm(int32_t x, int32_t m, int32_t left, int32_t right)
{
    int32_t h;
#if TSH_DSP_ASM
    int32_t x2 = (int32_t)((uint32_t)x << (left + 1));
    __asm__("smmulr %0, %1, %2" : "=r"(h) : "r"(x2), "r"(m));
#else
    h = (int32_t)(((int64_t)x * (1 << left) * m + ((int64_t)1 << 30)) >> 31);
#endif
    if (right == 0) return h;
    return (h + (1 << (right - 1)) - (int32_t)((uint32_t)h >> 31)) >> right;
}

#define CLR_RMAX 64    /* ranks whose (u_k, 0), (0, u_k) operands go on the stack (512 B) */

/* int8 saturation (SSAT on the Cortex-M) */
static inline int8_t clr_sat8(int32_t x)
{
#if TSH_DSP_ASM
    int32_t r;
    __asm__("ssat %0, #8, %1" : "=r"(r) : "r"(x));
    return (int8_t)r;
#else
    return tsh_sat8(x);
#endif
}

/* clr_mbqm's conditions for accumulators up to `bound` in magnitude and this shift */
static inline int clr_short(int32_t bound, int32_t shift)
{
    return shift > 0 ? shift <= 16 && ((int64_t)bound << shift) < (1 << 30) : shift >= -23 && bound < (1 << 30);
}

void tsh_embedding_clr_s8(const int32_t *ids, const uint16_t *slot, const int32_t *clusters, const int8_t *u,
                          const int8_t *v, const int32_t *u_mult, const int32_t *v_mult, int8_t *y, int32_t L,
                          int32_t d, int32_t vocab, int32_t nclusters)
{
    for (int32_t p = 0; p < L; p++) {
        int32_t t = ids[p];
        int32_t s = slot[(t >= 0 && t < vocab) ? t : 0];
        int8_t *out = y + p * d;
        const int32_t *c = 0;
        for (int32_t k = 0; k < nclusters; k++) {
            const int32_t *ck = clusters + 9 * k;
            if (ck[0] <= s && s < ck[0] + ck[1]) {
                c = ck;
                break;
            }
        }
        if (c == 0) {
            memset(out, 0, (size_t)d);
            continue;
        }
        int32_t i = s - c[0], r = c[2], um = u_mult[s], ush = c[7], vsh = c[8];
        if (c[3]) {
            const int8_t *ui = u + c[4] + i * d;
            if (clr_short(128, ush)) {     /* |u| <= 128: the short MBQM */
                int32_t l = ush > 0 ? ush : 0, rr = ush > 0 ? 0 : -ush;
                for (int32_t j = 0; j < d; j++) out[j] = clr_sat8(clr_mbqm(ui[j], um, l, rr));
                continue;
            }
            for (int32_t j = 0; j < d; j++) out[j] = tsh_sat8(tsh_mbqm(ui[j], um, ush));
            continue;
        }
        const int8_t *ui = u + c[4] + i * r, *vc = v + c[5];
        const int32_t *vm = v_mult + c[6];
        int32_t b1 = r * 16384, b2 = vsh > 0 && vsh <= 16 ? b1 << vsh : b1;
        if (clr_short(b1, vsh) && clr_short(b2, ush)) {
            /* |acc| <= b1 = r 2^14 and the first stage's |t| <= b1 2^left: both on the short path */
            int32_t l1 = vsh > 0 ? vsh : 0, r1 = vsh > 0 ? 0 : -vsh, l2 = ush > 0 ? ush : 0, r2 = ush > 0 ? 0 : -ush;
            int32_t j = 0;
#if TSH_USE_DSP
            if (r <= CLR_RMAX && ((uintptr_t)vc & 3u) == 0 && d % 4 == 0) {
                /* four columns at a time: per k one word of v split by SXTB16 into (j, j+2), (j+1, j+3)
                 * and four SMLAD against (u_k, 0) and (0, u_k) */
                int32_t up[2 * CLR_RMAX];
                for (int32_t k = 0; k < r; k++) {
                    up[2 * k] = (int32_t)(uint16_t)ui[k];
                    up[2 * k + 1] = (int32_t)((uint32_t)(uint16_t)ui[k] << 16);
                }
                for (; j < d; j += 4) {
                    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                    const int8_t *vk = vc + j;
                    for (int32_t k = 0; k < r; k++, vk += d) {
                        int32_t w = tsh_read32(vk), e = tsh_sxtb16(w), o = tsh_sxtb16_ror8(w);
                        a0 = tsh_smlad(e, up[2 * k], a0);
                        a2 = tsh_smlad(e, up[2 * k + 1], a2);
                        a1 = tsh_smlad(o, up[2 * k], a1);
                        a3 = tsh_smlad(o, up[2 * k + 1], a3);
                    }
                    int32_t a[4] = {a0, a1, a2, a3};    /* one copy of the requantisation in flash */
                    for (int32_t t = 0; t < 4; t++)
                        out[j + t] = clr_sat8(clr_mbqm(clr_mbqm(a[t], vm[j + t], l1, r1), um, l2, r2));
                }
            }
#endif
            for (; j < d; j++) {
                int32_t acc = 0;
                for (int32_t k = 0; k < r; k++) acc += ui[k] * vc[k * d + j];
                out[j] = tsh_sat8(clr_mbqm(clr_mbqm(acc, vm[j], l1, r1), um, l2, r2));
            }
            continue;
        }
        for (int32_t j = 0; j < d; j++) {
            int32_t acc = 0;
            for (int32_t k = 0; k < r; k++) acc += ui[k] * vc[k * d + j];
            out[j] = tsh_sat8(tsh_mbqm(tsh_mbqm(acc, vm[j], vsh), um, ush));
        }
    }
}

void tsh_pad_mask(const int32_t *ids, int8_t *mask, int32_t L)
{
    for (int32_t i = 0; i < L; i++) mask[i] = (int8_t)(ids[i] != 0);
}
