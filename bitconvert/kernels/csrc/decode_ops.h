// Shared by the decoding operators (decode_ops.cpp, decode_step.cpp): the rotary embedding + KV-cache write of one
// token, and the checks of the tensors it touches. Math and layouts: decode_ops.cpp's header comment.
#ifndef BITCONVERT_DECODE_OPS_H
#define BITCONVERT_DECODE_OPS_H

#include <ATen/ATen.h>

#include <cstdint>

namespace bitconvert {

// out (dim) = x (one head of dim values) rotated by the tables cos, sin (dim) of its position.
void rope_head(const float *x, const float *cos, const float *sin, int64_t dim, float *out);

// KV head `group` of one token as the cache holds it: key (dim) = its key head rotated, value (dim) = its value head
// (row, cos, sin as below; Cache as below).
template <typename Cache>
void rope_key_value(const float *row, const float *cos, const float *sin, int64_t heads, int64_t kv_heads,
                    int64_t dim, int64_t group, Cache *key, Cache *value);

// One token: row ((heads + 2 kv_heads) * dim) holds its q, k and v heads; cos, sin (dim) the rotary tables at its
// position. Writes q head h to q + h * q_head_stride, the rotated key head g to keys + g * cache_head_stride and value
// head g to values + g * cache_head_stride (keys and values point at the token's slot of KV head 0). Cache: float,
// or at::Half (each value rounded to the nearest fp16, ties to even, as torch's .half() rounds it).
template <typename Cache>
void rope_cache_write_token(const float *row, const float *cos, const float *sin, int64_t heads, int64_t kv_heads,
                            int64_t dim, float *q, int64_t q_head_stride, Cache *keys, Cache *values,
                            int64_t cache_head_stride);

// TORCH_CHECKs that `op` may write `count` tokens of qkv width `width` at positions start .. start + count - 1:
// contiguous keys/values (G, max_len, D) of one shape and one dtype, fp32 or fp16, fp32 contiguous cos/sin
// (>= start + count, D), an even D, width == (heads + 2 G) D.
void check_rope_cache(const char *op, int64_t width, const at::Tensor &cos, const at::Tensor &sin,
                      const at::Tensor &keys, const at::Tensor &values, int64_t start, int64_t count, int64_t heads);

}  // namespace bitconvert

#endif
