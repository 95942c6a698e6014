// ONNX Runtime custom operator com.bitconvert::TernaryMatMul (version 1), on bitconvert's ternary kernel core.
//
//   Y = TernaryMatMul(X, W, scale; out_features = N [, segments = (N_1, ..., N_m)])
//   X      float (..., K)        activations, quantized inside the op to int8 per token (per row of K)
//   W      uint8 (ceil(N/4), K)  ternary codes T + 1, 2 bits each, in HF transformers' BitNet layout
//   scale  float (m,)            weight_scale = 1 / g of each segment (m = 1 without `segments`)
//   Y      float (..., N)        y = (x_q @ T^T) / scale / s, the int32 product exact (bc_linear in ternary_core.h)
//
// `segments` (optional) stacks m projections of the same input into one node (q/k/v, gate/up): rows
// [N_1 + ... + N_{i-1}, N_1 + ... + N_i) of T are projection i and are divided by scale[i], so every output equals
// that projection's own TernaryMatMul bit for bit. Every segment but the last must be a multiple of 16 rows (the
// kernel's tile), so that no tile straddles two scales. Models without the attribute are unchanged.
// `activation` = "swiglu" (optional; needs two segments of equal size I, gate then up): Y (..., I) = silu(gate) * up
// = gate / (1 + exp(-gate)) * up per token, exp by bitconvert/kernels/csrc/fast_exp.h (AVX2 where the CPU has it,
// same bits as its scalar loop), the LLaMA MLP's activation in the node that computes gate and up.
// A folded RMSNorm (optional inputs 4 and 5, attribute `epsilon`): with `gamma` (K) the op multiplies
// rms_norm(H) * gamma instead of X, H = X + skip with the optional input `skip` (X's shape; else H = X), and its
// optional second output is H (a copy of X without skip): the residual add and the norm of a LLaMA layer's
// SkipSimplifiedLayerNormalization in the node of the product that reads them (bitconvert/kernels/csrc/norm_core.h,
// as the lean decoder computes it). These are the op's version 2; version 1 nodes are the same without them.
//
//   Y [, H] = TernaryMatMul(X, W, scale [, skip] [, gamma]; out_features, [segments], [activation], [epsilon])
//
// W is repacked into the kernel layout once, when the kernel is created, if ONNX Runtime gives it as a constant
// initializer (the exported models do); otherwise on every call. The SIMD path is BITCONVERT_ISA or the best the CPU
// has, the layout BITCONVERT_LAYOUT or the best that path computes on (bc_default_layout). Threads: ONNX Runtime's
// intra-op pool (SessionOptions.intra_op_num_threads), not OpenMP, so the op never competes with the session's own
// threads: the work is cut into parts of at least kMinWorkPerPart multiply-adds (one token: kMinWorkPerTokenPart;
// kMaxParts at most), by rows for one token (whole 16-row tiles, lut: 128-row groups; each part a run of rows of y,
// bc_linear_quantized's row0) and by groups of 8 tokens otherwise,
// and each part runs the core single-threaded. The activations are quantized once per call (bc_quantize_padded, by
// token groups in the same pool) and every part reads them: at 7B shapes a decode step had about 800 parts before the
// cap, and quantizing the 4,096-11,008 inputs in each of them cost more than the products.
// Built against the C API of the oldest supported onnxruntime: RegisterCustomOps refuses an older runtime with an
// error status instead of crashing. It registers the domain's other operators too (Int6MatMul and Int8MatMul,
// lm_head_ort_op.cpp; CachedAttention, attention_ort_op.cpp; DecoderLayer, decoder_layer_ort_op.cpp). The product's
// steps are ternary_job.h's, which DecoderLayer shares.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <exception>
#include <string>
#include <vector>

#include "ort_op_common.h"
#include "ternary_job.h"

namespace {

using namespace bitconvert_ort;

constexpr const char *kDomain = "com.bitconvert";


struct TernaryMatMulKernel : bitconvert_ort::KernelBase<TernaryMatMulKernel> {
    int64_t out_features = 0;
    bool swiglu = false;  // activation = "swiglu"
    float eps = 0.0f;     // attribute epsilon, for the folded norm
    bool has_eps = false;
    std::vector<int64_t> segment_ends;  // exclusive end row of each segment; {out_features} without `segments`
    int isa = BC_ISA_SCALAR, layout = BC_LAYOUT_2BIT;
    bitconvert_ort::HugePageBytes repacked;  // empty unless W was a constant initializer
    int64_t repacked_in = 0;

