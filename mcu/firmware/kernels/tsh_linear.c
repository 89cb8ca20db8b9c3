/* Linear algebra kernels: fully connected, attention matmuls, conv2d (twins of mcu/kernels.py). */
#include "tsh_fixedpoint.h"
#include "tsh_kernels.h"
#include "tsh_mve.h"

/* tsh_rq out of line: the rare fallback of the short requantisation paths, kept small in flash */
static int8_t __attribute__((noinline, unused)) rq_slow(const tsh_rq_t *q, int32_t x)
{
    return tsh_rq(q, x);
}

static inline int8_t requant_clamp(int32_t acc, int32_t mult, int32_t shift, int32_t zp, int32_t lo, int32_t hi)
{
    return tsh_add_clamp8(tsh_mbqm(acc, mult, shift), zp, lo, hi);
}

/* the same out of line: for paths that run once per row, kept small in flash */
static int8_t __attribute__((noinline, unused)) requant_clamp_ool(int32_t acc, int32_t mult, int32_t shift, int32_t zp,
                                                                  int32_t lo, int32_t hi)
{
    return requant_clamp(acc, mult, shift, zp, lo, hi);
}

/* ---- fully connected ----
 * Weight layout (mcu.kernels.pack_fc_weights): output channels in pairs; pair p (rows 2p, 2p+1)
 * starts at byte 2 p K and holds, for each group g of 4 k, row 2p's 4 bytes then row 2p+1's 4 bytes,
 * then the K % 4 tail bytes of row 2p, then of row 2p+1. An odd last row is stored plainly. So one
 * pointer walks both rows of a pair with 8-byte loads. */

/* weight k of the `which` (0/1) row of a pair whose first byte is `wp` */
static inline int32_t wpair_at(const int8_t *wp, int32_t K, int32_t which, int32_t k)
{
    int32_t K4 = K / 4;
    if (k < 4 * K4) return wp[8 * (k / 4) + 4 * which + (k % 4)];
    return wp[8 * K4 + which * (K - 4 * K4) + (k - 4 * K4)];
}

#if TSH_USE_DSP
#define TSH_FC_KMAX 512       /* rows up to this length are sign-extended once onto the stack (3 KB) */
#define TSH_FC_UNROLL 32      /* steps of 4 k per straight-line block (32 x 80 bytes of code) */
#define TSH_STR2(x) #x
#define TSH_STR(x) TSH_STR2(x)

/* Three rows sign-extended into int16 pairs, interleaved per 4 k: row0 (0,2) (1,3), row1, row2. */
/* inlined into each caller: its loop runs once per three rows, its call would run per chunk */
static inline __attribute__((always_inline)) void fc_extend3(const int8_t *x0, const int8_t *x1, const int8_t *x2, int32_t K4, int32_t *xe)
{
    for (int32_t g = 0; g < K4; g++) {
        int32_t v0 = tsh_read32(x0 + 4 * g), v1 = tsh_read32(x1 + 4 * g), v2 = tsh_read32(x2 + 4 * g);
        xe[0] = tsh_sxtb16(v0); xe[1] = tsh_sxtb16_ror8(v0);
        xe[2] = tsh_sxtb16(v1); xe[3] = tsh_sxtb16_ror8(v1);
        xe[4] = tsh_sxtb16(v2); xe[5] = tsh_sxtb16_ror8(v2);
        xe += 6;
    }
}

#if TSH_M4_ASM
#define FC_PAIRS_ASM 1
/* The fully connected layer's hot loop on the Cortex-M4: one block of three rows (sign-extended
 * once into int16 pairs, row0 (k, k+2) (k+1, k+3), row1, row2 per 4 k) against every channel
 * pair, all in assembly. Per step of 4 k: one LDRD of the weight pair, four SXTB16, three LDRD of
 * the extended rows and twelve SMLAD = 20 instructions for 24 MACs; the steps are straight-line
 * code (TSH_FC_UNROLL of them, 80 bytes each) entered part way, reading the rows at fixed offsets
 * from a chunk's base, so all 14 registers hold accumulators, operands, the weight pointer and the
 * base. K beyond one block of steps runs in chunks, each with its own base (a short first chunk,
 * then full ones). What does not fit the registers lives in a struct just below each base
 * (immediate offsets), so nothing is spilled per pair: about 75 instructions of bookkeeping per
 * pair of channels and three rows (the C loop with the same steps took about 100, and 240 with
 * chunks).
 * The requantisation is tsh_rq_short's with the zero point folded into the rounding term,
 * rnd' = 2^(right-1) + zp 2^right = ((2 zp + 1) << right) >> 1 (exact: the final shift is a floor
 * and zp 2^right a multiple of 2^right): h = SMMULR(2 acc, m); (h - [h < 0] + rnd') >> right;
 * SSAT 8, all in place. No add overflows: |h| <= 2^30 and |rnd'| <= 2^30 for |zp| <= 128 and
 * right <= 23. */
#define FC_CHUNKS (TSH_FC_KMAX / 4 / TSH_FC_UNROLL)

struct fc_state {                 /* 48 bytes below a chunk's base; the asm uses these offsets */
    const int32_t *bias, *mult, *shift;   /* -48 -44 -40: advanced pair by pair (chunk 0's only) */
    int8_t *y;                    /* -36: row 0's output of the current pair */
    int32_t d1, d2, c;            /* -32 -28 -24: row 1 - row 0, row 2 - row 1 (0: a repeated row), 2 zp + 1 */
    const int8_t *wend;           /* -20: the weights' end: the loop's stop */
    int32_t skip;                 /* -16: bytes of steps the first chunk skips */
    uint32_t entry;               /* -12: the first chunk's first step (Thumb address) */
    const int32_t *next;          /* -8: the next chunk's base, NULL after the last (every chunk) */
    const int32_t *first;         /* -4: the first chunk's base (every chunk) */
};

struct fc_chunk {                 /* a chunk: its state, then its steps' extended rows (24 bytes each) */
    struct fc_state st;
    int32_t x[6 * TSH_FC_UNROLL];
};

#define FC_RQ(a, m, rnd, r)                                                                        \
    "add " a ", " a ", " a "\n\t"                                                                   \
    "smmulr " a ", " a ", " m "\n\t"                                                               \
    "sub " a ", " a ", " a ", lsr #31\n\t"                                                         \
    "add " a ", " a ", " rnd "\n\t"                                                                \
    "asr " a ", " a ", " r "\n\t"                                                                  \
    "ssat " a ", #8, " a "\n\t"

/* the asm text of the two variants: the head (entry into the steps), one step's weight operands
 * (t2, t0: row 0 of the pair as (k, k+2), (k+1, k+3) int16 pairs; t3, t1: row 1), then the
 * multiply-accumulates against the three extended rows and the per-pair bookkeeping */
#define FC_ASM_HEAD \
        "adr %[t0], 3f\n\t"                                                                         \
        "ldr %[t1], [%[x], #-16]\n\t"                                                               \
        "add %[t0], %[t0], %[t1]\n\t"                                                               \
        "orr %[t0], %[t0], #1\n\t"                                                                  \
        "str %[t0], [%[x], #-12]\n"                                                                 \
        "1:\n\t"                                                                                    \
        "ldr %[t0], [%[x], #-48]\n\t"                                                               \
        "ldrd %[a0], %[a1], [%[t0]], #8\n\t"                                                        \
        "str %[t0], [%[x], #-48]\n\t"                                                               \
        "mov %[a2], %[a0]\n\t"                                                                      \
        "mov %[a3], %[a1]\n\t"                                                                      \
        "mov %[a4], %[a0]\n\t"                                                                      \
        "mov %[a5], %[a1]\n\t"                                                                      \
        "ldr pc, [%[x], #-12]\n\t"                                                                  \
        ".p2align 2\n"                                                                              \
        "3:\n\t"                                                                                    \
        ".set .Lfc_i, 0\n\t"                                                                        \
        ".rept " TSH_STR(TSH_FC_UNROLL) "\n\t"
#define FC_ASM_W8 \
        "ldrd %[t0], %[t1], [%[w]], #8\n\t"                                                         \
        "sxtb16 %[t2], %[t0]\n\t"                                                                   \
        "sxtb16 %[t0], %[t0], ror #8\n\t"                                                           \
        "sxtb16 %[t3], %[t1]\n\t"                                                                   \
        "sxtb16 %[t1], %[t1], ror #8\n\t"
/* int16 weights pre-arranged in that order (mcu.kernels.pack_fc_weights_s16): one LDM, no SXTB16; t2,
 * t0, t3, t1 live in r0-r3 in that order so the LDM fills them from consecutive words */
