/* Helium (MVE, Armv8.1-M e.g. Cortex-M55) paths of the linear kernels (tsh_mve.c). Internal header.
 *
 * Chosen at compile time: a core with MVE integer instructions (__ARM_FEATURE_MVE, gcc -mcpu=cortex-m55)
 * takes them unless TSH_PORTABLE (plain C) or TSH_EMULATE_DSP (the host's emulated-DSP build) is
 * defined. Each entry point computes the same integers as its kernel in tsh_linear.c and returns 1, or
 * returns 0 without writing anything when the arguments do not suit it (the caller's path runs). The
 * LayerNorm, softmax and table kernels keep their Helium rows in tsh_norm.c, tsh_softmax.c, tsh_misc.c
 * under TSH_USE_MVE; the four-lane requantisation below is shared. */
#ifndef TSH_MVE_H
#define TSH_MVE_H

#include <stdint.h>

#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1) && !defined(TSH_PORTABLE) && !defined(TSH_EMULATE_DSP)
#define TSH_USE_MVE 1
#include <arm_mve.h>

/* y = clamp(MBQM(acc, mult, shift) + zp, lo, hi) on four lanes, exactly tsh_mbqm + tsh_add_clamp8 (the
 * requantisation of base/quant.py) for any multiplier and shift: the saturating left shift VQSHL;
 * SRDHM is VQRDMULH (saturating only at INT32_MIN x INT32_MIN, like tsh_srdhm); RDBPOT(e) is a rounding
 * shift VRSHL by -e of x - 1 for negative x (round half away from zero; the subtraction saturates only at
 * INT32_MIN, which shifts to the same result); the zero point is added with saturation (a saturated sum
 * lies outside any int8 range as the exact one does) and the result clamped. left = max(shift, 0),
 * negright = min(shift, 0) per lane. */
static inline int32x4_t tsh_mve_mbqm(int32x4_t acc, int32x4_t left, int32x4_t mult, int32x4_t negright)
{
    int32x4_t x = vqrdmulhq_s32(vqshlq_s32(acc, left), mult);
    x = vqaddq_s32(x, vshrq_n_s32(vandq_s32(x, negright), 31));
    return vrshlq_s32(x, negright);
}

static inline int32x4_t tsh_mve_rq4(int32x4_t acc, int32x4_t left, int32x4_t mult, int32x4_t negright, int32_t zp,
                                    int32_t lo, int32_t hi)
{
    int32x4_t x = vqaddq_n_s32(tsh_mve_mbqm(acc, left, mult, negright), zp);
    return vminq_s32(vmaxq_s32(x, vdupq_n_s32(lo)), vdupq_n_s32(hi));
}


int tsh_mve_fc_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
                  const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
                  int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max);

int tsh_mve_matmul_qk_s8(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                         int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                         int32_t mult, int32_t shift, int32_t s_zp);

int tsh_mve_matmul_pv_s8(const int16_t *p, const int8_t *v, int8_t *y, int32_t Lq, int32_t Lk, int32_t dh,
                         int32_t p_stride, int32_t v_stride, int32_t y_stride, int32_t v_zp, int32_t mult,
                         int32_t shift, int32_t y_zp);
#else
#define TSH_USE_MVE 0
#endif

#endif /* TSH_MVE_H */
