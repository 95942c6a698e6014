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

#include "attention_core.h"
#include "decode_ops.h"
#include "fast_exp.h"
#include "norm_core.h"
#include "op_checks.h"
#include "ternary_core.h"

namespace {

using bitconvert::attention::attend;
using bitconvert::attention::use_avx2;
using bitconvert::rms_norm;

// A cache's rows as attention_core.h reads them: fp32 as they are, fp16 as its bits.
const float *cache_rows(const float *rows) { return rows; }
const uint16_t *cache_rows(const at::Half *rows) {
    static_assert(sizeof(at::Half) == sizeof(uint16_t), "at::Half holds the 16 bits of an fp16 value");
    return reinterpret_cast<const uint16_t *>(rows);
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
            attend(query, cache_rows(key_cache + cache), cache_rows(value_cache + cache), position, cache_rows(key),
                   cache_rows(value), dim, scale, nullptr, scores + h * length, attention + h * dim, avx2);
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