#define FC_ASM_W16 "ldm.w %[w]!, {%[t2], %[t0], %[t3], %[t1]}\n\t"
#define FC_ASM_REST \
        "ldrd %[xa], %[xb], [%[x], #(24 * .Lfc_i)]\n\t"                                                    \
        "smlad %[a0], %[xa], %[t2], %[a0]\n\t"                                                             \
        "smlad %[a0], %[xb], %[t0], %[a0]\n\t"                                                             \
        "smlad %[a1], %[xa], %[t3], %[a1]\n\t"                                                             \
        "smlad %[a1], %[xb], %[t1], %[a1]\n\t"                                                             \
        "ldrd %[xa], %[xb], [%[x], #(24 * .Lfc_i + 8)]\n\t"                                                \
        "smlad %[a2], %[xa], %[t2], %[a2]\n\t"                                                             \
        "smlad %[a2], %[xb], %[t0], %[a2]\n\t"                                                             \
        "smlad %[a3], %[xa], %[t3], %[a3]\n\t"                                                             \
        "smlad %[a3], %[xb], %[t1], %[a3]\n\t"                                                             \
        "ldrd %[xa], %[xb], [%[x], #(24 * .Lfc_i + 16)]\n\t"                                               \
        "smlad %[a4], %[xa], %[t2], %[a4]\n\t"                                                             \
        "smlad %[a4], %[xb], %[t0], %[a4]\n\t"                                                             \
        "smlad %[a5], %[xa], %[t3], %[a5]\n\t"                                                             \
        "smlad %[a5], %[xb], %[t1], %[a5]\n\t"                                                             \
        ".set .Lfc_i, .Lfc_i + 1\n\t"                                                                      \
        ".endr\n\t"                                                                                        \
        "ldr %[t0], [%[x], #-8]\n\t"     /* the next chunk from its first step, else back to the first */  \
        "cmp %[t0], #0\n\t"                                                                                \
        "beq 5f\n\t"                                                                                       \
        "mov %[x], %[t0]\n\t"                                                                              \
        "b 3b\n"                                                                                           \
        "5:\n\t"                                                                                           \
        "ldr %[x], [%[x], #-4]\n\t"                                                                        \
        /* the pair's multipliers (t1, t2), right shifts (xa, xb) and rounding terms (t3, t0) */           \
        "ldr %[t0], [%[x], #-44]\n\t"                                                                      \
        "ldrd %[t1], %[t2], [%[t0]], #8\n\t"                                                               \
        "str %[t0], [%[x], #-44]\n\t"                                                                      \
        "ldr %[t0], [%[x], #-40]\n\t"                                                                      \
        "ldrd %[xa], %[xb], [%[t0]], #8\n\t"                                                               \
        "str %[t0], [%[x], #-40]\n\t"                                                                      \
        "ldr %[t0], [%[x], #-24]\n\t"                                                                      \
        "rsb %[xa], %[xa], #0\n\t"                                                                         \
        "rsb %[xb], %[xb], #0\n\t"                                                                         \
        "lsl %[t3], %[t0], %[xa]\n\t"                                                                      \
        "asr %[t3], %[t3], #1\n\t"                                                                         \
        "lsl %[t0], %[t0], %[xb]\n\t"                                                                      \
        "asr %[t0], %[t0], #1\n\t"                                                                         \
        FC_RQ("%[a0]", "%[t1]", "%[t3]", "%[xa]")                                                          \
        FC_RQ("%[a2]", "%[t1]", "%[t3]", "%[xa]")                                                          \
        FC_RQ("%[a4]", "%[t1]", "%[t3]", "%[xa]")                                                          \
        FC_RQ("%[a1]", "%[t2]", "%[t0]", "%[xb]")                                                          \
        FC_RQ("%[a3]", "%[t2]", "%[t0]", "%[xb]")                                                          \
        FC_RQ("%[a5]", "%[t2]", "%[t0]", "%[xb]")                                                          \
        /* stores: row 0 at y, row 1 at y + d1, row 2 at y + d1 + d2 */                                    \
        "ldr %[t1], [%[x], #-36]\n\t"                                                                      \
        "ldr %[t2], [%[x], #-32]\n\t"                                                                      \
        "strb %[a1], [%[t1], #1]\n\t"                                                                      \
        "strb %[a0], [%[t1]], #2\n\t"                                                                      \
        "str %[t1], [%[x], #-36]\n\t"                                                                      \
        "add %[t1], %[t1], %[t2]\n\t"                                                                      \
        "strb %[a2], [%[t1], #-2]\n\t"                                                                     \
        "strb %[a3], [%[t1], #-1]\n\t"                                                                     \
        "ldr %[t2], [%[x], #-28]\n\t"                                                                      \
        "add %[t1], %[t1], %[t2]\n\t"                                                                      \
        "strb %[a4], [%[t1], #-2]\n\t"                                                                     \
        "strb %[a5], [%[t1], #-1]\n\t"                                                                     \
        "ldr %[t0], [%[x], #-20]\n\t"                                                                      \
        "cmp %[w], %[t0]\n\t"                                                                              \
        "bne 1b\n\t"
#define FC_ASM_OPERANDS \
        : [a0] "=&r"(a0), [a1] "=&r"(a1), [a2] "=&r"(a2), [a3] "=&r"(a3), [a4] "=&r"(a4), [a5] "=&r"(a5),  \
          [w] "+&r"(w), [x] "+&r"(base), [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3),   \
          [xa] "=&r"(xa), [xb] "=&r"(xb)                                                                   \
        :                                                                                                  \
        : "memory", "cc"

static void fc_pairs3_asm(const int32_t *base, const int8_t *w)
{
    int32_t a0, a1, a2, a3, a4, a5, t0, t1, t2, t3, xa, xb;
    __asm__ volatile(FC_ASM_HEAD FC_ASM_W8 FC_ASM_REST FC_ASM_OPERANDS);
}

static void fc_pairs3_w16_asm(const int32_t *base, const int16_t *w)
{
    int32_t a0, a1, a2, a3, a4, a5, xa, xb;
    register int32_t t2 __asm__("r0"), t0 __asm__("r1"), t3 __asm__("r2"), t1 __asm__("r3");
    __asm__ volatile(FC_ASM_HEAD FC_ASM_W16 FC_ASM_REST FC_ASM_OPERANDS);
}

#else
#define FC_PAIRS_ASM 0
/* The same integers in C: host tests of the DSP path run this with emulated instructions; other
 * DSP cores (Armv8-M mainline, where the register-hungry block above does not allocate) with the
 * real SMLAD/SXTB16. */
#define FC_STEPS(a0, a1, a2, a3, a4, a5, x, w, steps)                                              \
    do {                                                                                           \
        for (int32_t g_ = 0; g_ < (steps); g_++) {                                                 \
            int32_t w0_ = tsh_read32(w), w1_ = tsh_read32(w + 4);                                  \
            int32_t w0a_ = tsh_sxtb16(w0_), w0b_ = tsh_sxtb16_ror8(w0_);                           \
            int32_t w1a_ = tsh_sxtb16(w1_), w1b_ = tsh_sxtb16_ror8(w1_);                           \
            a0 = tsh_smlad(x[1], w0b_, tsh_smlad(x[0], w0a_, a0));                                 \
            a1 = tsh_smlad(x[1], w1b_, tsh_smlad(x[0], w1a_, a1));                                 \
            a2 = tsh_smlad(x[3], w0b_, tsh_smlad(x[2], w0a_, a2));                                 \
            a3 = tsh_smlad(x[3], w1b_, tsh_smlad(x[2], w1a_, a3));                                 \
            a4 = tsh_smlad(x[5], w0b_, tsh_smlad(x[4], w0a_, a4));                                 \
            a5 = tsh_smlad(x[5], w1b_, tsh_smlad(x[4], w1a_, a5));                                 \
            w += 8;                                                                                \
            x += 6;                                                                                \
        }                                                                                          \
    } while (0)

static inline int32_t fc_rq_fast(int32_t x, int32_t m, int32_t rnd, int32_t right, int32_t zp)
{
    (void)rnd;
    return tsh_sat8(tsh_mbqm(x, m, -right) + zp);   /* right >= 1: |mbqm| <= 2^30, no overflow */
}
#endif

#if !FC_PAIRS_ASM
/* Three rows (their extension `xe`) against all channel pairs, every channel on the short
 * requantisation path (see fc_rq_fast): the fully connected layer's hot loop in C. */
