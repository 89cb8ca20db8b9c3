/* Fixed-point helpers shared by the kernels: the requantisation of base/quant.py, exactly.
 * Internal header (static inline, no symbols exported). */
#ifndef TSH_FIXEDPOINT_H
#define TSH_FIXEDPOINT_H

#include <stdint.h>
#include <string.h>

/* An invariant code generation guarantees (e.g. a conv2d patch within TSH_CONV_PATCH_MAX). Breaking it is
 * a bug, so stop instead of computing garbage: a trap (HardFault on the board, SIGILL on the host). */
#define TSH_ASSERT(cond) do { if (!(cond)) __builtin_trap(); } while (0)

#if defined(TSH_EMULATE_DSP) || (defined(__ARM_FEATURE_DSP) && !defined(TSH_PORTABLE))
#define TSH_USE_DSP 1
#else
#define TSH_USE_DSP 0
#endif

/* Inline assembly with the real DSP instructions: a DSP core, not the portable or DSP-emulating host builds.
 * TSH_M4_ASM narrows it to ARMv7E-M (Cortex-M4/M7), whose blocks count on its registers and timings. */
#if defined(__ARM_FEATURE_DSP) && !defined(TSH_PORTABLE) && !defined(TSH_EMULATE_DSP)
#define TSH_DSP_ASM 1
#else
#define TSH_DSP_ASM 0
#endif
#if TSH_DSP_ASM && defined(__ARM_ARCH_7EM__)
#define TSH_M4_ASM 1
#else
#define TSH_M4_ASM 0
#endif

/* gemmlowp SaturatingRoundingDoublingHighMul: trunc((a b + nudge) / 2^31) with nudge = +-2^30 is
 * exactly floor((a b + 2^30) / 2^31) for both signs of a b (for a b < 0 the truncation toward zero
 * of (a b + 1 - 2^30) / 2^31 is the ceiling, i.e. floor((a b + 2^30) / 2^31)), so one 64-bit add
 * and an arithmetic shift do it: SMULL, ADDS/ADC, two shifts on Cortex-M. */
static inline int32_t tsh_srdhm(int32_t a, int32_t b)
{
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    return (int32_t)(((int64_t)a * (int64_t)b + ((int64_t)1 << 30)) >> 31);
}

/* gemmlowp RoundingDivideByPOT (round half away from zero), 0 <= e <= 31 (32-bit only: a 64-bit
 * variable shift would be a library call on Cortex-M) */
static inline int32_t tsh_rdbpot(int32_t x, int32_t e)
{
    int32_t mask = (int32_t)(((uint32_t)1 << e) - 1u);
    int32_t rem = x & mask;
    int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (rem > threshold ? 1 : 0);
}

/* The same on int64, 0 <= e <= 62 */
static inline int64_t tsh_rdbpot64(int64_t x, int32_t e)
{
    int64_t mask = ((int64_t)1 << e) - 1;
    int64_t rem = x & mask;
    int64_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (rem > threshold ? 1 : 0);
}

/* TFLite MultiplyByQuantizedMultiplier; the left shift saturates to int32 (defined, unlike TFLite). */
static inline int32_t tsh_mbqm(int32_t x, int32_t mult, int32_t shift)
{
    int32_t left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    if (left) {
        int64_t xs = (int64_t)x * ((int64_t)1 << left);
        x = xs > INT32_MAX ? INT32_MAX : (xs < INT32_MIN ? INT32_MIN : (int32_t)xs);
    }
    return tsh_rdbpot(tsh_srdhm(x, mult), right);
}

static inline int32_t tsh_clamp(int32_t x, int32_t lo, int32_t hi)
{
    return x < lo ? lo : (x > hi ? hi : x);
}

static inline int8_t tsh_sat8(int32_t x)
{
    return (int8_t)tsh_clamp(x, -128, 127);
}

/* v + zp clamped to [lo, hi] (an int8 range), in 64 bits so extreme values cannot overflow */
static inline int8_t tsh_add_clamp8(int32_t v, int32_t zp, int32_t lo, int32_t hi)
{
    int64_t r = (int64_t)v + zp;
    return (int8_t)(r < lo ? lo : (r > hi ? hi : r));
}

