/* Pointwise tables, pooling and token inputs (twins of mcu/kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"

void tsh_lut_s8(const int8_t *x, const int8_t *table, int8_t *y, int32_t n)
{
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

void tsh_pad_mask(const int32_t *ids, int8_t *mask, int32_t L)
{
    for (int32_t i = 0; i < L; i++) mask[i] = (int8_t)(ids[i] != 0);
}