static void fc_rows3_fast(const int32_t *xe, const int8_t *w, const int32_t *bias, const int32_t *mult,
                          const int32_t *shift, int8_t *y, int32_t y_stride, int32_t rows, int32_t K4, int32_t N2,
                          int32_t y_zp)
{
    for (int32_t n = 0; n < N2; n += 2) {
        int32_t a0 = bias[n], a1 = bias[n + 1], a2 = a0, a3 = a1, a4 = a0, a5 = a1;
        const int32_t *x = xe;
        if (K4 <= TSH_FC_UNROLL) {   /* the common case without a loop: fewer live registers */
            FC_STEPS(a0, a1, a2, a3, a4, a5, x, w, K4);
        } else {
            for (int32_t g = 0; g < K4; g += TSH_FC_UNROLL) {
                int32_t steps = K4 - g < TSH_FC_UNROLL ? K4 - g : TSH_FC_UNROLL;
                FC_STEPS(a0, a1, a2, a3, a4, a5, x, w, steps);
            }
        }
        int32_t r0 = -shift[n], m0 = mult[n], d0 = 1 << (r0 - 1);
        int32_t r1 = -shift[n + 1], m1 = mult[n + 1], d1 = 1 << (r1 - 1);
        int8_t *yc = y + n;
        yc[0] = (int8_t)fc_rq_fast(a0, m0, d0, r0, y_zp);
        yc[1] = (int8_t)fc_rq_fast(a1, m1, d1, r1, y_zp);
        if (rows < 3) {   /* the last block of a layer: its missing rows were duplicates */
            if (rows == 2) {
                yc[y_stride] = (int8_t)fc_rq_fast(a2, m0, d0, r0, y_zp);
                yc[y_stride + 1] = (int8_t)fc_rq_fast(a3, m1, d1, r1, y_zp);
            }
            continue;
        }
        yc[y_stride] = (int8_t)fc_rq_fast(a2, m0, d0, r0, y_zp);
        yc[y_stride + 1] = (int8_t)fc_rq_fast(a3, m1, d1, r1, y_zp);
        yc[2 * y_stride] = (int8_t)fc_rq_fast(a4, m0, d0, r0, y_zp);
        yc[2 * y_stride + 1] = (int8_t)fc_rq_fast(a5, m1, d1, r1, y_zp);
    }
}

#endif

/* One row against one weight pair (both channels), SXTB16 on both sides. */
static void fc_row_pair(const int8_t *x, const int8_t *wp, int32_t K, int32_t *s0, int32_t *s1)
{
    int32_t K4 = K / 4, a0 = *s0, a1 = *s1;
    for (int32_t g = 0; g < K4; g++) {
        int32_t xv = tsh_read32(x + 4 * g), w0 = tsh_read32(wp + 8 * g), w1 = tsh_read32(wp + 8 * g + 4);
        int32_t xa = tsh_sxtb16(xv), xb = tsh_sxtb16_ror8(xv);
        a0 = tsh_smlad(xb, tsh_sxtb16_ror8(w0), tsh_smlad(xa, tsh_sxtb16(w0), a0));
        a1 = tsh_smlad(xb, tsh_sxtb16_ror8(w1), tsh_smlad(xa, tsh_sxtb16(w1), a1));
    }
    for (int32_t k = 4 * K4; k < K; k++) {
        a0 += x[k] * wpair_at(wp, K, 0, k);
        a1 += x[k] * wpair_at(wp, K, 1, k);
    }
    *s0 = a0;
    *s1 = a1;
}

static int32_t dot_s8(const int8_t *x, const int8_t *w, int32_t K, int32_t acc)
{
    int32_t k = 0;
    for (; k + 4 <= K; k += 4) {
        int32_t xv = tsh_read32(x + k), wv = tsh_read32(w + k);
        acc = tsh_smlad(tsh_sxtb16(xv), tsh_sxtb16(wv), acc);
        acc = tsh_smlad(tsh_sxtb16_ror8(xv), tsh_sxtb16_ror8(wv), acc);
    }
    for (; k < K; k++) acc += x[k] * w[k];
    return acc;
}
#else
static void fc_row_pair(const int8_t *x, const int8_t *wp, int32_t K, int32_t *s0, int32_t *s1)
{
    int32_t K4 = K / 4, a0 = *s0, a1 = *s1;
    for (int32_t g = 0; g < K4; g++, x += 4, wp += 8)
        for (int32_t j = 0; j < 4; j++) {
            a0 += x[j] * wp[j];
            a1 += x[j] * wp[4 + j];
        }
    for (int32_t k = 0; k < K - 4 * K4; k++) {
        a0 += x[k] * wp[k];
        a1 += x[k] * wp[K - 4 * K4 + k];
    }
    *s0 = a0;
    *s1 = a1;
}

static int32_t dot_s8(const int8_t *x, const int8_t *w, int32_t K, int32_t acc)
{
    for (int32_t k = 0; k < K; k++) acc += x[k] * w[k];
    return acc;
}
#endif

/* one row against a channel pair of mcu.kernels.pack_fc_weights_s16's layout starting at `wp`: per
 * 4 k the row's word split by SXTB16 into (k, k+2), (k+1, k+3), four SMLAD on the stored pairs */
static void fc_row_pair_w16(const int8_t *x, const int16_t *wp, int32_t K, int32_t *s0, int32_t *s1)
{
    int32_t a0 = *s0, a1 = *s1, K4 = K / 4, g = 0;
#if TSH_USE_DSP
    for (; g < K4; g++, wp += 8) {
        int32_t xv = tsh_read32(x + 4 * g), xa = tsh_sxtb16(xv), xb = tsh_sxtb16_ror8(xv), w[4];
        memcpy(w, wp, sizeof w);
        a0 = tsh_smlad(xb, w[1], tsh_smlad(xa, w[0], a0));
        a1 = tsh_smlad(xb, w[3], tsh_smlad(xa, w[2], a1));
    }
#else
    for (; g < K4; g++, wp += 8) {
        const int8_t *xg = x + 4 * g;
        a0 += xg[0] * wp[0] + xg[2] * wp[1] + xg[1] * wp[2] + xg[3] * wp[3];
        a1 += xg[0] * wp[4] + xg[2] * wp[5] + xg[1] * wp[6] + xg[3] * wp[7];
    }
#endif
    for (int32_t k = 0; k < K - 4 * K4; k++) {
        a0 += x[4 * K4 + k] * wp[k];
        a1 += x[4 * K4 + k] * wp[K - 4 * K4 + k];
    }
    *s0 = a0;
    *s1 = a1;
}

static int32_t dot_s8_s16(const int8_t *x, const int16_t *w, int32_t K, int32_t acc)
{
    for (int32_t k = 0; k < K; k++) acc += x[k] * w[k];
    return acc;
}

#if FC_PAIRS_ASM
/* two steps of 4 k of one row against a channel pair: the pair's weights as (k, k+2), (k+1, k+3)
 * int16 pairs of row 0, then of row 1 (int8: one LDM of 16 bytes into r0-r3, SXTB16 into r4-r7;
 * int16: one LDM of eight words into r0-r7), the row's pairs by LDRD, eight SMLAD */
#define FC_ROW_SMLAD(w0, w1, w2, w3)                                                               \
    "smlad %[a0], %[xa], " w0 ", %[a0]\n\t"                                                        \
    "smlad %[a0], %[xb], " w1 ", %[a0]\n\t"                                                        \
    "smlad %[a1], %[xa], " w2 ", %[a1]\n\t"                                                        \
    "smlad %[a1], %[xb], " w3 ", %[a1]\n\t"
#define FC_ROW_W8(w0, w1)                                                                          \
    "sxtb16 r4, " w0 "\n\t"                                                                         \
    "sxtb16 r5, " w0 ", ror #8\n\t"                                                                 \
    "sxtb16 r6, " w1 "\n\t"                                                                         \
    "sxtb16 r7, " w1 ", ror #8\n\t"
