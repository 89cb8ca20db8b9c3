/* tinyshield int8 kernels: the C twins of mcu/kernels.py (numerics spec there and in base/quant.py).
 *
 * Plain C99, no allocation, no global state. Every kernel takes flat pointers into the arena or
 * into const (flash) tables, then int32 scalars (dimensions, strides, zero points, multipliers,
 * shifts), in the same order as its numpy twin. Results are bit-identical to numpy.
 *
 * Build options: on a core with the DSP extension (__ARM_FEATURE_DSP, e.g. Cortex-M4/M7/M33) the
 * hot loops use SMLAD/SXTB16; define TSH_PORTABLE to force the plain C path, or TSH_EMULATE_DSP to
 * run the DSP-shaped code with C emulations of the instructions (how the host tests check it). */
#ifndef TSH_KERNELS_H
#define TSH_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void tsh_fc_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
               const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
               int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max);

void tsh_fc_s8w16(const int8_t *x, const int16_t *w, const int32_t *bias, const int32_t *mult,
                  const int32_t *shift, int8_t *y, int32_t M, int32_t K, int32_t N, int32_t x_stride,
                  int32_t y_stride, int32_t y_zp, int32_t act_min, int32_t act_max);

void tsh_matmul_qk_s8(const int8_t *q, const int8_t *k, int8_t *s, int32_t Lq, int32_t Lk, int32_t dh,
                      int32_t q_stride, int32_t k_stride, int32_t s_stride, int32_t q_zp, int32_t k_zp,
                      int32_t mult, int32_t shift, int32_t s_zp);

void tsh_matmul_pv_s8(const int16_t *p, const int8_t *v, int8_t *y, int32_t Lq, int32_t Lk, int32_t dh,
                      int32_t p_stride, int32_t v_stride, int32_t y_stride, int32_t v_zp, int32_t mult,
                      int32_t shift, int32_t y_zp);

/* The longest conv2d patch row (ksize*ksize*Cin rounded up to 4) tsh_conv2d_s8 takes: its patches live on
 * the stack. mcu/kernels.py CONV_PATCH_MAX is the same number (tests/test_contracts.py checks it); code
 * generation refuses a longer one, naming the layer. */
#define TSH_CONV_PATCH_MAX 256

void tsh_conv2d_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult,
                   const int32_t *shift, int8_t *y, int32_t H, int32_t W, int32_t Cin, int32_t Cout,
                   int32_t Hout, int32_t Wout, int32_t ksize, int32_t stride, int32_t pad, int32_t x_zp,
                   int32_t y_zp, int32_t act_min, int32_t act_max);

void tsh_softmax_s16(const int8_t *s, const int8_t *mask, const int32_t *lut, int16_t *p, int32_t Lq,
                     int32_t Lk, int32_t s_stride, int32_t p_stride);

void tsh_add_layernorm_s8(const int8_t *a, const int8_t *b, const int32_t *gm, const int32_t *gs,
                          const int32_t *beta, int8_t *y, int32_t M, int32_t d, int32_t a_zp, int32_t b_zp,
                          int32_t ca, int32_t cb, int32_t eps, int32_t y_zp);

void tsh_lut_s8(const int8_t *x, const int8_t *table, int8_t *y, int32_t n);

void tsh_mean_pool_s8(const int8_t *x, const int8_t *mask, int8_t *y, int32_t L, int32_t d, int32_t x_zp,
                      int32_t mult, int32_t shift, int32_t y_zp);

void tsh_embedding_s8(const int32_t *ids, const int8_t *table, int8_t *y, int32_t L, int32_t d, int32_t vocab);

/* Clustered low-rank embedding; `clusters` rows: start, rows, rank, dense, u_off, v_off, vm_off,
 * u_shift, v_shift (see mcu.kernels.embedding_clr_s8) */
void tsh_embedding_clr_s8(const int32_t *ids, const uint16_t *slot, const int32_t *clusters, const int8_t *u,
                          const int8_t *v, const int32_t *u_mult, const int32_t *v_mult, int8_t *y, int32_t L,
                          int32_t d, int32_t vocab, int32_t nclusters);

void tsh_pad_mask(const int32_t *ids, int8_t *mask, int32_t L);

/* tsh_elementwise.c: TFLite's int8 ADD and MUL (b[i % b_n] broadcast), requantising strided copies,
 * a strided gather over up to 6 dims (dims: 6 output sizes, then 6 input strides; the last nd used) */
