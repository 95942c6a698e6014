// int8 x int8 products (int8_core.h): the scalar reference and the AVX2, AVX-VNNI and AVX-512 VNNI paths, one struct
// each, selected like the ternary kernels (function-level target attributes, called only after a CPUID check); then
// the int4 and int6 block-scaled rows on the same activation blocks.
// Signed x signed products use the sign trick: x_q * w_q = |x_q| * (sign(x_q) * w_q), an unsigned x signed pair as
// vpmaddubsw and vpdpbusd take it (|x_q| <= 127 and |w_q| <= 127, so nothing overflows).
#include "int8_core.h"
#include "ternary_core.h"  // bc_thread_count
#include "avxvnni.h"
#include "fp16.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kRowAlign = 64;     // row stride multiple: whole 64-byte (two-block) steps on every path
constexpr int kRowsPerCall = 4;       // rows sharing one pass over a token's activations
constexpr int64_t kRowsPerTask = 64;  // rows per parallel task: 64 rows x in bytes stay in L2 across tokens
constexpr int64_t kPrefetchBytes = 4096;  // ahead in the contiguous rows of a task, as the ternary kernels

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// A row function: out[r] = sum_b e[b] * (sum_{k in b} x[k] * w[r * ldw + k]) for r < R, over `blocks` blocks of 32.
using RowsFn = void (*)(const int8_t *w, int64_t ldw, const int8_t *x, const float *e, int64_t blocks, float *out);

struct Scalar {
    template <int R>
    static void rows(const int8_t *w, int64_t ldw, const int8_t *x, const float *e, int64_t blocks, float *out) {
        for (int r = 0; r < R; ++r) {
            float sum = 0.0f;
            for (int64_t b = 0; b < blocks; ++b) {
                int32_t p = 0;
                for (int k = 0; k < BC_INT8_BLOCK; ++k)
                    p += int32_t(x[b * BC_INT8_BLOCK + k]) * w[r * ldw + b * BC_INT8_BLOCK + k];
                sum += e[b] * float(p);
            }
            out[r] = sum;
        }
    }
};

#define BC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define BC_TARGET_AVXVNNI __attribute__((target("avx2,fma," BC_AVXVNNI_FEATURES)))
#define BC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define BC_TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

BC_TARGET_AVX2 inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// The int32 sums of one 32-column block as 8 lanes (lane i: columns 4i..4i+3): x * w as |x| (u8) x sign(x)*w (s8)
// through vpmaddubsw + vpmaddwd; ax = |x|, both operands in [-127, 127]. Shared by the int8 and int4 AVX2 rows.
BC_TARGET_AVX2 inline __m256i block_dot_avx2(__m256i ax, __m256i xv, __m256i w) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, xv)), _mm256_set1_epi16(1));
}

// One 32-column block per step: |x| (u8) x sign(x)*w (s8) -> int32 x 8 lanes, converted and scaled by e[b].
// The integer step is vpmaddubsw + vpmaddwd on AVX2, one vpdpbusd on AVX-VNNI.
template <bool Vnni>
struct Avx256 {
    template <int R>
    BC_TARGET_AVXVNNI static void rows_vnni(const int8_t *w, int64_t ldw, const int8_t *x, const float *e,
                                            int64_t blocks, float *out) {
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + b * BC_INT8_BLOCK));
            const __m256i ax = _mm256_abs_epi8(xv);
            const __m256 scale = _mm256_set1_ps(e[b]);
            for (int r = 0; r < R; ++r) {
                const int8_t *row = w + r * ldw + b * BC_INT8_BLOCK;
                _mm_prefetch((const char *)(row + kPrefetchBytes), _MM_HINT_T0);
                const __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)row), xv);
                const __m256i p = bc_dpbusd256(_mm256_setzero_si256(), ax, sw);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]);
    }

    template <int R>
    BC_TARGET_AVX2 static void rows_avx2(const int8_t *w, int64_t ldw, const int8_t *x, const float *e,
                                         int64_t blocks, float *out) {
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + b * BC_INT8_BLOCK));
            const __m256i ax = _mm256_abs_epi8(xv);
            const __m256 scale = _mm256_set1_ps(e[b]);
            for (int r = 0; r < R; ++r) {
                const int8_t *row = w + r * ldw + b * BC_INT8_BLOCK;
                _mm_prefetch((const char *)(row + kPrefetchBytes), _MM_HINT_T0);
                const __m256i p = block_dot_avx2(ax, xv, _mm256_loadu_si256((const __m256i *)row));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]);
    }

    template <int R>
    static void rows(const int8_t *w, int64_t ldw, const int8_t *x, const float *e, int64_t blocks, float *out) {
        if (Vnni)
            rows_vnni<R>(w, ldw, x, e, blocks, out);
        else
            rows_avx2<R>(w, ldw, x, e, blocks, out);
    }
};