/* Requantisation with everything that depends only on the channel hoisted out of the inner loops
 * (a channel's outputs for several rows share it). Same integers as tsh_mbqm + zero point + clamp. */
typedef struct {
    int32_t mult, left, right, mask, half, lo, hi, zp, amin, amax, rnd, fast, fastl, lim, left1;
} tsh_rq_t;

static inline tsh_rq_t tsh_rq_make(int32_t mult, int32_t shift, int32_t zp, int32_t lo, int32_t hi)
{
    tsh_rq_t q;
    q.mult = mult;
    q.left = shift > 0 ? shift : 0;
    q.right = shift > 0 ? 0 : -shift;
    q.mask = (int32_t)(((uint32_t)1 << q.right) - 1u);
    q.half = q.mask >> 1;
    q.zp = zp;
    q.lo = lo - zp;     /* compare before adding the zero point: no overflow near INT32_MAX */
    q.hi = hi - zp;
    q.amin = lo;
    q.amax = hi;
    q.rnd = q.right > 0 ? (int32_t)((uint32_t)1 << (q.right - 1)) : 0;
    /* the short Cortex-M sequence of tsh_rq applies (for |x| < 2^30, any multiplier: the one
     * saturating case of SRDHM needs x = INT32_MIN) */
    q.fast = q.left == 0 && q.right >= 1 && q.right <= 23 && lo == -128 && hi == 127;
    /* no right shift (shift >= 0): the short left-shift sequence for |x| < lim = 2^(30 - left) */
    q.fastl = q.right == 0 && q.left <= 29 && lo == -128 && hi == 127;
    q.lim = q.fastl ? (int32_t)(1u << (30 - q.left)) : 0;
    q.left1 = q.left + 1;
    return q;
}



static inline int8_t tsh_rq_apply(const tsh_rq_t *q, int32_t x)
{
    if (__builtin_expect(q->left != 0, 0)) {
        int64_t xs = (int64_t)x * ((int64_t)1 << q->left);
        x = xs > INT32_MAX ? INT32_MAX : (xs < INT32_MIN ? INT32_MIN : (int32_t)xs);
    }
    int32_t h;
    if (__builtin_expect(x == INT32_MIN && q->mult == INT32_MIN, 0))
        h = INT32_MAX;
    else
        h = (int32_t)(((int64_t)x * (int64_t)q->mult + ((int64_t)1 << 30)) >> 31);
    int32_t r = (h >> q->right) + ((h & q->mask) > q->half + (int32_t)((uint32_t)h >> 31) ? 1 : 0);
    if (r > q->hi) return (int8_t)(q->hi + q->zp);
    if (r < q->lo) return (int8_t)(q->lo + q->zp);
    return (int8_t)(r + q->zp);
}

/* tsh_rq_apply, with the short sequence on Cortex-M when its preconditions hold: for |x| < 2^30,
 * SRDHM(x, m) = floor((x m + 2^30) / 2^31) = floor((2x m + 2^31) / 2^32) is SMMULR of 2x and m;
 * RDBPOT is QADD of 2^(right-1), minus the sign bit, arithmetic shift (if that QADD saturates, the
 * exact result is >= 2^(31-right) >= 256 and saturates below as well); QADD of the zero point and
 * SSAT to int8 finish: the same integers as tsh_mbqm + zero point + clamp, in 7 instructions. */
#if TSH_DSP_ASM
/* The short sequence itself (preconditions above; rnd = 2^(right-1)). */
static inline int32_t tsh_rq_short(int32_t x, int32_t m, int32_t rnd, int32_t right, int32_t zp)
{
    int32_t h, r;
    __asm__("add %[h], %[x], %[x]\n\t"
            "smmulr %[h], %[h], %[m]\n\t"
            "qadd %[r], %[h], %[rnd]\n\t"
            "sub %[r], %[r], %[h], lsr #31\n\t"
            "asr %[r], %[r], %[right]\n\t"
            "qadd %[r], %[r], %[zp]\n\t"
            "ssat %[r], #8, %[r]\n\t"
            : [h] "=&r"(h), [r] "=&r"(r)
            : [x] "r"(x), [m] "r"(m), [rnd] "r"(rnd), [right] "r"(right), [zp] "r"(zp));
    return r;
}

