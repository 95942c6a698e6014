// The attention of com.bitconvert::CachedAttention (attention_ort_op.cpp) as work that a pool runs in parts, shared
// with com.bitconvert::DecoderLayer (decoder_layer_ort_op.cpp): the call's AttentionJob, its two steps as functions
// of (job, item) -- write_rows (the new keys and values into present, per (b, KV head)) and attend_part (a part of the
// (b, s, h) items) -- and plan_attention, which checks the inputs and sizes the job. Include onnxruntime_cxx_api.h
// (with ORT_API_MANUAL_INIT) first.
#ifndef BITCONVERT_ATTENTION_JOB_H
#define BITCONVERT_ATTENTION_JOB_H

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "attention_core.h"
#include "ort_op_common.h"

namespace bitconvert_ort {

constexpr int64_t kMinAttentionWorkPerPart = int64_t(1) << 15;  // multiply-adds (scores and weighted sum)
constexpr int64_t kMaxAttentionParts = 32;

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
inline void write_rows(void *data, size_t index) {
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
inline void attend_part(void *data, size_t index) {
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

inline std::vector<int64_t> shape_of(const Ort::ConstValue &value) {
    return value.GetTensorTypeAndShapeInfo().GetShape();
}

// Checks the attention inputs against qkv's shape (B, S, (H + 2 G) D) and sizes `job`: its sizes, positions and
// input pointers (`op` names the operator in the errors). The caller then allocates out (B, S, H D) and present
// (B, G, job.rows, D) and passes them to finish_plan.
template <typename Cache>
void plan_attention(const std::string &op, AttentionJob<Cache> &job, const std::vector<int64_t> &qkv_shape,
                    int64_t heads, int64_t kv_heads, const Ort::ConstValue &past_key, const Ort::ConstValue &past_value,
                    const Ort::ConstValue &seqlens, const Ort::ConstValue &total_length, const Ort::ConstValue &cos,
                    const Ort::ConstValue &sin, const Ort::ConstValue &bias) {
    const std::vector<int64_t> cache_shape = shape_of(past_key);
    if (qkv_shape.size() != 3 || cache_shape.size() != 4 || shape_of(past_value) != cache_shape)
        throw OpError(op + ": qkv " + shape_string(qkv_shape) + " must be (B, S, W) and past_key, past_value one "
                      "shape (B, G, L, D), got " + shape_string(cache_shape) + " and " +
                      shape_string(shape_of(past_value)));
    job.batch = qkv_shape[0];
    job.length = qkv_shape[1];
    job.heads = heads;
    job.kv_heads = kv_heads;
    job.dim = cache_shape[3];
    job.past_rows = cache_shape[2];
    if (cache_shape[0] != job.batch || cache_shape[1] != kv_heads || job.dim % 2 != 0 ||
        qkv_shape[2] != (heads + 2 * kv_heads) * job.dim)
        throw OpError(op + ": qkv " + shape_string(qkv_shape) + " and past_key " +
                      shape_string(cache_shape) + " do not match " + std::to_string(heads) + " + 2 x " +
                      std::to_string(kv_heads) + " heads of an even head size");
    if (shape_of(total_length).size() != 0 || shape_of(seqlens) != std::vector<int64_t>{job.batch})
        throw OpError(op + ": total_length must be a scalar and seqlens_k (B,)");
    job.total = *total_length.GetTensorData<int32_t>();
    const int64_t half = job.dim / 2;
    const std::vector<int64_t> table_shape = shape_of(cos);
    if (table_shape.size() != 2 || table_shape[1] != half || shape_of(sin) != table_shape)
        throw OpError(op + ": cos_cache and sin_cache must both be (M, D / 2) = (M, " +
                      std::to_string(half) + "), got " + shape_string(table_shape) + " and " +
                      shape_string(shape_of(sin)));
    if (shape_of(bias) != std::vector<int64_t>{job.batch, 1, job.length, job.total})
        throw OpError(op + ": attention_bias has shape " + shape_string(shape_of(bias)) +
                      ", expected (B, 1, S, T) = " + shape_string({job.batch, 1, job.length, job.total}));
    if (job.past_rows < job.total && job.past_rows != job.total - job.length)
        throw OpError(op + ": past_key holds " + std::to_string(job.past_rows) + " positions; it must "
                      "hold the T - S = " + std::to_string(job.total - job.length) + " past ones, or be a buffer "
                      "of at least T = " + std::to_string(job.total));
    job.rows = std::max(job.past_rows, job.total);
    job.seqlens = seqlens.GetTensorData<int32_t>();
    for (int64_t b = 0; b < job.batch && job.length > 0; ++b) {
        const int64_t first = job.position(b, 0), last = job.position(b, job.length - 1);
        if (first < 0 || last >= job.total || last >= table_shape[0])
            throw OpError(op + ": seqlens_k[" + std::to_string(b) + "] = " +
                          std::to_string(job.seqlens[b]) + " puts the tokens at positions " +
                          std::to_string(first) + ".." + std::to_string(last) + ", outside the T = " +
                          std::to_string(job.total) + " positions or the " + std::to_string(table_shape[0]) +
                          " rows of the rotary tables");
    }
    job.past_key = static_cast<const Cache *>(past_key.GetTensorRawData());
    job.past_value = static_cast<const Cache *>(past_value.GetTensorRawData());
    job.cos = cos.GetTensorData<float>();
    job.sin = sin.GetTensorData<float>();
    job.bias = bias.GetTensorData<float>();
}

// The rest of the job once qkv, out and present are placed: whether the past rows are copied (present is not the
// past buffer itself), the SIMD choice, the scale, and the attention's parts (at least `min_work_per_part`
// multiply-adds each: kMinAttentionWorkPerPart where each part is a task of ORT's pool).
template <typename Cache>
void finish_plan(AttentionJob<Cache> &job, const float *qkv, float *out, Cache *present_key, Cache *present_value,
                 int64_t min_work_per_part = kMinAttentionWorkPerPart) {
    job.qkv = qkv;
    job.out = out;
    job.key = present_key;
    job.value = present_value;
    job.copy_past = job.key != job.past_key || job.value != job.past_value;
    job.avx2 = bitconvert::attention::use_avx2();
    job.scale = float(1.0 / std::sqrt(double(job.dim)));
    job.items = job.batch * job.length * job.heads;
    const int64_t positions = job.total - job.length / 2;  // rows an item reads, on average
    const int64_t work = job.items * positions * job.dim * 2;
    job.parts = std::max<int64_t>(1, std::min({work / min_work_per_part, job.items, kMaxAttentionParts}));
}

}  // namespace bitconvert_ort

#endif
