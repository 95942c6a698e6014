// LLaMA's RMSNorm of one token in fp32, the one computation that both the PyTorch decode step (decode_step.cpp) and
// ONNX Runtime's TernaryMatMul with a folded norm (export/csrc/ternary_ort_op.cpp) run, free of torch and of ONNX
// Runtime. Header only.
#ifndef BITCONVERT_NORM_CORE_H
#define BITCONVERT_NORM_CORE_H

#include <cmath>
#include <cstdint>

namespace bitconvert {

// out (n) = (x * (1 / sqrt(mean(x^2) + eps))) * weight, LlamaRMSNorm's fp32 steps; the fp32 squares are summed in
// double, as 8 partial sums (lane l takes i = l mod 8: independent adds the compiler vectorizes) added in lane order,
// and rounded once (torch and ORT sum fp32 in their own blocked orders, so the sum may differ in the last bit).
inline void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    constexpr int kLanes = 8;
    double lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const float square = x[i + l] * x[i + l];
            lanes[l] += square;
        }
    for (int l = 0; i + l < n; ++l) {
        const float square = x[i + l] * x[i + l];
        lanes[l] += square;
    }
    double sum = 0.0;
    for (double lane : lanes) sum += lane;
    const float inverse = 1.0f / std::sqrt(float(sum) / float(n) + eps);
    for (int64_t j = 0; j < n; ++j) out[j] = (x[j] * inverse) * weight[j];
}

}  // namespace bitconvert

#endif