/* The left-shift twin (shift = left >= 0, |x| < 2^(30 - left), left1 = left + 1): x 2^left stays
 * below 2^30 in magnitude, so no saturation; SRDHM is SMMULR of 2 x 2^left; RDBPOT by 0 is the
 * identity; QADD of the zero point and SSAT finish: 4 instructions. */
static inline int32_t tsh_rq_short_left(int32_t x, int32_t m, int32_t left1, int32_t zp)
{
    int32_t h, r;
    __asm__("lsl %[h], %[x], %[s]\n\t"
            "smmulr %[h], %[h], %[m]\n\t"
            "qadd %[r], %[h], %[zp]\n\t"
            "ssat %[r], #8, %[r]\n\t"
            : [h] "=&r"(h), [r] "=&r"(r)
            : [x] "r"(x), [m] "r"(m), [s] "r"(left1), [zp] "r"(zp));
    return r;
}
#endif

static inline int8_t tsh_rq(const tsh_rq_t *q, int32_t x)
{
#if TSH_DSP_ASM
    if (q->fast && (uint32_t)x + (1u << 30) < (1u << 31))
        return (int8_t)tsh_rq_short(x, q->mult, q->rnd, q->right, q->zp);
    if (q->fastl && (uint32_t)x + (uint32_t)q->lim < 2u * (uint32_t)q->lim)
        return (int8_t)tsh_rq_short_left(x, q->mult, q->left1, q->zp);
#endif
    return tsh_rq_apply(q, x);
}

/* a / b rounded half away from zero, b > 0 */
static inline int64_t tsh_div_round(int64_t a, int64_t b)
{
    return a >= 0 ? (a + b / 2) / b : -((-a + b / 2) / b);
}

/* the same on int32 (one SDIV on Cortex-M; the 64-bit division is a library call) */
static inline int32_t tsh_div_round32(int32_t a, int32_t b)
{
    return a >= 0 ? (a + b / 2) / b : -((-a + b / 2) / b);
}