    explicit TernaryMatMulKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo kernel_info(info);
        out_features = kernel_info.GetAttribute<int64_t>("out_features");
        if (out_features < 1) throw OpError("TernaryMatMul: attribute out_features must be >= 1");
        read_segments(kernel_info);
        read_activation(kernel_info);
        try {
            eps = kernel_info.GetAttribute<float>("epsilon");
            has_eps = true;
        } catch (const Ort::Exception &) {  // absent: no folded norm
        }
        default_path("TernaryMatMul", isa, layout);
        int is_constant = 0;
        Ort::ConstValue weight = kernel_info.GetTensorConstantInput(1, &is_constant);
        if (is_constant) {
            std::vector<int64_t> shape = weight.GetTensorTypeAndShapeInfo().GetShape();
            check_weight_shape("TernaryMatMul: W", shape, out_features);
            repacked_in = shape[1];
            repacked = bitconvert_ort::HugePageBytes(bc_repacked_bytes(out_features, repacked_in, layout));
            bc_repack(weight.GetTensorData<uint8_t>(), out_features, repacked_in, layout, repacked.data());
        }
    }

    void read_segments(const Ort::ConstKernelInfo &kernel_info) {
        std::vector<int64_t> segments;
        try {
            segments = kernel_info.GetAttributes<int64_t>("segments");
        } catch (const Ort::Exception &) {  // absent: one segment
            segments = {out_features};
        }
        int64_t end = 0;
        for (size_t i = 0; i < segments.size(); ++i) {
            const bool last = i + 1 == segments.size();
            if (segments[i] < 1 || (!last && segments[i] % BC_TILE_ROWS != 0))
                throw OpError("TernaryMatMul: every segment must be >= 1 rows and all but the last a multiple of " +
                              std::to_string(BC_TILE_ROWS));
            end += segments[i];
            segment_ends.push_back(end);
        }
        if (segments.empty() || end != out_features)
            throw OpError("TernaryMatMul: the segments must add up to out_features = " + std::to_string(out_features));
    }

    void read_activation(const Ort::ConstKernelInfo &kernel_info) {
        std::string activation;
        try {
            activation = kernel_info.GetAttribute<std::string>("activation");
        } catch (const Ort::Exception &) {  // absent: none
        }
        if (activation.empty()) return;
        if (activation != "swiglu")
            throw OpError("TernaryMatMul: attribute activation must be \"swiglu\" or absent, got \"" + activation + "\"");
        if (segment_ends.size() != 2 || segment_ends[0] * 2 != out_features)
            throw OpError("TernaryMatMul: activation \"swiglu\" needs two segments of equal size (gate, up)");
        swiglu = true;
    }

    static Ort::ConstValue optional_input(const Ort::KernelContext &ctx, size_t index) {
        return index < ctx.GetInputCount() ? ctx.GetInput(index) : Ort::ConstValue{nullptr};
    }
    static bool present(const Ort::ConstValue &value) { return static_cast<const OrtValue *>(value) != nullptr; }

