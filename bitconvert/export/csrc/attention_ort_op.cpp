// ONNX Runtime custom operator com.bitconvert::CachedAttention (version 1): grouped-query attention with the rotary
// embedding and a KV cache, on the decode step's attention loops (bitconvert/kernels/csrc/attention_core.h), in place
// of com.microsoft::GroupQueryAttention. It takes the inputs and attributes of the GroupQueryAttention node that
// bitconvert's fused graph emits (packed q/k/v, rotary inside on halves, an additive bias) and gives its outputs:
//
//   out, present_key, present_value = CachedAttention(qkv, past_key, past_value, seqlens_k, total_length, cos_cache,
//                                                      sin_cache, attention_bias; num_heads = H, kv_num_heads = G)
//   qkv              float (B, S, (H + 2 G) D)  per token: H query heads, then G key heads, then G value heads
//   past_key/value   C (B, G, L, D)             the cache: L = T - S positions, or a buffer of L >= T positions
//   seqlens_k        int32 (B,)                 token s of row b sits at position p = seqlens_k[b] + 1 - S + s
//   total_length     int32 ()                   T, the positions attention_bias covers
//   cos/sin_cache    float (M, D / 2)           the rotary tables' first half (LLaMA's second half repeats it)
//   attention_bias   float (B, 1, S, T)         added to the scores (0, or a large negative number at padding)
//   out              float (B, S, H D)          out[b, s, h] = sum_{j <= p} softmax_j(D^-0.5 q.k_j + bias[b,0,s,j]) v_j
//   present_key/value C (B, G, max(L, T), D)   the cache with the S tokens' rotated keys and values at rows p
//
// C: float, or float16 (a cache of half the bytes: each new key and value rounded to fp16, ties to even, and read
// back to fp32 exactly by the attention loops, as the lean decoder's fp16 cache; everything else stays fp32).
// q and k are rotated at p (attention_core.h's rope_halves); query head h reads KV head h / (H / G). A buffer
// (L >= T) bound as both past and present (IOBinding, as bitconvert's OnnxDecoder does) is written in place at rows
// p and nothing is copied; otherwise the L past rows are copied into present first. Each (b, s, h) is
// attention_core.h's attend over the rows 0..p of present, in fp32, the loops of bitconvert.load's decode step (plus
// the bias); against GroupQueryAttention the output differs by float rounding (tests/test_export.py bounds it).
//
// Threads: ONNX Runtime's intra-op pool. The cache write is one item per (b, KV head), on the calling thread when
// it is a decoding step's few rows already in place; attention is cut into parts of whole (b, s, h) items of at
// least kMinWorkPerPart multiply-adds (a short decoding step at SmolLM2's shapes is one part: handing it out would
// cost more than it computes).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_core.h"
#include "ort_op_common.h"

namespace {

using bitconvert_ort::ceil_div;
using bitconvert_ort::OpError;
using bitconvert_ort::shape_string;

constexpr int64_t kMinWorkPerPart = int64_t(1) << 15;  // multiply-adds (scores and weighted sum)
constexpr int64_t kMaxParts = 32;

// Cache: float, or uint16_t for an fp16 cache (its bits).
template <typename Cache>
struct AttentionJob {
    const float *qkv, *cos, *sin, *bias;
    const Cache *past_key, *past_value;
    const int32_t *seqlens;
    float *out;
    Cache *key, *value;  // present_key, present_value
    int64_t batch, length, total, heads, kv_heads, dim, past_rows, rows, items, parts;
    bool copy_past, avx2;
    float scale;