/* floor(sqrt(v)) for v >= 0, bit by bit (no floating point, no division) */
static inline int64_t tsh_isqrt64(int64_t v)
{
    uint64_t n = (uint64_t)v, r = 0, bit = (uint64_t)1 << 62;
    while (bit > n) bit >>= 2;
    while (bit) {
        if (n >= r + bit) {
            n -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    return (int64_t)r;
}

/* ---- DSP instructions: the real ones on Cortex-M, C emulations for host tests of the same code ---- */
#if TSH_DSP_ASM
static inline int32_t tsh_smlad(int32_t a, int32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smlad %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}
static inline int32_t tsh_sxtb16(int32_t x)          /* bytes 0 and 2, sign extended to halfwords */
{
    int32_t r;
    __asm__("sxtb16 %0, %1" : "=r"(r) : "r"(x));
    return r;
}
static inline int32_t tsh_sxtb16_ror8(int32_t x)     /* bytes 1 and 3 */
{
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}
static inline int32_t tsh_pkhbt(int32_t lo, int32_t hi)   /* (lo.bottom, hi.bottom) */
{
    int32_t r;
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(lo), "r"(hi));
    return r;
}
static inline int32_t tsh_pkhtb(int32_t hi, int32_t lo)   /* (lo.top, hi.top) */
{
    int32_t r;
    __asm__("pkhtb %0, %1, %2, asr #16" : "=r"(r) : "r"(hi), "r"(lo));
    return r;
}
static inline int32_t tsh_ssub16(int32_t a, int32_t b)    /* halfword-wise a - b (wrapping) */
{
    int32_t r;
    __asm__("ssub16 %0, %1, %2" : "=r"(r) : "r"(a), "r"(b) : "cc");
    return r;
}
#else
static inline int32_t tsh_lo16(int32_t x) { return (int32_t)(int16_t)(uint16_t)((uint32_t)x & 0xffffu); }
static inline int32_t tsh_hi16(int32_t x) { return (int32_t)(int16_t)(uint16_t)((uint32_t)x >> 16); }
static inline int32_t tsh_pack16(int32_t lo, int32_t hi)
{
    return (int32_t)(((uint32_t)(uint16_t)lo) | ((uint32_t)(uint16_t)hi << 16));
}
static inline int32_t tsh_smlad(int32_t a, int32_t b, int32_t acc)
{
    return acc + tsh_lo16(a) * tsh_lo16(b) + tsh_hi16(a) * tsh_hi16(b);
}
static inline int32_t tsh_sxtb16(int32_t x)
{
    uint32_t u = (uint32_t)x;
    return tsh_pack16((int8_t)(uint8_t)(u & 0xffu), (int8_t)(uint8_t)((u >> 16) & 0xffu));
}
static inline int32_t tsh_sxtb16_ror8(int32_t x)
{
    uint32_t u = (uint32_t)x;
    return tsh_pack16((int8_t)(uint8_t)((u >> 8) & 0xffu), (int8_t)(uint8_t)(u >> 24));
}
static inline int32_t tsh_pkhbt(int32_t lo, int32_t hi)
{
    return (int32_t)(((uint32_t)lo & 0xffffu) | ((uint32_t)hi << 16));
}
static inline int32_t tsh_pkhtb(int32_t hi, int32_t lo)
{
    return (int32_t)(((uint32_t)hi & 0xffff0000u) | ((uint32_t)lo >> 16));
}
static inline int32_t tsh_ssub16(int32_t a, int32_t b)
{
    return tsh_pack16(tsh_lo16(a) - tsh_lo16(b), tsh_hi16(a) - tsh_hi16(b));
}
#endif

/* the per-byte signed maximum of two words of four int8 (SSUB8 sets a GE flag per byte, SEL picks) */
static inline uint32_t tsh_max_s8x4(uint32_t a, uint32_t b)
{
#if TSH_DSP_ASM
    uint32_t t, r;
    __asm__("ssub8 %0, %2, %3\n\tsel %1, %2, %3" : "=&r"(t), "=r"(r) : "r"(a), "r"(b) : "cc");
    (void)t;
    return r;
#else
    uint32_t r = 0;
    for (int b8 = 0; b8 < 32; b8 += 8) {
        int32_t x = (int8_t)(uint8_t)(a >> b8), y = (int8_t)(uint8_t)(b >> b8);
        r |= (uint32_t)(uint8_t)(x > y ? x : y) << b8;
    }
    return r;
#endif
}

/* An unaligned little-endian 32-bit load (one LDR on Cortex-M4, which allows unaligned LDR). */
static inline int32_t tsh_read32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* acc[c] = sum_j p[j] * v[j * v_stride + c] for the four columns c = 0..3 over n keys: two keys x four
 * columns a step on SMLAD. One word of each key's row holds four columns; SXTB16 splits it into (0, 2) and
 * (1, 3) halfword pairs and PKHBT/PKHTB regroup them into per-column (key j, key j+1) pairs that line up
 * with the probability pair. The P.V inner loop of tsh_matmul_pv_s8 and of the tiled attention. */
static inline void tsh_pv4(const int16_t *p, const int8_t *v, int32_t n, int32_t v_stride, int32_t acc[4])
{
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, j = 0;
    for (; j + 2 <= n; j += 2) {
        int32_t pp;
        memcpy(&pp, p + j, sizeof pp);
        int32_t w0 = tsh_read32(v + j * v_stride), w1 = tsh_read32(v + (j + 1) * v_stride);
        int32_t e0 = tsh_sxtb16(w0), o0 = tsh_sxtb16_ror8(w0), e1 = tsh_sxtb16(w1), o1 = tsh_sxtb16_ror8(w1);
        a0 = tsh_smlad(pp, tsh_pkhbt(e0, e1), a0);
        a2 = tsh_smlad(pp, tsh_pkhtb(e1, e0), a2);
        a1 = tsh_smlad(pp, tsh_pkhbt(o0, o1), a1);
        a3 = tsh_smlad(pp, tsh_pkhtb(o1, o0), a3);
    }
    for (; j < n; j++) {
        const int8_t *vj = v + j * v_stride;
        a0 += p[j] * vj[0]; a1 += p[j] * vj[1]; a2 += p[j] * vj[2]; a3 += p[j] * vj[3];
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

#endif /* TSH_FIXEDPOINT_H */
