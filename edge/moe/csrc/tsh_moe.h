/* Host kernels of the MoE runtime (edge/moe), loaded with ctypes by edge.moe.kernels. */
#ifndef TSH_MOE_H
#define TSH_MOE_H

/* y (rows x d) = (GELU((h @ q1) * s1) @ q2) * s2 for h (rows x d); q1 (d x f), q2 (f x d) int8, or int4
 * packed two a byte along the rows when int4 != 0; scratch holds f floats. */
void tsh_moe_expert_ffn(const float *h, const void *q1, const float *s1, const void *q2, const float *s2,
                        float *y, float *scratch, int rows, int d, int f, int int4);

#endif