#define FC_ROW_ASM(steps)                                                                          \
    __asm__ volatile("1:\n\t" steps                                                                \
                     "ldr %[xa], %[end]\n\t"                                                        \
                     "cmp %[x], %[xa]\n\t"                                                          \
                     "bne 1b\n\t"                                                                   \
                     : [a0] "+r"(a0), [a1] "+r"(a1), [w] "+r"(wp), [x] "+r"(xp), [xa] "=&r"(xa),    \
                       [xb] "=&r"(xb)                                                               \
                     : [end] "m"(xend)                                                              \
                     : "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "memory", "cc")

/* One row against every channel pair (the rows outside the three-row blocks), K % 8 == 0: the row
 * sign-extended once as fc_extend3 does, then per two steps of 4 k the pair's weights, two LDRD of
 * the row and eight SMLAD: 22 (int8) or 14 (int16) instructions for 16 MACs with the loop;
 * fc_row_pair takes 28 (it extends the row again for every pair), fc_row_pair_w16 42 (its weight
 * words go through the stack). One body, one function per layout (`wide`: int16). */
static inline __attribute__((always_inline)) void fc_row_m4(const int8_t *x, const void *w, int wide,
                                                           const int32_t *bias, const int32_t *mult,
                                                           const int32_t *shift, int8_t *y, int32_t K, int32_t N2,
                                                           int32_t y_zp, int32_t act_min, int32_t act_max)
{
    int32_t xe[TSH_FC_KMAX / 2], K4 = K / 4;
    for (int32_t g = 0; g < K4; g++) {
        int32_t v = tsh_read32(x + 4 * g);
        xe[2 * g] = tsh_sxtb16(v);
        xe[2 * g + 1] = tsh_sxtb16_ror8(v);
    }
    const int32_t *xend = xe + 2 * K4;
    const void *wp = w;
    for (int32_t n = 0; n < N2; n += 2) {
        int32_t a0 = bias[n], a1 = bias[n + 1], xa, xb;
        const int32_t *xp = xe;
        if (wide)
            FC_ROW_ASM("ldm %[w]!, {r0, r1, r2, r3, r4, r5, r6, r7}\n\t"
                       "ldrd %[xa], %[xb], [%[x]], #16\n\t" FC_ROW_SMLAD("r0", "r1", "r2", "r3")
                       "ldrd %[xa], %[xb], [%[x], #-8]\n\t" FC_ROW_SMLAD("r4", "r5", "r6", "r7"));
        else
            FC_ROW_ASM("ldm %[w]!, {r0, r1, r2, r3}\n\t"
                       "ldrd %[xa], %[xb], [%[x]], #16\n\t" FC_ROW_W8("r0", "r1") FC_ROW_SMLAD("r4", "r5", "r6", "r7")
                       "ldrd %[xa], %[xb], [%[x], #-8]\n\t" FC_ROW_W8("r2", "r3") FC_ROW_SMLAD("r4", "r5", "r6", "r7"));
        y[n] = requant_clamp_ool(a0, mult[n], shift[n], y_zp, act_min, act_max);
        y[n + 1] = requant_clamp_ool(a1, mult[n + 1], shift[n + 1], y_zp, act_min, act_max);
    }
}

static void __attribute__((noinline)) fc_row_w8_asm(const int8_t *x, const void *w, const int32_t *bias,
                                                    const int32_t *mult, const int32_t *shift, int8_t *y, int32_t K,
                                                    int32_t N2, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    fc_row_m4(x, w, 0, bias, mult, shift, y, K, N2, y_zp, act_min, act_max);
}

static void __attribute__((noinline)) fc_row_w16_asm(const int8_t *x, const void *w, const int32_t *bias,
                                                     const int32_t *mult, const int32_t *shift, int8_t *y, int32_t K,
                                                     int32_t N2, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    fc_row_m4(x, w, 1, bias, mult, shift, y, K, N2, y_zp, act_min, act_max);
}

/* the odd last channel of a row (stored plainly after the pairs) */
static inline int32_t fc_dot_last(const int8_t *x, const void *w, int wide, int32_t N2, int32_t K, int32_t acc)
{
    return wide ? dot_s8_s16(x, (const int16_t *)w + N2 * K, K, acc) : dot_s8(x, (const int8_t *)w + N2 * K, K, acc);
}

/* The Cortex-M4 path of both weight layouts (`wide`: fc_s8w16's int16 steps), inlined into each
 * kernel: blocks of three rows (fc_pairs3_asm / fc_pairs3_w16_asm) while the requantisation is on
 * the short path (|acc| < 2^30: |bias| + K 2^14 with K <= 512; an int8 zero point folded into the
 * rounding), then the other rows one at a time (fc_row_w8_asm / fc_row_w16_asm) for K % 8 == 0.
 * Returns the first row it leaves to the kernel's C loop. */
static inline __attribute__((always_inline)) int32_t fc_m4(const int8_t *x, const void *w, int wide,
                                                          const int32_t *bias, const int32_t *mult,
                                                          const int32_t *shift, int8_t *y, int32_t M, int32_t K,
                                                          int32_t N, int32_t x_stride, int32_t y_stride, int32_t y_zp,
                                                          int32_t act_min, int32_t act_max)
{
    int32_t m = 0, N2 = N / 2 * 2;
    /* the register-blocked path needs 4-byte aligned weight groups */
    if (K <= TSH_FC_KMAX && K % 4 == 0 && ((uintptr_t)w & 3u) == 0 && M >= 2) {
        int32_t K4 = K / 4, fast = act_min == -128 && act_max == 127 && y_zp >= -128 && y_zp <= 127;
        for (int32_t n = 0; n < N2 && fast; n++)
            fast = mult[n] >= 0 && shift[n] <= -1 && shift[n] >= -23 && bias[n] < (1 << 29) && bias[n] > -(1 << 29);
        /* chunk c's base ch[c].x; the short first chunk (k0 steps) ends where the full ones do */
        struct fc_chunk ch[FC_CHUNKS];
        int32_t nch = (K4 + TSH_FC_UNROLL - 1) / TSH_FC_UNROLL, k0 = K4 - (nch - 1) * TSH_FC_UNROLL;
        for (int32_t c = 0; c < nch; c++) {
            ch[c].st.next = c + 1 < nch ? ch[c + 1].x : 0;
            ch[c].st.first = ch[0].x;
        }
        ch[0].st.c = 2 * y_zp + 1;
        ch[0].st.wend = (const int8_t *)w + (wide ? 2 : 1) * N2 * K;
        /* a step: int8 LDRD, 4 SXTB16, 3 LDRD, 12 SMLAD = 80 bytes; int16 LDM, 3 LDRD, 12 SMLAD = 64 */
        ch[0].st.skip = (wide ? 64 : 80) * (TSH_FC_UNROLL - k0);
        /* a last single row goes row by row below: cheaper than a block of three copies */
        for (; fast && N2 >= 2 && M - m >= 2; m += 3) {
            int32_t rows = M - m < 3 ? M - m : 3;
            const int8_t *x0 = x + m * x_stride;
            const int8_t *x1 = rows > 1 ? x0 + x_stride : x0, *x2 = rows > 2 ? x1 + x_stride : x1;
            int8_t *y0 = y + m * y_stride;
            for (int32_t c = 0; c < nch; c++) {
                int32_t g0 = c ? k0 + (c - 1) * TSH_FC_UNROLL : 0, n = c ? TSH_FC_UNROLL : k0;
                fc_extend3(x0 + 4 * g0, x1 + 4 * g0, x2 + 4 * g0, n, ch[c].x + 6 * (c ? 0 : TSH_FC_UNROLL - k0));
            }
            ch[0].st.bias = bias;
            ch[0].st.mult = mult;
            ch[0].st.shift = shift;
            ch[0].st.y = y0;
            ch[0].st.d1 = rows > 1 ? y_stride : 0;   /* a repeated row writes the same bytes again */
            ch[0].st.d2 = rows > 2 ? y_stride : 0;
            if (wide)
                fc_pairs3_w16_asm(ch[0].x, (const int16_t *)w);
            else
                fc_pairs3_asm(ch[0].x, (const int8_t *)w);
            if (N2 < N)
                for (int32_t r = 0; r < rows; r++)
                    y0[r * y_stride + N2] = requant_clamp_ool(fc_dot_last(x0 + r * x_stride, w, wide, N2, K, bias[N2]),
                                                              mult[N2], shift[N2], y_zp, act_min, act_max);
        }
    }
    if (K % 8 == 0 && K <= TSH_FC_KMAX && ((uintptr_t)w & 3u) == 0 && N2 >= 2)
        for (; m < M; m++) {
            const int8_t *xr = x + m * x_stride;
            int8_t *yr = y + m * y_stride;
            if (wide)
                fc_row_w16_asm(xr, w, bias, mult, shift, yr, K, N2, y_zp, act_min, act_max);
            else
                fc_row_w8_asm(xr, w, bias, mult, shift, yr, K, N2, y_zp, act_min, act_max);
            if (N2 < N)
                yr[N2] = requant_clamp_ool(fc_dot_last(xr, w, wide, N2, K, bias[N2]), mult[N2], shift[N2], y_zp,
                                           act_min, act_max);
        }
    return m;
}
#endif

void tsh_fc_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
               const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
               int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    int32_t m = 0, N2 = N / 2 * 2;
#if TSH_USE_MVE
    if (tsh_mve_fc_s8(x, w, bias, mult, shift, y, M, K, N, x_stride, y_stride, y_zp, act_min, act_max)) return;
#endif
#if FC_PAIRS_ASM
    m = fc_m4(x, w, 0, bias, mult, shift, y, M, K, N, x_stride, y_stride, y_zp, act_min, act_max);
#elif TSH_USE_DSP
    /* other DSP cores: blocks of three rows, channel pairs, the short requantisation (conditions as
     * in fc_m4), in C */
    if (K <= TSH_FC_KMAX && K % 4 == 0 && ((uintptr_t)w & 3u) == 0 && M >= 2) {
        int32_t K4 = K / 4, fast = act_min == -128 && act_max == 127 && y_zp >= -128 && y_zp <= 127;
        for (int32_t n = 0; n < N2 && fast; n++)
            fast = mult[n] >= 0 && shift[n] <= -1 && shift[n] >= -23 && bias[n] < (1 << 29) && bias[n] > -(1 << 29);
        int32_t xe[6 * (TSH_FC_KMAX / 4)];
        for (; fast && m < M; m += 3) {
            int32_t rows = M - m < 3 ? M - m : 3;
            const int8_t *x0 = x + m * x_stride;
            const int8_t *x1 = rows > 1 ? x0 + x_stride : x0, *x2 = rows > 2 ? x1 + x_stride : x1;
            int8_t *y0 = y + m * y_stride;
            fc_extend3(x0, x1, x2, K4, xe);
            fc_rows3_fast(xe, w, bias, mult, shift, y0, y_stride, rows, K4, N2, y_zp);
            if (N2 < N)
                for (int32_t r = 0; r < rows; r++)
                    y0[r * y_stride + N2] = requant_clamp(dot_s8(x0 + r * x_stride, w + N2 * K, K, bias[N2]),
                                                          mult[N2], shift[N2], y_zp, act_min, act_max);
        }
    }
#endif
    for (; m < M; m++) {
        const int8_t *xr = x + m * x_stride;
        int8_t *yr = y + m * y_stride;
        for (int32_t n = 0; n < N2; n += 2) {
            int32_t a0 = bias[n], a1 = bias[n + 1];
            fc_row_pair(xr, w + n * K, K, &a0, &a1);
            yr[n] = requant_clamp(a0, mult[n], shift[n], y_zp, act_min, act_max);
            yr[n + 1] = requant_clamp(a1, mult[n + 1], shift[n + 1], y_zp, act_min, act_max);
        }
        if (N2 < N)
            yr[N2] = requant_clamp(dot_s8(xr, w + N2 * K, K, bias[N2]), mult[N2], shift[N2], y_zp, act_min, act_max);
    }
}

