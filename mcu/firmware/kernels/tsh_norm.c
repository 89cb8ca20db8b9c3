/* Residual add fused with LayerNorm, all integer (twin of mcu.kernels.add_layernorm_s8):
 * x = (a - za) ca + (b - zb) cb; mu = round(sum x / d); var = floor(sum (x - mu)^2 / d) + eps;
 * sigma = max(1, isqrt(var)); inv = round(2^40 / sigma); n = RDBPOT64((x - mu) inv, 28) (units 2^-12);
 * y = sat8(MBQM(n, gm[c], gs[c]) + beta[c] + zy). x is recomputed per pass rather than stored.
 *
 * Written as u = a ca + b cb, x = u - off (off = za ca + zb cb), x - mu = u - c (c = off + mu): one
 * pass gathers sum u and sum u^2, and sum (x - mu)^2 = sum u^2 - 2 c sum u + d c^2 exactly, so the
 * statistics read each row once. |ca|, |cb| <= 2^12 (the lowering's LN_IN_BITS): |u| <= 2^20. */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"
#include "tsh_mve.h"

#define TSH_LN_GROUP 16     /* rows normalised together: their statistics live on the stack */
#define TSH_LN_SUM32 512    /* up to this d, sum u and sum x fit int32 (d 2^21 < 2^31) */

/* floor(sqrt(v)): a single-precision guess (VSQRT on the Cortex-M4F) made exact by integer steps */
static uint32_t ln_isqrt(uint64_t v)
{
    float f = (float)(uint32_t)(v >> 32) * 4294967296.0f + (float)(uint32_t)v, g;
#if defined(__ARM_FP) && (__ARM_FP & 4)
    __asm__("vsqrt.f32 %0, %1" : "=t"(g) : "t"(f));
#else
    g = f;   /* Newton on the host: a guess of similar quality, the integer steps below decide */
    if (g > 0.0f) {
        float r = g > 1.0f ? g * 0.5f : 1.0f;
        for (int i = 0; i < 40; i++) r = 0.5f * (r + g / r);
        g = r;
    }
#endif
    uint64_t r = g < 4294967040.0f ? (uint32_t)g : 0xffffffffu;   /* VCVT to 32 bits, no library call */
    while (r > 0 && r * r > v) r--;
    while (r < 0xffffffffu && (r + 1) * (r + 1) <= v) r++;
    return (uint32_t)r;
}

/* round(2^40 / s) = floor((2^40 + floor(s / 2)) / s) for 1 <= s < 2^23, by 32-bit divisions:
 * the top 24 bits, then two bytes (each remainder < 2^23 leaves room for 8 more bits) */
static uint64_t ln_inv(uint32_t s)
{
    uint64_t n = ((uint64_t)1 << 40) + s / 2;
    if (s >= (1u << 23)) return n / s;
    uint32_t hi = (uint32_t)(n >> 16), q0 = hi / s, r = hi - q0 * s;
    uint32_t t = r << 8 | (uint32_t)(n >> 8 & 0xffu), q1 = t / s;
    r = t - q1 * s;
    t = r << 8 | (uint32_t)(n & 0xffu);
    return (uint64_t)q0 << 16 | (uint64_t)q1 << 8 | (t / s);
}

/* c = off + mu and inv of a row from sum u, sum u^2 and the mean */
static void ln_finish(int64_t su, int64_t sq, int64_t mu, int32_t d, int32_t off, int32_t eps, int32_t *c_out,
                      int64_t *inv_out)
{
    int64_t c = off + mu;
    uint64_t ss = (uint64_t)(sq - 2 * c * su + d * c * c);
    uint64_t q = (d & (d - 1)) == 0 ? ss >> __builtin_ctz((uint32_t)d) : ss / (uint64_t)d;
    uint32_t sigma = ln_isqrt(q + (uint64_t)(uint32_t)eps);
    *c_out = (int32_t)c;
    *inv_out = (int64_t)ln_inv(sigma < 1 ? 1 : sigma);
}

