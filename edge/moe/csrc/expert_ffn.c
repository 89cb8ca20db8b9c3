/* One MoE expert's FFN on quantised weights, for the host: y = (GELU((h @ q1) * s1) @ q2) * s2.
 *
 * q1 (d x f) and q2 (f x d) are int8 (row-major, one row per input feature) or int4 packed two a byte
 * along the rows (byte row i: row 2i in the low nibble, row 2i+1 in the high one; edge.moe.store's
 * layout), with per-output-channel scales. The weights are widened one at a time inside the product:
 * no dequantised copy of the expert is ever written (the torch path spends most of its time there).
 *
 * Numerics: every output is summed in input order, h[0] * q[0][j] + h[1] * q[1][j] + ..., in float32,
 * with no fused multiply-add (-ffp-contract=off). Vectorising across outputs j does not reorder any
 * sum, so the results are the same on every x86 (or other) instruction set, and an int4 expert gives
 * exactly what its unpacked int8 weights give. GELU is the exact one, 0.5 x (1 + erf(x / sqrt 2)).
 * Compiled by edge.moe.kernels (base.cbuild) and called once per expert use.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tsh_moe.h"

/* Wider vectors where the CPU has them, chosen at load time; the same sums either way (TSH_MOE_PORTABLE
 * builds the baseline only: the tests compare the two). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TSH_MOE_PORTABLE)
#define TSH_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TSH_CLONES
#endif

/* acc[j] += sum over k rows of x[i] * q[i][j], rows in order. */
TSH_CLONES static void accumulate_s8(const float *restrict x, const int8_t *restrict q, float *restrict acc,
                                     int k, int n)
{
    for (int i = 0; i < k; i++) {
        const float xi = x[i];
        const int8_t *restrict row = q + (size_t)i * n;
        for (int j = 0; j < n; j++)
            acc[j] += xi * (float)row[j];
    }
}

TSH_CLONES static void accumulate_s4(const float *restrict x, const uint8_t *restrict p, float *restrict acc,
                                     int k, int n)
{
    for (int i = 0; i < k / 2; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1];
        const uint8_t *restrict row = p + (size_t)i * n;
        for (int j = 0; j < n; j++) {
            const int lo = ((row[j] & 0x0F) ^ 8) - 8, hi = ((row[j] >> 4) ^ 8) - 8;
            acc[j] += x0 * (float)lo;
            acc[j] += x1 * (float)hi;
        }
    }
}

static void matvec(const float *x, const void *q, const float *s, float *y, int k, int n, int int4)
{
    memset(y, 0, (size_t)n * sizeof(float));
    if (int4)
        accumulate_s4(x, (const uint8_t *)q, y, k, n);
    else
        accumulate_s8(x, (const int8_t *)q, y, k, n);
    for (int j = 0; j < n; j++)
        y[j] *= s[j];
}

void tsh_moe_expert_ffn(const float *h, const void *q1, const float *s1, const void *q2, const float *s2,
                        float *y, float *scratch, int rows, int d, int f, int int4)
{
    for (int r = 0; r < rows; r++) {
        matvec(h + (size_t)r * d, q1, s1, scratch, d, f, int4);
        for (int j = 0; j < f; j++)
            scratch[j] = 0.5f * scratch[j] * (1.0f + erff(scratch[j] * 0.70710678118654752f));
        matvec(scratch, q2, s2, y + (size_t)r * d, f, d, int4);
    }
}
