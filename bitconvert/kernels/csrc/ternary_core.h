/* Ternary x int8 matrix products for BitNet b1.58 inference: plain C API, no torch types.
 *
 * Math. T is an (out, in) matrix with entries in {-1, 0, +1}; x_q is (n, in) int8; then
 *     acc[t][o] = sum_k x_q[t][k] * T[o][k]                       int32, exact
 *     y[t][o]   = (float)acc[t][o] / weight_scale / s[t]          fp32, divided in that order
 * where (x_q, s) is BitNet's per-token absmax quantization of float activations x (n, in):
 *     s = (1 / max(max_k |x[t][k]|, 1e-5)) * 127,   x_q = clamp(round_half_even(x * s), -128, 127)
 * (fp32 throughout; torch computes `127 / t` as `t.reciprocal() * 127`, and so does this code, so the results equal
 * bitconvert.bitlinear's pure-torch path bit for bit).
 *
 * Kernel layouts ("repacked"), chosen when the weights are repacked and passed to every call (`layout`). In all,
 * the codes c = T + 1 in {0, 1, 2}; rows are padded to a multiple of 16 (tiles; lut: 128) with code 1 (weight 0);
 * in 2bit and base3 one tile's weights are contiguous (tile t starts at byte t * bc_tile_bytes(in, layout)). Since
 * sum_k c*x = sum_k T*x + sum_k x, the kernels compute sum(c * x) with unsigned codes and subtract the per-token sum
 * of x_q.
 *
 * BC_LAYOUT_2BIT (2 bits per weight; every path). 64-byte blocks of 16 rows x 16 columns, columns padded to a
 * multiple of 16 (k-blocks); block (tile t, k-block b) at byte (t * kblocks + b) * 64. Inside a block, byte 4*r + j
 * holds in bits 2i..2i+1 the code of row 16t + r, column 16b + 4i + j (r < 16, i < 4, j < 4). Shifting a block
 * right by 2i and masking with 3 yields 16 lanes of 4 codes each (lane r = row r, columns 16b+4i .. 16b+4i+3), the
 * operand shape of vpdpbusd / vpmaddubsw against the 4 broadcast activation bytes of those columns.
 *
 * BC_LAYOUT_BASE3 (1.67 bits per weight; every path, AVX-512 only with VBMI). Three codes of one row make one
 * base-3 index u = c0 + 3 c1 + 9 c2 < 27 (columns 3g, 3g+1, 3g+2 of a 12-column block give the digits c0, c1, c2).
 * A block covers 16 rows x 12 columns = 64 indices, lane 4*r + g holding row r's column group g (g < 4). Columns are
 * padded to a multiple of 24: two blocks A (columns 24p .. 24p+11) and B (24p+12 .. 24p+23) make an 80-byte pair p
 * at byte (t * pairs + p) * 80: bytes 0..63 hold lane l's low 4 index bits, A's in the low nibble of byte l and
 * B's in the high nibble; bytes 64..71 and 72..79 hold the fifth bits of A's and B's 64 lanes (bit l % 8 of byte
 * l / 8). The AVX-512 path rebuilds 64 indices with one masked add (the fifth bits loaded straight into a mask
 * register) and turns them into the three digit planes with three vpermb table lookups; each plane is one vpdpbusd
 * against 4 activation bytes, so the activations are stored permuted (bc_quantize_padded): within each 12-column
 * block, byte 4*j + g holds column 3g + j. Against 2 bits it reads 17% fewer bytes for the same 3 vpdpbusd per
 * 192 weights, which matters where decoding streams the weights from memory. The AVX2 and AVX-VNNI paths, without
 * vpermb, look each digit up in two 16-entry vpshufb tables and blend by the fifth bit: about 1.7x the work per
 * weight of their 2-bit loop, so they are not the default (bc_default_layout).
 *
 * BC_LAYOUT_LUT (1.78 bits per weight; the scalar reference and AVX-512 F/BW/VNNI; opt-in). Three codes of a row make a
 * base-3 index as in base3, three indices of columns 9u .. 9u+8 one 16-bit word (index k in bits 5k .. 5k+4, of
 * columns 9u+3k .. 9u+3k+2); 9-column units, columns padded to a multiple of 9. Rows are padded to 128-row groups
 * of 8 tiles, stored unit by unit: group g's unit u at byte (g * units + u) * 256 holds its tiles' words, tile i's
 * row r at byte 32 i + 2 r. The activations (bc_padded_in: 204 bytes per unit) are, per unit u and index k, a
 * 32-entry int16 table at byte (3u + k) * 64 whose entry i < 27 is sum_j digit_j(i) * x[9u + 3k + j] (0 beyond),
 * then at byte units * 192 + 12u + 4k the codes (x[9u+3k], x[9u+3k+1], x[9u+3k+2], 0). One token: one vpermw per
 * index and tile pair (32 word lanes), int16 sums widened every 14 units (|42 x 768| < 2^15); several tokens: the
 * words decoded to digit planes and vpdpbusd against the codes.
 *
 * Limits: in_features <= BC_MAX_IN_FEATURES keeps every int32 partial sum exact (the AVX-512 one-token path sums
 * codes scaled by up to 64: |64 * 2 * 128| per column, in/4 columns per chain, < 2^31 for in <= 2^19).
 */
