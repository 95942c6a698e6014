// fp16 <-> fp32 conversions on fp16 bits (uint16_t), free of torch and of ONNX Runtime: the scalar forms the
// kernels' reference paths use (the int6 lm_head's scales in int8_core.cpp, the fp16 KV cache in attention_core.h;
// their SIMD paths convert with F16C and give the same values). Header only.
#ifndef BITCONVERT_FP16_H
#define BITCONVERT_FP16_H

#include <cmath>
#include <cstdint>
#include <cstring>

namespace bitconvert {

// The fp32 value of fp16 bits, exactly (normal, subnormal, zero, inf, NaN).
inline float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
        const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    const uint32_t bits = sign | (exponent == 0x1F ? 0x7F800000u | (mantissa << 13)
                                                   : ((exponent + 112) << 23) | (mantissa << 13));
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t h) { return half_to_float(h); }

// The fp16 bits nearest to x, ties to even (as torch's .half() and numpy's astype(float16) round): overflow to inf,
// gradual underflow to subnormals, NaN kept (quiet).
inline uint16_t float_to_half(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return sign | 0x7E00u;  // NaN
    if (magnitude >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf (65504 is the largest fp16)
    if (magnitude < 0x38800000u) {                       // below 2^-14: a multiple of 2^-24, exact in fp32 once scaled
        float scaled;
        std::memcpy(&scaled, &magnitude, sizeof scaled);
        return sign | uint16_t(std::nearbyint(scaled * 16777216.0f));  // the default rounding: to nearest even
    }
    uint32_t half = (magnitude >> 13) - (112u << 10);  // exponent rebiased (127 -> 15), top 10 mantissa bits
    const uint32_t rest = magnitude & 0x1FFFu;         // the 13 bits dropped; a carry may raise the exponent
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
    return sign | uint16_t(half);
}

}  // namespace bitconvert

#endif