void tsh_fc_s8w16(const int8_t *x, const int16_t *w, const int32_t *bias, const int32_t *mult,
                  const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
                  int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max)
{
    int32_t m = 0, N2 = N / 2 * 2;
#if FC_PAIRS_ASM
    m = fc_m4(x, w, 1, bias, mult, shift, y, M, K, N, x_stride, y_stride, y_zp, act_min, act_max);
#endif
    /* the rows and parameters the Cortex-M4 path does not take, other cores, the host: row by row */
    for (; m < M; m++) {
        const int8_t *xr = x + m * x_stride;
        int8_t *yr = y + m * y_stride;
        for (int32_t n = 0; n < N2; n += 2) {
            int32_t a0 = bias[n], a1 = bias[n + 1];
            fc_row_pair_w16(xr, w + n * K, K, &a0, &a1);
            yr[n] = requant_clamp(a0, mult[n], shift[n], y_zp, act_min, act_max);
            yr[n + 1] = requant_clamp(a1, mult[n + 1], shift[n + 1], y_zp, act_min, act_max);
        }
        if (N2 < N)
            yr[N2] = requant_clamp(dot_s8_s16(xr, w + N2 * K, K, bias[N2]), mult[N2], shift[N2], y_zp, act_min, act_max);
    }
}

/* sum_t x[t] w[t] and sum_t w[t] in one pass (the key sums of matmul_qk come for free) */
static int32_t dot_sum_s8(const int8_t *x, const int8_t *w, int32_t K, int32_t *wsum)
{
    int32_t acc = 0, ws = 0, k = 0;
#if TSH_USE_DSP
    const int32_t ones = 0x00010001;
    for (; k + 4 <= K; k += 4) {
        int32_t xv = tsh_read32(x + k), wv = tsh_read32(w + k);
        int32_t wa = tsh_sxtb16(wv), wb = tsh_sxtb16_ror8(wv);
        acc = tsh_smlad(tsh_sxtb16(xv), wa, acc);
        acc = tsh_smlad(tsh_sxtb16_ror8(xv), wb, acc);
        ws = tsh_smlad(wa, ones, tsh_smlad(wb, ones, ws));
    }
#endif
    for (; k < K; k++) {
        acc += x[k] * w[k];
        ws += w[k];
    }
    *wsum = ws;
    return acc;
}

#if TSH_USE_DSP
/* Two queries x two keys: q.k for the four pairs and the two key sums, SXTB16 + SMLAD. */
static void qk_block2x2(const int8_t *q0, const int8_t *q1, const int8_t *k0, const int8_t *k1, int32_t dh,
                        int32_t *acc, int32_t *ks)
{
    const int32_t ones = 0x00010001;
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, s0 = 0, s1 = 0, t = 0;
    for (; t + 4 <= dh; t += 4) {
        int32_t x0 = tsh_read32(q0 + t), x1 = tsh_read32(q1 + t), y0 = tsh_read32(k0 + t), y1 = tsh_read32(k1 + t);
        int32_t x0a = tsh_sxtb16(x0), x0b = tsh_sxtb16_ror8(x0), x1a = tsh_sxtb16(x1), x1b = tsh_sxtb16_ror8(x1);
        int32_t y0a = tsh_sxtb16(y0), y0b = tsh_sxtb16_ror8(y0), y1a = tsh_sxtb16(y1), y1b = tsh_sxtb16_ror8(y1);
        a00 = tsh_smlad(x0b, y0b, tsh_smlad(x0a, y0a, a00));
        a01 = tsh_smlad(x0b, y1b, tsh_smlad(x0a, y1a, a01));
        a10 = tsh_smlad(x1b, y0b, tsh_smlad(x1a, y0a, a10));
        a11 = tsh_smlad(x1b, y1b, tsh_smlad(x1a, y1a, a11));
        s0 = tsh_smlad(y0b, ones, tsh_smlad(y0a, ones, s0));
        s1 = tsh_smlad(y1b, ones, tsh_smlad(y1a, ones, s1));
    }
    for (; t < dh; t++) {
        a00 += q0[t] * k0[t]; a01 += q0[t] * k1[t];
        a10 += q1[t] * k0[t]; a11 += q1[t] * k1[t];
        s0 += k0[t]; s1 += k1[t];
    }
    acc[0] = a00; acc[1] = a01; acc[2] = a10; acc[3] = a11;
    ks[0] = s0; ks[1] = s1;
}
#endif

#if TSH_USE_DSP
#define TSH_ATT_DMAX 256      /* head widths the blocked attention matmuls take (4 KB of stack) */
#define TSH_PV_LKMAX 512      /* keys of the blocked p.v (its 4 transposed columns: 4 KB of stack) */

static inline int32_t pair16(int32_t v) { return (int32_t)((uint32_t)(uint16_t)v * 0x10001u); }

/* Four query rows as (q - zq) int16 pairs, interleaved per 4 t: row r's (t, t+2) and (t+1, t+3)
 * pairs at xe[8 g + 2 r], xe[8 g + 2 r + 1]; qs[r] = sum_t (q - zq). Missing rows repeat row 0. */
static void qk_extend4(const int8_t *q, int32_t q_stride, int32_t rows, int32_t dh4, int32_t q_zp,
                       int32_t *xe, int32_t *qs)
{
    const int32_t zz = pair16(q_zp), ones = 0x00010001;
    for (int32_t r = 0; r < 4; r++) {
        const int8_t *src = q + (r < rows ? r : 0) * q_stride;
        int32_t sum = 0;
        for (int32_t g = 0; g < dh4; g++) {
            int32_t v = tsh_read32(src + 4 * g);
            int32_t a = tsh_ssub16(tsh_sxtb16(v), zz), b = tsh_ssub16(tsh_sxtb16_ror8(v), zz);
            xe[8 * g + 2 * r] = a;
            xe[8 * g + 2 * r + 1] = b;
            sum = tsh_smlad(a, ones, tsh_smlad(b, ones, sum));
        }
        qs[r] = sum;
    }
}

/* one query row's two pairs of the step (one LDRD on Cortex-M) into accumulator a */
#if TSH_DSP_ASM
#define QK_ROW(a)                                                                                  \
    do {                                                                                           \
        __asm__("ldrd %0, %1, [%2], #8" : "=&r"(u), "=&r"(w), "+r"(x) : : "memory");               \
        a = tsh_smlad(w, kb, tsh_smlad(u, ka, a));                                                 \
    } while (0)
#else
#define QK_ROW(a)                                                                                  \
    do {                                                                                           \
        u = x[0];                                                                                  \
        w = x[1];                                                                                  \
        x += 2;                                                                                    \
        a = tsh_smlad(w, kb, tsh_smlad(u, ka, a));                                                 \
    } while (0)
#endif

#if FC_PAIRS_ASM   /* the same Cortex-M4 condition: 14 registers for one asm block */
#define QK_STEPS 16       /* head widths up to 64 take the straight-line key loop below */

struct qk_state {         /* just above the extended rows (x_end); the asm uses these offsets */
    int32_t c[4];         /* 0 .. 12: the accumulators' start, -k_zp sum_t (q - zq) per query */
    int32_t kdelta;       /* 16: from the end of a key row to the next row */
    int32_t d1, d2, d3;   /* 20 24 28: query row r's output - row r-1's (a repeated row: back to row 0) */
    const int8_t *send;   /* 32: row 0's output end: the loop's stop */
    const int32_t *start; /* 36: the first executed step's rows */
    uint32_t entry;       /* 40: the first executed step (Thumb address) */
    int32_t m, rnd, right;/* 44 48 52: the requantisation (zero point in the rounding term) */
    int32_t skip;         /* 56: bytes of steps skipped, 52 (QK_STEPS - dh / 4) */
};