#ifndef BITCONVERT_TERNARY_CORE_H
#define BITCONVERT_TERNARY_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Instruction set paths. BC_ISA_AUTO: the BITCONVERT_ISA environment variable if set, else the best the CPU has. */
enum {
    BC_ISA_AUTO = -1,
    BC_ISA_SCALAR = 0,  /* portable C++, the reference */
    BC_ISA_AVX2 = 1,    /* vpmaddubsw + vpmaddwd, 256-bit */
    BC_ISA_AVXVNNI = 2, /* AVX2 + AVX-VNNI vpdpbusd, 256-bit */
    BC_ISA_AVX512 = 3,  /* AVX-512 F/BW + VNNI vpdpbusd, 512-bit */
    BC_ISA_COUNT = 4
};

/* Weight layouts (above). */
enum { BC_LAYOUT_2BIT = 0, BC_LAYOUT_BASE3 = 1, BC_LAYOUT_LUT = 2, BC_LAYOUT_COUNT = 3 };

/* Error codes returned by the compute functions. */
enum { BC_OK = 0, BC_ERR_ISA = 1, BC_ERR_SHAPE = 2, BC_ERR_LAYOUT = 3 };

#define BC_TILE_ROWS 16
#define BC_BLOCK_COLS 16
#define BC_BLOCK_BYTES 64
#define BC_PAIR_COLS 24
#define BC_PAIR_BYTES 80
#define BC_LUT_UNIT_COLS 9
#define BC_LUT_UNIT_BYTES 32
#define BC_LUT_GROUP_ROWS 128
#define BC_MAX_IN_FEATURES (1 << 19)

const char *bc_isa_name(int isa);          /* "scalar", "avx2", "avxvnni", "avx512"; NULL if out of range */
int bc_isa_from_name(const char *name);    /* inverse of bc_isa_name; -2 if unknown */
int bc_isa_supported(int isa);             /* 1 if this CPU (and OS) can run the path */
int bc_best_isa(void);                     /* fastest supported path */
/* BITCONVERT_ISA if set (-2 if it names an unknown path, -3 if the CPU lacks it), else bc_best_isa(). */
int bc_default_isa(void);

const char *bc_layout_name(int layout);          /* "2bit", "base3", "lut"; NULL if out of range */
int bc_layout_from_name(const char *name);        /* inverse of bc_layout_name; -2 if unknown */
int bc_layout_supported(int layout, int isa);     /* 1 if the path isa computes on this layout on this CPU */
/* The layout to repack into for path isa (BC_ISA_AUTO: bc_default_isa()): BITCONVERT_LAYOUT if set (-2 if it
 * names an unknown layout, -3 if isa cannot compute on it or is no path), else base3 for AVX-512 with VBMI (fewer
 * bytes to stream at the same work per weight), else 2bit (the AVX2 and AVX-VNNI base3 loops do more work per
 * weight than they save in bytes at 2 threads: opt in with BITCONVERT_LAYOUT=base3; and for the scalar reference).
 * The layout of a repacked weight is the caller's to keep beside it: the compute functions trust `layout`, and the
 * torch bindings' size check tells 2bit and base3 apart except for in_features 73-80 (equal sizes there), and lut
 * from them for most shapes only. */
int bc_default_layout(int isa);

/* Bytes of one 16-row tile, and of the whole repacked (out, in) matrix, in `layout`. */
int64_t bc_tile_bytes(int64_t in_features, int layout);
size_t bc_repacked_bytes(int64_t out_features, int64_t in_features, int layout);

