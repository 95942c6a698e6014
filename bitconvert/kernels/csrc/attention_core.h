// One query head's attention over a KV cache, and the rotary embedding of one head: the math that both the PyTorch
// decode step (decode_step.cpp, decode_ops.cpp) and ONNX Runtime's CachedAttention (export/csrc/attention_ort_op.cpp)
// run, free of torch and of ONNX Runtime. Header only (templates and inline functions).
//
// Cache rows: float, or uint16_t holding fp16 bits (at::Half's layout), read back to fp32 exactly and written by
// float_to_half (fp16.h). Each loop has a
// scalar reference and an AVX2 (+ F16C for fp16) form that computes the same bits: the same products and sums in the
// same order, no FMA (the libraries build with -ffp-contract=off).
#ifndef BITCONVERT_ATTENTION_CORE_H
#define BITCONVERT_ATTENTION_CORE_H

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fast_exp.h"
#include "fp16.h"
#include "ternary_core.h"

namespace bitconvert {
namespace attention {

using bitconvert::float_to_half;
using bitconvert::to_float;

constexpr int kLanes = 8;

inline void store(float x, float *out) { *out = x; }
inline void store(float x, uint16_t *out) { *out = float_to_half(x); }

// out (dim) = x (one head of dim values) rotated by the tables of its position, on halves x1 = x[:dim/2],
// x2 = x[dim/2:]: out = (x1 cos_lo + (-x2) sin_lo, x2 cos_hi + x1 sin_hi), each value two products and one sum
// (transformers' x * cos + rotate_half(x) * sin, whose tables repeat one half: pass the same half twice, or the two
// halves of a full (dim) row).
inline void rope_halves(const float *x, const float *cos_lo, const float *sin_lo, const float *cos_hi,
                        const float *sin_hi, int64_t dim, float *out) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos_lo[i] + (-x[i + half]) * sin_lo[i];
    for (int64_t i = 0; i < half; ++i) out[half + i] = x[half + i] * cos_hi[i] + x[i] * sin_hi[i];
}

// sum_d a[d] * b[d] (n values) in fp32 as kLanes partial sums (lane l takes d = l mod kLanes) added in lane order at
// the end: an order the compiler vectorizes without reassociating.
template <typename Cache>
float dot_scalar(const float *a, const Cache *b, int64_t n) {
    float lanes[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * to_float(b[d + l]);
    for (int l = 0; d + l < n; ++l) lanes[l] += a[d + l] * to_float(b[d + l]);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    return sum;
}

// out (n) += weight * row (n), each value alone (a product, then a sum).
template <typename Cache>
void add_scaled_scalar(float weight, const Cache *row, int64_t n, float *out) {
    for (int64_t d = 0; d < n; ++d) out[d] += weight * to_float(row[d]);
}

#define BC_TARGET_F16C __attribute__((target("avx2,f16c")))

// 8 cache values as fp32: loaded, or fp16 converted exactly by F16C.
BC_TARGET_F16C inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
BC_TARGET_F16C inline __m256 load8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

// dot_scalar on AVX2: the same lanes, order and roundings (a product, then a sum).
template <typename Cache>
BC_TARGET_F16C float dot_avx2(const float *a, const Cache *b, int64_t n) {
    __m256 sums = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes)
        sums = _mm256_add_ps(sums, _mm256_mul_ps(_mm256_loadu_ps(a + d), load8(b + d)));
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, sums);
    for (int l = 0; d + l < n; ++l) lanes[l] += a[d + l] * to_float(b[d + l]);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    return sum;
}