void tsh_add_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t n, int32_t b_n, int32_t a_zp, int32_t b_zp,
                int32_t a_mult, int32_t a_shift, int32_t b_mult, int32_t b_shift, int32_t y_mult, int32_t y_shift,
                int32_t y_zp, int32_t act_min, int32_t act_max);

void tsh_mul_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t n, int32_t b_n, int32_t a_zp, int32_t b_zp,
                int32_t y_mult, int32_t y_shift, int32_t y_zp, int32_t act_min, int32_t act_max);

void tsh_requant_s8(const int8_t *x, int8_t *y, int32_t rows, int32_t cols, int32_t x_stride, int32_t y_stride,
                    int32_t x_zp, int32_t mult, int32_t shift, int32_t y_zp);

void tsh_permute_s8(const int8_t *x, int8_t *y, const int32_t *dims, int32_t nd);

/* tiled.c (the tiled schedule's attention, see mcu/tiled.py) */
void tsh_attention_s8(const int8_t *q, const int8_t *k, const int8_t *v, const int8_t *mask,
                      const int32_t *lut, int8_t *y, int8_t *s_tile, int32_t *acc, int32_t *stats,
                      int32_t Lq, int32_t Lk, int32_t dh, int32_t kt, int32_t q_stride, int32_t k_stride,
                      int32_t v_stride, int32_t y_stride, int32_t q_zp, int32_t k_zp, int32_t qk_mult,
                      int32_t qk_shift, int32_t s_zp, int32_t v_zp, int32_t pv_mult, int32_t pv_shift,
                      int32_t y_zp);

void tsh_attention_kv_s8(const int8_t *q, const int8_t *x, const int8_t *wk, const int32_t *bk, const int32_t *mk,
                         const int32_t *sk, const int8_t *wv, const int32_t *bv, const int32_t *mv,
                         const int32_t *sv, const int8_t *mask, const int32_t *lut, int8_t *y, int8_t *s_tile,
                         int32_t *acc, int32_t *stats, int8_t *kv, int32_t Lq, int32_t Lk, int32_t dh, int32_t kt,
                         int32_t pt, int32_t d_in, int32_t q_stride, int32_t x_stride, int32_t y_stride,
                         int32_t k_min, int32_t k_max, int32_t v_min, int32_t v_max, int32_t q_zp, int32_t k_zp,
                         int32_t qk_mult, int32_t qk_shift, int32_t s_zp, int32_t v_zp, int32_t pv_mult,
                         int32_t pv_shift, int32_t y_zp);

/* tsh_tflite.c: TFLite Micro's int8 reference arithmetic for imported models (see mcu/tflite_kernels.py) */
void tsh_binary_s8(const int8_t *a, const int8_t *b, int8_t *y, const int32_t *dims, const int32_t *p, int32_t op);

void tsh_softmax_s8(const int8_t *x, int8_t *y, int32_t rows, int32_t depth, int32_t mult, int32_t left_shift,
                    int32_t diff_min);

void tsh_matmul_kn_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t M, int32_t N, int32_t K, int32_t a_stride,
                      int32_t b_stride, int32_t y_stride, int32_t a_zp, int32_t b_zp, int32_t mult, int32_t shift,
                      int32_t y_zp);

void tsh_depthwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const int32_t *mult, const int32_t *shift,
                      int8_t *y, int32_t H, int32_t W, int32_t C, int32_t dm, int32_t Hout, int32_t Wout, int32_t kh,
                      int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t pad_h, int32_t pad_w,
                      int32_t x_zp, int32_t y_zp, int32_t act_min, int32_t act_max);

void tsh_mean_s8(const int8_t *x, int8_t *y, int32_t outer, int32_t n, int32_t inner, int32_t x_zp, int32_t mult,
                 int32_t shift, int32_t y_zp);

void tsh_avg_pool_s8(const int8_t *x, int8_t *y, int32_t H, int32_t W, int32_t C, int32_t Hout, int32_t Wout,
                     int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pad_h, int32_t pad_w, int32_t act_min,
                     int32_t act_max);

void tsh_mean_s16(const int16_t *x, int16_t *y, int32_t outer, int32_t n, int32_t inner, int32_t x_zp, int32_t mult,
                  int32_t shift, int32_t y_zp);

void tsh_requant_s8_s16(const int8_t *x, int16_t *y, int32_t n, int32_t x_zp, int32_t mult, int32_t shift, int32_t y_zp);

void tsh_requant_s16_s8(const int16_t *x, int8_t *y, int32_t n, int32_t x_zp, int32_t mult, int32_t shift, int32_t y_zp);

#ifdef __cplusplus
}
#endif

#endif /* TSH_KERNELS_H */
