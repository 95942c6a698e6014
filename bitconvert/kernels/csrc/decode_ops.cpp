// Decoding-loop helper of bitconvert.kernels.decode (CPU, fp32): the rotary embedding of q and k and the KV-cache
// write of one layer in one operator, replacing about fifteen small torch calls per layer and token.
//
// qkv (T, (H + 2 G) * D) holds, per token, H query heads, G key heads and G value heads of D values. With
// cos, sin (>= start + T, D) the rotary tables and rotate(x) = (-x[D/2:], x[:D/2]) (transformers' rotate_half):
//     q[h][t]              = qkv_q[t][h] * cos[start + t] + rotate(qkv_q[t][h]) * sin[start + t]    returned (H, T, D)
//     keys[g][start + t]   = the same for the key heads                                           written in place
//     values[g][start + t] = qkv_v[t][g]                                                          written in place
// keys, values: (G, max_len, D), fp32 or fp16 (a cache of half the bytes; each value rounded to fp16 as `.half()`
// rounds it). Each element is rounded as torch rounds `x * cos + r * sin` (two products, one sum; the library is
// built with -ffp-contract=off), so the result equals transformers' apply_rotary_pos_emb bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "attention_core.h"
#include "decode_ops.h"

namespace bitconvert {

void rope_head(const float *x, const float *cos, const float *sin, int64_t dim, float *out) {
    attention::rope_halves(x, cos, sin, cos + dim / 2, sin + dim / 2, dim, out);
}

template <typename Cache>
void rope_key_value(const float *row, const float *cos, const float *sin, int64_t heads, int64_t kv_heads,
                    int64_t dim, int64_t group, Cache *key, Cache *value) {
    const float *key_in = row + (heads + group) * dim, *value_in = row + (heads + kv_heads + group) * dim;
    if constexpr (std::is_same_v<Cache, float>) {
        rope_head(key_in, cos, sin, dim, key);
        std::memcpy(value, value_in, size_t(dim) * sizeof(float));
    } else {
        thread_local std::vector<float> rotated;
        rotated.resize(size_t(dim));
        rope_head(key_in, cos, sin, dim, rotated.data());
        for (int64_t d = 0; d < dim; ++d) {
            key[d] = Cache(rotated[d]);
            value[d] = Cache(value_in[d]);
        }
    }
}

template <typename Cache>
void rope_cache_write_token(const float *row, const float *cos, const float *sin, int64_t heads, int64_t kv_heads,
                            int64_t dim, float *q, int64_t q_head_stride, Cache *keys, Cache *values,
                            int64_t cache_head_stride) {
    for (int64_t h = 0; h < heads; ++h) rope_head(row + h * dim, cos, sin, dim, q + h * q_head_stride);
    for (int64_t g = 0; g < kv_heads; ++g)
        rope_key_value(row, cos, sin, heads, kv_heads, dim, g, keys + g * cache_head_stride,
                       values + g * cache_head_stride);
}

template void rope_key_value<float>(const float *, const float *, const float *, int64_t, int64_t, int64_t, int64_t,
                                    float *, float *);
template void rope_key_value<at::Half>(const float *, const float *, const float *, int64_t, int64_t, int64_t,
                                       int64_t, at::Half *, at::Half *);
template void rope_cache_write_token<float>(const float *, const float *, const float *, int64_t, int64_t, int64_t,
                                            float *, int64_t, float *, float *, int64_t);
template void rope_cache_write_token<at::Half>(const float *, const float *, const float *, int64_t, int64_t, int64_t,
                                               float *, int64_t, at::Half *, at::Half *, int64_t);

void check_rope_cache(const char *op, int64_t width, const at::Tensor &cos, const at::Tensor &sin,
                      const at::Tensor &keys, const at::Tensor &values, int64_t start, int64_t count, int64_t heads) {
    TORCH_CHECK(cos.dtype() == at::kFloat && sin.dtype() == at::kFloat &&
                    (keys.dtype() == at::kFloat || keys.dtype() == at::kHalf) && values.dtype() == keys.dtype(),
                "bitconvert: ", op, " takes fp32 rotary tables and an fp32 or fp16 KV cache (keys and values alike)");
    TORCH_CHECK(keys.dim() == 3 && values.sizes() == keys.sizes() && keys.is_contiguous() && values.is_contiguous() &&
                    cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous(),
                "bitconvert: ", op, " expects contiguous keys/values (G, max_len, D) and rotary tables (positions, D)");
    const int64_t kv_heads = keys.size(0), max_len = keys.size(1), dim = keys.size(2);
    TORCH_CHECK(heads > 0 && heads % kv_heads == 0, "bitconvert: ", op, ": ", heads,
                " query heads are not a multiple of ", kv_heads, " KV heads");
    TORCH_CHECK(width == (heads + 2 * kv_heads) * dim && dim % 2 == 0, "bitconvert: ", op, ": qkv width ", width,
                " does not match ", heads, " + 2 x ", kv_heads, " heads of ", dim);
    TORCH_CHECK(start >= 0 && start + count <= max_len && cos.size(0) >= start + count && cos.size(1) == dim &&
                    sin.sizes() == cos.sizes(),
                "bitconvert: ", op, ": positions ", start, "..", start + count, " exceed the cache (", max_len,
                ") or the rotary tables");
}

}  // namespace bitconvert

namespace {

at::Tensor rope_cache_write(const at::Tensor &qkv, const at::Tensor &cos, const at::Tensor &sin, at::Tensor keys,
                            at::Tensor values, int64_t start, int64_t heads) {
    TORCH_CHECK(qkv.dtype() == at::kFloat && qkv.dim() == 2, "bitconvert: rope_cache_write takes fp32 qkv (T, width)");
    const int64_t count = qkv.size(0), width = qkv.size(1);
    bitconvert::check_rope_cache("rope_cache_write", width, cos, sin, keys, values, start, count, heads);
    const int64_t kv_heads = keys.size(0), max_len = keys.size(1), dim = keys.size(2);
    const at::Tensor x = qkv.contiguous();
    at::Tensor q = at::empty({heads, count, dim}, x.options());
    const float *src = x.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
    float *q_out = q.data_ptr<float>();
    auto write = [&](auto *k_out, auto *v_out) {
        for (int64_t t = 0; t < count; ++t) {
            const int64_t position = start + t;
            bitconvert::rope_cache_write_token(src + t * width, c + position * dim, s + position * dim, heads,
                                               kv_heads, dim, q_out + t * dim, count * dim, k_out + position * dim,
                                               v_out + position * dim, max_len * dim);
        }
    };
    if (keys.dtype() == at::kHalf)
        write(keys.data_ptr<at::Half>(), values.data_ptr<at::Half>());
    else
        write(keys.data_ptr<float>(), values.data_ptr<float>());
    return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitconvert, m) {
    m.def("rope_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, int start, "
          "int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitconvert, CPU, m) { m.impl("rope_cache_write", &rope_cache_write); }
