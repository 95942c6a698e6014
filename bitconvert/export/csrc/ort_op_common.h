// Helpers shared by bitconvert's ONNX Runtime custom operators (ternary_ort_op.cpp, int6_ort_op.cpp): the error a
// kernel throws and the bases that turn it into an ORT status, shape text for messages, and the com.bitconvert
// operators other than TernaryMatMul, which RegisterCustomOps adds to the domain. Include onnxruntime_cxx_api.h
// (with ORT_API_MANUAL_INIT) first.
#ifndef BITCONVERT_ORT_OP_COMMON_H
#define BITCONVERT_ORT_OP_COMMON_H

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

struct OrtCustomOp;

namespace bitconvert_ort {

struct OpError : std::exception {
    std::string message;
    explicit OpError(std::string m) : message(std::move(m)) {}
    const char *what() const noexcept override { return message.c_str(); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline std::string shape_string(const std::vector<int64_t> &shape) {
    std::string text = "(";
    for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + ")";
}

// A kernel whose Compute(context) throws: ComputeV2 returns the exception as an ORT_RUNTIME_EXCEPTION status.
template <class Kernel>
struct KernelBase {
    OrtStatusPtr ComputeV2(OrtKernelContext *context) {
        try {
            static_cast<Kernel *>(this)->Compute(context);
            return nullptr;
        } catch (const std::exception &error) {
            return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, error.what());
        }
    }
};

// An operator with one float output whose Kernel(info) constructor throws on bad attributes: CreateKernelV2
// returns that as an ORT_INVALID_ARGUMENT status (the session refuses the model with the message).
template <class Op, class Kernel>
struct OpBase : Ort::CustomOpBase<Op, Kernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi &api, const OrtKernelInfo *info, void **kernel) const {
        try {
            *kernel = new Kernel(info);
            return nullptr;
        } catch (const std::exception &error) {
            return api.CreateStatus(ORT_INVALID_ARGUMENT, error.what());
        }
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// com.bitconvert::Int6MatMul (int6_ort_op.cpp): one instance for the whole process.
OrtCustomOp *int6_matmul_op();

}  // namespace bitconvert_ort

#endif
