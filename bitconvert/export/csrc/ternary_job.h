// The ternary product of com.bitconvert::TernaryMatMul (ternary_ort_op.cpp) as work that a pool runs in parts, shared
// with com.bitconvert::DecoderLayer (decoder_layer_ort_op.cpp), which runs four of them in one node: the call's
// Job, its steps as functions of (job, part index) -- quantize_group (the activations, after the optional folded
// residual add and RMSNorm), run_part (rows of y for one token, groups of tokens for several), swiglu_token -- how
// many parts a product is cut into (product_parts), and the call's scratch buffers. Include onnxruntime_cxx_api.h
// (with ORT_API_MANUAL_INIT) first.
#ifndef BITCONVERT_TERNARY_JOB_H
#define BITCONVERT_TERNARY_JOB_H

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "fast_exp.h"
#include "norm_core.h"
#include "ort_op_common.h"
#include "ternary_core.h"

namespace bitconvert_ort {

constexpr int64_t kMinWorkPerPart = int64_t(1) << 18;  // below this, handing work to another thread costs more
// One token's parts are finer: the pool hands parts out one at a time, so with p parts on T threads the busiest
// thread does up to ceil(p / T) / p of the work (3 parts on 2 threads: 2/3), and SmolLM2's products cut at 2^18 made
// 1-6 parts each (its 576 x 576 o_proj ran on one thread).
constexpr int64_t kMinWorkPerTokenPart = int64_t(1) << 16;
// At most this many parts per call: each part is a separate call into the core and a task of ORT's pool, and a 7B
// decode step cut by kMinWorkPerPart alone made ~170 parts per product; capped, 7B-4l decoded 10-15% faster (2-core
// Zen 4, docs/export.md), while 32 parts still balance a pool of up to 8 threads or so.
constexpr int64_t kMaxParts = 32;
constexpr int64_t kTokensPerGroup = 8;                 // the core's tokens per tile call

// One call's work, cut into `parts` slices that run_part computes independently.
struct Job {
    const float *x;         // (n, in_features)
    int8_t *x_q;            // (n, ldx): x quantized per token (bc_quantize_padded)
    int32_t *x_sums;        // (n)
    float *x_scales;        // (n)
    const uint8_t *weight;  // repacked
    float *y;
    const float *scales;            // one per segment
    const std::vector<int64_t> *ends;  // exclusive end row of each segment
    int64_t n, out_features, in_features, ldx, parts;
    int isa, layout;
    std::atomic<int> error{BC_OK};  // set by a failing part
    // the folded norm (gamma not null): skip (n, in_features) or null, sums (n, in_features) = x + skip (x without
    // skip; null when nothing needs it), normed (n, in_features) = rms_norm(sums or x) * gamma, the rows quantized
    const float *skip = nullptr, *gamma = nullptr;
    float *sums = nullptr, *normed = nullptr;
    float eps = 0.0f;
};

// Quantizes the tokens of group `index` (kTokensPerGroup tokens) of job.x into job.x_q, x_sums, x_scales; with a
// folded norm, first x + skip into job.sums and the normalized rows into job.normed, which are quantized instead.
inline void quantize_group(void *data, size_t index) {
    Job &job = *static_cast<Job *>(data);
    const int64_t first = int64_t(index) * kTokensPerGroup, count = std::min(kTokensPerGroup, job.n - first);
    const int64_t k = job.in_features;
    const float *rows = job.x + first * k;
    if (job.gamma != nullptr) {
        for (int64_t t = first; t < first + count; ++t) {
            const float *row = job.x + t * k;
            if (job.sums != nullptr) {
                float *sum = job.sums + t * k;
                for (int64_t i = 0; i < k; ++i) sum[i] = job.skip != nullptr ? row[i] + job.skip[t * k + i] : row[i];
                row = sum;
            }
            bitconvert::rms_norm(row, job.gamma, k, job.eps, job.normed + t * k);
        }
        rows = job.normed + first * k;
    }
    bc_quantize_padded(rows, count, k, job.layout, job.x_q + first * job.ldx, job.x_sums + first,
                       job.x_scales + first);
}

// The rows a one-token part covers a multiple of: a tile, or lut's 128-row group, which its one-token loop computes
// whole (a part that started inside a group would compute the group again).
inline int64_t row_block(int layout) { return layout == BC_LAYOUT_LUT ? BC_LUT_GROUP_ROWS : BC_TILE_ROWS; }

// Rows [row0, row1) of the output for tokens [first, last), all inside segment `seg`, into y (row stride N).
inline int run_rows(const Job &job, int64_t first, int64_t last, int64_t row0, int64_t row1, size_t seg) {
    return bc_linear_quantized(job.x_q + first * job.ldx, job.x_sums + first, job.x_scales + first, last - first,
                               job.weight, job.layout, row0, row1 - row0, job.in_features, job.scales[seg],
                               job.y + first * job.out_features + row0, job.out_features, job.isa, 1);
}

inline void run_part(void *data, size_t index) {
    Job &job = *static_cast<Job *>(data);
    const int64_t part = int64_t(index);
    int64_t first = 0, last = job.n, lo = 0, hi = job.out_features;
    if (job.n == 1) {  // split the rows into whole row blocks (row_block)
        const int64_t rows = row_block(job.layout), blocks = ceil_div(job.out_features, rows);
        lo = part * blocks / job.parts * rows;
        hi = std::min((part + 1) * blocks / job.parts * rows, job.out_features);
    } else {  // split the tokens
        const int64_t groups = ceil_div(job.n, kTokensPerGroup);
        first = part * groups / job.parts * kTokensPerGroup;
        last = std::min((part + 1) * groups / job.parts * kTokensPerGroup, job.n);
    }
    int64_t start = 0;
    for (size_t seg = 0; seg < job.ends->size(); ++seg) {
        const int64_t end = (*job.ends)[seg];
        const int64_t row0 = std::max(start, lo), row1 = std::min(end, hi);
        if (row0 < row1 && first < last) {
            const int err = run_rows(job, first, last, row0, row1, seg);
            if (err != BC_OK) job.error = err;
        }
        start = end;
    }
}

inline int64_t packed_rows(int64_t out_features) { return (out_features + 3) / 4; }

// `name`: the weight's name in the error, e.g. "TernaryMatMul: W".
inline void check_weight_shape(const std::string &name, const std::vector<int64_t> &shape, int64_t out_features) {
    if (shape.size() != 2 || shape[0] != packed_rows(out_features) || shape[1] < 1 || shape[1] > BC_MAX_IN_FEATURES)
        throw OpError(name + " has shape " + shape_string(shape) + ", expected (ceil(" +
                      std::to_string(out_features) + "/4), K) with 1 <= K <= " + std::to_string(BC_MAX_IN_FEATURES));
}

// silu(gate) * up of token `index`: products (n, 2 * half) = gate | up per token -> out (n, half) (fast_exp.h).
struct SwigluJob {
    const float *products;
    float *out;
    int64_t half;
    bool avx2;
};

inline void swiglu_token(void *data, size_t index) {
    const SwigluJob &job = *static_cast<const SwigluJob *>(data);
    bitconvert::fast_exp::swiglu(job.products + int64_t(index) * 2 * job.half, job.half,
                                 job.out + int64_t(index) * job.half, job.avx2);
}

// A call's scratch of `count` values (Slot tells a call's buffers of one type apart). With `keep` (a decoding step's
// few tokens) it is kept per calling thread between calls instead of allocated on each; otherwise (a prompt) it is
// the call's own and freed after it, so no thread holds a prompt-sized buffer.
template <typename T, int Slot>
class Scratch {
  public:
    Scratch(size_t count, bool keep) {
        thread_local std::vector<T> kept;
        std::vector<T> &buffer = keep ? kept : own_;
        if (buffer.size() < count) buffer.resize(count);
        data_ = buffer.data();
    }
    T *data() const { return data_; }

  private:
    std::vector<T> own_;
    T *data_;
};

// How many parts a product of n tokens by (out_features x in_features) is cut into: at least kMinWorkPerPart
// multiply-adds each (kMinWorkPerTokenPart for one token), whole row blocks (one token) or token groups, at most
// kMaxParts.
inline int64_t product_parts(int64_t n, int64_t out_features, int64_t in_features, int layout) {
    const int64_t work = ceil_div(out_features, BC_TILE_ROWS) * BC_TILE_ROWS * n * in_features;
    const int64_t pieces = n == 1 ? ceil_div(out_features, row_block(layout)) : ceil_div(n, kTokensPerGroup);
    return std::max<int64_t>(1, std::min({work / (n == 1 ? kMinWorkPerTokenPart : kMinWorkPerPart), pieces,
                                          kMaxParts}));
}

}  // namespace bitconvert_ort

#endif
