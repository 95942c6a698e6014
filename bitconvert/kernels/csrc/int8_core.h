#ifndef BITCONVERT_INT8_CORE_H
#define BITCONVERT_INT8_CORE_H

#include "ternary_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* int8 x int8 products for float layers (the lm_head): plain C API, no torch types; ISA paths and error codes as in
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

#ifdef __cplusplus
}
#endif

#endif