// Two blocks (64 bytes) per step: AVX-512 has no vpsignb, so sign(x)*w is w negated under the sign mask of x; lanes
// 0-7 of the vpdpbusd result belong to the first block, 8-15 to the second (`blocks` is even: rows are padded to 64).
struct Avx512 {
    template <int R>
    BC_TARGET_AVX512 static void rows(const int8_t *w, int64_t ldw, const int8_t *x, const float *e, int64_t blocks,
                                      float *out) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b += 2) {
            const __m512i xv = _mm512_loadu_si512(x + b * BC_INT8_BLOCK);
            const __m512i ax = _mm512_abs_epi8(xv);
            const __mmask64 negative = _mm512_movepi8_mask(xv);
            const __m512 scale = _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(e[b]), _mm512_set1_ps(e[b + 1]));
            for (int r = 0; r < R; ++r) {
                const int8_t *row = w + r * ldw + b * BC_INT8_BLOCK;
                _mm_prefetch((const char *)(row + kPrefetchBytes), _MM_HINT_T0);
                const __m512i wv = _mm512_loadu_si512(row);
                const __m512i sw = _mm512_mask_sub_epi8(wv, negative, _mm512_setzero_si512(), wv);
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sw);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    }
};

// Block-scaled rows (int4, int6: int8_core.h): out[r] = sum_b (d[r * blocks + b] * e[b]) * P[r][b] for r < R; w holds
// R rows of ldw bytes in the format's layout, `blocks` (even) blocks each; d is fp32 (int4) or fp16 bits (int6).
template <class Scale>
using BlockRowsFn = void (*)(const uint8_t *w, int64_t ldw, const Scale *d, const int8_t *x, const float *e,
                             int64_t blocks, float *out);
using Int4RowsFn = BlockRowsFn<float>;
using Int6RowsFn = BlockRowsFn<uint16_t>;

// fp16 bits -> fp32, exactly (fp16.h); the SIMD paths use vcvtph2ps.
using bitconvert::half_to_float;
using bitconvert::to_float;

// The signed code of column k of an int4 row: the low or high nibble of byte 32 * (k / 64) + k % 32, minus 8.
inline int int4_code(const uint8_t *row, int64_t k) {
    const uint8_t byte = row[k / 64 * 32 + k % 32];
    return (k % 64 < 32 ? byte & 15 : byte >> 4) - 8;
}

// Storage position (0-63) of column c of a 64-column int6 group (int8_core.h): 4-column runs of the group's two blocks
// alternate, so dword q of a 64-byte vector holds columns of block q % 2.
constexpr int int6_position(int c) { return 4 * (2 * (c % 32 / 4) + c / 32) + c % 4; }

// The signed code of column k of an int6 row: at position p of 48-byte group k / 64, the low 4 bits from ql (the
// nibble of byte p % 32), the high 2 from bits 2 (p / 16) of qh byte p % 16, minus 32.
inline int int6_code(const uint8_t *row, int64_t k) {
    const uint8_t *group = row + k / 64 * 48;
    const int p = int6_position(int(k % 64));
    const int low = p < 32 ? group[p] & 15 : group[p - 32] >> 4;
    const int high = group[32 + p % 16] >> (2 * (p / 16)) & 3;
    return (low | high << 4) - 32;
}