    int64_t position(int64_t b, int64_t s) const { return int64_t(seqlens[b]) + 1 - length + s; }
    const float *token(int64_t b, int64_t s) const { return qkv + (b * length + s) * (heads + 2 * kv_heads) * dim; }
    int64_t cache_offset(int64_t b, int64_t g) const { return (b * kv_heads + g) * rows * dim; }
};

// Item (b, g): present's rows of KV head g of row b: the past rows copied (unless in place), then each token's key
// rotated at its position and its value (each rounded to fp16 for an fp16 cache).
template <typename Cache>
void write_rows(void *data, size_t index) {
    const AttentionJob<Cache> &job = *static_cast<const AttentionJob<Cache> *>(data);
    const int64_t b = int64_t(index) / job.kv_heads, g = int64_t(index) % job.kv_heads;
    const int64_t half = job.dim / 2, offset = job.cache_offset(b, g);
    Cache *keys = job.key + offset, *values = job.value + offset;
    if (job.copy_past) {
        const int64_t past = (b * job.kv_heads + g) * job.past_rows * job.dim;
        std::memcpy(keys, job.past_key + past, size_t(job.past_rows * job.dim) * sizeof(Cache));
        std::memcpy(values, job.past_value + past, size_t(job.past_rows * job.dim) * sizeof(Cache));
    }
    thread_local std::vector<float> rotated;
    rotated.resize(size_t(job.dim));
    for (int64_t s = 0; s < job.length; ++s) {
        const int64_t p = job.position(b, s);
        const float *row = job.token(b, s), *cos = job.cos + p * half, *sin = job.sin + p * half;
        const float *value = row + (job.heads + job.kv_heads + g) * job.dim;
        bitconvert::attention::rope_halves(row + (job.heads + g) * job.dim, cos, sin, cos, sin, job.dim,
                                           rotated.data());
        for (int64_t d = 0; d < job.dim; ++d) {
            bitconvert::attention::store(rotated[size_t(d)], keys + p * job.dim + d);
            bitconvert::attention::store(value[d], values + p * job.dim + d);
        }
    }
}

// Part `index` of the (b, s, h) items, in that order: each query head rotated at its position and attended over
// present's rows 0..p of its KV head.
template <typename Cache>
void attend_part(void *data, size_t index) {
    const AttentionJob<Cache> &job = *static_cast<const AttentionJob<Cache> *>(data);
    const int64_t first = int64_t(index) * job.items / job.parts, last = (int64_t(index) + 1) * job.items / job.parts;
    const int64_t half = job.dim / 2, group = job.heads / job.kv_heads;
    thread_local std::vector<float> scratch;
    if (scratch.size() < size_t(job.dim + job.total)) scratch.resize(size_t(job.dim + job.total));
    float *query = scratch.data(), *scores = query + job.dim;
    for (int64_t item = first; item < last; ++item) {
        const int64_t h = item % job.heads, s = item / job.heads % job.length, b = item / (job.heads * job.length);
        const int64_t p = job.position(b, s), offset = job.cache_offset(b, h / group);
        const float *cos = job.cos + p * half, *sin = job.sin + p * half;
        bitconvert::attention::rope_halves(job.token(b, s) + h * job.dim, cos, sin, cos, sin, job.dim, query);
        const Cache *keys = job.key + offset, *values = job.value + offset;
        bitconvert::attention::attend(query, keys, values, p, keys + p * job.dim, values + p * job.dim, job.dim,
                                      job.scale, job.bias + (b * job.length + s) * job.total, scores,
                                      job.out + ((b * job.length + s) * job.heads + h) * job.dim, job.avx2);
    }
}

template <typename Cache>
struct CachedAttentionKernel : bitconvert_ort::KernelBase<CachedAttentionKernel<Cache>> {
    int64_t heads = 0, kv_heads = 0;