struct qk_block {         /* the four extended query rows, 32 bytes a step, then the state */
    int32_t x[8 * QK_STEPS];
    struct qk_state st;
};

/* Four queries (extended as qk_extend4 lays them out, the last dh / 4 steps of `x`) against every
 * key, in assembly: per step of 4 t one load of the key word, two SXTB16, two LDM of two query rows'
 * pairs each and eight SMLAD (13 instructions for 16 MACs), straight-line code entered part way;
 * then the four scores requantised in place as in fc_pairs3_asm (zero point folded into the
 * rounding term) and stored down the column. r0-r3 are the LDM lists; the state sits at x_end. */
static void qk_keys_asm(struct qk_state *st, const int8_t *k, int8_t *s)
{
    int32_t a0, a1, a2, a3, ka, kb;
    const int32_t *w;
    __asm__ volatile(
        "adr %[w], 3f\n\t"
        "ldr %[ka], [%[x], #56]\n\t"
        "add %[w], %[w], %[ka]\n\t"
        "orr %[w], %[w], #1\n\t"
        "str %[w], [%[x], #40]\n"
        "1:\n\t"
        "ldrd %[a0], %[a1], [%[x], #0]\n\t"
        "ldrd %[a2], %[a3], [%[x], #8]\n\t"
        "ldr %[w], [%[x], #36]\n\t"
        "ldr pc, [%[x], #40]\n\t"
        ".p2align 2\n"
        "3:\n\t"
        ".rept " TSH_STR(QK_STEPS) "\n\t"
        "ldr.w %[ka], [%[k]], #4\n\t"
        "sxtb16 %[kb], %[ka], ror #8\n\t"
        "sxtb16 %[ka], %[ka]\n\t"
        "ldm.w %[w]!, {r0, r1, r2, r3}\n\t"
        "smlad %[a0], r0, %[ka], %[a0]\n\t"
        "smlad %[a0], r1, %[kb], %[a0]\n\t"
        "smlad %[a1], r2, %[ka], %[a1]\n\t"
        "smlad %[a1], r3, %[kb], %[a1]\n\t"
        "ldm.w %[w]!, {r0, r1, r2, r3}\n\t"
        "smlad %[a2], r0, %[ka], %[a2]\n\t"
        "smlad %[a2], r1, %[kb], %[a2]\n\t"
        "smlad %[a3], r2, %[ka], %[a3]\n\t"
        "smlad %[a3], r3, %[kb], %[a3]\n\t"
        ".endr\n\t"
        "ldr %[ka], [%[x], #44]\n\t"
        "ldr %[kb], [%[x], #48]\n\t"
        "ldr %[w], [%[x], #52]\n\t"
        FC_RQ("%[a0]", "%[ka]", "%[kb]", "%[w]")
        FC_RQ("%[a1]", "%[ka]", "%[kb]", "%[w]")
        FC_RQ("%[a2]", "%[ka]", "%[kb]", "%[w]")
        FC_RQ("%[a3]", "%[ka]", "%[kb]", "%[w]")
        "ldrd r0, r1, [%[x], #20]\n\t"
        "ldr r2, [%[x], #28]\n\t"
        "strb %[a0], [%[s]], #1\n\t"
        "add r3, %[s], r0\n\t"
        "strb %[a1], [r3, #-1]\n\t"
        "add r3, r3, r1\n\t"
        "strb %[a2], [r3, #-1]\n\t"
        "add r3, r3, r2\n\t"
        "strb %[a3], [r3, #-1]\n\t"
        "ldr r0, [%[x], #16]\n\t"
        "add %[k], %[k], r0\n\t"
        "ldr r0, [%[x], #32]\n\t"
        "cmp %[s], r0\n\t"
        "bne 1b\n\t"
        : [a0] "=&r"(a0), [a1] "=&r"(a1), [a2] "=&r"(a2), [a3] "=&r"(a3), [ka] "=&r"(ka), [kb] "=&r"(kb),
          [w] "=&r"(w), [k] "+&r"(k), [s] "+&r"(s)
        : [x] "r"(st)
        : "r0", "r1", "r2", "r3", "memory", "cc");
}

/* matmul_qk through qk_keys_asm: four queries at a time, the missing rows of the last block
 * repeating row 0 (stored over row 0 again, the same bytes) */
static void qk_asm(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                   int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                   const tsh_rq_t *rq)
{
    struct qk_block blk;
    int32_t qs[4], dh4 = dh / 4;
    blk.st.m = rq->mult;
    blk.st.rnd = (int32_t)((uint32_t)(2 * rq->zp + 1) << rq->right) >> 1;
    blk.st.right = rq->right;
    blk.st.kdelta = k_stride - dh;
    blk.st.skip = 52 * (QK_STEPS - dh4);
    blk.st.start = blk.x + 8 * (QK_STEPS - dh4);
    for (int32_t i = 0; i < Lq; i += 4) {
        int32_t rows = Lq - i < 4 ? Lq - i : 4;
        qk_extend4(q + i * q_stride, q_stride, rows, dh4, q_zp, blk.x + 8 * (QK_STEPS - dh4), qs);
        for (int32_t r = 0; r < 4; r++) blk.st.c[r] = -k_zp * qs[r];
        /* row r's output at row (r < rows ? r : 0) */
        blk.st.d1 = rows > 1 ? s_stride : 0;
        blk.st.d2 = rows > 2 ? s_stride : -blk.st.d1;
        blk.st.d3 = rows > 3 ? s_stride : (rows > 2 ? -2 * s_stride : 0);
        int8_t *si = s + i * s_stride;
        blk.st.send = si + Lk;
        qk_keys_asm(&blk.st, k, si);
    }
}
#endif

/* matmul_qk for dh % 4 == 0: blocks of four queries against one key, the queries extended once
 * (zero point subtracted), each key word split by two SXTB16 and used by eight SMLAD;
 * sum (q - zq)(k - zk) = sum (q - zq) k - zk sum (q - zq). */
static void qk_blocked(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                       int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                       const tsh_rq_t *rq)
{
    int32_t xe[2 * TSH_ATT_DMAX], qs[4], dh4 = dh / 4;
    /* |acc| <= 2 dh 255 128 < 2^30 for dh <= TSH_ATT_DMAX: the short requantisation needs no range
     * check, its parameters stay in registers */
#if TSH_DSP_ASM
    const int32_t fast = rq->fast, m = rq->mult, rnd = rq->rnd, right = rq->right, zp = rq->zp;
#define QK_RQ(acc) (fast ? (int8_t)tsh_rq_short(acc, m, rnd, right, zp) : rq_slow(rq, acc))
#else
#define QK_RQ(acc) tsh_rq(rq, acc)
#endif
#if FC_PAIRS_ASM
    if (fast && dh <= 4 * QK_STEPS && zp >= -128 && zp <= 127 && Lk >= 1) {
        qk_asm(q, k, s, Lq, Lk, dh, q_stride, k_stride, s_stride, q_zp, k_zp, rq);
        return;
    }
#endif
    for (int32_t i = 0; i < Lq; i += 4) {
        int32_t rows = Lq - i < 4 ? Lq - i : 4;
        qk_extend4(q + i * q_stride, q_stride, rows, dh4, q_zp, xe, qs);
        int32_t c0 = -k_zp * qs[0], c1 = -k_zp * qs[1], c2 = -k_zp * qs[2], c3 = -k_zp * qs[3];
        int8_t *si = s + i * s_stride;
        for (int32_t j = 0; j < Lk; j++) {
            const int8_t *kj = k + j * k_stride;
            const int32_t *x = xe;
            int32_t a0 = c0, a1 = c1, a2 = c2, a3 = c3;
            for (int32_t g = 0; g < dh4; g++) {
                int32_t kv = tsh_read32(kj + 4 * g), ka = tsh_sxtb16(kv), kb = tsh_sxtb16_ror8(kv), u, w;
                QK_ROW(a0);
                QK_ROW(a1);
                QK_ROW(a2);
                QK_ROW(a3);
            }
            si[j] = QK_RQ(a0);
            if (rows > 1) si[s_stride + j] = QK_RQ(a1);
            if (rows > 2) si[2 * s_stride + j] = QK_RQ(a2);
            if (rows > 3) si[3 * s_stride + j] = QK_RQ(a3);
        }
    }
}

#if FC_PAIRS_ASM
#define PV_ASM_PAIR(x)                                                                             \
    "ldm %[c]!, {r4, r5, r6, r7}\n\t"                                                             \
    "smlad %[a0], " x ", r4, %[a0]\n\t"                                                           \
    "smlad %[a1], " x ", r5, %[a1]\n\t"                                                           \
    "smlad %[a2], " x ", r6, %[a2]\n\t"                                                           \
    "smlad %[a3], " x ", r7, %[a3]\n\t"
#define PV_ASM_8 "ldm %[pp]!, {r0, r1, r2, r3}\n\t" PV_ASM_PAIR("r0") PV_ASM_PAIR("r1") PV_ASM_PAIR("r2") PV_ASM_PAIR("r3")

