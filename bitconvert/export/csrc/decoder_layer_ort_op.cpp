// ONNX Runtime custom operator com.bitconvert::DecoderLayer (version 2): one LLaMA decoder layer of bitconvert's
// fused graph in one node, the five nodes it replaces (TernaryMatMul q/k/v with the folded norm, CachedAttention,
// TernaryMatMul o_proj, TernaryMatMul gate/up with the folded norm and SwiGLU, TernaryMatMul down) run as one
// PhaseProgram: one hand-off to ORT's pool per layer instead of one per product, and one node's dispatch instead of
// five. Every step is the code of the node it replaces (ternary_job.h, attention_job.h), so the outputs equal the
// five-node graph's bit for bit.
//
//   y, h1, present_key, present_value = DecoderLayer(x, [skip], input_norm, qkv_weight, qkv_scale, past_key,
//       past_value, seqlens_k, total_length, cos_cache, sin_cache, attention_bias, o_weight, o_scale, post_norm,
//       gate_up_weight, gate_up_scale, down_weight, down_scale; num_heads = H, kv_num_heads = G, epsilon)
//
//   x, skip          float (B, S, K)   the residual stream h = x + skip (h = x without skip)
//   qkv              = TernaryMatMul(rms_norm(h) * input_norm; segments H D, G D, G D, scales qkv_scale (3,))
//   attn, present    = CachedAttention(qkv, past_key, past_value, seqlens_k, total_length, cos, sin, bias; H, G)
//   o                = TernaryMatMul(attn; o_scale (1,))                                  (B, S, K)
//   h1               = o + h                                                              output 1
//   act              = silu(gate) * up, gate | up = TernaryMatMul(rms_norm(h1) * post_norm; scales gate_up_scale (2,))
//   y                = TernaryMatMul(act; down_scale (1,))                                output 0, (B, S, K)
//
// Weights: uint8 (ceil(N / 4), in) ternary codes as TernaryMatMul's W: qkv N = (H + 2 G) D (in K), o N = K (in H D),
// gate_up N = 2 I (in K), down N = K (in I), the sizes read off the weights' columns (D = o's / H, I = down's). The
// weights, their scales and the norms' gains must be constant initializers (as the export writes them): the weights
// are repacked and the rest copied once, when the kernel is created, so a decoding step reads no more inputs than it
// must. The cache: float, or float16 (one kernel per type), as CachedAttention's. The next layer takes x = y,
// skip = h1, as the fused graph's next q/k/v node does.
// Threads: ORT's intra-op pool, one PhaseProgram per call (ort_op_common.h): the steps of the five nodes (each
// product's activation quantization and its parts, the cache write, attention's parts, SwiGLU) as its eleven phases,
// cut as each node cuts them, attention finer (kMinAttentionWorkPerItem). Against the five nodes on SmolLM2 (30 thin
// layers), 2 threads, Zen 4: docs/export.md.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_job.h"
#include "ort_op_common.h"
#include "ternary_job.h"

namespace {

using namespace bitconvert_ort;

constexpr const char *kName = "DecoderLayer";
// Attention's parts here are items of the layer's program, not tasks of ORT's pool, so they can be much finer than
// CachedAttention's (2^15 multiply-adds): a decoding step at SmolLM2's shapes (9 heads of 64, a few dozen positions)
// is one part there, on one thread, and about a head per part here. Per-phase cycle counters (a scratch build,
// SmolLM2, one-token calls, 2 threads, Zen 4): attention 14.8K -> 7.4K cycles of a layer's ~80K.
constexpr int64_t kMinAttentionWorkPerItem = int64_t(1) << 12;

enum Input : size_t {
    kX, kSkip, kInputNorm, kQkvWeight, kQkvScale, kPastKey, kPastValue, kSeqlens, kTotalLength, kCos, kSin, kBias,
    kOWeight, kOScale, kPostNorm, kGateUpWeight, kGateUpScale, kDownWeight, kDownScale, kInputs
};

// Input `index` of the kernel, which must be a constant initializer.
Ort::ConstValue constant_input(const Ort::ConstKernelInfo &info, size_t index) {
    int is_constant = 0;
    Ort::ConstValue value = info.GetTensorConstantInput(index, &is_constant);
    if (!is_constant)
        throw OpError(std::string(kName) + ": the weights, norms and scales must be constant initializers (input " +
                      std::to_string(index) + " is not)");
    return value;
}

// Constant input `index` (`name` in errors), which must hold `size` floats, copied.
std::vector<float> constant_vector(const Ort::ConstKernelInfo &info, size_t index, const std::string &name,
                                   int64_t size) {
    Ort::ConstValue value = constant_input(info, index);
    if (int64_t(value.GetTensorTypeAndShapeInfo().GetElementCount()) != size)
        throw OpError(name + " (input " + std::to_string(index) + ") must hold " + std::to_string(size) + " values");
    const float *data = value.GetTensorData<float>();
    return std::vector<float>(data, data + size);
}

// The second dimension of constant input `index` (a weight's in_features).
int64_t columns(const Ort::ConstKernelInfo &info, size_t index) {
    const std::vector<int64_t> shape = constant_input(info, index).GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 2) throw OpError(std::string(kName) + ": weight input " + std::to_string(index) +
                                         " has shape " + shape_string(shape) + ", expected (ceil(N / 4), K)");
    return shape[1];
}