// rows[i] (8 x 8 fp32) transposed in place: lane r of rows[l] becomes lane l of rows[r].
BC_TARGET_F16C inline void transpose8(__m256 rows[kLanes]) {
    __m256 low[4], high[4], quads[kLanes];
    for (int i = 0; i < 4; ++i) {
        low[i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        high[i] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
        quads[4 * i + 0] = _mm256_shuffle_ps(low[2 * i], low[2 * i + 1], 0x44);
        quads[4 * i + 1] = _mm256_shuffle_ps(low[2 * i], low[2 * i + 1], 0xEE);
        quads[4 * i + 2] = _mm256_shuffle_ps(high[2 * i], high[2 * i + 1], 0x44);
        quads[4 * i + 3] = _mm256_shuffle_ps(high[2 * i], high[2 * i + 1], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        rows[i] = _mm256_permute2f128_ps(quads[i], quads[4 + i], 0x20);
        rows[4 + i] = _mm256_permute2f128_ps(quads[i], quads[4 + i], 0x31);
    }
}

// scores[j] = dot_scalar(q, keys + j * dim, dim) * scale for j < length, bit for bit: 8 rows at a time where dim is
// a multiple of 8 (8 independent sums instead of one chain of dependent adds; the 8 rows' lanes are then transposed
// and added lane 0 first, which is dot_scalar's final sum for all 8 rows in one register), the rest by dot_avx2.
template <typename Cache>
BC_TARGET_F16C void scores_avx2(const float *q, const Cache *keys, int64_t length, int64_t dim, float scale,
                                float *scores) {
    int64_t j = 0;
    if (dim % kLanes == 0) {
        const __m256 factor = _mm256_set1_ps(scale);
        for (; j + kLanes <= length; j += kLanes) {
            __m256 sums[kLanes];
            for (int r = 0; r < kLanes; ++r) sums[r] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += kLanes) {
                const __m256 a = _mm256_loadu_ps(q + d);
                for (int r = 0; r < kLanes; ++r)
                    sums[r] = _mm256_add_ps(sums[r], _mm256_mul_ps(a, load8(keys + (j + r) * dim + d)));
            }
            transpose8(sums);
            __m256 total = _mm256_setzero_ps();
            for (int l = 0; l < kLanes; ++l) total = _mm256_add_ps(total, sums[l]);
            _mm256_storeu_ps(scores + j, _mm256_mul_ps(total, factor));
        }
    }
    for (; j < length; ++j) scores[j] = dot_avx2(q, keys + j * dim, dim) * scale;
}

// out[d0 + c] = sum_j weights[j] * row_j[d0 + c] for c < 8 * Regs over the rows j <= cached (row_j = values + j * dim
// below `cached`, then `current`), j ascending from a zero sum (a product, then a sum): add_scaled_scalar's order over
// the rows, held in Regs registers instead of stored and reloaded per row.
template <int Regs, typename Cache>
BC_TARGET_F16C inline void weighted_columns(const float *weights, const Cache *values, int64_t cached,
                                            const Cache *current, int64_t dim, int64_t d0, float *out) {
    __m256 sums[Regs];
    for (int r = 0; r < Regs; ++r) sums[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j <= cached; ++j) {
        const __m256 weight = _mm256_set1_ps(weights[j]);
        const Cache *row = (j < cached ? values + j * dim : current) + d0;
        for (int r = 0; r < Regs; ++r)
            sums[r] = _mm256_add_ps(sums[r], _mm256_mul_ps(weight, load8(row + r * kLanes)));
    }
    for (int r = 0; r < Regs; ++r) _mm256_storeu_ps(out + d0 + r * kLanes, sums[r]);
}

// out (dim) = sum_j weights[j] * row_j over the cached rows of values and then current (weighted_columns' rows), as
// zeroing out and add_scaled_scalar row by row computes it (bit for bit): 64, then 32, 16 and 8 columns at a time,
// then the last dim % 8 alone.
template <typename Cache>
BC_TARGET_F16C void weighted_sum_avx2(const float *weights, const Cache *values, int64_t cached, const Cache *current,
                                      int64_t dim, float *out) {
    int64_t d = 0;
    for (; d + 8 * kLanes <= dim; d += 8 * kLanes) weighted_columns<8>(weights, values, cached, current, dim, d, out);
    if (d + 4 * kLanes <= dim) weighted_columns<4>(weights, values, cached, current, dim, d, out), d += 4 * kLanes;
    if (d + 2 * kLanes <= dim) weighted_columns<2>(weights, values, cached, current, dim, d, out), d += 2 * kLanes;
    if (d + kLanes <= dim) weighted_columns<1>(weights, values, cached, current, dim, d, out), d += kLanes;
    for (; d < dim; ++d) {
        float sum = 0.0f;
        for (int64_t j = 0; j < cached; ++j) sum += weights[j] * to_float(values[j * dim + d]);
        out[d] = sum + weights[cached] * to_float(current[d]);
    }
}

// Whether to read the cache with the AVX2 (and F16C) loops: the CPU has both, and BITCONVERT_ISA does not ask for the
// scalar reference (which then runs the scalar loops above: the same results, tested).
inline bool use_avx2() {
    static const bool supported =
        (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"));
    return supported && bc_default_isa() > BC_ISA_SCALAR;
}

// out (dim) = sum_j w_j v_j / sum_j w_j with w_j = exp(s_j - max_i s_i), s_j = scale * (q . k_j) (+ bias[j] when
// bias is not null), over the rows j < cached of keys, values (cached, dim) and then the current token's key, value
// (dim; j = cached, what the cache holds at that position): the softmax-weighted mean, stable for any score range.
// scores: cached + 1 floats of scratch. avx2: the AVX2 loops (use_avx2() of the call), else the scalar reference.
template <typename Cache>
void attend(const float *q, const Cache *keys, const Cache *values, int64_t cached, const Cache *key,
            const Cache *value, int64_t dim, float scale, const float *bias, float *scores, float *out, bool avx2) {
    const int64_t length = cached + 1;
    if (avx2) {
        scores_avx2(q, keys, cached, dim, scale, scores);
        scores[cached] = dot_avx2(q, key, dim) * scale;
    } else {
        for (int64_t j = 0; j < cached; ++j) scores[j] = dot_scalar(q, keys + j * dim, dim) * scale;
        scores[cached] = dot_scalar(q, key, dim) * scale;
    }
    if (bias != nullptr)
        for (int64_t j = 0; j < length; ++j) scores[j] += bias[j];
    float largest = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) largest = std::max(largest, scores[j]);
    fast_exp::exp_shifted(scores, length, largest, avx2);
    float total = 0.0f;
    for (int64_t j = 0; j < length; ++j) total += scores[j];
    if (avx2) {
        weighted_sum_avx2(scores, values, cached, value, dim, out);
    } else {
        std::fill(out, out + dim, 0.0f);
        for (int64_t j = 0; j < cached; ++j) add_scaled_scalar(scores[j], values + j * dim, dim, out);
        add_scaled_scalar(scores[cached], value, dim, out);
    }
    for (int64_t d = 0; d < dim; ++d) out[d] /= total;
}

}  // namespace attention
}  // namespace bitconvert

#endif
