// Helpers shared by bitconvert's ONNX Runtime custom operators (ternary_ort_op.cpp, lm_head_ort_op.cpp,
// attention_ort_op.cpp, decoder_layer_ort_op.cpp): the error a kernel throws and the bases that turn it into an ORT
// status, shape text for messages, the kernels' SIMD path and layout, the intra-op pool's loop, a program of ordered
// parallel steps run in one hand-off to that pool (PhaseProgram), huge-page memory for repacked weights, and the
// com.bitconvert operators other than TernaryMatMul, which RegisterCustomOps adds to the domain. Include
// onnxruntime_cxx_api.h (with ORT_API_MANUAL_INIT) first.
#ifndef BITCONVERT_ORT_OP_COMMON_H
#define BITCONVERT_ORT_OP_COMMON_H

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ternary_core.h"

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

// The SIMD path the kernels run (BITCONVERT_ISA or the CPU's best); `op` names the operator in the error.
inline int default_isa(const std::string &op) {
    const int isa = bc_default_isa();
    if (isa == -2) throw OpError(op + ": BITCONVERT_ISA names no known path (scalar, avx2, avxvnni, avx512)");
    if (isa == -3) throw OpError(op + ": this CPU cannot run the path BITCONVERT_ISA names");
    return isa;
}

// That path and the ternary layout it computes on (BITCONVERT_LAYOUT or the path's best).
inline void default_path(const std::string &op, int &isa, int &layout) {
    isa = default_isa(op);
    layout = bc_default_layout(isa);
    if (layout == -2) throw OpError(op + ": BITCONVERT_LAYOUT names no known layout (2bit, base3, lut)");
    if (layout == -3) throw OpError(op + ": the SIMD path does not compute on the layout BITCONVERT_LAYOUT names");
}

// fn(data, i) for i < count on ORT's intra-op pool; a single item runs on the calling thread, without a hand-off.
inline void parallel_for(Ort::KernelContext &ctx, void (*fn)(void *, size_t), size_t count, void *data) {
    if (count == 1)
        fn(data, 0);
    else
        ctx.ParallelFor(fn, count, 0, data);
}

// One step of a PhaseProgram: fn(data, i) for i < count, any i on any thread.
struct Phase {
    void (*fn)(void *, size_t);
    void *data;
    size_t count;
};

// Steps that must run in order, each cut into items that may run in parallel, in ONE hand-off to ORT's intra-op
// pool instead of one per step: every participant (a task of the pool) walks the phases in order, claims items of
// the current phase until none is left, then waits until every claimed item of it is done before it moves on (the
// items of phase i + 1 read what phase i wrote). A participant claims from its own share of a phase's items first,
// in order (participant p of P: items [p count / P, (p + 1) count / P)), then from the others' shares: so each
// thread streams one contiguous run of a product's rows, as ORT's own loops (home shards) and the lean decoder's
// static split do, instead of every other part. A participant waits only for items that another participant has
// already claimed and is computing, so the program finishes whatever the pool does: one thread runs it all, a late
// thread finds the phases done and returns. Which thread computes an item never changes its result.
// Participants: one per CPU (std::thread::hardware_concurrency), at most one per item of the largest phase. ORT tells
// a kernel nothing about its pool's size; where the session has fewer threads than the machine has CPUs, the
// participants without a thread of their own are late ones, and their shares go to the others after their own
// (every item still computed once, the same bits; the runs of rows per thread just less contiguous).
class PhaseProgram {
  public:
    explicit PhaseProgram(std::vector<Phase> phases) : phases_(std::move(phases)) {}

    // Runs every phase to the end on the pool of `ctx` (on the calling thread alone for a single item), once; rethrows
    // the first exception an item threw (the other items still run, so no participant waits forever).
    void run(Ort::KernelContext &ctx) {
        static const size_t cpus = std::max(1u, std::thread::hardware_concurrency());  // read once: it reads /sys
        size_t most = 0;
        for (const Phase &phase : phases_) most = std::max(most, phase.count);
        if (most == 0) return;
        participants_ = std::min({most, cpus, kMaxParticipants});
        shards_.reset(new Shard[phases_.size() * participants_]);
        done_.reset(new Done[phases_.size()]);
        for (size_t i = 0; i < phases_.size(); ++i)
            for (size_t p = 0; p < participants_; ++p) {
                Shard &shard = shards_[i * participants_ + p];
                shard.next.store(begin(i, p), std::memory_order_relaxed);
                shard.end = begin(i, p + 1);
            }
        if (participants_ <= 1)
            participate(this, 0);
        else
            ctx.ParallelFor(participate, participants_, 0, this);
        if (error_) std::rethrow_exception(error_);
    }

  private:
    static constexpr size_t kMaxParticipants = 32;
    struct alignas(64) Shard {  // the items [next, end) of one participant's share not claimed yet
        std::atomic<size_t> next{0};
        size_t end = 0;
    };
    struct alignas(64) Done {
        std::atomic<size_t> count{0};
    };

    size_t begin(size_t phase, size_t participant) const {
        return phases_[phase].count * participant / participants_;
    }

    // The next unclaimed item of phase i, from participant p's share first, then the others'; count when none.
    size_t claim(size_t i, size_t p) {
        for (size_t k = 0; k < participants_; ++k) {
            Shard &shard = shards_[i * participants_ + (p + k) % participants_];
            if (shard.next.load(std::memory_order_relaxed) >= shard.end) continue;
            const size_t item = shard.next.fetch_add(1, std::memory_order_relaxed);
            if (item < shard.end) return item;
        }
        return phases_[i].count;
    }

    static void participate(void *data, size_t index) {
        PhaseProgram &program = *static_cast<PhaseProgram *>(data);
        if (program.finished_.load(std::memory_order_acquire)) return;
        const size_t p = index % program.participants_;
        for (size_t i = 0; i < program.phases_.size(); ++i) {
            const Phase &phase = program.phases_[i];
            std::atomic<size_t> &done = program.done_[i].count;
            for (size_t item; (item = program.claim(i, p)) < phase.count;) {
                try {
                    phase.fn(phase.data, item);
                } catch (...) {
                    std::lock_guard<std::mutex> lock(program.error_mutex_);
                    if (!program.error_) program.error_ = std::current_exception();
                }
                done.fetch_add(1, std::memory_order_release);
            }
            for (unsigned spins = 0; done.load(std::memory_order_acquire) < phase.count; ++spins) {
                if (spins < 4096)
                    _mm_pause();
                else
                    std::this_thread::yield();  // the other participant may share this core
            }
        }
        program.finished_.store(true, std::memory_order_release);
    }

    std::vector<Phase> phases_;
    size_t participants_ = 1;
    std::unique_ptr<Shard[]> shards_;  // phase i, participant p: shards_[i * participants_ + p]
    std::unique_ptr<Done[]> done_;
    std::atomic<bool> finished_{false};
    std::mutex error_mutex_;
    std::exception_ptr error_;  // the first exception an item threw
};

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

// com.bitconvert::Int6MatMul and ::Int8MatMul (lm_head_ort_op.cpp), ::CachedAttention (attention_ort_op.cpp) and
// ::DecoderLayer (decoder_layer_ort_op.cpp): one instance each for the whole process (per cache type for the last
// two).
OrtCustomOp *int6_matmul_op();
OrtCustomOp *int8_matmul_op();
OrtCustomOp *cached_attention_op(bool fp16_cache);
OrtCustomOp *decoder_layer_op(bool fp16_cache);

}  // namespace bitconvert_ort

#endif