// One of the layer's four products: its ternary codes repacked into the kernel's layout once, its segments' ends.
struct Product {
    HugePageBytes repacked;
    int64_t in_features = 0;
    std::vector<int64_t> ends;  // exclusive end row of each segment
    std::vector<float> scales;  // weight_scale of each segment (the scale input, a constant too)

    // Input `index` of the kernel (a constant initializer, `name` in errors) as N = sum(segments) rows, its scales
    // input `scale_index`.
    Product(const Ort::ConstKernelInfo &info, size_t index, size_t scale_index, const std::string &name,
            const std::vector<int64_t> &segments, int layout) {
        Ort::ConstValue weight = constant_input(info, index);
        const std::vector<int64_t> shape = weight.GetTensorTypeAndShapeInfo().GetShape();
        int64_t end = 0;
        for (size_t i = 0; i < segments.size(); ++i) {
            if (segments[i] < 1 || (i + 1 < segments.size() && segments[i] % BC_TILE_ROWS != 0))
                throw OpError(name + "'s segments must be >= 1 rows and all but the last a multiple of " +
                              std::to_string(BC_TILE_ROWS));
            ends.push_back(end += segments[i]);
        }
        check_weight_shape(name, shape, end);
        in_features = shape[1];
        scales = constant_vector(info, scale_index, name + "'s scale", int64_t(segments.size()));
        repacked = HugePageBytes(bc_repacked_bytes(end, in_features, layout));
        bc_repack(weight.GetTensorData<uint8_t>(), end, in_features, layout, repacked.data());
    }
    int64_t out_features() const { return ends.back(); }
};

template <typename Cache>
struct DecoderLayerKernel : KernelBase<DecoderLayerKernel<Cache>> {
    int64_t heads = 0, kv_heads = 0, hidden = 0, dim = 0;  // hidden = K, dim = D
    float eps = 0.0f;
    int isa = BC_ISA_SCALAR, layout = BC_LAYOUT_2BIT;
    std::vector<std::unique_ptr<Product>> products;  // qkv, o, gate_up, down
    std::vector<float> input_norm, post_norm;         // the norms' gains (K)

