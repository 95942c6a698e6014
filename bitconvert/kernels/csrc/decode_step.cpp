// One decoder layer of bitconvert.kernels.decode's loop for ONE token, in place on the hidden state, as one operator:
// the decoding step's per-layer Python and dispatcher calls (a dozen in the per-op path) become one.
//
// x (hidden) is the token's hidden state at position p; H query heads, G KV heads, head dim D, intermediate size I:
//     a       = rms_norm(x, input_norm)        LlamaRMSNorm in fp32: (x * rsqrt(mean(x^2) + eps)) * weight
//     q, k, v = qkv(a)                         one ternary product, one weight scale per row (bc_linear_rows)
//     rotary embedding of q and k at p; keys[:, p] = k, values[:, p] = v        (decode_ops.cpp)
//     o[h]    = sum_{j <= p} softmax_j(D^-0.5 q[h] . keys[g][j]) values[g][j],  g = h / (H / G)
//     x      += o_proj(o)
//     b       = rms_norm(x, post_norm)
//     gate, up = gate_up(b);   x += down(silu(gate) * up)
// keys, values: (G, max_len, D), fp32 or fp16 (read back to fp32 exactly; F16C converts 8 at a time where the CPU
// has it); cos, sin: (>= p + 1, D); everything else fp32.
// Threads: one OpenMP team for the whole layer (torch's thread count): the products' tiles (bc_linear_rows_in_team)
// and attention's heads (with their rotary step) are split over it, and every thread computes the steps between
// them itself (no barrier).
//
// Exactness against the per-op path (F.rms_norm, ternary_linear, rope_cache_write, SDPA, F.silu): the ternary
// products quantize their input per token exactly as ternary_linear does, so equal inputs give bit-identical outputs,
// and the rotary/cache step is the same code. What is summed in another order is the norms' sum of squares and
// attention's dot products and softmax sums (torch blocks and vectorizes its reductions), and the softmax's and SiLU's
// exp is fast_exp.h's polynomial (within 1 ulp of the exact exp, as is torch's own vectorized exp), so the layer's output
// differs from the per-op path's by fp32 rounding -- and, rarely, by one int8 code where that rounding moves an
// activation across a rounding boundary of the next product's quantization.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "decode_ops.h"
#include "fast_exp.h"
#include "op_checks.h"
#include "ternary_core.h"

namespace {

constexpr int kLanes = 8;

// out (n) = (x * (1 / sqrt(mean(x^2) + eps))) * weight, LlamaRMSNorm's fp32 steps; the fp32 squares are summed in
// double, as kLanes partial sums (lane l takes i = l mod kLanes: independent adds the compiler vectorizes) added in lane
// order, and rounded once (torch sums fp32 in its own blocked order, so the sum may differ in the last bit).
void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    double lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const float square = x[i + l] * x[i + l];
            lanes[l] += square;
        }
    for (int l = 0; i + l < n; ++l) {
        const float square = x[i + l] * x[i + l];
        lanes[l] += square;
    }
    double sum = 0.0;
    for (double lane : lanes) sum += lane;
    const float inverse = 1.0f / std::sqrt(float(sum) / float(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * inverse) * weight[i];
}

