#ifndef BITCONVERT_INT8_CORE_H
#define BITCONVERT_INT8_CORE_H

#include "ternary_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* int8 x int8, int4 x int8 and int6 x int8 products for float layers (the lm_head): plain C API, no torch types; ISA
 * paths and error codes as in ternary_core.h.
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

/* int6 weights x the same int8 activation blocks (the ~6-bit lm_head; llama.cpp uses Q6_K for its output tensor).
 *
 * Weights, per row o and per block b of BC_INT8_BLOCK columns (weight-only symmetric, 63 levels):
 *     d[o][b] = the smallest fp16 >= max_{k in b} |W[o][k]| / 31   (0 for an all-zero block; fp32 division),
 *     c[o][k] = clamp(round_half_even(W[o][k] * (1 / d[o][b])), -31, 31)   (fp32; c = 0 where d = 0)
 * The codes are rounded against the stored (fp16) scale, and d is rounded up, not to nearest, so |W| / d <= 31: no
 * code is clamped and |W - d * c| <= d / 2 per element (up to the fp32 rounding of W * (1 / d)) for every block max
 * up to 31 * 65504 ~ 2.03e6 (beyond, d saturates at 65504 and codes clamp: the torch operator refuses such weights).
 * Tiny blocks (max < 31 * 2^-14 ~ 1.9e-3) get a subnormal fp16 d, coarse relative to the max but never below it,
 * so the error bound holds (|W - d c| <= d / 2 <= 2^-25 absolute at the smallest).
 * Why fp16 scales: 6 + 16 / 32 = 6.5 bits per weight (Q6_K: 6.56), 19% fewer bytes than int8's 8.06; fp32 scales
 * would give 7.0 (13% fewer) for a precision nobody needs: fp16's 11 significant bits put d within 2^-11 of
 * max / 31, 64x finer than the codes' own half-step. One vcvtph2ps converts 8 (AVX2, F16C: every AVX2 CPU has it,
 * as it has FMA) or 16 (AVX-512F) scales. d is stored (out, bc_int6_row_blocks(in)) as fp16 bits, padding blocks 0.
 * Codes are stored unsigned, u = c + 32 in [1, 63] (padding columns: c = 0), bc_int6_row_bytes(in) bytes per row
 * (in rounded up to 64, 6 bits per column) in groups of 48 bytes per 64 columns (Q6_K's ql/qh split). Within a
 * group, column c (block c / 32) sits at position p = 4 * (2 * ((c % 32) / 4) + c / 32) + c % 4: runs of 4 columns
 * of the two blocks alternate, so each int32 lane of a 64-position dot product (vpdpbusd, vpmaddwd) belongs to block
 * lane % 2 and one 64-bit broadcast (d e of block 2g, d e of block 2g + 1) scales it; the activations are put in
 * the same order once per group and token (AVX-512: vpermd; AVX2: vpermq + vpunpck), shared by every row. Bytes:
 *     bytes 0-31  (ql): byte j holds the low 4 bits of u at position j (low nibble) and 32 + j (high nibble);
 *     bytes 32-47 (qh): byte j holds in bits 2i..2i+1 the high 2 bits of u at position 16i + j (i < 4, j < 16).
 * Unpacking a group: the ql bytes (twice, the copy shifted right by 4) and the 16 qh bytes broadcast to each
 * 16-position lane i, shifted (AVX2) or rotated (AVX-512) so that field i lands on bits 4-5; then
 * u = (ql & 15) | (qh & 48): 9 AVX2 ops per 64 columns, 4 AVX-512 ops (vpsrlvq, vprolvd, vpandd, vpternlogd).
 * Unsigned codes make every product an unsigned x signed pair (vpmaddubsw, vpdpbusd) with no sign trick:
 *     P[t][o][b] = sum_{k in b} x_q[t][k] * c[o][k] = sum_{k in b} u[o][k] * x_q[t][k] - 32 * sum_{k in b} x_q[t][k]
 * (int32, exact; the correction once per activation block and token: AVX-512 starts vpdpbusd's accumulator at it).
 * |u x_q| pair sums <= 2 * 63 * 127 < 2^15, so vpmaddubsw never saturates.
 * Output (fp32):
 *     y[t][o] = sum_b (d[o][b] * e[t][b]) * P[t][o][b]
 * with (x_q, e) the activation blocks above; d converts exactly to fp32, d * e is rounded to fp32 once, and the sum
 * over blocks is accumulated in an order that differs between paths (as for int8 and int4).
 * Paths: scalar (the reference), AVX2 (avxvnni runs it too) and AVX-512 VNNI (two blocks per vpdpbusd); per 64
 * columns and row the SIMD paths convert and scale once (vcvtdq2ps + vfmadd231ps). */
int64_t bc_int6_row_bytes(int64_t in_features);   /* bc_int8_row_stride(in) * 3 / 4 */
int64_t bc_int6_row_blocks(int64_t in_features);  /* bc_int8_row_stride(in) / BC_INT8_BLOCK */
/* w (out, in) fp32 -> codes (out, bc_int6_row_bytes(in)) uint8 and d (out, bc_int6_row_blocks(in)) fp16 bits. */
void bc_int6_quantize_rows(const float *w, int64_t out_features, int64_t in_features, uint8_t *w_q, uint16_t *d);
/* y (n, out) fp32 from x (n, in) fp32 and the int6 rows above. Returns a BC_ERR_* code. */
int bc_int6_linear(const float *x, int64_t n, const uint8_t *w_q, const uint16_t *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads);

#ifdef __cplusplus
}
#endif

#endif