/* Every row of pv_rows in assembly when Lk % 16 == 0, the rows are word aligned and the short
 * requantisation needs no range check (|acc| <= 128 * 2^15 * 255 < 2^30 for Lk <= 128): per row
 * the key groups above, the four outputs requantised in place as in fc_pairs3_asm (zero point in
 * the rounding term) and stored; what the loop does not keep in registers is read from the stack. */
static void pv_rows_asm(const int16_t *pp, const int32_t *vt, int8_t *y, int32_t Lq, int32_t Lk, int32_t p_stride,
                        int32_t y_stride, int32_t m, int32_t rnd, int32_t right)
{
    const int32_t *cend = vt + 2 * Lk, *c;
    int32_t pdelta = 2 * (p_stride - Lk), a0, a1, a2, a3;
    int8_t *yend = y + Lq * y_stride;
    __asm__ volatile(
        "2:\n\t"
        "movs %[a0], #0\n\t"
        "movs %[a1], #0\n\t"
        "movs %[a2], #0\n\t"
        "movs %[a3], #0\n\t"
        "ldr %[c], %[vt]\n"
        "1:\n\t"
        PV_ASM_8 PV_ASM_8
        "ldr r0, %[end]\n\t"
        "cmp %[c], r0\n\t"
        "bne 1b\n\t"
        "ldr r0, %[m]\n\t"
        "ldr r1, %[rnd]\n\t"
        "ldr r2, %[r]\n\t"
        FC_RQ("%[a0]", "r0", "r1", "r2")
        FC_RQ("%[a1]", "r0", "r1", "r2")
        FC_RQ("%[a2]", "r0", "r1", "r2")
        FC_RQ("%[a3]", "r0", "r1", "r2")
        "ldr r3, %[y]\n\t"
        "strb %[a0], [r3]\n\t"
        "strb %[a1], [r3, #1]\n\t"
        "strb %[a2], [r3, #2]\n\t"
        "strb %[a3], [r3, #3]\n\t"
        "ldr r1, %[ys]\n\t"
        "add r3, r3, r1\n\t"
        "str r3, %[y]\n\t"
        "ldr r0, %[pd]\n\t"
        "add %[pp], %[pp], r0\n\t"
        "ldr r0, %[yend]\n\t"
        "cmp r3, r0\n\t"
        "bne 2b\n\t"
        : [a0] "=&r"(a0), [a1] "=&r"(a1), [a2] "=&r"(a2), [a3] "=&r"(a3), [pp] "+&r"(pp), [c] "=&r"(c),
          [y] "+m"(y)
        : [vt] "m"(vt), [end] "m"(cend), [m] "m"(m), [rnd] "m"(rnd), [r] "m"(right), [ys] "m"(y_stride),
          [pd] "m"(pdelta), [yend] "m"(yend)
        : "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "memory", "cc");
}
#endif

/* The rows of matmul_pv against four transposed columns `vt` (see pv_blocked): per probability
 * row and two keys one load of p, two LDRD of the pairs, four SMLAD; the short requantisation
 * when the accumulator allows it. A function of its own so that its few spills sit near the
 * stack pointer, not beyond pv_blocked's 4 KB table (three instructions per access there). */
static void __attribute__((noinline)) pv_rows(const int16_t *p, const int32_t *vt, const int8_t *vl, int8_t *y,
                                              int32_t Lq, int32_t Lk, int32_t p_stride, int32_t y_stride,
                                              int32_t v_zp, const tsh_rq_t *rq)
{
    const int32_t *cend = vt + 4 * (Lk / 2);
#if TSH_DSP_ASM
    const int32_t fast = rq->fast, m = rq->mult, rnd = rq->rnd, right = rq->right, zp = rq->zp;
    /* tsh_rq's short path for |acc| < 2^30 (a probability row of large values can exceed it) */
#define PV_RQ(acc) (fast && (uint32_t)(acc) + (1u << 30) < (1u << 31) ? (int8_t)tsh_rq_short(acc, m, rnd, right, zp) \
                                                                     : rq_slow(rq, acc))
#else
#define PV_RQ(acc) tsh_rq(rq, acc)
#endif
#if FC_PAIRS_ASM
    /* whole groups of 16 keys in assembly when every row is word aligned (LDM) */
    int32_t aligned = ((uintptr_t)p & 3u) == 0 && (p_stride & 1) == 0;
    const int32_t *c16 = aligned ? vt + 32 * (Lk / 16) : vt;
    if (aligned && Lk % 16 == 0 && Lk <= 128 && Lq >= 1 && fast && zp >= -128 && zp <= 127 && v_zp >= -128 &&
        v_zp <= 127) {
        pv_rows_asm(p, vt, y, Lq, Lk, p_stride, y_stride, m, (int32_t)((uint32_t)(2 * zp + 1) << right) >> 1, right);
        return;
    }
#endif
    for (int32_t i = 0; i < Lq; i++) {
        const int16_t *pi = p + i * p_stride, *pp = pi;
        const int32_t *c = vt;
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#if FC_PAIRS_ASM
        /* per 8 keys: one LDM of four probability pairs, then per pair one LDM of the four columns'
         * (v_j, v_j+1) pairs and four SMLAD: 21 instructions for 32 MACs; r0-r7 are the LDM lists */
        if (c < c16)
            __asm__ volatile(
                "1:\n\t"
                PV_ASM_8 PV_ASM_8
                "ldr r0, %[end]\n\t"
                "cmp %[c], r0\n\t"
                "bne 1b\n\t"
                : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [pp] "+r"(pp), [c] "+r"(c)
                : [end] "m"(c16)
                : "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "memory", "cc");
#endif
        while (c < cend) {
            int32_t x, u0, u1, u2, u3;
            memcpy(&x, pp, sizeof x);
            pp += 2;
#if TSH_DSP_ASM
            __asm__("ldrd %0, %1, [%4], #8\n\tldrd %2, %3, [%4], #8"
                    : "=&r"(u0), "=&r"(u1), "=&r"(u2), "=&r"(u3), "+r"(c) : : "memory");
#else
            u0 = c[0]; u1 = c[1]; u2 = c[2]; u3 = c[3];
            c += 4;
#endif
            a0 = tsh_smlad(x, u0, a0);
            a1 = tsh_smlad(x, u1, a1);
            a2 = tsh_smlad(x, u2, a2);
            a3 = tsh_smlad(x, u3, a3);
        }
        if (Lk & 1) {
            int32_t pl = pi[Lk - 1];
            a0 += pl * (vl[0] - v_zp); a1 += pl * (vl[1] - v_zp);
            a2 += pl * (vl[2] - v_zp); a3 += pl * (vl[3] - v_zp);
        }
        int8_t *yi = y + i * y_stride;
        yi[0] = PV_RQ(a0); yi[1] = PV_RQ(a1); yi[2] = PV_RQ(a2); yi[3] = PV_RQ(a3);
    }
#undef PV_RQ
}

/* matmul_pv for dh % 4 == 0, Lk <= TSH_PV_LKMAX: four columns of v at a time, transposed once into
 * (key j, key j+1) int16 pairs of v - zv, the four columns' pairs of a key pair side by side, then
 * every probability row against them (pv_rows). */
static void pv_blocked(const int16_t *p, const int8_t *v, int8_t *y, int32_t Lq, int32_t Lk, int32_t dh,
                       int32_t p_stride, int32_t v_stride, int32_t y_stride, int32_t v_zp, const tsh_rq_t *rq)
{
    int32_t vt[4 * (TSH_PV_LKMAX / 2)], L2 = Lk / 2;
    const int32_t zz = pair16(v_zp);
    for (int32_t t = 0; t < dh; t += 4) {
        for (int32_t jp = 0; jp < L2; jp++) {
            const int8_t *v0 = v + 2 * jp * v_stride + t;
            int32_t w0 = tsh_read32(v0), w1 = tsh_read32(v0 + v_stride);
            int32_t e0 = tsh_sxtb16(w0), o0 = tsh_sxtb16_ror8(w0), e1 = tsh_sxtb16(w1), o1 = tsh_sxtb16_ror8(w1);
            int32_t *c = vt + 4 * jp;
            c[0] = tsh_ssub16(tsh_pkhbt(e0, e1), zz);
            c[1] = tsh_ssub16(tsh_pkhbt(o0, o1), zz);
            c[2] = tsh_ssub16(tsh_pkhtb(e1, e0), zz);
            c[3] = tsh_ssub16(tsh_pkhtb(o1, o0), zz);
        }
        /* the odd last key, if any, plainly */
        pv_rows(p, vt, v + (Lk - 1) * v_stride + t, y + t, Lq, Lk, p_stride, y_stride, v_zp, rq);
    }
}
#endif

static int32_t row_sum_s8(const int8_t *x, int32_t n)
{
    int32_t s = 0;
    for (int32_t t = 0; t < n; t++) s += x[t];
    return s;
}

void tsh_matmul_qk_s8(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                      int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                      int32_t mult, int32_t shift, int32_t s_zp)
{
    /* sum (q - zq)(k - zk) = sum q k - zk sum q - zq sum k + dh zq zk */
#if TSH_USE_MVE
    if (tsh_mve_matmul_qk_s8(q, k, s, Lq, Lk, dh, q_stride, k_stride, s_stride, q_zp, k_zp, mult, shift, s_zp)) return;
#endif
    tsh_rq_t rq = tsh_rq_make(mult, shift, s_zp, -128, 127);
    int32_t i = 0;
#if TSH_USE_DSP
    if (dh % 4 == 0 && dh <= TSH_ATT_DMAX) {
        qk_blocked(q, k, s, Lq, Lk, dh, q_stride, k_stride, s_stride, q_zp, k_zp, &rq);
        return;
    }
    for (; i + 2 <= Lq; i += 2) {
        const int8_t *q0 = q + i * q_stride, *q1 = q0 + q_stride;
        int32_t b0 = dh * q_zp * k_zp - k_zp * row_sum_s8(q0, dh), b1 = dh * q_zp * k_zp - k_zp * row_sum_s8(q1, dh);
        int8_t *s0 = s + i * s_stride, *s1 = s0 + s_stride;
        int32_t j = 0;
        for (; j + 2 <= Lk; j += 2) {
            int32_t acc[4], ks[2];
            qk_block2x2(q0, q1, k + j * k_stride, k + (j + 1) * k_stride, dh, acc, ks);
            int32_t c0 = q_zp * ks[0], c1 = q_zp * ks[1];
            s0[j] = tsh_rq(&rq, acc[0] + b0 - c0);
            s0[j + 1] = tsh_rq(&rq, acc[1] + b0 - c1);
            s1[j] = tsh_rq(&rq, acc[2] + b1 - c0);
            s1[j + 1] = tsh_rq(&rq, acc[3] + b1 - c1);
        }
        for (; j < Lk; j++) {
            int32_t ksum, d0 = dot_sum_s8(q0, k + j * k_stride, dh, &ksum), d1 = dot_sum_s8(q1, k + j * k_stride, dh, &ksum);
            s0[j] = tsh_rq(&rq, d0 + b0 - q_zp * ksum);
            s1[j] = tsh_rq(&rq, d1 + b1 - q_zp * ksum);
        }
    }
#endif
    for (; i < Lq; i++) {
        const int8_t *qi = q + i * q_stride;
        int32_t base = dh * q_zp * k_zp - k_zp * row_sum_s8(qi, dh);
        for (int32_t j = 0; j < Lk; j++) {
            int32_t ksum;
            int32_t dot = dot_sum_s8(qi, k + j * k_stride, dh, &ksum);
            s[i * s_stride + j] = tsh_rq(&rq, dot + base - q_zp * ksum);
        }
    }
}

void tsh_matmul_pv_s8(const int16_t *p, const int8_t *v, int8_t *y, int32_t Lq, int32_t Lk, int32_t dh,
                      int32_t p_stride, int32_t v_stride, int32_t y_stride, int32_t v_zp, int32_t mult,
                      int32_t shift, int32_t y_zp)
{
    /* sum_j p_j (v_j - zv) = sum_j p_j v_j - zv sum_j p_j */
#if TSH_USE_MVE
    if (tsh_mve_matmul_pv_s8(p, v, y, Lq, Lk, dh, p_stride, v_stride, y_stride, v_zp, mult, shift, y_zp)) return;
#endif
    tsh_rq_t rq = tsh_rq_make(mult, shift, y_zp, -128, 127);
#if TSH_USE_DSP
    if (dh % 4 == 0 && Lk <= TSH_PV_LKMAX) {
        pv_blocked(p, v, y, Lq, Lk, dh, p_stride, v_stride, y_stride, v_zp, &rq);
        return;
    }
#endif
    for (int32_t i = 0; i < Lq; i++) {
        const int16_t *pi = p + i * p_stride;
        int32_t psum = 0;
        for (int32_t j = 0; j < Lk; j++) psum += pi[j];
        int32_t t = 0;
#if TSH_USE_DSP
        for (; t + 4 <= dh; t += 4) {          /* two keys x four columns a step (tsh_pv4) */
            int32_t a[4];
            tsh_pv4(pi, v + t, Lk, v_stride, a);
            int8_t *yi = y + i * y_stride + t;
            yi[0] = tsh_rq(&rq, a[0] - v_zp * psum);
            yi[1] = tsh_rq(&rq, a[1] - v_zp * psum);
            yi[2] = tsh_rq(&rq, a[2] - v_zp * psum);
            yi[3] = tsh_rq(&rq, a[3] - v_zp * psum);
        }
        /* two keys x two columns a step: the probabilities are already int16 pairs; the bytes
         * v[j][t], v[j][t+1], v[j+1][t], v[j+1][t+1] in one word split by SXTB16 into the
         * (v[j][t], v[j+1][t]) and (v[j][t+1], v[j+1][t+1]) pairs */
        for (; t + 2 <= dh; t += 2) {
            int32_t a0 = 0, a1 = 0, j = 0;
            for (; j + 2 <= Lk; j += 2) {
                int32_t pp;
                memcpy(&pp, pi + j, sizeof pp);
                const uint8_t *v0 = (const uint8_t *)(v + j * v_stride + t), *v1 = v0 + v_stride;
                int32_t vv = (int32_t)((uint32_t)v0[0] | (uint32_t)v0[1] << 8 | (uint32_t)v1[0] << 16 |
                                       (uint32_t)v1[1] << 24);
                a0 = tsh_smlad(pp, tsh_sxtb16(vv), a0);
                a1 = tsh_smlad(pp, tsh_sxtb16_ror8(vv), a1);
            }
            for (; j < Lk; j++) {
                a0 += pi[j] * v[j * v_stride + t];
                a1 += pi[j] * v[j * v_stride + t + 1];
            }
            y[i * y_stride + t] = tsh_rq(&rq, a0 - v_zp * psum);
            y[i * y_stride + t + 1] = tsh_rq(&rq, a1 - v_zp * psum);
        }
#endif
        for (; t < dh; t++) {
            int32_t acc = 0;
            for (int32_t j = 0; j < Lk; j++) acc += pi[j] * v[j * v_stride + t];
            y[i * y_stride + t] = tsh_rq(&rq, acc - v_zp * psum);
        }
    }
}

/* conv2d = fully connected over patches (mcu.kernels.conv2d_s8): six output pixels' patches at a
 * time (padding = x_zp, zero tail up to a multiple of 4) go through tsh_fc_s8 (two of its
 * three-row blocks per call). Taps of a few channels are copied byte by byte: a memcpy call per
 * tap costs more than the bytes. */
#define TSH_CONV_ROWS 6

static inline void conv_tap(int8_t *dst, const int8_t *src, int32_t n)
{
    if (n > 8) {
        memcpy(dst, src, (size_t)n);
        return;
    }
    for (int32_t c = 0; c < n; c++) dst[c] = src[c];
}

void tsh_conv2d_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
                   const int32_t *shift, int8_t *y, int32_t H, int32_t W, int32_t Cin, int32_t Cout,
                   int32_t Hout, int32_t Wout, int32_t ksize, int32_t stride, int32_t pad, int32_t x_zp,
                   int32_t y_zp, int32_t act_min, int32_t act_max)
{
    int32_t P = ksize * ksize * Cin, Kp = (P + 3) / 4 * 4, npix = Hout * Wout;
    int32_t patch_words[TSH_CONV_ROWS * TSH_CONV_PATCH_MAX / 4];   /* int32 storage: 4-byte aligned rows */
    int8_t *patch = (int8_t *)(void *)patch_words;
    TSH_ASSERT(Kp <= TSH_CONV_PATCH_MAX);             /* refused by code generation */
    for (int32_t p0 = 0; p0 < npix; p0 += TSH_CONV_ROWS) {
        int32_t rows = npix - p0 < TSH_CONV_ROWS ? npix - p0 : TSH_CONV_ROWS;
        for (int32_t r = 0; r < rows; r++) {
            int32_t oh = (p0 + r) / Wout, ow = (p0 + r) % Wout;
            int8_t *pr = patch + r * Kp;
            for (int32_t kh = 0; kh < ksize; kh++) {
                int32_t ih = oh * stride - pad + kh;
                for (int32_t kw = 0; kw < ksize; kw++, pr += Cin) {
                    int32_t iw = ow * stride - pad + kw;
                    if (ih < 0 || ih >= H || iw < 0 || iw >= W)
                        for (int32_t c = 0; c < Cin; c++) pr[c] = (int8_t)x_zp;
                    else
                        conv_tap(pr, x + (ih * W + iw) * Cin, Cin);
                }
            }
            for (int32_t t = P; t < Kp; t++) *pr++ = 0;
        }
        tsh_fc_s8(patch, w, bias, mult, shift, y + p0 * Cout, rows, Kp, Cout, Kp, Cout, y_zp, act_min, act_max);
    }
}