// The scalar reference of a block-scaled format whose codes Code reads.
template <class Scale, int (*Code)(const uint8_t *, int64_t)>
struct BlockScalar {
    template <int R>
    static void rows(const uint8_t *w, int64_t ldw, const Scale *d, const int8_t *x, const float *e, int64_t blocks,
                     float *out) {
        for (int r = 0; r < R; ++r) {
            float sum = 0.0f;
            for (int64_t b = 0; b < blocks; ++b) {
                int32_t p = 0;
                for (int k = 0; k < BC_INT8_BLOCK; ++k)
                    p += int32_t(x[b * BC_INT8_BLOCK + k]) * Code(w + r * ldw, b * BC_INT8_BLOCK + k);
                sum += (to_float(d[r * blocks + b]) * e[b]) * float(p);
            }
            out[r] = sum;
        }
    }
};
using Int4Scalar = BlockScalar<float, int4_code>;
using Int6Scalar = BlockScalar<uint16_t, int6_code>;

// Two blocks (one 32-byte group of codes) per step: nibbles unpacked by and/shift, minus 8, then the int8 block dot.
struct Int4Avx2 {
    template <int R>
    BC_TARGET_AVX2 static void rows(const uint8_t *w, int64_t ldw, const float *d, const int8_t *x, const float *e,
                                    int64_t blocks, float *out) {
        const __m256i nibble = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; b += 2) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + b * BC_INT8_BLOCK));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + (b + 1) * BC_INT8_BLOCK));
            const __m256i ax0 = _mm256_abs_epi8(x0), ax1 = _mm256_abs_epi8(x1);
            for (int r = 0; r < R; ++r) {
                const uint8_t *group = w + r * ldw + b * (BC_INT8_BLOCK / 2);
                _mm_prefetch((const char *)(group + kPrefetchBytes), _MM_HINT_T0);
                const __m256i v = _mm256_loadu_si256((const __m256i *)group);
                const __m256i c0 = _mm256_sub_epi8(_mm256_and_si256(v, nibble), eight);
                const __m256i c1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), eight);
                const float *scale = d + r * blocks + b;
                if (b % 16 == 0) _mm_prefetch((const char *)scale + kPrefetchBytes, _MM_HINT_T0);  // one line of d
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(ax0, x0, c0)),
                                         _mm256_set1_ps(scale[0] * e[b]), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(ax1, x1, c1)),
                                         _mm256_set1_ps(scale[1] * e[b + 1]), acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]);
    }
};

// The int32 sums of 32 bytes of unsigned codes u (u8) against x (s8) as 8 lanes (lane i: bytes 4i..4i+3), vpmaddubsw +
// vpmaddwd; u <= 63 and |x| <= 127, so no int16 pair sum saturates.
BC_TARGET_AVX2 inline __m256i unsigned_dot_avx2(__m256i u, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}

// Both int6 SIMD paths take one 48-byte group (64 columns, two blocks) per step. In storage order its int32 lanes
// alternate between the two blocks, so (d e of the first block, d e of the second) broadcast as one 64-bit value is
// the lane scale: per row and chunk of blocks the d * e products are computed once (vcvtph2ps of masked fp16 loads,
// whole pairs since blocks is even) into `pairs`, then read back by vbroadcastsd.
inline double scale_pair(const float *pairs) {
    double pair;
    std::memcpy(&pair, pairs, sizeof pair);
    return pair;
}

