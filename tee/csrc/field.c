/* The blinded mode's field kernels, p = 2^23 + 2^21 + 7: one pass over the data per call.
 *
 * Enclave side (one thread): blind = quantise + mask + Freivalds' right-hand side + the digit planes the
 * accelerator multiplies, in one pass over the input;
 * unblind = Freivalds' left-hand side + unmask + dequantise in one pass over the accelerator's answer, which
 * lives in untrusted shared memory: every element is read exactly once, so the check covers exactly the
 * values that are used (nothing can change between check and use).
 * Accelerator side: recombine (three digit products -> field element) after its int8 GEMM; digits (field
 * element -> three int8 digits) for inputs given as field elements (pads, tests).
 *
 * The numpy reference of each kernel is in tee/fieldmath.py and tee/blinded.py; tests check equality.
 */
#include <math.h>
#include <stdint.h>

#define P ((uint32_t)TSH_P)  /* 2^23 + 2^21 + 7, given by tee/fieldkernels.py from tee.fieldmath.P */
#define HALF (P / 2)
#define OFFSET (128u * (1u + 256u + 65536u))
/* A row sum of products of field elements (< p^2 < 2^46.7 each) fits a uint64 for up to 2^17 terms; the
 * Python side refuses longer rows (tee.fieldmath.MAX_DOT). */

/* int32 in (-p, 2p) -> [0, p), branch-free: (t >> 31) is all ones exactly for negative t */
static inline int32_t reduce(int32_t t) {
    t += (t >> 31) & (int32_t)P;
    t -= (int32_t)P;
    t += (t >> 31) & (int32_t)P;
    return t;
}

/* The bytes b_i of centre(x) + OFFSET for a field element x: centre(x) = (b0 - 128) + 256 (b1 - 128)
 * + 65536 (b2 - 128), each b_i a uint8 digit with zero point 128. */
static inline uint32_t offset_centre(uint32_t x) {
    return x > HALF ? x - (P - OFFSET) : x + OFFSET;
}

/* x~ = round(x * scale) + r mod p for a (rows, k) float32 x, written as the accelerator's GEMM input: three
 * digit planes of offset_centre(x~) stacked by rows, (3 rows, k) uint8; and rhs[i] = (x~_i . v) mod p.
 * Returns 0, or 1 when some |round(x * scale)| >= p/2 or x is not finite (the output is then garbage). */
int tsh_blind(const float *restrict x, int rows, int k, float scale, const uint32_t *restrict r,
              const uint32_t *restrict v, uint8_t *restrict out, uint64_t *restrict rhs) {
    int bad = 0;
    const int64_t n = (int64_t)rows * k;
    for (int i = 0; i < rows; i++) {
        const float *xi = x + (int64_t)i * k;
        const uint32_t *ri = r + (int64_t)i * k;
        uint8_t *restrict d0 = out + (int64_t)i * k, *restrict d1 = d0 + n, *restrict d2 = d0 + 2 * n;
        uint64_t acc = 0;
        for (int j = 0; j < k; j++) {
            float q = nearbyintf(xi[j] * scale);   /* round half to even, as the reference */
            int ok = fabsf(q) < (float)HALF;       /* false for NaN too */
            bad |= !ok;
            q = ok ? q : 0.0f;                     /* keep the int conversion defined */
            uint32_t t = (uint32_t)reduce((int32_t)q + (int32_t)ri[j]);
            acc += (uint64_t)t * v[j];
            uint32_t z = offset_centre(t);
            d0[j] = (uint8_t)z;
            d1[j] = (uint8_t)(z >> 8);
            d2[j] = (uint8_t)(z >> 16);
        }
        rhs[i] = acc % P;
    }
    return bad;
}

/* From the accelerator's y~ (rows, m): lhs[i] = (y~_i . s) mod p, and
 * out = bias + centre(y~ - u) * scale in float32 (no fused multiply-add: the reference rounds twice).
 * Returns the number of entries of y~ that are not field elements (>= p): such an answer is refused. */
