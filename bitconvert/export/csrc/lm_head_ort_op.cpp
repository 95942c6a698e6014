// ONNX Runtime custom operators com.bitconvert::Int6MatMul and ::Int8MatMul (version 1): the quantized lm_heads of
// bitconvert.load on bitconvert's C++ core.
//
//   Y = Int6MatMul(X, W, D; out_features = N)
//   X  float   (..., K)                        activations, quantized inside to int8 per 32-column block
//   W  uint8   (N, bc_int6_row_bytes(K))       int6 codes of each row (ql/qh layout of int8_core.h)
//   D  float16 (N, bc_int6_row_blocks(K))      one scale per row and 32-column block
//   Y  float   (..., N)                        y[t][o] = sum_b d[o][b] e[t][b] P[t][o][b] (bc_int6_linear)
//
//   Y = Int8MatMul(X, W, D; out_features = N)
//   X  float   (..., K)                        activations, quantized inside to int8 per 32-column block
//   W  int8    (N, bc_int8_row_stride(K))      int8 codes of each row (K rounded up to 64, zero padded)
//   D  float   (N,)                            one scale per row
//   Y  float   (..., N)                        y[t][o] = d[o] sum_b e[t][b] P[t][o][b] (bc_int8_linear)
//
// W and D are what bitconvert.kernels.int6_quantize_rows / int8_quantize_rows return (the layout is the kernel's
// own, so nothing is repacked), and every output is bit for bit what bc_int6_linear / bc_int8_linear computes on the
// same path (so Int8MatMul's logits are bitconvert.load(..., lm_head="int8")'s): one token's rows are
// cut into parts of whole rows (a row's sum does not depend on which rows share its call), several tokens into
// parts of whole tokens, and each part runs the core single-threaded in ONNX Runtime's intra-op pool. Each part
// quantizes its tokens' activations itself (K values per token: a few hundred nanoseconds against the part's
// thousands of rows).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "int8_core.h"
#include "ort_op_common.h"

namespace {

using bitconvert_ort::OpError;
using bitconvert_ort::shape_string;

constexpr int64_t kMinWorkPerPart = int64_t(1) << 18;  // multiply-adds; as TernaryMatMul's
constexpr int64_t kMaxParts = 32;

// The two formats: their op name, the element types of W and D, the columns of W and D per row, and the core's
// product of n tokens by `rows` rows.
struct Int6Format {
    static constexpr const char *kName = "Int6MatMul";
    using Code = uint8_t;
    using Scale = uint16_t;  // fp16 bits
    static constexpr ONNXTensorElementDataType kCodeType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    static constexpr ONNXTensorElementDataType kScaleType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    static constexpr const char *kSource = "bitconvert.kernels.int6_quantize_rows";
    static int64_t code_columns(int64_t in_features) { return bc_int6_row_bytes(in_features); }
    static int64_t scale_columns(int64_t in_features) { return bc_int6_row_blocks(in_features); }
    static std::vector<int64_t> scale_shape(int64_t rows, int64_t in_features) {
        return {rows, scale_columns(in_features)};
    }
    static int linear(const float *x, int64_t n, const Code *w_q, const Scale *d, int64_t rows, int64_t in_features,
                      float *y, int isa) {
        return bc_int6_linear(x, n, w_q, d, rows, in_features, y, isa, 1);
    }
};

struct Int8Format {
    static constexpr const char *kName = "Int8MatMul";
    using Code = int8_t;
    using Scale = float;
    static constexpr ONNXTensorElementDataType kCodeType = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    static constexpr ONNXTensorElementDataType kScaleType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    static constexpr const char *kSource = "bitconvert.kernels.int8_quantize_rows";
    static int64_t code_columns(int64_t in_features) { return bc_int8_row_stride(in_features); }
    static int64_t scale_columns(int64_t) { return 1; }
    static std::vector<int64_t> scale_shape(int64_t rows, int64_t) { return {rows}; }
    static int linear(const float *x, int64_t n, const Code *w_q, const Scale *d, int64_t rows, int64_t in_features,
                      float *y, int isa) {
        return bc_int8_linear(x, n, w_q, d, rows, in_features, y, isa, 1);
    }
};

template <class Format>
struct HeadJob {
    const float *x;
    const typename Format::Code *w_q;
    const typename Format::Scale *d;
    float *y;
    int64_t n, out_features, in_features, parts;
    int isa;
    std::atomic<int> error{BC_OK};
};

template <class Format>
void run_head_part(void *data, size_t index) {
    HeadJob<Format> &job = *static_cast<HeadJob<Format> *>(data);
    const int64_t part = int64_t(index);
    int err;
    if (job.n == 1) {  // rows [lo, hi)
        const int64_t lo = part * job.out_features / job.parts, hi = (part + 1) * job.out_features / job.parts;
        err = Format::linear(job.x, 1, job.w_q + lo * Format::code_columns(job.in_features),
                             job.d + lo * Format::scale_columns(job.in_features), hi - lo, job.in_features,
                             job.y + lo, job.isa);
    } else {  // tokens [first, last), every row
        const int64_t first = part * job.n / job.parts, last = (part + 1) * job.n / job.parts;
        err = Format::linear(job.x + first * job.in_features, last - first, job.w_q, job.d, job.out_features,
                             job.in_features, job.y + first * job.out_features, job.isa);
    }
    if (err != BC_OK) job.error = err;
}

template <class Format>
struct HeadKernel : bitconvert_ort::KernelBase<HeadKernel<Format>> {
    int64_t out_features = 0;
    int isa = BC_ISA_SCALAR;