// int6 on AVX2: x reordered to storage order (two vpermq + vpunpck{l,h}dq per step, shared by the rows), u = (ql
// nibble) | (qh field shifted to bits 4-5) for each 32-byte half, P = sum u * x - 32 * sum x per lane, both halves
// added as integers (their lanes alternate blocks alike), one vcvtdq2ps + vfmadd per step and row.
struct Int6Avx2 {
    template <int R>
    BC_TARGET_AVX2_F16C static void rows(const uint8_t *w, int64_t ldw, const uint16_t *d, const int8_t *x,
                                         const float *e, int64_t blocks, float *out) {
        const __m256i low4 = _mm256_set1_epi8(15), high2 = _mm256_set1_epi8(48), bias = _mm256_set1_epi8(32);
        // qh broadcast to both 16-byte lanes: positions 0-31 want fields 0 (lane 0) and 1 (lane 1) on bits 4-5,
        // positions 32-63 fields 2 (already there) and 3.
        const __m256i up0 = _mm256_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2);
        const __m256i down1 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
        alignas(32) float pairs[R][8];
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t c0 = 0; c0 < blocks; c0 += 8) {
            const int nb = int(std::min<int64_t>(8, blocks - c0));
            const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(nb), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            const __m128i halves = _mm_cmpgt_epi32(_mm_set1_epi32(nb / 2), _mm_setr_epi32(0, 1, 2, 3));
            const __m256 ev = _mm256_maskload_ps(e + c0, lanes);
            for (int r = 0; r < R; ++r) {
                const uint16_t *row_d = d + r * blocks + c0;
                _mm_prefetch((const char *)row_d + kPrefetchBytes, _MM_HINT_T0);
                const __m256 scales = _mm256_cvtph_ps(_mm_maskload_epi32((const int *)row_d, halves));
                _mm256_store_ps(pairs[r], _mm256_mul_ps(scales, ev));
            }
            for (int i = 0; i < nb; i += 2) {
                const int8_t *xb = x + (c0 + i) * BC_INT8_BLOCK;
                // columns 0-31 and 32-63 as dwords a0..a7, b0..b7 -> a0 b0 a1 b1 a2 b2 a3 b3 | a4 b4 ... a7 b7
                const __m256i x0 = _mm256_permute4x64_epi64(_mm256_loadu_si256((const __m256i *)xb), 0xD8);
                const __m256i x1 = _mm256_permute4x64_epi64(_mm256_loadu_si256((const __m256i *)(xb + 32)), 0xD8);
                const __m256i xa = _mm256_unpacklo_epi32(x0, x1), xc = _mm256_unpackhi_epi32(x0, x1);
                const __m256i correction = _mm256_add_epi32(unsigned_dot_avx2(bias, xa), unsigned_dot_avx2(bias, xc));
                for (int r = 0; r < R; ++r) {
                    const uint8_t *group = w + r * ldw + (c0 + i) / 2 * 48;
                    _mm_prefetch((const char *)(group + kPrefetchBytes), _MM_HINT_T0);
                    const __m256i ql = _mm256_loadu_si256((const __m256i *)group);
                    const __m256i qh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(group + 32)));
                    const __m256i u0 = _mm256_or_si256(_mm256_and_si256(ql, low4),
                                                       _mm256_and_si256(_mm256_sllv_epi32(qh, up0), high2));
                    const __m256i u1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql, 4), low4),
                                                       _mm256_and_si256(_mm256_srlv_epi32(qh, down1), high2));
                    const __m256i p = _mm256_sub_epi32(
                        _mm256_add_epi32(unsigned_dot_avx2(u0, xa), unsigned_dot_avx2(u1, xc)), correction);
                    const __m256 scale = _mm256_castpd_ps(_mm256_set1_pd(scale_pair(pairs[r] + i)));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
                }
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]);
    }
};

// int6 on AVX-512 VNNI, one vpdpbusd per step: x reordered to storage order (one vpermd per step, shared by the rows),
// ql broadcast to both halves (the upper copy shifted right by 4 per qword), qh broadcast to the four 16-byte lanes
// and rotated per dword so that lane i's field sits on bits 4-5, u = (ql & 15) | (qh & 48) in one vpternlogd;
// vpdpbusd's accumulator starts at -32 * sum x per lane; one vcvtdq2ps + vfmadd per step and row.
struct Int6Avx512 {
    template <int R>
    BC_TARGET_AVX512 static void rows(const uint8_t *w, int64_t ldw, const uint16_t *d, const int8_t *x,
                                      const float *e, int64_t blocks, float *out) {
        const __m512i low4 = _mm512_set1_epi8(15), high2 = _mm512_set1_epi8(48), bias = _mm512_set1_epi8(32);
        const __m512i nibble_shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
        const __m512i field_rotate = _mm512_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0, 30, 30, 30, 30);
        const __m512i storage_order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        alignas(64) float pairs[R][16];
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t c0 = 0; c0 < blocks; c0 += 16) {
            const int nb = int(std::min<int64_t>(16, blocks - c0));
            const __mmask16 lanes = __mmask16((1u << nb) - 1);
            const __m512 ev = _mm512_maskz_loadu_ps(lanes, e + c0);
            for (int r = 0; r < R; ++r) {
                const uint16_t *row_d = d + r * blocks + c0;
                _mm_prefetch((const char *)row_d + kPrefetchBytes, _MM_HINT_T0);
                const __m512i halves = _mm512_maskz_loadu_epi16(__mmask32(lanes), row_d);
                _mm512_store_ps(pairs[r], _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(halves)), ev));
            }
            for (int i = 0; i < nb; i += 2) {
                const __m512i xv =
                    _mm512_permutexvar_epi32(storage_order, _mm512_loadu_si512(x + (c0 + i) * BC_INT8_BLOCK));
                const __m512i zero = _mm512_setzero_si512();
                const __m512i correction = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, xv));
                for (int r = 0; r < R; ++r) {
                    const uint8_t *group = w + r * ldw + (c0 + i) / 2 * 48;
                    _mm_prefetch((const char *)(group + kPrefetchBytes), _MM_HINT_T0);
                    const __m512i ql = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)group));
                    const __m512i qh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(group + 32)));
                    const __m512i high = _mm512_and_si512(_mm512_rolv_epi32(qh, field_rotate), high2);
                    // (A & C) | B with A = the nibbles, B = the high bits, C = 15: truth table 0xEC
                    const __m512i u = _mm512_ternarylogic_epi32(_mm512_srlv_epi64(ql, nibble_shift), high, low4, 0xEC);
                    const __m512i p = _mm512_dpbusd_epi32(correction, u, xv);
                    const __m512 scale = _mm512_castpd_ps(_mm512_set1_pd(scale_pair(pairs[r] + i)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
                }
            }
        }
        for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    }
};