    explicit DecoderLayerKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo kernel_info(info);
        heads = kernel_info.GetAttribute<int64_t>("num_heads");
        kv_heads = kernel_info.GetAttribute<int64_t>("kv_num_heads");
        eps = kernel_info.GetAttribute<float>("epsilon");
        if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0)
            throw OpError(std::string(kName) + ": num_heads (" + std::to_string(heads) +
                          ") must be a positive multiple of kv_num_heads (" + std::to_string(kv_heads) + ")");
        default_path(kName, isa, layout);
        // The sizes from the weights' columns: K = qkv's, H D = o's, I = down's.
        hidden = columns(kernel_info, kQkvWeight);
        const int64_t attended = columns(kernel_info, kOWeight), intermediate = columns(kernel_info, kDownWeight);
        if (attended % heads != 0)
            throw OpError(std::string(kName) + ": o_weight's " + std::to_string(attended) +
                          " columns are not num_heads = " + std::to_string(heads) + " heads");
        dim = attended / heads;
        const std::string name = std::string(kName) + ": ";
        products.push_back(std::make_unique<Product>(kernel_info, kQkvWeight, kQkvScale, name + "qkv_weight",
                                                     std::vector<int64_t>{heads * dim, kv_heads * dim, kv_heads * dim},
                                                     layout));
        products.push_back(std::make_unique<Product>(kernel_info, kOWeight, kOScale, name + "o_weight",
                                                     std::vector<int64_t>{hidden}, layout));
        products.push_back(std::make_unique<Product>(kernel_info, kGateUpWeight, kGateUpScale,
                                                     name + "gate_up_weight",
                                                     std::vector<int64_t>{intermediate, intermediate}, layout));
        products.push_back(std::make_unique<Product>(kernel_info, kDownWeight, kDownScale, name + "down_weight",
                                                     std::vector<int64_t>{hidden}, layout));
        input_norm = constant_vector(kernel_info, kInputNorm, name + "input_norm", hidden);
        post_norm = constant_vector(kernel_info, kPostNorm, name + "post_norm", hidden);
        if (products[2]->in_features != hidden)
            throw OpError(std::string(kName) + ": gate_up_weight has " + std::to_string(products[2]->in_features) +
                          " columns, expected K = " + std::to_string(hidden) + " (qkv_weight's)");
    }

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue x = ctx.GetInput(kX), skip = ctx.GetInput(kSkip);
        const std::vector<int64_t> x_shape = shape_of(x);
        if (x_shape.size() != 3)
            throw OpError(std::string(kName) + ": x has shape " + shape_string(x_shape) + ", expected (B, S, K)");
        const bool has_skip = static_cast<const OrtValue *>(skip) != nullptr;
        if (has_skip && shape_of(skip) != x_shape)
            throw OpError(std::string(kName) + ": skip has shape " + shape_string(shape_of(skip)) + ", x " +
                          shape_string(x_shape) + "; they must be equal");
        if (x_shape[2] != hidden)
            throw OpError(std::string(kName) + ": x has shape " + shape_string(x_shape) + ", its last dimension must "
                          "be K = " + std::to_string(hidden) + " (qkv_weight's columns)");
        const int64_t n = x_shape[0] * x_shape[1], width = products[0]->out_features();
        AttentionJob<Cache> attention{};
        plan_attention(kName, attention, {x_shape[0], x_shape[1], width}, heads, kv_heads, ctx.GetInput(kPastKey),
                       ctx.GetInput(kPastValue), ctx.GetInput(kSeqlens), ctx.GetInput(kTotalLength),
                       ctx.GetInput(kCos), ctx.GetInput(kSin), ctx.GetInput(kBias));
        const int64_t intermediate = products[3]->in_features;

        const std::vector<int64_t> present_shape{attention.batch, kv_heads, attention.rows, dim};
        float *y = ctx.GetOutput(0, x_shape).GetTensorMutableData<float>();
        float *h1 = ctx.GetOutput(1, x_shape).GetTensorMutableData<float>();
        Cache *present_key = static_cast<Cache *>(ctx.GetOutput(2, present_shape).GetTensorMutableRawData());
        Cache *present_value = static_cast<Cache *>(ctx.GetOutput(3, present_shape).GetTensorMutableRawData());
        if (n == 0) return;

        const bool keep = n <= kTokensPerGroup;
        const int64_t ldx = std::max({bc_padded_in(hidden, layout), bc_padded_in(heads * dim, layout),
                                      bc_padded_in(intermediate, layout)});
        const Scratch<float, 10> h(has_skip ? size_t(n * hidden) : 0, keep);
        const Scratch<float, 11> normed(size_t(n * hidden), keep);
        const Scratch<float, 12> qkv(size_t(n * width), keep);
        const Scratch<float, 13> attended(size_t(n * heads * dim), keep);
        const Scratch<float, 14> o(size_t(n * hidden), keep);
        const Scratch<float, 15> gates(size_t(n * 2 * intermediate), keep);
        const Scratch<float, 16> act(size_t(n * intermediate), keep);
        const Scratch<float, 17> x_scales(size_t(n), keep);
        const Scratch<int8_t, 10> x_q(size_t(n * ldx), keep);
        const Scratch<int32_t, 10> x_sums(size_t(n), keep);
        finish_plan(attention, qkv.data(), attended.data(), present_key, present_value, kMinAttentionWorkPerItem);

        // The four products' jobs: every one quantizes into the same x_q, one after the other.
        auto job = [&](Job &j, size_t p, const float *input, float *output) {
            const Product &product = *products[p];
            j.x = input;
            j.x_q = x_q.data();
            j.x_sums = x_sums.data();
            j.x_scales = x_scales.data();
            j.weight = product.repacked.data();
            j.y = output;
            j.scales = product.scales.data();
            j.ends = &product.ends;
            j.n = n;
            j.out_features = product.out_features();
            j.in_features = product.in_features;
            j.ldx = bc_padded_in(j.in_features, layout);
            j.parts = product_parts(n, j.out_features, j.in_features, layout);
            j.isa = isa;
            j.layout = layout;
        };
        Job qkv_job, o_job, gate_up_job, down_job;
        job(qkv_job, 0, x.GetTensorData<float>(), qkv.data());
        qkv_job.skip = has_skip ? skip.GetTensorData<float>() : nullptr;
        qkv_job.sums = has_skip ? h.data() : nullptr;  // h = x without skip
        qkv_job.gamma = input_norm.data();
        qkv_job.normed = normed.data();
        qkv_job.eps = eps;
        job(o_job, 1, attended.data(), o.data());
        job(gate_up_job, 2, o.data(), gates.data());
        gate_up_job.skip = has_skip ? h.data() : x.GetTensorData<float>();
        gate_up_job.sums = h1;
        gate_up_job.gamma = post_norm.data();
        gate_up_job.normed = normed.data();
        gate_up_job.eps = eps;
        job(down_job, 3, act.data(), y);
        static const bool avx2 = bc_isa_supported(BC_ISA_AVX2);
        SwigluJob swiglu{gates.data(), act.data(), intermediate, avx2 && isa > BC_ISA_SCALAR};

        const size_t groups = size_t(ceil_div(n, kTokensPerGroup));
        std::vector<Phase> phases;
        phases.reserve(11);
        auto product = [&](Job &j) {  // quantize the input, then the parts of the product
            phases.push_back({quantize_group, &j, groups});
            phases.push_back({run_part, &j, size_t(j.parts)});
        };
        product(qkv_job);
        phases.push_back({write_rows<Cache>, &attention, size_t(attention.batch * kv_heads)});
        phases.push_back({attend_part<Cache>, &attention, size_t(attention.parts)});
        product(o_job);
        product(gate_up_job);
        phases.push_back({swiglu_token, &swiglu, size_t(n)});
        product(down_job);
        PhaseProgram(std::move(phases)).run(ctx);
        for (const Job *j : {&qkv_job, &o_job, &gate_up_job, &down_job})
            if (j->error != BC_OK) throw OpError(std::string(kName) + ": kernel error " + std::to_string(j->error));
    }
};