// sum_d a[d] * b[d] (n values) in fp32 as kLanes partial sums (lane l takes d = l mod kLanes) added in lane order at
// the end: an order the compiler vectorizes without reassociating. b: fp32, or fp16 taken exactly to fp32.
template <typename Cache>
float dot_scalar(const float *a, const Cache *b, int64_t n) {
    float lanes[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * float(b[d + l]);
    for (int l = 0; d + l < n; ++l) lanes[l] += a[d + l] * float(b[d + l]);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    return sum;
}

// out (n) += weight * row (n), each value alone (a product, then a sum).
template <typename Cache>
void add_scaled_scalar(float weight, const Cache *row, int64_t n, float *out) {
    for (int64_t d = 0; d < n; ++d) out[d] += weight * float(row[d]);
}

#define BC_TARGET_F16C __attribute__((target("avx2,f16c")))

// 8 cache values as fp32: loaded, or fp16 converted exactly by F16C.
BC_TARGET_F16C inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
BC_TARGET_F16C inline __m256 load8(const at::Half *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

// dot_scalar on AVX2 (F16C for an fp16 cache): the same lanes, order and roundings (a product, then a sum: no FMA).
template <typename Cache>
BC_TARGET_F16C float dot_avx2(const float *a, const Cache *b, int64_t n) {
    __m256 sums = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes)
        sums = _mm256_add_ps(sums, _mm256_mul_ps(_mm256_loadu_ps(a + d), load8(b + d)));
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, sums);
    for (int l = 0; d + l < n; ++l) lanes[l] += a[d + l] * float(b[d + l]);
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
        for (int64_t j = 0; j < cached; ++j) sum += weights[j] * float(values[j * dim + d]);
        out[d] = sum + weights[cached] * float(current[d]);
    }
}