/* c = off + mu and inv of one row */
static void ln_row_stats(const int8_t *a, const int8_t *b, int32_t d, int32_t ca, int32_t cb, int32_t off,
                         int32_t eps, int32_t *c_out, int64_t *inv_out)
{
    int64_t su, sq = 0, mu;
    if (d <= TSH_LN_SUM32) {
        int32_t s32 = 0;
#if TSH_USE_MVE
        /* sum u = ca sum a + cb sum b, sum u^2 = ca^2 sum a^2 + 2 ca cb sum a b + cb^2 sum b^2: five
         * reductions of 16 bytes (VADDVA, VMLADAVA), each within int32 for d <= TSH_LN_SUM32 */
        int32_t sa = 0, sb = 0, saa = 0, sab = 0, sbb = 0;
        for (int32_t j = 0; j < d; j += 16) {
            mve_pred16_t p = vctp8q((uint32_t)(d - j));
            int8x16_t va = vld1q_z_s8(a + j, p), vb = vld1q_z_s8(b + j, p);
            sa = vaddvaq_s8(sa, va);
            sb = vaddvaq_s8(sb, vb);
            saa = vmladavaq_s8(saa, va, va);
            sab = vmladavaq_s8(sab, va, vb);
            sbb = vmladavaq_s8(sbb, vb, vb);
        }
        s32 = sa * ca + sb * cb;
        sq = (int64_t)ca * ca * saa + 2 * (int64_t)ca * cb * sab + (int64_t)cb * cb * sbb;
#elif TSH_USE_DSP
        /* the same five sums on int16 pairs: per 4 bytes of a and b two SXTB16 each and ten SMLAD */
        int32_t sa = 0, sb = 0, saa = 0, sab = 0, sbb = 0, j = 0;
        const int32_t ones = 0x00010001;
        for (; j + 4 <= d; j += 4) {
            int32_t va = tsh_read32(a + j), vb = tsh_read32(b + j);
            int32_t ae = tsh_sxtb16(va), ao = tsh_sxtb16_ror8(va), be = tsh_sxtb16(vb), bo = tsh_sxtb16_ror8(vb);
            sa = tsh_smlad(ao, ones, tsh_smlad(ae, ones, sa));
            sb = tsh_smlad(bo, ones, tsh_smlad(be, ones, sb));
            saa = tsh_smlad(ao, ao, tsh_smlad(ae, ae, saa));
            sab = tsh_smlad(ao, bo, tsh_smlad(ae, be, sab));
            sbb = tsh_smlad(bo, bo, tsh_smlad(be, be, sbb));
        }
        for (; j < d; j++) {
            sa += a[j];
            sb += b[j];
            saa += a[j] * a[j];
            sab += a[j] * b[j];
            sbb += b[j] * b[j];
        }
        s32 = sa * ca + sb * cb;
        sq = (int64_t)ca * ca * saa + 2 * (int64_t)ca * cb * sab + (int64_t)cb * cb * sbb;
#else
        for (int32_t j = 0; j < d; j++) {
            int32_t u = a[j] * ca + b[j] * cb;
            s32 += u;
            sq += (int64_t)u * u;
        }
#endif
        su = s32;
        mu = tsh_div_round32(s32 - d * off, d);
    } else {
        su = 0;
        for (int32_t j = 0; j < d; j++) {
            int32_t u = a[j] * ca + b[j] * cb;
            su += u;
            sq += (int64_t)u * u;
        }
        mu = tsh_div_round(su - (int64_t)d * off, d);
    }
    ln_finish(su, sq, mu, d, off, eps, c_out, inv_out);
}

/* MBQM + zero point + int8 saturation on the short path (preconditions: 1 <= right <= 23,
 * |x| < 2^30; rnd = 2^(right-1)) */
static inline int32_t ln_rq(int32_t x, int32_t m, int32_t rnd, int32_t right, int32_t zp)
{
#if TSH_DSP_ASM
    return tsh_rq_short(x, m, rnd, right, zp);
#else
    (void)rnd;
    return tsh_add_clamp8(tsh_mbqm(x, m, -right), zp, -128, 127);
#endif
}