    explicit HeadKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo kernel_info(info);
        out_features = kernel_info.GetAttribute<int64_t>("out_features");
        if (out_features < 1) throw OpError(std::string(Format::kName) + ": attribute out_features must be >= 1");
        isa = bitconvert_ort::default_isa(Format::kName);
    }

    static void check_shape(const char *name, const std::vector<int64_t> &shape, const std::vector<int64_t> &expected,
                            int64_t in_features) {
        if (shape != expected)
            throw OpError(std::string(Format::kName) + ": " + name + " has shape " + shape_string(shape) +
                          ", expected " + shape_string(expected) + " for K = " + std::to_string(in_features) + " (" +
                          Format::kSource + ")");
    }

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue x = ctx.GetInput(0), w = ctx.GetInput(1), d = ctx.GetInput(2);
        const std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
        if (x_shape.empty() || x_shape.back() < 1)
            throw OpError(std::string(Format::kName) + ": X has shape " + shape_string(x_shape) +
                          ", it needs a last dimension K >= 1");
        const int64_t in_features = x_shape.back();
        check_shape("W", w.GetTensorTypeAndShapeInfo().GetShape(), {out_features, Format::code_columns(in_features)},
                    in_features);
        check_shape("D", d.GetTensorTypeAndShapeInfo().GetShape(), Format::scale_shape(out_features, in_features),
                    in_features);
        int64_t n = 1;
        for (size_t i = 0; i + 1 < x_shape.size(); ++i) n *= x_shape[i];
        std::vector<int64_t> y_shape = x_shape;
        y_shape.back() = out_features;
        Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
        if (n == 0) return;
        const int64_t work = n * out_features * in_features;
        const int64_t parts = std::max<int64_t>(1, std::min({work / kMinWorkPerPart, n == 1 ? out_features : n,
                                                             kMaxParts}));
        HeadJob<Format> job{x.GetTensorData<float>(),
                            static_cast<const typename Format::Code *>(w.GetTensorRawData()),
                            static_cast<const typename Format::Scale *>(d.GetTensorRawData()),
                            y.GetTensorMutableData<float>(),
                            n, out_features, in_features, parts, isa, {BC_OK}};
        bitconvert_ort::parallel_for(ctx, run_head_part<Format>, size_t(parts), &job);
        if (job.error != BC_OK)
            throw OpError(std::string(Format::kName) + ": kernel error " + std::to_string(job.error));
    }
};

template <class Format>
struct HeadOp : bitconvert_ort::OpBase<HeadOp<Format>, HeadKernel<Format>> {
    const char *GetName() const { return Format::kName; }
    size_t GetInputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetInputType(size_t index) const {
        return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : index == 1 ? Format::kCodeType : Format::kScaleType;
    }
};

}  // namespace

OrtCustomOp *bitconvert_ort::int6_matmul_op() {
    static HeadOp<Int6Format> op;
    return &op;
}

OrtCustomOp *bitconvert_ort::int8_matmul_op() {
    static HeadOp<Int8Format> op;
    return &op;
}