// One kernel per cache type (ORT picks it by the past/present type): float, or fp16 (Cache = uint16_t).
template <typename Cache>
struct DecoderLayerOp : OpBase<DecoderLayerOp<Cache>, DecoderLayerKernel<Cache>> {
    static constexpr ONNXTensorElementDataType kCacheType =
        std::is_same_v<Cache, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const char *GetName() const { return kName; }
    size_t GetInputTypeCount() const { return kInputs; }
    ONNXTensorElementDataType GetInputType(size_t index) const {
        switch (index) {
        case kPastKey:
        case kPastValue: return kCacheType;
        case kSeqlens:
        case kTotalLength: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
        case kQkvWeight:
        case kOWeight:
        case kGateUpWeight:
        case kDownWeight: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
        default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        }
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
        return index == kSkip ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    }
    size_t GetOutputTypeCount() const { return 4; }
    ONNXTensorElementDataType GetOutputType(size_t index) const {
        return index < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : kCacheType;
    }
};

}  // namespace

OrtCustomOp *bitconvert_ort::decoder_layer_op(bool fp16_cache) {
    static DecoderLayerOp<float> fp32;
    static DecoderLayerOp<uint16_t> fp16;
    return fp16_cache ? static_cast<OrtCustomOp *>(&fp16) : static_cast<OrtCustomOp *>(&fp32);
}