    explicit CachedAttentionKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo kernel_info(info);
        heads = kernel_info.GetAttribute<int64_t>("num_heads");
        kv_heads = kernel_info.GetAttribute<int64_t>("kv_num_heads");
        if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0)
            throw OpError("CachedAttention: num_heads (" + std::to_string(heads) + ") must be a positive multiple of "
                          "kv_num_heads (" + std::to_string(kv_heads) + ")");
    }

    static std::vector<int64_t> shape_of(const Ort::ConstValue &value) {
        return value.GetTensorTypeAndShapeInfo().GetShape();
    }

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue qkv = ctx.GetInput(0), past_key = ctx.GetInput(1), past_value = ctx.GetInput(2),
                        seqlens = ctx.GetInput(3), total_length = ctx.GetInput(4), cos = ctx.GetInput(5),
                        sin = ctx.GetInput(6), bias = ctx.GetInput(7);
        const std::vector<int64_t> qkv_shape = shape_of(qkv), cache_shape = shape_of(past_key);
        if (qkv_shape.size() != 3 || cache_shape.size() != 4 || shape_of(past_value) != cache_shape)
            throw OpError("CachedAttention: qkv " + shape_string(qkv_shape) + " must be (B, S, W) and past_key, "
                          "past_value one shape (B, G, L, D), got " + shape_string(cache_shape) + " and " +
                          shape_string(shape_of(past_value)));
        AttentionJob<Cache> job{};
        job.batch = qkv_shape[0];
        job.length = qkv_shape[1];
        job.heads = heads;
        job.kv_heads = kv_heads;
        job.dim = cache_shape[3];
        job.past_rows = cache_shape[2];
        if (cache_shape[0] != job.batch || cache_shape[1] != kv_heads || job.dim % 2 != 0 ||
            qkv_shape[2] != (heads + 2 * kv_heads) * job.dim)
            throw OpError("CachedAttention: qkv " + shape_string(qkv_shape) + " and past_key " +
                          shape_string(cache_shape) + " do not match " + std::to_string(heads) + " + 2 x " +
                          std::to_string(kv_heads) + " heads of an even head size");
        if (shape_of(total_length).size() != 0 || shape_of(seqlens) != std::vector<int64_t>{job.batch})
            throw OpError("CachedAttention: total_length must be a scalar and seqlens_k (B,)");
        job.total = *total_length.GetTensorData<int32_t>();
        const int64_t half = job.dim / 2;
        const std::vector<int64_t> table_shape = shape_of(cos);
        if (table_shape.size() != 2 || table_shape[1] != half || shape_of(sin) != table_shape)
            throw OpError("CachedAttention: cos_cache and sin_cache must both be (M, D / 2) = (M, " +
                          std::to_string(half) + "), got " + shape_string(table_shape) + " and " +
                          shape_string(shape_of(sin)));
        if (shape_of(bias) != std::vector<int64_t>{job.batch, 1, job.length, job.total})
            throw OpError("CachedAttention: attention_bias has shape " + shape_string(shape_of(bias)) +
                          ", expected (B, 1, S, T) = " + shape_string({job.batch, 1, job.length, job.total}));
        if (job.past_rows < job.total && job.past_rows != job.total - job.length)
            throw OpError("CachedAttention: past_key holds " + std::to_string(job.past_rows) + " positions; it must "
                          "hold the T - S = " + std::to_string(job.total - job.length) + " past ones, or be a buffer "
                          "of at least T = " + std::to_string(job.total));
        job.rows = std::max(job.past_rows, job.total);
        job.seqlens = seqlens.GetTensorData<int32_t>();
        for (int64_t b = 0; b < job.batch && job.length > 0; ++b) {
            const int64_t first = job.position(b, 0), last = job.position(b, job.length - 1);
            if (first < 0 || last >= job.total || last >= table_shape[0])
                throw OpError("CachedAttention: seqlens_k[" + std::to_string(b) + "] = " +
                              std::to_string(job.seqlens[b]) + " puts the tokens at positions " +
                              std::to_string(first) + ".." + std::to_string(last) + ", outside the T = " +
                              std::to_string(job.total) + " positions or the " + std::to_string(table_shape[0]) +
                              " rows of the rotary tables");
        }
        const std::vector<int64_t> present_shape{job.batch, kv_heads, job.rows, job.dim};
        Ort::UnownedValue out = ctx.GetOutput(0, {job.batch, job.length, heads * job.dim});
        Ort::UnownedValue present_key = ctx.GetOutput(1, present_shape);
        Ort::UnownedValue present_value = ctx.GetOutput(2, present_shape);
        job.qkv = qkv.GetTensorData<float>();
        job.past_key = static_cast<const Cache *>(past_key.GetTensorRawData());
        job.past_value = static_cast<const Cache *>(past_value.GetTensorRawData());
        job.cos = cos.GetTensorData<float>();
        job.sin = sin.GetTensorData<float>();
        job.bias = bias.GetTensorData<float>();
        job.out = out.GetTensorMutableData<float>();
        job.key = static_cast<Cache *>(present_key.GetTensorMutableRawData());
        job.value = static_cast<Cache *>(present_value.GetTensorMutableRawData());
        job.copy_past = job.key != job.past_key || job.value != job.past_value;
        job.avx2 = bitconvert::attention::use_avx2();
        job.scale = float(1.0 / std::sqrt(double(job.dim)));
        job.items = job.batch * job.length * heads;
        if (job.items == 0) return;
        const int64_t writes = job.batch * kv_heads;
        if (!job.copy_past && job.length == 1) {
            for (int64_t item = 0; item < writes; ++item) write_rows<Cache>(&job, size_t(item));
        } else {
            bitconvert_ort::parallel_for(ctx, write_rows<Cache>, size_t(writes), &job);
        }
        const int64_t positions = job.total - job.length / 2;  // rows an item reads, on average
        const int64_t work = job.items * positions * job.dim * 2;
        job.parts = std::max<int64_t>(1, std::min({work / kMinWorkPerPart, job.items, kMaxParts}));
        bitconvert_ort::parallel_for(ctx, attend_part<Cache>, size_t(job.parts), &job);
    }
};

// One kernel per cache type (ORT picks it by the past/present type): float, or fp16 (Cache = uint16_t).
template <typename Cache>
struct CachedAttentionOp : bitconvert_ort::OpBase<CachedAttentionOp<Cache>, CachedAttentionKernel<Cache>> {
    static constexpr ONNXTensorElementDataType kCacheType =
        std::is_same_v<Cache, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const char *GetName() const { return "CachedAttention"; }
    size_t GetInputTypeCount() const { return 8; }
    ONNXTensorElementDataType GetInputType(size_t index) const {
        return index == 1 || index == 2   ? kCacheType
               : index == 3 || index == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                                          : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    size_t GetOutputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetOutputType(size_t index) const {
        return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : kCacheType;
    }
};

}  // namespace

OrtCustomOp *bitconvert_ort::cached_attention_op(bool fp16_cache) {
    static CachedAttentionOp<float> fp32;
    static CachedAttentionOp<uint16_t> fp16;
    return fp16_cache ? static_cast<OrtCustomOp *>(&fp16) : static_cast<OrtCustomOp *>(&fp32);
}
