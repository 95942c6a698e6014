// int8 x int8 products (int8_core.h): the scalar reference and the AVX2, AVX-VNNI and AVX-512 VNNI paths, one struct
// each, selected like the ternary kernels (function-level target attributes, called only after a CPUID check).
// Signed x signed products use the sign trick: x_q * w_q = |x_q| * (sign(x_q) * w_q), an unsigned x signed pair as
// vpmaddubsw and vpdpbusd take it (|x_q| <= 127 and |w_q| <= 127, so nothing overflows).
#include "int8_core.h"
#include "ternary_core.h"  // bc_thread_count

#include <immintrin.h>

#include <algorithm>
#include <cmath>
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
#define BC_TARGET_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define BC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))

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
                const __m256i p = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sw);
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

// int4 rows (int8_core.h): out[r] = sum_b (d[r * blocks + b] * e[b]) * P[r][b] for r < R; w holds R rows of ldw
// bytes in the nibble layout, `blocks` (even) blocks each.
using Int4RowsFn = void (*)(const uint8_t *w, int64_t ldw, const float *d, const int8_t *x, const float *e,
                            int64_t blocks, float *out);

// The signed code of column k of an int4 row: the low or high nibble of byte 32 * (k / 64) + k % 32, minus 8.
inline int int4_code(const uint8_t *row, int64_t k) {
    const uint8_t byte = row[k / 64 * 32 + k % 32];
    return (k % 64 < 32 ? byte & 15 : byte >> 4) - 8;
}

struct Int4Scalar {
    template <int R>
    static void rows(const uint8_t *w, int64_t ldw, const float *d, const int8_t *x, const float *e, int64_t blocks,
                     float *out) {
        for (int r = 0; r < R; ++r) {
            float sum = 0.0f;
            for (int64_t b = 0; b < blocks; ++b) {
                int32_t p = 0;
                for (int k = 0; k < BC_INT8_BLOCK; ++k)
                    p += int32_t(x[b * BC_INT8_BLOCK + k]) * int4_code(w + r * ldw, b * BC_INT8_BLOCK + k);
                sum += (d[r * blocks + b] * e[b]) * float(p);
            }
            out[r] = sum;
        }
    }
};

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

// A path's row functions of type Fn (RowsFn or Int4RowsFn): rows[R] handles R rows.
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

constexpr Kernels<RowsFn> kKernels[BC_ISA_COUNT] = {kernels_of<RowsFn, Scalar>(), kernels_of<RowsFn, Avx256<false>>(),
                                                    kernels_of<RowsFn, Avx256<true>>(), kernels_of<RowsFn, Avx512>()};

// v (count) fp32 -> codes (padded >= count) int8, symmetric with `levels` steps each side, zero padded; returns the
// scale:  scale = max|v| / levels,  codes = clamp(round_half_even(v * (levels / max|v|)), -levels, levels), all 0 and
// scale 0 if max|v| = 0. The one rounding rule of the int8 rows (levels 127), int8 activation blocks (127) and int4
// weight blocks (7).
float quantize_span(const float *v, int64_t count, int64_t padded, float levels, int8_t *codes) {
    float amax = 0.0f;
    for (int64_t k = 0; k < count; ++k) amax = std::max(amax, std::fabs(v[k]));
    const float inverse = amax > 0.0f ? levels / amax : 0.0f;
    for (int64_t k = 0; k < count; ++k)
        codes[k] = int8_t(std::min(std::max(std::nearbyint(v[k] * inverse), -levels), levels));
    std::memset(codes + count, 0, size_t(padded - count));
    return amax / levels;
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

// Calls group(o, rows, t) for every token t < n and every group of rows o .. o + rows - 1 (rows <= kRowsPerCall),
// in parallel over tasks of kRowsPerTask rows (each task walks its rows once per token, so they stay in L2), on
// bc_thread_count threads for out_features * n * ldx multiply-adds.
template <class Group>
void for_row_groups(int64_t n, int64_t out_features, int64_t ldx, int threads, const Group &group) {
    const int64_t tasks = (out_features + kRowsPerTask - 1) / kRowsPerTask;
    const int nthreads = bc_thread_count(threads, tasks, out_features * n * ldx);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t row0 = task * kRowsPerTask, row1 = std::min(out_features, row0 + kRowsPerTask);
        for (int64_t t = 0; t < n; ++t)
            for (int64_t o = row0; o < row1; o += kRowsPerCall)
                group(o, int(std::min<int64_t>(kRowsPerCall, row1 - o)), t);
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
    const int64_t ldw = bc_int4_row_bytes(in_features), blocks = bc_int4_row_blocks(in_features);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_features; ++o) {
        int8_t codes[2 * BC_INT8_BLOCK];  // one 64-column group
        for (int64_t g = 0; g < ldw / BC_INT8_BLOCK; ++g) {
            for (int half = 0; half < 2; ++half) {
                const int64_t b = 2 * g + half;
                d[o * blocks + b] = quantize_span(w + o * in_features + b * BC_INT8_BLOCK,
                                                  block_columns(b, in_features), BC_INT8_BLOCK, 7.0f,
                                                  codes + half * BC_INT8_BLOCK);
            }
            uint8_t *dst = w_q + o * ldw + g * BC_INT8_BLOCK;
            for (int j = 0; j < BC_INT8_BLOCK; ++j)
                dst[j] = uint8_t((codes[j] + 8) | (codes[BC_INT8_BLOCK + j] + 8) << 4);
        }
    }
}

int bc_int4_linear(const float *x, int64_t n, const uint8_t *w_q, const float *d, int64_t out_features,
                   int64_t in_features, float *y, int isa, int threads) {
    const int64_t ldw = bc_int4_row_bytes(in_features);
    return run_product(kInt4Kernels, x, n, out_features, in_features, isa, threads,
                       [&](Int4RowsFn rows_fn, const BlockActivations &act, int64_t o, int, int64_t t) {
                           rows_fn(w_q + o * ldw, ldw, d + o * act.blocks, act.codes(t), act.scales(t), act.blocks,
                                   y + t * out_features + o);
                       });
}

}  // extern "C"