#if TSH_USE_MVE
/* The normalisation of `rows` rows on four channels at a time, when every inv < 2^31 (inv32) and
 * beta + zy fits int32 (else 0, nothing written). 16 (x - mu) = a 16ca + b 16cb - 16c has |.| < 2^25, so
 * n = RDBPOT64((x - mu) inv, 28) = sign * VRMULH(|16 (x - mu)|, inv) (round half away from zero is
 * round half up of the magnitude); MBQM, beta + zy and the int8 clamp as tsh_mve_rq4. */
static int ln_out_mve(const int8_t *a, const int8_t *b, const int32_t *gm, const int32_t *gs, const int32_t *beta,
                      int8_t *y, int32_t rows, int32_t d, int32_t ca, int32_t cb, int32_t y_zp, const int32_t *cr,
                      const int32_t *inv32)
{
    if (y_zp > (1 << 30) || y_zp < -(1 << 30)) return 0;
    for (int32_t c = 0; c < d; c++)
        if (beta[c] > (1 << 30) || beta[c] < -(1 << 30)) return 0;
    const int32_t ca16 = ca * 16, cb16 = cb * 16;
    for (int32_t c = 0; c < d; c += 4) {
        mve_pred16_t p = vctp32q((uint32_t)(d - c));
        int32x4_t sh = vldrwq_z_s32(gs + c, p), mu = vldrwq_z_s32(gm + c, p);
        int32x4_t left = vmaxq_s32(sh, vdupq_n_s32(0)), negright = vminq_s32(sh, vdupq_n_s32(0));
        int32x4_t zp = vaddq_n_s32(vldrwq_z_s32(beta + c, p), y_zp);
        for (int32_t r = 0; r < rows; r++) {
            int32_t i = r * d + c;
            int32x4_t x16 = vmlaq_n_s32(vmulq_n_s32(vldrbq_z_s32(a + i, p), ca16), vldrbq_z_s32(b + i, p), cb16);
            x16 = vsubq_n_s32(x16, cr[r] * 16);
            int32x4_t sgn = vshrq_n_s32(x16, 31);
            int32x4_t n = vrmulhq_s32(vabsq_s32(x16), vdupq_n_s32(inv32[r]));
            n = vsubq_s32(veorq_s32(n, sgn), sgn);
            int32x4_t out = vqaddq_s32(tsh_mve_mbqm(n, left, mu, negright), zp);
            vstrbq_p_s32(y + i, vminq_s32(vmaxq_s32(out, vdupq_n_s32(-128)), vdupq_n_s32(127)), p);
        }
    }
    return 1;
}
#endif

#if TSH_USE_DSP && !TSH_USE_MVE
/* Row by row on DSP cores for d % 4 == 0, d <= TSH_LN_ROW: one pass builds the row's u = a ca + b cb
 * (SMLAD of (a, b) int16 pairs against (ca, cb)) and sums u and u^2; the normalisation then reads u
 * and a per-channel table {m, rnd', right} with the channel's offset beta + zy folded into the
 * rounding term as in fc's requantisation: (h - [h < 0] + 2^(right-1) + z 2^right) >> right =
 * RDBPOT(h, right) + z exactly, no add overflows for |z 2^right| <= 2^30 and |h| < 2^25 (|n| < 2^25).
 * The table and one row of u live on the stack (2 KB). */
#define TSH_LN_ROW 128

/* the table, or 0 if a channel's parameters leave the short path (1 <= right <= 23, |z 2^right| <= 2^30) */
static int ln_table(const int32_t *gm, const int32_t *gs, const int32_t *beta, int32_t y_zp, int32_t d, int32_t *tab)
{
    for (int32_t c = 0; c < d; c++, tab += 3) {
        int32_t right = -gs[c];
        int64_t z = (int64_t)beta[c] + y_zp;
        if (right < 1 || right > 23 || z > ((int64_t)1 << (30 - right)) || z < -((int64_t)1 << (30 - right)))
            return 0;
        tab[0] = gm[c];
        tab[1] = (int32_t)(((int64_t)1 << (right - 1)) + z * ((int64_t)1 << right));
        tab[2] = right;
    }
    return 1;
}