// Whether this call reads the cache with the AVX2 (and, for fp16, F16C) loops: the CPU has both, and BITCONVERT_ISA
// does not ask for the scalar reference (which then runs the scalar loops above: the same results, tested).
bool use_avx2() {
    static const bool supported =
        (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"));
    return supported && bc_default_isa() > BC_ISA_SCALAR;
}

// out (dim) = sum_j w_j v_j / sum_j w_j with w_j = exp(s_j - max_i s_i), s_j = scale * (q . k_j), over the rows
// j < cached of keys, values (cached, dim) and then the current token's key, value (dim; j = cached, what the cache
// holds at that position): the softmax-weighted mean, stable for any score range. scores: cached + 1 floats of
// scratch. avx2: the AVX2 loops (use_avx2() of the call), else the scalar reference.
template <typename Cache>
void attend(const float *q, const Cache *keys, const Cache *values, int64_t cached, const Cache *key, const Cache *value,
            int64_t dim, float scale, float *scores, float *out, bool avx2) {
    const int64_t length = cached + 1;
    if (avx2) {
        scores_avx2(q, keys, cached, dim, scale, scores);
        scores[cached] = dot_avx2(q, key, dim) * scale;
    } else {
        for (int64_t j = 0; j < cached; ++j) scores[j] = dot_scalar(q, keys + j * dim, dim) * scale;
        scores[cached] = dot_scalar(q, key, dim) * scale;
    }
    float largest = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) largest = std::max(largest, scores[j]);
    bitconvert::fast_exp::exp_shifted(scores, length, largest, avx2);
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

// x (n) += delta (n).
void add(float *x, const float *delta, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += delta[i];
}

// TORCH_CHECKs that `vector` is a contiguous fp32 tensor of n values.
void check_vector(const char *name, const at::Tensor &vector, int64_t n) {
    TORCH_CHECK(vector.dtype() == at::kFloat && vector.is_contiguous() && vector.numel() == n,
                "bitconvert: decode_layer: ", name, " must be contiguous fp32 with ", n, " values, got ",
                vector.sizes(), " ", vector.dtype());
}

// TORCH_CHECKs a product's repacked weight and fp32 per-row scales for in_features inputs; returns its out_features.
int64_t check_product(const char *name, const at::Tensor &weight, int64_t layout, const at::Tensor &scales,
                      int64_t in_features) {
    const int64_t out_features = scales.numel();
    check_vector(name, scales, out_features);
    bitconvert::check_weight(weight, layout, out_features, in_features);
    return out_features;
}

// Per-token work space of the calling thread, one buffer per element type and slot (kShared: what the team shares;
// kOwn, kOwnCache: a thread's own), grown to the largest layer seen and then reused (no allocation).
enum { kShared, kOwn, kOwnCache };
template <typename T, int Slot>
T *workspace(int64_t count) {
    thread_local std::vector<T> buffer;
    if (buffer.size() < size_t(count)) buffer.resize(size_t(count));
    return buffer.data();
}

void decode_layer(at::Tensor x, const at::Tensor &input_norm, const at::Tensor &qkv_weight,
                  const at::Tensor &qkv_scales, const at::Tensor &o_weight, const at::Tensor &o_scales,
                  const at::Tensor &post_norm, const at::Tensor &gate_up_weight, const at::Tensor &gate_up_scales,
                  const at::Tensor &down_weight, const at::Tensor &down_scales, const at::Tensor &cos,
                  const at::Tensor &sin, at::Tensor keys, at::Tensor values, int64_t position, int64_t heads,
                  double eps, int64_t layout) {
    TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && (x.dim() == 1 || (x.dim() == 2 && x.size(0) == 1)),
                "bitconvert: decode_layer runs one token: x must be contiguous fp32 (1, hidden) or (hidden,), got ",
                x.sizes(), " ", x.dtype());
    const int64_t hidden = x.numel();
    check_vector("input_norm", input_norm, hidden);
    check_vector("post_norm", post_norm, hidden);
    const int64_t width = check_product("qkv", qkv_weight, layout, qkv_scales, hidden);
    bitconvert::check_rope_cache("decode_layer", width, cos, sin, keys, values, position, 1, heads);
    const int64_t kv_heads = keys.size(0), max_len = keys.size(1), dim = keys.size(2), length = position + 1;
    TORCH_CHECK(check_product("o_proj", o_weight, layout, o_scales, heads * dim) == hidden,
                "bitconvert: decode_layer: o_proj has ", o_scales.numel(), " rows, expected hidden size ", hidden);
    const int64_t gate_up = check_product("gate_up", gate_up_weight, layout, gate_up_scales, hidden);
    TORCH_CHECK(gate_up % 2 == 0, "bitconvert: decode_layer: gate_up has an odd number of rows, ", gate_up);
    const int64_t intermediate = gate_up / 2;
    TORCH_CHECK(check_product("down", down_weight, layout, down_scales, intermediate) == hidden,
                "bitconvert: decode_layer: down has ", down_scales.numel(), " rows, expected hidden size ", hidden);

    const int threads = bitconvert::resolve_threads(0);
    float *delta = workspace<float, kShared>(hidden + width + heads * dim + gate_up + heads * length);
    float *qkv = delta + hidden, *attention = qkv + width, *gates = attention + heads * dim;
    float *scores = gates + gate_up;
    float *state = x.data_ptr<float>();
    const int lay = int(layout);
    const int64_t padded_in = std::max({bc_padded_in(hidden, lay), bc_padded_in(heads * dim, lay),
                                        bc_padded_in(intermediate, lay)});
    const bool avx2 = use_avx2();
    const float *cos_row = cos.data_ptr<float>() + position * dim, *sin_row = sin.data_ptr<float>() + position * dim;
    const int64_t group = heads / kv_heads;
    const float scale = float(1.0 / std::sqrt(double(dim)));

    // One team for the whole layer: each product's tiles and attention's heads are split over it (worksharing
    // loops, a barrier after each). Opening a parallel region per product instead cost ~1 us each (docs/kernels.md,
    // "One-token fixed costs"). The steps between the products (norms, residual adds, SwiGLU, the products' input
    // quantization) are a few microseconds of serial work: every thread computes them itself, on its own copy of the
    // residual stream and its own quantized row (equal values on every thread), so that no barrier follows them, and
    // the first thread writes the layer's output. So a barrier follows each product (its output is shared) and
    // attention, five per layer; the rotary step runs inside attention's loop (below).
    int error = BC_OK;
    // Attention's heads over the team, each thread rotating its own query heads; the current token's key and value
    // of a KV head are computed by every thread that attends to that head's group, and written to the cache by the
    // thread of the group's first query head (one writer; the others read the position from their own copy, the same
    // values), so that no barrier separates the rotary step from attention.
    auto attend_cache = [&](auto *key_cache, auto *value_cache, float *query) {
        using Cache = std::remove_pointer_t<decltype(key_cache)>;
        Cache *key = workspace<Cache, kOwnCache>(2 * dim), *value = key + dim;
        int64_t current_group = -1;
#pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t g = h / group, cache = g * max_len * dim;
            if (g != current_group) {
                bitconvert::rope_key_value(qkv, cos_row, sin_row, heads, kv_heads, dim, g, key, value);
                current_group = g;
                if (h % group == 0) {
                    std::copy(key, key + dim, key_cache + cache + position * dim);
                    std::copy(value, value + dim, value_cache + cache + position * dim);
                }
            }
            bitconvert::rope_head(qkv + h * dim, cos_row, sin_row, dim, query);
            attend(query, key_cache + cache, value_cache + cache, position, key, value, dim, scale,
                   scores + h * length, attention + h * dim, avx2);
        }
    };
