// ONNX Runtime custom operator com.bitconvert::TernaryMatMul (version 1), on bitconvert's ternary kernel core.
//
//   Y = TernaryMatMul(X, W, scale; out_features = N)
//   X      float (..., K)        activations, quantized inside the op to int8 per token (per row of K)
//   W      uint8 (ceil(N/4), K)  ternary codes T + 1, 2 bits each, in HF transformers' BitNet layout
//   scale  float (1,)            weight_scale = 1 / g
//   Y      float (..., N)        y = (x_q @ T^T) / scale / s, the int32 product exact (bc_linear in ternary_core.h)
//
// W is repacked into the kernel layout once, when the kernel is created, if ONNX Runtime gives it as a constant
// initializer (the exported models do); otherwise on every call. The SIMD path is BITCONVERT_ISA or the best the CPU
// has, the thread count OpenMP's (OMP_NUM_THREADS). Built against the C API of the oldest supported onnxruntime:
// RegisterCustomOps refuses an older runtime with an error status instead of crashing.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "ternary_core.h"

namespace {

constexpr const char *kDomain = "com.bitconvert";

struct OpError : std::exception {
    std::string message;
    explicit OpError(std::string m) : message(std::move(m)) {}
    const char *what() const noexcept override { return message.c_str(); }
};

int64_t packed_rows(int64_t out_features) { return (out_features + 3) / 4; }

std::string shape_string(const std::vector<int64_t> &shape) {
    std::string text = "(";
    for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + ")";
}

void check_weight_shape(const std::vector<int64_t> &shape, int64_t out_features) {
    if (shape.size() != 2 || shape[0] != packed_rows(out_features) || shape[1] < 1 || shape[1] > BC_MAX_IN_FEATURES)
        throw OpError("TernaryMatMul: W has shape " + shape_string(shape) + ", expected (ceil(" +
                      std::to_string(out_features) + "/4), K) with 1 <= K <= " + std::to_string(BC_MAX_IN_FEATURES));
}

struct TernaryMatMulKernel {
    int64_t out_features = 0;
    int isa = BC_ISA_SCALAR;
    std::vector<uint8_t> repacked;  // empty unless W was a constant initializer
    int64_t repacked_in = 0;

    explicit TernaryMatMulKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo kernel_info(info);
        out_features = kernel_info.GetAttribute<int64_t>("out_features");
        if (out_features < 1) throw OpError("TernaryMatMul: attribute out_features must be >= 1");
        isa = bc_default_isa();
        if (isa == -2) throw OpError("TernaryMatMul: BITCONVERT_ISA names no known path (scalar, avx2, avxvnni, avx512)");
        if (isa == -3) throw OpError("TernaryMatMul: this CPU cannot run the path BITCONVERT_ISA names");
        int is_constant = 0;
        Ort::ConstValue weight = kernel_info.GetTensorConstantInput(1, &is_constant);
        if (is_constant) {
            std::vector<int64_t> shape = weight.GetTensorTypeAndShapeInfo().GetShape();
            check_weight_shape(shape, out_features);
            repacked_in = shape[1];
            repacked.resize(bc_repacked_bytes(out_features, repacked_in));
            bc_repack(weight.GetTensorData<uint8_t>(), out_features, repacked_in, repacked.data());
        }
    }

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue x = ctx.GetInput(0), w = ctx.GetInput(1), scale = ctx.GetInput(2);
        std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
        std::vector<int64_t> w_shape = w.GetTensorTypeAndShapeInfo().GetShape();
        check_weight_shape(w_shape, out_features);
        const int64_t in_features = w_shape[1];
        if (x_shape.empty() || x_shape.back() != in_features)
            throw OpError("TernaryMatMul: X has shape " + shape_string(x_shape) + ", its last dimension must be K = " +
                          std::to_string(in_features));
        if (scale.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
            throw OpError("TernaryMatMul: scale must hold exactly one value");
        int64_t n = 1;
        for (size_t i = 0; i + 1 < x_shape.size(); ++i) n *= x_shape[i];
        std::vector<int64_t> y_shape = x_shape;
        y_shape.back() = out_features;
        Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
        if (n == 0) return;
        std::vector<uint8_t> per_call;
        const uint8_t *weight = repacked.data();
        if (repacked.empty()) {
            per_call.resize(bc_repacked_bytes(out_features, in_features));
            bc_repack(w.GetTensorData<uint8_t>(), out_features, in_features, per_call.data());
            weight = per_call.data();
        }
        const int err = bc_linear(x.GetTensorData<float>(), n, weight, out_features, in_features,
                                  *scale.GetTensorData<float>(), y.GetTensorMutableData<float>(), isa, 0);
        if (err != BC_OK) throw OpError("TernaryMatMul: kernel error " + std::to_string(err));
    }

    OrtStatusPtr ComputeV2(OrtKernelContext *context) {
        try {
            Compute(context);
            return nullptr;
        } catch (const std::exception &error) {
            return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, error.what());
        }
    }
};

struct TernaryMatMulOp : Ort::CustomOpBase<TernaryMatMulOp, TernaryMatMulKernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi &api, const OrtKernelInfo *info, void **kernel) const {
        try {
            *kernel = new TernaryMatMulKernel(info);
            return nullptr;
        } catch (const std::exception &error) {
            return api.CreateStatus(ORT_INVALID_ARGUMENT, error.what());
        }
    }
    const char *GetName() const { return "TernaryMatMul"; }
    size_t GetInputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetInputType(size_t index) const {
        return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
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
    // The domain must outlive every session made from these options, so it is never released (a few bytes per
    // registration; releasing it at process exit could run after onnxruntime itself is gone).
    return api->AddCustomOpDomain(options, domain);
}