/* Repack HF transformers' BitNet layout (uint8 (ceil(out/4), in), row i*R + r in bits 2i..2i+1 of packed row r,
 * code T + 1) into `layout`; dst holds bc_repacked_bytes(out, in, layout) bytes. */
void bc_repack(const uint8_t *packed, int64_t out_features, int64_t in_features, int layout, uint8_t *dst);

/* Per-token absmax quantization as described above: x (n, in) fp32 -> x_q (n, in) int8, s (n) fp32. The scalar
 * reference; the products quantize with their path's SIMD loop (AVX2, AVX-512), bit for bit the same, tokens split
 * over the call's threads. */
void bc_quantize_activations(const float *x, int64_t n, int64_t in_features, int8_t *x_q, float *s);

/* acc (n, out) int32 = x_q (n, in) @ T^T. threads <= 0: OpenMP's default. Returns a BC_ERR_* code. */
int bc_matmul_int(const int8_t *x_q, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
                  int64_t in_features, int32_t *acc, int isa, int threads);

/* Fused: y (n, out) fp32 = (x_q @ T^T) / weight_scale / s with (x_q, s) quantized from x (n, in). */
int bc_linear(const float *x, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
              int64_t in_features, float weight_scale, float *y, int isa, int threads);

/* As bc_linear with one weight scale per output row (weight_scales (out,)): y[t][o] = (float)acc / weight_scales[o]
 * / s[t]. Several projections of the same input concatenated row-wise (q/k/v, gate/up) become one product whose
 * rows equal the separate products bit for bit. */
int bc_linear_rows(const float *x, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
                   int64_t in_features, const float *weight_scales, float *y, int isa, int threads);

/* The same product in two steps, for callers that split one product into parts (ONNX Runtime's op): quantize the
 * activations once, then compute any run of whole tiles from them, so that no part re-quantizes its input.
 * bc_padded_in: the row stride ldx of the quantized activations, in_features rounded up to a k-block (16; base3:
 *     a pair, 24; lut: 204 bytes per 9-column unit, its tables and codes).
 * bc_quantize_padded: x (n, in) fp32 -> x_q (n, ldx) int8 (zero padded; base3: permuted, lut: tables and codes, as
 *     the layout states),
 *     sums (n) int32 = per-token sum of x_q, s (n) fp32, the quantization of bc_quantize_activations (computed by
 *     the SIMD loop of BC_ISA_AUTO's path, on the calling thread only).
 * bc_linear_quantized: y[t * ldy + o] = (float)(x_q[t] . T[row0 + o]) / weight_scale / s[t] for o < out_features,
 *     rows row0 .. row0 + out_features - 1 (row0 a multiple of 16) of the repacked matrix `weight`; bit for bit
 *     bc_linear's output. */
int64_t bc_padded_in(int64_t in_features, int layout);
/* bc_linear_rows' product of one token from its quantized row (x_q, sum, s of bc_quantize_padded), shared by the
 * threads of the enclosing OpenMP team: every thread of the team calls it with the same arguments, and the tiles are
 * split statically over them, with a barrier at the end (called outside a parallel region it runs them all). For
 * a decoder step that keeps one team for a whole layer instead of one parallel region per product. */
int bc_linear_rows_in_team(const int8_t *x_q, int32_t sum, float s, const uint8_t *weight, int layout,
                           int64_t out_features, int64_t in_features, const float *weight_scales, float *y, int isa);
void bc_quantize_padded(const float *x, int64_t n, int64_t in_features, int layout, int8_t *x_q, int32_t *sums,
                        float *s);
int bc_linear_quantized(const int8_t *x_q, const int32_t *sums, const float *s, int64_t n, const uint8_t *weight,
                        int layout, int64_t row0, int64_t out_features, int64_t in_features, float weight_scale,
                        float *y, int64_t ldy, int isa, int threads);

/* Threads for `tasks` parallel tasks totalling `work` multiply-adds: `requested` (0 = OpenMP's default), at most one
 * per task, and at most one per 2^18 multiply-adds (below that the fork/join costs more than it saves). Shared by
 * every kernel in this folder (the int8 lm_head too). */
int bc_thread_count(int requested, int64_t tasks, int64_t work);

#ifdef __cplusplus
}
#endif

#endif