// A path's row functions of type Fn (RowsFn or a BlockRowsFn): rows[R] handles R rows.
template <class Fn>
struct Kernels {
    Fn rows[kRowsPerCall + 1];
};

template <class Fn, class Path>
constexpr Kernels<Fn> kernels_of() {
    return {{nullptr, &Path::template rows<1>, &Path::template rows<2>, &Path::template rows<3>,
             &Path::template rows<4>}};
}

// No int4 code of its own for AVX-VNNI or AVX-512 (none could be tested here): those paths run the AVX2 rows.
constexpr Kernels<Int4RowsFn> kInt4Kernels[BC_ISA_COUNT] = {
    kernels_of<Int4RowsFn, Int4Scalar>(), kernels_of<Int4RowsFn, Int4Avx2>(), kernels_of<Int4RowsFn, Int4Avx2>(),
    kernels_of<Int4RowsFn, Int4Avx2>()};

// int6: no AVX-VNNI code of its own (this machine lacks AVX-VNNI, so it could not be tested): that path runs AVX2.
constexpr Kernels<Int6RowsFn> kInt6Kernels[BC_ISA_COUNT] = {
    kernels_of<Int6RowsFn, Int6Scalar>(), kernels_of<Int6RowsFn, Int6Avx2>(), kernels_of<Int6RowsFn, Int6Avx2>(),
    kernels_of<Int6RowsFn, Int6Avx512>()};

constexpr Kernels<RowsFn> kKernels[BC_ISA_COUNT] = {kernels_of<RowsFn, Scalar>(), kernels_of<RowsFn, Avx256<false>>(),
                                                    kernels_of<RowsFn, Avx256<true>>(), kernels_of<RowsFn, Avx512>()};

float abs_max(const float *v, int64_t count) {
    float amax = 0.0f;
    for (int64_t k = 0; k < count; ++k) amax = std::max(amax, std::fabs(v[k]));
    return amax;
}

// codes[k] = clamp(round_half_even(v[k] * inverse), -levels, levels) for k < count, 0 up to padded.
void round_codes(const float *v, int64_t count, int64_t padded, float levels, float inverse, int8_t *codes) {
    for (int64_t k = 0; k < count; ++k)
        codes[k] = int8_t(std::min(std::max(std::nearbyint(v[k] * inverse), -levels), levels));
    std::memset(codes + count, 0, size_t(padded - count));
}

// v (count) fp32 -> codes (padded >= count) int8, symmetric with `levels` steps each side, zero padded; returns the
// scale:  scale = max|v| / levels,  codes = clamp(round_half_even(v * (levels / max|v|)), -levels, levels), all 0 and
// scale 0 if max|v| = 0. The one rounding rule of the int8 rows (levels 127), int8 activation blocks (127) and int4
// weight blocks (7).
float quantize_span(const float *v, int64_t count, int64_t padded, float levels, int8_t *codes) {
    const float amax = abs_max(v, count);
    round_codes(v, count, padded, levels, amax > 0.0f ? levels / amax : 0.0f, codes);
    return amax / levels;
}

