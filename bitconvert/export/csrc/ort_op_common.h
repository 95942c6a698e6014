// Helpers shared by bitconvert's ONNX Runtime custom operators (ternary_ort_op.cpp, int6_ort_op.cpp,
// attention_ort_op.cpp): the error a kernel throws and the bases that turn it into an ORT status, shape text for
// messages, the intra-op pool's loop, and the com.bitconvert operators other than TernaryMatMul, which
// RegisterCustomOps adds to the domain. Include onnxruntime_cxx_api.h
// (with ORT_API_MANUAL_INIT) first.
#ifndef BITCONVERT_ORT_OP_COMMON_H
#define BITCONVERT_ORT_OP_COMMON_H

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

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

// fn(data, i) for i < count on ORT's intra-op pool; a single item runs on the calling thread, without a hand-off.
inline void parallel_for(Ort::KernelContext &ctx, void (*fn)(void *, size_t), size_t count, void *data) {
    if (count == 1)
        fn(data, 0);
    else
        ctx.ParallelFor(fn, count, 0, data);
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

// An operator with float outputs (one unless Op says more) whose Kernel(info) constructor throws on bad attributes:
// CreateKernelV2 returns that as an ORT_INVALID_ARGUMENT status (the session refuses the model with the message).
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

// `size` zeroed bytes that a kernel keeps for the session (a repacked weight, read once per decoded token): from 2 MiB
// on, on transparent huge pages where Linux offers them (2 MiB aligned, madvise(MADV_HUGEPAGE) before the first
// touch), as bitconvert.kernels.pages does for the PyTorch path: a streamed weight on 4 KiB pages costs a TLB miss
// and a prefetcher stop every 4 KiB. BITCONVERT_HUGE_PAGES=0 keeps ordinary memory.
class HugePageBytes {
public:
    static constexpr size_t kHugePage = size_t(2) << 20;

    HugePageBytes() = default;
    explicit HugePageBytes(size_t size) : size_(size) {
        const char *setting = std::getenv("BITCONVERT_HUGE_PAGES");
        const bool huge = size >= kHugePage && !(setting != nullptr && std::strcmp(setting, "0") == 0);
        const size_t reserved = huge ? (size + kHugePage - 1) / kHugePage * kHugePage : size;
        data_ = static_cast<uint8_t *>(huge ? std::aligned_alloc(kHugePage, reserved)
                                            : std::malloc(reserved ? reserved : 1));
        if (data_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (huge) madvise(data_, reserved, MADV_HUGEPAGE);  // advice: a kernel without THP keeps 4 KiB pages
#endif
        std::memset(data_, 0, size);
    }
    HugePageBytes(const HugePageBytes &) = delete;
    HugePageBytes &operator=(const HugePageBytes &) = delete;
    HugePageBytes &operator=(HugePageBytes &&other) noexcept {
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
        return *this;
    }
    ~HugePageBytes() { std::free(data_); }

    uint8_t *data() const { return data_; }
    bool empty() const { return size_ == 0; }

private:
    uint8_t *data_ = nullptr;
    size_t size_ = 0;
};

// com.bitconvert::Int6MatMul (int6_ort_op.cpp) and ::CachedAttention (attention_ort_op.cpp): one instance each for
// the whole process.
OrtCustomOp *int6_matmul_op();
OrtCustomOp *cached_attention_op(bool fp16_cache);

}  // namespace bitconvert_ort

#endif