#pragma omp parallel num_threads(threads)
    {
        float *residual = workspace<float, kOwn>(2 * hidden + intermediate + dim);
        float *normed = residual + hidden, *activation = normed + hidden, *query = activation + intermediate;
        int8_t *x_q = workspace<int8_t, kOwn>(padded_in);
        int32_t sum = 0;  // x_q's per-token sum and scale (bc_quantize_padded)
        float s = 0.0f;
        auto product = [&](const float *input, int64_t in_features, const at::Tensor &weight,
                           const at::Tensor &scales, float *y) {
            bc_quantize_padded(input, 1, in_features, lay, x_q, &sum, &s);
            const int code = bc_linear_rows_in_team(x_q, sum, s, weight.data_ptr<uint8_t>(), lay, scales.numel(),
                                                    in_features, scales.data_ptr<float>(), y, BC_ISA_AUTO);
            if (code != BC_OK) {
#pragma omp atomic write
                error = code;
            }
        };
        std::copy(state, state + hidden, residual);
        rms_norm(residual, input_norm.data_ptr<float>(), hidden, float(eps), normed);
        product(normed, hidden, qkv_weight, qkv_scales, qkv);
        if (keys.dtype() == at::kHalf)
            attend_cache(keys.data_ptr<at::Half>(), values.data_ptr<at::Half>(), query);
        else
            attend_cache(keys.data_ptr<float>(), values.data_ptr<float>(), query);
        product(attention, heads * dim, o_weight, o_scales, delta);
        add(residual, delta, hidden);
        rms_norm(residual, post_norm.data_ptr<float>(), hidden, float(eps), normed);
        product(normed, hidden, gate_up_weight, gate_up_scales, gates);
        bitconvert::fast_exp::swiglu(gates, intermediate, activation, avx2);  // silu(gate) * up
        product(activation, intermediate, down_weight, down_scales, delta);
#pragma omp masked
        {
            add(residual, delta, hidden);
            std::copy(residual, residual + hidden, state);
        }
    }
    bitconvert::check_result(error, BC_ISA_AUTO);
}

// exp of every value of x (contiguous fp32) by fast_exp.h, the AVX2 loop where use_avx2() and simd allow: what the
// fused step's softmax and SiLU compute, exposed for tests.
at::Tensor exp_approx(const at::Tensor &x, bool simd) {
    TORCH_CHECK(x.dtype() == at::kFloat, "bitconvert: exp_approx takes fp32, got ", x.dtype());
    at::Tensor out = x.contiguous().clone();
    bitconvert::fast_exp::exp_shifted(out.data_ptr<float>(), out.numel(), 0.0f, simd && use_avx2());
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitconvert, m) {
    m.def("exp_approx(Tensor x, bool simd=True) -> Tensor");
    m.def("decode_layer(Tensor(a!) x, Tensor input_norm, Tensor qkv_weight, Tensor qkv_scales, Tensor o_weight, "
          "Tensor o_scales, Tensor post_norm, Tensor gate_up_weight, Tensor gate_up_scales, Tensor down_weight, "
          "Tensor down_scales, Tensor cos, Tensor sin, Tensor(b!) keys, Tensor(c!) values, int position, int heads, "
          "float eps, int layout=0) -> ()");
}

TORCH_LIBRARY_IMPL(bitconvert, CPU, m) {
    m.impl("decode_layer", &decode_layer);
    m.impl("exp_approx", &exp_approx);
}