/* u of one row (d % 4 == 0, |ca|, |cb| < 2^15) and sum u; sum u^2 into *sq */
static int32_t __attribute__((noinline)) ln_row_u(const int8_t *a, const int8_t *b, int32_t d, int32_t cab, int32_t *u, int64_t *sq)
{
    int32_t su = 0;
    int64_t q = 0;
#if TSH_M4_ASM
    /* per 4 bytes of a and b: the (a, b) pairs by SXTB16 and PKH, four SMUAD, one STM, four SMLAL:
     * 25 instructions with the loop (the C loop took 36); r4-r7 are the STM list */
    uint32_t lo = 0, hi = 0;
    const int8_t *aend = a + d;
    int32_t va, vb;
    __asm__ volatile(
        "1:\n\t"
        "ldr %[va], [%[a]], #4\n\t"
        "ldr %[vb], [%[b]], #4\n\t"
        "sxtb16 r6, %[va]\n\t"                 /* a0 a2 */
        "sxtb16 %[va], %[va], ror #8\n\t"      /* a1 a3 */
        "sxtb16 r7, %[vb]\n\t"                 /* b0 b2 */
        "sxtb16 %[vb], %[vb], ror #8\n\t"      /* b1 b3 */
        "pkhbt r4, r6, r7, lsl #16\n\t"        /* a0 b0 */
        "pkhtb r6, r7, r6, asr #16\n\t"        /* a2 b2 */
        "pkhbt r5, %[va], %[vb], lsl #16\n\t"  /* a1 b1 */
        "pkhtb r7, %[vb], %[va], asr #16\n\t"  /* a3 b3 */
        "smuad r4, r4, %[cab]\n\t"
        "smuad r5, r5, %[cab]\n\t"
        "smuad r6, r6, %[cab]\n\t"
        "smuad r7, r7, %[cab]\n\t"
        "stm %[u]!, {r4, r5, r6, r7}\n\t"
        "add %[su], %[su], r4\n\t"
        "smlal %[lo], %[hi], r4, r4\n\t"
        "add %[su], %[su], r5\n\t"
        "smlal %[lo], %[hi], r5, r5\n\t"
        "add %[su], %[su], r6\n\t"
        "smlal %[lo], %[hi], r6, r6\n\t"
        "add %[su], %[su], r7\n\t"
        "smlal %[lo], %[hi], r7, r7\n\t"
        "cmp %[a], %[aend]\n\t"
        "bne 1b\n\t"
        : [su] "+r"(su), [lo] "+r"(lo), [hi] "+r"(hi), [a] "+r"(a), [b] "+r"(b), [u] "+r"(u), [va] "=&r"(va),
          [vb] "=&r"(vb)
        : [cab] "r"(cab), [aend] "r"(aend)
        : "r4", "r5", "r6", "r7", "memory", "cc");
    *sq = (int64_t)((uint64_t)hi << 32 | lo);
    return su;
#endif
    for (int32_t j = 0; j < d; j += 4, u += 4) {
        int32_t va = tsh_read32(a + j), vb = tsh_read32(b + j);
        int32_t ae = tsh_sxtb16(va), ao = tsh_sxtb16_ror8(va), be = tsh_sxtb16(vb), bo = tsh_sxtb16_ror8(vb);
        int32_t u0 = tsh_smlad(tsh_pkhbt(ae, be), cab, 0), u2 = tsh_smlad(tsh_pkhtb(be, ae), cab, 0);
        int32_t u1 = tsh_smlad(tsh_pkhbt(ao, bo), cab, 0), u3 = tsh_smlad(tsh_pkhtb(bo, ao), cab, 0);
        u[0] = u0; u[1] = u1; u[2] = u2; u[3] = u3;
        su += u0 + u1 + u2 + u3;
        q += (int64_t)u0 * u0 + (int64_t)u1 * u1 + (int64_t)u2 * u2 + (int64_t)u3 * u3;
    }
    *sq = q;
    return su;
}