    // The folded norm's inputs: gamma (K values) with the attribute epsilon; skip (X's shape) and the second output
    // (H) only with gamma.
    void check_norm(const Ort::ConstValue &skip, const Ort::ConstValue &gamma, bool with_sum,
                    const std::vector<int64_t> &x_shape, int64_t in_features) const {
        if (!present(gamma)) {
            if (present(skip) || with_sum)
                throw OpError("TernaryMatMul: the skip input and the second output (X + skip) need the norm weight "
                              "gamma (input 5)");
            return;
        }
        if (!has_eps) throw OpError("TernaryMatMul: the norm weight gamma needs the attribute epsilon");
        if (int64_t(gamma.GetTensorTypeAndShapeInfo().GetElementCount()) != in_features)
            throw OpError("TernaryMatMul: gamma must hold K = " + std::to_string(in_features) + " values");
        if (present(skip) && skip.GetTensorTypeAndShapeInfo().GetShape() != x_shape)
            throw OpError("TernaryMatMul: skip has shape " + shape_string(skip.GetTensorTypeAndShapeInfo().GetShape()) +
                          ", X " + shape_string(x_shape) + "; they must be equal");
    }

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue x = ctx.GetInput(0), w = ctx.GetInput(1), scale = ctx.GetInput(2);
        std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
        std::vector<int64_t> w_shape = w.GetTensorTypeAndShapeInfo().GetShape();
        check_weight_shape("TernaryMatMul: W", w_shape, out_features);
        const int64_t in_features = w_shape[1];
        if (x_shape.empty() || x_shape.back() != in_features)
            throw OpError("TernaryMatMul: X has shape " + shape_string(x_shape) + ", its last dimension must be K = " +
                          std::to_string(in_features));
        if (scale.GetTensorTypeAndShapeInfo().GetElementCount() != segment_ends.size())
            throw OpError("TernaryMatMul: scale must hold one value per segment (" +
                          std::to_string(segment_ends.size()) + ")");
        const Ort::ConstValue skip = optional_input(ctx, 3), gamma = optional_input(ctx, 4);
        const bool norm = present(gamma), with_sum = ctx.GetOutputCount() > 1;
        check_norm(skip, gamma, with_sum, x_shape, in_features);
        int64_t n = 1;
        for (size_t i = 0; i + 1 < x_shape.size(); ++i) n *= x_shape[i];
        std::vector<int64_t> y_shape = x_shape;
        y_shape.back() = swiglu ? out_features / 2 : out_features;
        Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
        float *sums_out = with_sum ? ctx.GetOutput(1, x_shape).GetTensorMutableData<float>() : nullptr;
        if (n == 0) return;
        const bool keep = n <= kTokensPerGroup;
        const Scratch<float, 2> normed(norm ? size_t(n * in_features) : 0, keep);
        const Scratch<float, 3> sums(present(skip) && !with_sum ? size_t(n * in_features) : 0, keep);
        const Scratch<float, 0> products(swiglu ? size_t(n * out_features) : 0, keep);  // gate | up, before SwiGLU
        float *out = swiglu ? products.data() : y.GetTensorMutableData<float>();
        std::vector<uint8_t> per_call;
        const uint8_t *weight = repacked.data();
        if (repacked.empty()) {
            per_call.resize(bc_repacked_bytes(out_features, in_features, layout));
            bc_repack(w.GetTensorData<uint8_t>(), out_features, in_features, layout, per_call.data());
            weight = per_call.data();
        }
        const int64_t parts = product_parts(n, out_features, in_features, layout);
        const int64_t ldx = bc_padded_in(in_features, layout);
        const Scratch<int8_t, 0> x_q(size_t(n * ldx), keep);
        const Scratch<int32_t, 0> x_sums(size_t(n), keep);
        const Scratch<float, 1> x_scales(size_t(n), keep);
        Job job{x.GetTensorData<float>(), x_q.data(), x_sums.data(), x_scales.data(), weight,
                out, scale.GetTensorData<float>(), &segment_ends, n, out_features,
                in_features, ldx, parts, isa, layout, {BC_OK}};
        if (norm) {
            job.skip = present(skip) ? skip.GetTensorData<float>() : nullptr;
            job.gamma = gamma.GetTensorData<float>();
            job.sums = with_sum ? sums_out : present(skip) ? sums.data() : nullptr;
            job.normed = normed.data();
            job.eps = eps;
        }
        parallel_for(ctx, quantize_group, size_t(ceil_div(n, kTokensPerGroup)), &job);
        parallel_for(ctx, run_part, size_t(parts), &job);
        if (job.error != BC_OK) throw OpError("TernaryMatMul: kernel error " + std::to_string(job.error));
        if (swiglu) {  // the AVX2 loop unless the CPU lacks it or BITCONVERT_ISA=scalar (same bits either way)
            static const bool avx2 = bc_isa_supported(BC_ISA_AVX2);
            SwigluJob epilogue{products.data(), y.GetTensorMutableData<float>(), out_features / 2,
                               avx2 && isa > BC_ISA_SCALAR};
            parallel_for(ctx, swiglu_token, size_t(n), &epilogue);
        }
    }
};

struct TernaryMatMulOp : bitconvert_ort::OpBase<TernaryMatMulOp, TernaryMatMulKernel> {
    const char *GetName() const { return "TernaryMatMul"; }
    size_t GetInputTypeCount() const { return 5; }  // X, W, scale, [skip], [gamma]
    ONNXTensorElementDataType GetInputType(size_t index) const {
        return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
        return index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return 2; }  // Y, [X + skip]
    OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
        return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus *ORT_API_CALL
RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
    const OrtApi *api = api_base->GetApi(ORT_API_VERSION);
    if (api == nullptr) {
        const std::string message = std::string("bitconvert's TernaryMatMul library needs onnxruntime >= 1.") +
                                    std::to_string(ORT_API_VERSION) + ", this runtime is " +
                                    api_base->GetVersionString();
        return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
    }
    Ort::InitApi(api);
    static TernaryMatMulOp op;
    OrtCustomOpDomain *domain = nullptr;
    if (OrtStatus *status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
    if (OrtStatus *status = api->CustomOpDomain_Add(domain, &op)) return status;
    if (OrtStatus *status = api->CustomOpDomain_Add(domain, bitconvert_ort::int6_matmul_op())) return status;
    if (OrtStatus *status = api->CustomOpDomain_Add(domain, bitconvert_ort::int8_matmul_op())) return status;
    for (bool fp16_cache : {false, true}) {
        if (OrtStatus *status = api->CustomOpDomain_Add(domain, bitconvert_ort::cached_attention_op(fp16_cache)))
            return status;
        if (OrtStatus *status = api->CustomOpDomain_Add(domain, bitconvert_ort::decoder_layer_op(fp16_cache)))
            return status;
    }
    // The domain must outlive every session made from these options, so it is never released (a few bytes per
    // registration; releasing it at process exit could run after onnxruntime itself is gone).
    return api->AddCustomOpDomain(options, domain);
}