// The smallest fp16 >= v (0 <= v), as bits; 65504 (the largest finite) for larger v. With 2^e the power of two just
// above v, fp16 values near v are multiples of 2^(e - 11) (2^-24 among the subnormals): v in those units, rounded up,
// is exact in fp32 and, added to the binade's base bits, gives the bits (a carry into the exponent included).
uint16_t half_at_least(float v) {
    if (!(v > 0.0f)) return 0;
    if (v >= 65504.0f) return 0x7BFF;
    int e;
    std::frexp(v, &e);  // v in [2^(e-1), 2^e)
    const int unit = std::max(e - 11, -24);
    const int units = int(std::ceil(std::ldexp(v, -unit)));
    return uint16_t(unit == -24 ? units : ((e + 14) << 10) + units - 1024);
}

// As quantize_span for the int6 blocks (int8_core.h): the scale is the smallest fp16 >= max|v| / levels, returned as
// bits, and the codes are rounded against it, v * (1 / scale).
uint16_t quantize_span_half(const float *v, int64_t count, int64_t padded, float levels, int8_t *codes) {
    const uint16_t scale = half_at_least(abs_max(v, count) / levels);
    const float step = half_to_float(scale);
    round_codes(v, count, padded, levels, step > 0.0f ? 1.0f / step : 0.0f, codes);
    return scale;
}

// Columns of block b (BC_INT8_BLOCK wide) inside the first in_features: 32, fewer for the last, 0 for padding.
int64_t block_columns(int64_t b, int64_t in_features) {
    return std::max<int64_t>(0, std::min<int64_t>(BC_INT8_BLOCK, in_features - b * BC_INT8_BLOCK));
}

// Activations of n tokens, per token and per 32-column block as int8_core.h states: x_q (n, ldx) int8 zero padded,
// e (n, ldx / 32) fp32, ldx = bc_int8_row_stride(in) (the padded columns of both weight formats).
struct BlockActivations {
    int64_t ldx, blocks;
    std::vector<int8_t> x_q;
    std::vector<float> e;

    BlockActivations(const float *x, int64_t n, int64_t in_features)
        : ldx(bc_int8_row_stride(in_features)), blocks(ldx / BC_INT8_BLOCK), x_q(size_t(n * ldx)),
          e(size_t(n * blocks)) {
        for (int64_t t = 0; t < n; ++t) {
            for (int64_t b = 0; b < blocks; ++b) {
                const int64_t k0 = b * BC_INT8_BLOCK;
                e[t * blocks + b] = quantize_span(x + t * in_features + k0, block_columns(b, in_features),
                                                  BC_INT8_BLOCK, 127.0f, &x_q[t * ldx + k0]);
            }
        }
    }
    const int8_t *codes(int64_t t) const { return &x_q[t * ldx]; }
    const float *scales(int64_t t) const { return &e[t * blocks]; }
};

// Rows per call for one token (decoding, where the rows come from memory): 1, so each thread reads its rows as one
// sequential stream, or kRowsPerCall, which interleaves that many streams (ldx bytes each). Which is faster depends on
// the CPU's prefetchers: on an AMD EPYC Zen 4, four streams read a 49,152 x 1,024 int8 head from memory 1.4x slower
// and a 49,152 x 576 one 1.9x; on an Intel Xeon (AVX-512, AMX) they decoded 2-8% faster on all four benchmark models
// (docs/kernels.md). So kRowsPerCall on Intel CPUs, 1 elsewhere; BITCONVERT_HEAD_STREAMS=1 or 4 picks either.
int64_t one_token_rows_per_call() {
    static const int64_t rows = [] {
        const char *choice = std::getenv("BITCONVERT_HEAD_STREAMS");
        if (choice != nullptr && std::strcmp(choice, "1") == 0) return int64_t(1);
        if (choice != nullptr && std::strcmp(choice, "4") == 0) return int64_t(kRowsPerCall);
        __builtin_cpu_init();
        return __builtin_cpu_is("intel") ? int64_t(kRowsPerCall) : int64_t(1);
    }();
    return rows;
}