/* y[j] = sat8(MBQM(RDBPOT64((u[j] - c) inv, 28), m, -right) + z) for inv < 2^31 (nc16 = -16 c), the
 * table's folded form; on the Cortex-M4 16 instructions a channel */
static void ln_out_row(const int32_t *u, const int32_t *tab, int8_t *y, int32_t d, int32_t nc16, int32_t inv)
{
#if TSH_M4_ASM
    int8_t *yend = y + d;
    int32_t x, lo, hi;
    __asm__ volatile(
        "1:\n\t"
        "ldr %[x], [%[u]], #4\n\t"
        "ldm %[t]!, {r0, r1, r2}\n\t"
        "add %[x], %[nc], %[x], lsl #4\n\t"
        "asr %[lo], %[x], #31\n\t"
        "add %[lo], %[lo], #0x80000000\n\t"
        "movs %[hi], #0\n\t"
        "smlal %[lo], %[hi], %[x], %[inv]\n\t"
        "add %[hi], %[hi], %[hi]\n\t"
        "smmulr %[hi], %[hi], r0\n\t"
        "sub %[hi], %[hi], %[hi], lsr #31\n\t"
        "add %[hi], %[hi], r1\n\t"
        "asr %[hi], %[hi], r2\n\t"
        "ssat %[hi], #8, %[hi]\n\t"
        "strb %[hi], [%[y]], #1\n\t"
        "cmp %[y], %[end]\n\t"
        "bne 1b\n\t"
        : [x] "=&r"(x), [lo] "=&r"(lo), [hi] "=&r"(hi), [u] "+&r"(u), [t] "+&r"(tab), [y] "+&r"(y)
        : [nc] "r"(nc16), [inv] "r"(inv), [end] "r"(yend)
        : "r0", "r1", "r2", "memory", "cc");
#else
    for (int32_t j = 0; j < d; j++, tab += 3) {
        int32_t X = 16 * u[j] + nc16;
        int32_t n = (int32_t)(((int64_t)X * inv + (int64_t)0x80000000 + (X >> 31)) >> 32);
        int32_t h = tsh_mbqm(n, tab[0], 0);          /* SRDHM alone: no shift */
        int64_t r = ((int64_t)h - (h < 0) + tab[1]) >> tab[2];
        y[j] = (int8_t)(r < -128 ? -128 : (r > 127 ? 127 : r));
    }
#endif
}

/* one output on the 64-bit steps (any inv, shift and offset z = beta + zy), out of line: the rare
 * rows of tiny spread on the row-by-row path */
static int8_t __attribute__((noinline)) ln_out_slow(int32_t xc, int64_t inv, int32_t m, int32_t shift, int64_t z)
{
    int32_t n = (int32_t)tsh_rdbpot64((int64_t)xc * inv, 28);
    int64_t out = (int64_t)tsh_mbqm(n, m, shift) + z;
    return (int8_t)(out < -128 ? -128 : (out > 127 ? 127 : out));
}

