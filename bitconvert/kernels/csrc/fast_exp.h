// exp(x) in fp32 for the fused decode step's softmax and SiLU: a scalar reference and an AVX2 loop that give the same
// bits (the same operations in the same order, no FMA; the library builds with -ffp-contract=off), the AVX2 one 8
// values per instruction where std::exp takes ~3.3 ns per value (Zen 4: a 11,008-wide SiLU, 32 of them per 7B token,
// 36.4 us with std::exp, 8.2 us here; benchmarks/silu_exp.cpp).
//
//   x clamped to [-104, 89] (NaN passes through unchanged; exp is 0 below and inf above, as std::exp's)
//   n = round_half_even(x * log2(e))
//   r = (x - n * C1) - n * C2          C1 + C2 = ln 2; C1 = 0.693359375 has 9 bits, so n * C1 and x - n * C1 are exact
//   p = ((((((P0 r + P1) r + P2) r + P3) r + P4) r + P5) * r^2 + r) + 1     Cephes' expf polynomial, |r| <= ln 2 / 2
//   exp(x) = (p * 2^h) * 2^(n - h),  h = floor(n / 2)   two exact powers of two: one rounding, gradual underflow
// Error: below 1 ulp of the exact exp wherever the result is normal (0.96 ulp at most over 2 million points from -110
// to 95), below one subnormal step where it underflows (0.75); tests/test_decode.py checks both.
#ifndef BITCONVERT_FAST_EXP_H
#define BITCONVERT_FAST_EXP_H

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace bitconvert {
namespace fast_exp {

constexpr float kLow = -104.0f, kHigh = 89.0f;
constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float power_of_two(int32_t e) {  // 2^e for -126 <= e <= 127
    const uint32_t bits = uint32_t(e + 127) << 23;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline float scalar(float x) {
    if (x != x) return x;
    x = kLow > x ? kLow : x;  // the operand order of _mm256_max_ps / _mm256_min_ps below
    x = kHigh < x ? kHigh : x;
    const float n = std::nearbyint(x * kLog2e);
    const float r = (x - n * kC1) - n * kC2;
    float p = kP0 * r + kP1;
    p = p * r + kP2;
    p = p * r + kP3;
    p = p * r + kP4;
    p = p * r + kP5;
    p = (p * (r * r) + r) + 1.0f;
    const int32_t e = int32_t(n), half = e >> 1;
    return (p * power_of_two(half)) * power_of_two(e - half);
}

#define BC_TARGET_AVX2_EXP __attribute__((target("avx2")))

BC_TARGET_AVX2_EXP inline __m256 avx2(__m256 x) {
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(kHigh), _mm256_max_ps(_mm256_set1_ps(kLow), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(clamped, _mm256_mul_ps(n, _mm256_set1_ps(kC1))),
                                   _mm256_mul_ps(n, _mm256_set1_ps(kC2)));
    __m256 p = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(kP0), r), _mm256_set1_ps(kP1));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kP2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kP3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kP4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kP5));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(e, 1), bias = _mm256_set1_epi32(127);
    const __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(e, half), bias), 23));
    return _mm256_blendv_ps(_mm256_mul_ps(_mm256_mul_ps(p, first), second), x, nan);
}

// values[i] = exp(values[i] - shift) for i < n, in place; avx2: 8 at a time (same bits as the scalar loop).
inline void exp_shifted_scalar(float *values, int64_t n, float shift) {
    for (int64_t i = 0; i < n; ++i) values[i] = scalar(values[i] - shift);
}

BC_TARGET_AVX2_EXP inline void exp_shifted_avx2(float *values, int64_t n, float shift) {
    const __m256 by = _mm256_set1_ps(shift);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(values + i, avx2(_mm256_sub_ps(_mm256_loadu_ps(values + i), by)));
    for (; i < n; ++i) values[i] = scalar(values[i] - shift);
}

// out (n) = silu(gate) * up = gate / (1 + exp(-gate)) * up, gate_up (2n) = gate then up; avx2: 8 at a time.
inline void swiglu_scalar(const float *gate_up, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = gate_up[i] / (1.0f + scalar(-gate_up[i])) * gate_up[n + i];
}

BC_TARGET_AVX2_EXP inline void swiglu_avx2(const float *gate_up, int64_t n, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gate = _mm256_loadu_ps(gate_up + i);
        const __m256 denominator = _mm256_add_ps(one, avx2(_mm256_xor_ps(gate, sign)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gate, denominator), _mm256_loadu_ps(gate_up + n + i)));
    }
    for (; i < n; ++i) out[i] = gate_up[i] / (1.0f + scalar(-gate_up[i])) * gate_up[n + i];
}

// The two loops above behind one call each: avx2 picks the AVX2 loop (the caller checks the CPU and BITCONVERT_ISA).
inline void exp_shifted(float *values, int64_t n, float shift, bool avx2) {
    avx2 ? exp_shifted_avx2(values, n, shift) : exp_shifted_scalar(values, n, shift);
}

inline void swiglu(const float *gate_up, int64_t n, float *out, bool avx2) {
    avx2 ? swiglu_avx2(gate_up, n, out) : swiglu_scalar(gate_up, n, out);
}

}  // namespace fast_exp
}  // namespace bitconvert

#endif