// Calls group(o, rows, t) for every token t < n and every group of rows o .. o + rows - 1 (rows <= kRowsPerCall),
// in parallel over tasks of kRowsPerTask rows (each task walks its rows once per token, so they stay in L2), on
// bc_thread_count threads for out_features * n * ldx multiply-adds. Several tokens: kRowsPerCall rows share each
// pass over a token's activations; one token: one_token_rows_per_call(). A row's sum is the same instructions in the
// same order either way.
template <class Group>
void for_row_groups(int64_t n, int64_t out_features, int64_t ldx, int threads, const Group &group) {
    const int64_t tasks = (out_features + kRowsPerTask - 1) / kRowsPerTask;
    const int nthreads = bc_thread_count(threads, tasks, out_features * n * ldx);
    const int64_t rows_per_call = n == 1 ? one_token_rows_per_call() : kRowsPerCall;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t row0 = task * kRowsPerTask, row1 = std::min(out_features, row0 + kRowsPerTask);
        for (int64_t t = 0; t < n; ++t)
            for (int64_t o = row0; o < row1; o += rows_per_call)
                group(o, int(std::min(rows_per_call, row1 - o)), t);
    }
}

// The body of bc_int8_linear and bc_int4_linear: checks the arguments (BC_ISA_AUTO resolved), quantizes x (n, in)
// into activation blocks, then calls group(rows_fn, act, o, rows, t) for every row group of for_row_groups with
// rows_fn the `isa` path's function for `rows` rows from `table`. Returns a BC_ERR_* code.
template <class Fn, class Group>
int run_product(const Kernels<Fn> (&table)[BC_ISA_COUNT], const float *x, int64_t n, int64_t out_features,
                int64_t in_features, int isa, int threads, const Group &group) {
    if (isa == BC_ISA_AUTO) isa = bc_default_isa();
    if (!bc_isa_supported(isa)) return BC_ERR_ISA;
    if (n < 0 || out_features < 0 || in_features < 0) return BC_ERR_SHAPE;
    const BlockActivations act(x, n, in_features);
    for_row_groups(n, out_features, act.ldx, threads,
                   [&](int64_t o, int rows, int64_t t) { group(table[isa].rows[rows], act, o, rows, t); });
    return BC_OK;
}

// The body of bc_int4_linear and bc_int6_linear: rows of ldw bytes and `blocks` scales each.
template <class Scale>
int run_block_product(const Kernels<BlockRowsFn<Scale>> (&table)[BC_ISA_COUNT], const float *x, int64_t n,
                      const uint8_t *w_q, int64_t ldw, const Scale *d, int64_t out_features, int64_t in_features,
                      float *y, int isa, int threads) {
    return run_product(table, x, n, out_features, in_features, isa, threads,
                       [&](BlockRowsFn<Scale> rows_fn, const BlockActivations &act, int64_t o, int, int64_t t) {
                           rows_fn(w_q + o * ldw, ldw, d + o * act.blocks, act.codes(t), act.scales(t), act.blocks,
                                   y + t * out_features + o);
                       });
}

// Quantizes each row of w (out, in) per 32-column block, 64 columns (two blocks) at a time: d[o * blocks + b] =
// quantize_block(columns of b, their count, 32 codes out) for both blocks, then pack(64 codes, the group's bytes)
// writes the group's group_bytes bytes. The loop of bc_int4_quantize_rows and bc_int6_quantize_rows.
template <class Scale, class QuantizeBlock, class Pack>
void quantize_block_rows(const float *w, int64_t out_features, int64_t in_features, int64_t group_bytes, uint8_t *w_q,
                         Scale *d, const QuantizeBlock &quantize_block, const Pack &pack) {
    const int64_t groups = bc_int8_row_stride(in_features) / (2 * BC_INT8_BLOCK), blocks = 2 * groups;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_features; ++o) {
        for (int64_t g = 0; g < groups; ++g) {
            int8_t codes[2 * BC_INT8_BLOCK];
            for (int half = 0; half < 2; ++half) {
                const int64_t b = 2 * g + half;
                d[o * blocks + b] = quantize_block(w + o * in_features + b * BC_INT8_BLOCK,
                                                   block_columns(b, in_features), codes + half * BC_INT8_BLOCK);
            }
            pack(codes, w_q + (o * groups + g) * group_bytes);
        }
    }
}

}  // namespace