/* the whole call row by row, or 0 if it does not meet the preconditions (nothing written) */
static int ln_rows_dsp(const int8_t *a, const int8_t *b, const int32_t *gm, const int32_t *gs, const int32_t *beta,
                       int8_t *y, int32_t M, int32_t d, int32_t off, int32_t ca, int32_t cb, int32_t eps, int32_t y_zp)
{
    int32_t tab[3 * TSH_LN_ROW], u[TSH_LN_ROW];
    if (d % 4 != 0 || d < 4 || d > TSH_LN_ROW || ca >= (1 << 15) || ca < -(1 << 15) || cb >= (1 << 15) || cb < -(1 << 15) ||
        !ln_table(gm, gs, beta, y_zp, d, tab))
        return 0;
    int32_t cab = tsh_pkhbt(ca, cb);
    for (int32_t r = 0; r < M; r++, a += d, b += d, y += d) {
        int64_t sq, inv;
        int32_t c, su = ln_row_u(a, b, d, cab, u, &sq);
        ln_finish(su, sq, tsh_div_round32(su - d * off, d), d, off, eps, &c, &inv);
        if (inv < ((int64_t)1 << 31)) {
            ln_out_row(u, tab, y, d, -16 * c, (int32_t)inv);
            continue;
        }
        for (int32_t j = 0; j < d; j++)         /* a row of tiny spread: the 64-bit steps */
            y[j] = ln_out_slow(u[j] - c, inv, gm[j], gs[j], (int64_t)beta[j] + y_zp);
    }
    return 1;
}
#endif

void tsh_add_layernorm_s8(const int8_t *a, const int8_t *b, const int32_t *gm, const int32_t *gs,
                          const int32_t *beta, int8_t *y, int32_t M, int32_t d, int32_t a_zp, int32_t b_zp,
                          int32_t ca, int32_t cb, int32_t eps, int32_t y_zp)
{
    int32_t cr[TSH_LN_GROUP], inv32[TSH_LN_GROUP];
    int64_t inv[TSH_LN_GROUP];
    int32_t off = a_zp * ca + b_zp * cb;
#if TSH_USE_DSP && !TSH_USE_MVE
    if (ln_rows_dsp(a, b, gm, gs, beta, y, M, d, off, ca, cb, eps, y_zp)) return;
#endif
    for (int32_t r0 = 0; r0 < M; r0 += TSH_LN_GROUP) {
        int32_t rows = M - r0 < TSH_LN_GROUP ? M - r0 : TSH_LN_GROUP, small = 1;
        for (int32_t r = 0; r < rows; r++) {
            int32_t i = (r0 + r) * d;
            ln_row_stats(a + i, b + i, d, ca, cb, off, eps, &cr[r], &inv[r]);
            inv32[r] = (int32_t)inv[r];
            small &= inv[r] < ((int64_t)1 << 31);
        }
#if TSH_USE_MVE
        if (small && ln_out_mve(a + r0 * d, b + r0 * d, gm, gs, beta, y + r0 * d, rows, d, ca, cb, y_zp, cr, inv32))
            continue;
#endif
        /* channel by channel, so the channel's requantisation is set up once for the group */
        for (int32_t c = 0; c < d; c++) {
            int64_t zp = (int64_t)beta[c] + y_zp;
            int32_t m = gm[c], right = -gs[c];
            const int8_t *ac = a + r0 * d + c, *bc = b + r0 * d + c;
            int8_t *yc = y + r0 * d + c;
            if (small && right >= 1 && right <= 23 && zp >= INT32_MIN && zp <= INT32_MAX) {
                /* inv < 2^31: (u - c) inv + 2^27 - [u < c] fits one SMLAL, |n| < 2^25 */
                int32_t rnd = 1 << (right - 1), z = (int32_t)zp;
                for (int32_t r = 0; r < rows; r++, ac += d, bc += d, yc += d) {
                    int32_t xc = *ac * ca + *bc * cb - cr[r];
                    int64_t p = (int64_t)xc * inv32[r] + ((1 << 27) + (xc >> 31));
                    *yc = (int8_t)ln_rq((int32_t)(p >> 28), m, rnd, right, z);
                }
                continue;
            }
            for (int32_t r = 0; r < rows; r++, ac += d, bc += d, yc += d) {
                int32_t xc = *ac * ca + *bc * cb - cr[r];
                int32_t n = (int32_t)tsh_rdbpot64((int64_t)xc * inv[r], 28);
                int64_t out = (int64_t)tsh_mbqm(n, m, gs[c]) + zp;
                *yc = (int8_t)(out < -128 ? -128 : (out > 127 ? 127 : out));
            }
        }
    }
}
