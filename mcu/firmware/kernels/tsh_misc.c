/* Pointwise tables, pooling and token inputs (twins of mcu/kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"
#include "tsh_mve.h"

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
    for (int32_t i = 0; i < n; i++) y[i] = table[x[i] + 128];
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
            for (int32_t j = 0; j < d; j++) out[j] = tsh_sat8(tsh_mbqm(ui[j], um, ush));
            continue;
        }
        const int8_t *ui = u + c[4] + i * r, *vc = v + c[5];
        const int32_t *vm = v_mult + c[6];
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
