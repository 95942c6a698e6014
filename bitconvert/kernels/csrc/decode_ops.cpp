// Decoding-loop helper of bitconvert.kernels.decode (CPU, fp32): the rotary embedding of q and k and the KV-cache
// write of one layer in one operator, replacing about fifteen small torch calls per layer and token.
//
// qkv (T, (H + 2 G) * D) holds, per token, H query heads, G key heads and G value heads of D values. With
// cos, sin (>= start + T, D) the rotary tables and rotate(x) = (-x[D/2:], x[:D/2]) (transformers' rotate_half):
//     q[h][t]              = qkv_q[t][h] * cos[start + t] + rotate(qkv_q[t][h]) * sin[start + t]    returned (H, T, D)
//     keys[g][start + t]   = the same for the key heads                                           written in place
//     values[g][start + t] = qkv_v[t][g]                                                          written in place
// keys, values: (G, max_len, D). Each element is rounded as torch rounds `x * cos + r * sin` (two products, one
// sum; the library is built with -ffp-contract=off), so the result equals transformers' apply_rotary_pos_emb bit
// for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

namespace {

void rotate(const float *x, const float *cos, const float *sin, int64_t dim, float *out) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < dim; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

at::Tensor rope_cache_write(const at::Tensor &qkv, const at::Tensor &cos, const at::Tensor &sin, at::Tensor keys,
                            at::Tensor values, int64_t start, int64_t heads) {
    TORCH_CHECK(qkv.dtype() == at::kFloat && cos.dtype() == at::kFloat && sin.dtype() == at::kFloat &&
                    keys.dtype() == at::kFloat && values.dtype() == at::kFloat,
                "bitconvert: rope_cache_write takes fp32 tensors");
    TORCH_CHECK(qkv.dim() == 2 && keys.dim() == 3 && values.sizes() == keys.sizes() && keys.is_contiguous() &&
                    values.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
                "bitconvert: rope_cache_write expects qkv (T, width), contiguous keys/values (G, max_len, D)");
    const int64_t count = qkv.size(0), kv_heads = keys.size(0), max_len = keys.size(1), dim = keys.size(2);
    TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim && dim % 2 == 0, "bitconvert: qkv width ", qkv.size(1),
                " does not match ", heads, " + 2 x ", kv_heads, " heads of ", dim);
    TORCH_CHECK(start >= 0 && start + count <= max_len && cos.size(0) >= start + count && cos.size(1) == dim &&
                    sin.sizes() == cos.sizes(),
                "bitconvert: positions ", start, "..", start + count, " exceed the cache or the rotary tables");
    const at::Tensor x = qkv.contiguous();
    at::Tensor q = at::empty({heads, count, dim}, x.options());
    const float *src = x.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
    float *q_out = q.data_ptr<float>(), *k_out = keys.data_ptr<float>(), *v_out = values.data_ptr<float>();
    const int64_t width = x.size(1);
    for (int64_t t = 0; t < count; ++t) {
        const float *row = src + t * width, *ct = c + (start + t) * dim, *st = s + (start + t) * dim;
        for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, ct, st, dim, q_out + (h * count + t) * dim);
        for (int64_t g = 0; g < kv_heads; ++g) {
            const int64_t at = (g * max_len + start + t) * dim;
            rotate(row + (heads + g) * dim, ct, st, dim, k_out + at);
            std::memcpy(v_out + at, row + (heads + kv_heads + g) * dim, size_t(dim) * sizeof(float));
        }
    }
    return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitconvert, m) {
    m.def("rope_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, int start, "
          "int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitconvert, CPU, m) { m.impl("rope_cache_write", &rope_cache_write); }
