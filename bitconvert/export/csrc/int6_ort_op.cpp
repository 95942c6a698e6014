// ONNX Runtime custom operator com.bitconvert::Int6MatMul (version 1): the ~6-bit lm_head on bitconvert's C++ core.
//
//   Y = Int6MatMul(X, W, D; out_features = N)
//   X  float   (..., K)                        activations, quantized inside to int8 per 32-column block
//   W  uint8   (N, bc_int6_row_bytes(K))       int6 codes of each row (ql/qh layout of int8_core.h)
//   D  float16 (N, bc_int6_row_blocks(K))      one scale per row and 32-column block
//   Y  float   (..., N)                        y[t][o] = sum_b d[o][b] e[t][b] P[t][o][b] (bc_int6_linear)
//
// W and D are what bitconvert.kernels.int6_quantize_rows returns (the layout is the kernel's own, so nothing is
// repacked), and every output is bit for bit what bc_int6_linear computes on the same path: one token's rows are
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

struct Int6Job {
    const float *x;
    const uint8_t *w_q;
    const uint16_t *d;
    float *y;
    int64_t n, out_features, in_features, parts;
    int isa;
    std::atomic<int> error{BC_OK};
};

void run_int6_part(void *data, size_t index) {
    Int6Job &job = *static_cast<Int6Job *>(data);
    const int64_t part = int64_t(index);
    int err;
    if (job.n == 1) {  // rows [lo, hi)
        const int64_t lo = part * job.out_features / job.parts, hi = (part + 1) * job.out_features / job.parts;
        err = bc_int6_linear(job.x, 1, job.w_q + lo * bc_int6_row_bytes(job.in_features),
                             job.d + lo * bc_int6_row_blocks(job.in_features), hi - lo, job.in_features, job.y + lo,
                             job.isa, 1);
    } else {  // tokens [first, last), every row
        const int64_t first = part * job.n / job.parts, last = (part + 1) * job.n / job.parts;
        err = bc_int6_linear(job.x + first * job.in_features, last - first, job.w_q, job.d, job.out_features,
                             job.in_features, job.y + first * job.out_features, job.isa, 1);
    }
    if (err != BC_OK) job.error = err;
}

struct Int6MatMulKernel : bitconvert_ort::KernelBase<Int6MatMulKernel> {
    int64_t out_features = 0;
    int isa = BC_ISA_SCALAR;

    explicit Int6MatMulKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo kernel_info(info);
        out_features = kernel_info.GetAttribute<int64_t>("out_features");
        if (out_features < 1) throw OpError("Int6MatMul: attribute out_features must be >= 1");
        isa = bc_default_isa();
        if (isa == -2) throw OpError("Int6MatMul: BITCONVERT_ISA names no known path (scalar, avx2, avxvnni, avx512)");
        if (isa == -3) throw OpError("Int6MatMul: this CPU cannot run the path BITCONVERT_ISA names");
    }

    void check_shape(const char *name, const std::vector<int64_t> &shape, int64_t columns, int64_t in_features) const {
        if (shape.size() != 2 || shape[0] != out_features || shape[1] != columns)
            throw OpError(std::string("Int6MatMul: ") + name + " has shape " + shape_string(shape) + ", expected (" +
                          std::to_string(out_features) + ", " + std::to_string(columns) + ") for K = " +
                          std::to_string(in_features) + " (bitconvert.kernels.int6_quantize_rows)");
    }

    void Compute(OrtKernelContext *context) {
        Ort::KernelContext ctx(context);
        Ort::ConstValue x = ctx.GetInput(0), w = ctx.GetInput(1), d = ctx.GetInput(2);
        const std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
        if (x_shape.empty() || x_shape.back() < 1)
            throw OpError("Int6MatMul: X has shape " + shape_string(x_shape) + ", it needs a last dimension K >= 1");
        const int64_t in_features = x_shape.back();
        check_shape("W", w.GetTensorTypeAndShapeInfo().GetShape(), bc_int6_row_bytes(in_features), in_features);
        check_shape("D", d.GetTensorTypeAndShapeInfo().GetShape(), bc_int6_row_blocks(in_features), in_features);
        int64_t n = 1;
        for (size_t i = 0; i + 1 < x_shape.size(); ++i) n *= x_shape[i];
        std::vector<int64_t> y_shape = x_shape;
        y_shape.back() = out_features;
        Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
        if (n == 0) return;
        const int64_t work = n * out_features * in_features;
        const int64_t parts = std::max<int64_t>(1, std::min({work / kMinWorkPerPart, n == 1 ? out_features : n,
                                                             kMaxParts}));
        Int6Job job{x.GetTensorData<float>(), w.GetTensorData<uint8_t>(),
                    static_cast<const uint16_t *>(d.GetTensorRawData()), y.GetTensorMutableData<float>(),
                    n, out_features, in_features, parts, isa, {BC_OK}};
        ctx.ParallelFor(run_int6_part, size_t(parts), 0, &job);
        if (job.error != BC_OK) throw OpError("Int6MatMul: kernel error " + std::to_string(job.error));
    }
};

struct Int6MatMulOp : bitconvert_ort::OpBase<Int6MatMulOp, Int6MatMulKernel> {
    const char *GetName() const { return "Int6MatMul"; }
    size_t GetInputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetInputType(size_t index) const {
        return index == 0   ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
               : index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                            : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    }
};

}  // namespace

OrtCustomOp *bitconvert_ort::int6_matmul_op() {
    static Int6MatMulOp op;
    return &op;
}
