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
// least kMinAttentionWorkPerPart multiply-adds (a short decoding step at SmolLM2's shapes is one part: handing it
// out would cost more than it computes). The job and its steps are attention_job.h's, which DecoderLayer shares.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <type_traits>
#include <vector>

#include "attention_job.h"
#include "ort_op_common.h"

namespace {

using namespace bitconvert_ort;

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

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue qkv = ctx.GetInput(0);
        AttentionJob<Cache> job{};
        plan_attention("CachedAttention", job, shape_of(qkv), heads, kv_heads, ctx.GetInput(1), ctx.GetInput(2),
                       ctx.GetInput(3), ctx.GetInput(4), ctx.GetInput(5), ctx.GetInput(6), ctx.GetInput(7));
        const std::vector<int64_t> present_shape{job.batch, kv_heads, job.rows, job.dim};
        Ort::UnownedValue out = ctx.GetOutput(0, {job.batch, job.length, heads * job.dim});
        Ort::UnownedValue present_key = ctx.GetOutput(1, present_shape);
        Ort::UnownedValue present_value = ctx.GetOutput(2, present_shape);
        finish_plan(job, qkv.GetTensorData<float>(), out.GetTensorMutableData<float>(),
                    static_cast<Cache *>(present_key.GetTensorMutableRawData()),
                    static_cast<Cache *>(present_value.GetTensorMutableRawData()));
        if (job.items == 0) return;
        const int64_t writes = job.batch * kv_heads;
        if (!job.copy_past && job.length == 1) {
            for (int64_t item = 0; item < writes; ++item) write_rows<Cache>(&job, size_t(item));
        } else {
            parallel_for(ctx, write_rows<Cache>, size_t(writes), &job);
        }
        parallel_for(ctx, attend_part<Cache>, size_t(job.parts), &job);
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