int tsh_unblind(const uint32_t *y, const uint32_t *u, const uint32_t *s, const float *scale, const float *bias,
                int rows, int m, float *out, uint64_t *lhs) {
    int bad = 0;
    for (int i = 0; i < rows; i++) {
        const uint32_t *yi = y + (int64_t)i * m;
        const uint32_t *ui = u + (int64_t)i * m;
        float *oi = out + (int64_t)i * m;
        uint64_t acc = 0;                              /* may wrap only for an answer refused below */
        for (int j = 0; j < m; j++) {
            uint32_t yj = yi[j];                       /* the one read of untrusted memory */
            bad += yj >= P;
            acc += (uint64_t)yj * s[j];
            int32_t d = (int32_t)yj - (int32_t)ui[j];
            d += (d >> 31) & (int32_t)P;                    /* [0, p) */
            d -= (((int32_t)HALF - d) >> 31) & (int32_t)P;  /* (-p/2, p/2] */
            float prod = (float)d * scale[j];
            oi[j] = bias[j] + prod;
        }
        lhs[i] = acc % P;
    }
    return bad;
}

/* Field elements x (n of them, each < p) -> three planes of digits (n each) with
 * centre(x) = d0 + 256 d1 + 65536 d2 - OFFSET: the bytes b_i of centre(x) + OFFSET. `flip` = 0x80 gives the
 * signed digits b_i - 128 read as int8; flip = 0 the unsigned bytes b_i (uint8 with zero point 128). */
void tsh_digits(const uint32_t *x, int64_t n, uint8_t *out, int flip) {
    uint8_t *d0 = out, *d1 = out + n, *d2 = out + 2 * n;
    const uint8_t f = (uint8_t)flip;
    for (int64_t i = 0; i < n; i++) {
        uint32_t z = offset_centre(x[i]);
        d0[i] = (uint8_t)(z & 0xff) ^ f;
        d1[i] = (uint8_t)((z >> 8) & 0xff) ^ f;
        d2[i] = (uint8_t)((z >> 16) & 0xff) ^ f;
    }
}

/* (t mod p) for an integer-valued double |t| < 2^52, in floating point so that loops over it vectorise:
 * the truncated quotient is within one of t / p, so t - q p (q p < 2^53, exact) lies in (-2p, 2p). */
static inline uint32_t mod_p_f64(double t) {
    double q = (double)(int64_t)(t * (1.0 / P));
    int32_t r = (int32_t)(t - q * (double)P);
    r += (r >> 31) & (int32_t)P;                   /* (-p, 2p) */
    return (uint32_t)reduce(r);
}

/* Three planes of int32 digit products (n each) -> (y0 + 256 y1 + 65536 y2) mod p (|sum| < 2^48: exact). */
void tsh_recombine(const int32_t *restrict y, int64_t n, uint32_t *restrict out) {
    const int32_t *y0 = y, *y1 = y + n, *y2 = y + 2 * n;
    for (int64_t i = 0; i < n; i++)
        out[i] = mod_p_f64((double)y0[i] + 256.0 * (double)y1[i] + 65536.0 * (double)y2[i]);
}

/* The same from float32 planes holding exact integers (|y| < 2^24, so the sum is below 2^41); with
 * `accumulate` the result is added to `out` mod p (a GEMM split along k into parts whose sums each stay exact
 * in float32). */
void tsh_recombine_f32(const float *restrict y, int64_t n, uint32_t *restrict out, int accumulate) {
    const float *y0 = y, *y1 = y + n, *y2 = y + 2 * n;
    if (accumulate)
        for (int64_t i = 0; i < n; i++)
            out[i] = mod_p_f64((double)y0[i] + 256.0 * (double)y1[i] + 65536.0 * (double)y2[i] + (double)out[i]);
    else
        for (int64_t i = 0; i < n; i++)
            out[i] = mod_p_f64((double)y0[i] + 256.0 * (double)y1[i] + 65536.0 * (double)y2[i]);
}

/* Ask for `bytes` at p to be brought into the cache (no wait): the enclave names the pad entries it will
 * need next while it waits for the accelerator, so that its next pass reads them from cache. */
void tsh_prefetch(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(p + i, 0, 2);
}