extern "C" {

int64_t bc_int8_row_stride(int64_t in_features) { return round_up(std::max<int64_t>(in_features, 1), kRowAlign); }

void bc_int8_quantize_rows(const float *w, int64_t out_features, int64_t in_features, int8_t *w_q, float *d) {
    const int64_t ldw = bc_int8_row_stride(in_features);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_features; ++o)
        d[o] = quantize_span(w + o * in_features, in_features, ldw, 127.0f, w_q + o * ldw);
}

int bc_int8_linear(const float *x, int64_t n, const int8_t *w_q, const float *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads) {
    return run_product(kKernels, x, n, out_features, in_features, isa, threads,
                       [&](RowsFn rows_fn, const BlockActivations &act, int64_t o, int rows, int64_t t) {
                           float sums[kRowsPerCall];
                           rows_fn(w_q + o * act.ldx, act.ldx, act.codes(t), act.scales(t), act.blocks, sums);
                           for (int r = 0; r < rows; ++r) y[t * out_features + o + r] = d[o + r] * sums[r];
                       });
}

int64_t bc_int4_row_bytes(int64_t in_features) { return bc_int8_row_stride(in_features) / 2; }

int64_t bc_int4_row_blocks(int64_t in_features) { return bc_int8_row_stride(in_features) / BC_INT8_BLOCK; }

void bc_int4_quantize_rows(const float *w, int64_t out_features, int64_t in_features, uint8_t *w_q, float *d) {
    quantize_block_rows(
        w, out_features, in_features, BC_INT8_BLOCK, w_q, d,
        [](const float *v, int64_t count, int8_t *codes) {
            return quantize_span(v, count, BC_INT8_BLOCK, 7.0f, codes);
        },
        [](const int8_t *codes, uint8_t *dst) {
            for (int j = 0; j < BC_INT8_BLOCK; ++j)
                dst[j] = uint8_t((codes[j] + 8) | (codes[BC_INT8_BLOCK + j] + 8) << 4);
        });
}

int bc_int4_linear(const float *x, int64_t n, const uint8_t *w_q, const float *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads) {
    return run_block_product(kInt4Kernels, x, n, w_q, bc_int4_row_bytes(in_features), d, out_features, in_features, y,
                             isa, threads);
}

int64_t bc_int6_row_bytes(int64_t in_features) { return bc_int8_row_stride(in_features) / 4 * 3; }

int64_t bc_int6_row_blocks(int64_t in_features) { return bc_int8_row_stride(in_features) / BC_INT8_BLOCK; }

void bc_int6_quantize_rows(const float *w, int64_t out_features, int64_t in_features, uint8_t *w_q, uint16_t *d) {
    quantize_block_rows(
        w, out_features, in_features, 48, w_q, d,
        [](const float *v, int64_t count, int8_t *codes) {
            return quantize_span_half(v, count, BC_INT8_BLOCK, 31.0f, codes);
        },
        [](const int8_t *codes, uint8_t *dst) {  // u = c + 32 in storage order: ql (low 4 bits), qh (high 2 bits)
            uint8_t u[2 * BC_INT8_BLOCK];
            for (int c = 0; c < 2 * BC_INT8_BLOCK; ++c) u[int6_position(c)] = uint8_t(codes[c] + 32);
            for (int j = 0; j < BC_INT8_BLOCK; ++j) dst[j] = uint8_t((u[j] & 15) | (u[BC_INT8_BLOCK + j] & 15) << 4);
            for (int j = 0; j < 16; ++j) {
                int high = 0;
                for (int i = 0; i < 4; ++i) high |= (u[16 * i + j] >> 4) << (2 * i);
                dst[BC_INT8_BLOCK + j] = uint8_t(high);
            }
        });
}

int bc_int6_linear(const float *x, int64_t n, const uint8_t *w_q, const uint16_t *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads) {
    return run_block_product(kInt6Kernels, x, n, w_q, bc_int6_row_bytes(in_features), d, out_features, in_features, y,
                             isa, threads);
}

}  // extern "C"
