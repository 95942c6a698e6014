#ifndef BITCONVERT_INT8_CORE_H
#define BITCONVERT_INT8_CORE_H

#include "ternary_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* int8 x int8 and int4 x int8 products for float layers (the lm_head): plain C API, no torch types; ISA paths and error codes as in
 * ternary_core.h.
 *
 * Weights, per row (weight-only symmetric int8):
 *     d[o] = max_k |W[o][k]| / 127,   W_q[o][k] = clamp(round_half_even(W[o][k] * (127 / max_k |W[o][k]|)), -127, 127)
 * stored row-major with a row stride of bc_int8_row_stride(in) bytes (in rounded up to 64, zero padded); an all-zero
 * row gets d = 0 and codes 0.
 * Activations, per token and per block of BC_INT8_BLOCK consecutive columns b (as llama.cpp's Q8_0):
 *     e[t][b] = max_{k in b} |x[t][k]| / 127,   x_q = clamp(round_half_even(x * (127 / max)), -127, 127)  (0 if max = 0)
 * Output (fp32):
 *     y[t][o] = d[o] * sum_b e[t][b] * P[t][o][b],   P = sum_{k in b} x_q[t][k] * W_q[o][k]  (int32, exact)
 * The integer block sums P are exact on every path; the float sum over blocks is accumulated in fp32 in an order
 * that differs between paths (SIMD lanes), so paths agree to fp32 rounding, not bit for bit.
 * Both operands stay within [-127, 127], so |x| * w pairs never saturate vpmaddubsw's int16 (2 * 127 * 127 < 2^15). */
#define BC_INT8_BLOCK 32

int64_t bc_int8_row_stride(int64_t in_features);
/* w (out, in) fp32 -> w_q (out, bc_int8_row_stride(in)) int8 and d (out) fp32. */
void bc_int8_quantize_rows(const float *w, int64_t out_features, int64_t in_features, int8_t *w_q, float *d);
/* y (n, out) fp32 from x (n, in) fp32 and the quantized rows above. Returns a BC_ERR_* code. */
int bc_int8_linear(const float *x, int64_t n, const int8_t *w_q, const float *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads);

/* int4 weights x the same int8 activation blocks (the 4-bit lm_head).
 *
 * Weights, per row o and per block b of BC_INT8_BLOCK columns (weight-only symmetric, 15 levels):
 *     d[o][b] = max_{k in b} |W[o][k]| / 7,   c[o][k] = clamp(round_half_even(W[o][k] * (7 / max)), -7, 7)
 * (d = 0 and c = 0 for an all-zero block), so |W - d * c| <= d / 2 per element. d is fp32: exact to the rounding of
 * one division, any float range, and no F16C dependency; it costs 1 bit per weight over the 4 of the codes (5.0
 * bits per weight against Q4_0's 4.5 with fp16 scales, int8's 8.06, Q6_K's 6.56).
 * d is stored (out, bc_int4_row_blocks(in)) fp32, padding blocks 0. The codes, stored c + 8 in [1, 15] (one nibble),
 * fill bc_int4_row_bytes(in) bytes per row (in rounded up to 64, zero-code padded, two codes per byte) in groups of
 * 32 bytes per 64 columns: byte j of group g holds column 64g + j in its low nibble and column 64g + 32 + j in its
 * high nibble (j < 32). One 32-byte load then gives block 2g as `v & 15` and block 2g + 1 as `(v >> 4) & 15`, each
 * 32 codes in column order, matching a 32-byte load of the activation block.
 * Output (fp32):
 *     y[t][o] = sum_b (d[o][b] * e[t][b]) * P[t][o][b],   P = sum_{k in b} x_q[t][k] * c[o][k]  (int32, exact)
 * with (x_q, e) the activation blocks above; the product d * e is rounded to fp32 once, then the float sum over
 * blocks is accumulated in an order that differs between paths (as for int8). |x_q| <= 127 and |c| <= 7.
 * Paths: scalar (the reference) and AVX2; avxvnni and avx512 run the AVX2 code (every such CPU has AVX2). */
int64_t bc_int4_row_bytes(int64_t in_features);   /* bc_int8_row_stride(in) / 2 */
int64_t bc_int4_row_blocks(int64_t in_features);  /* bc_int8_row_stride(in) / BC_INT8_BLOCK */
/* w (out, in) fp32 -> codes (out, bc_int4_row_bytes(in)) uint8 and d (out, bc_int4_row_blocks(in)) fp32. */
void bc_int4_quantize_rows(const float *w, int64_t out_features, int64_t in_features, uint8_t *w_q, float *d);
/* y (n, out) fp32 from x (n, in) fp32 and the int4 rows above. Returns a BC_ERR_* code. */
int bc_int4_linear(const float *x, int64_t n, const uint8_t *w_q, const float *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads);

#ifdef __cplusplus
}
#endif

#endif
