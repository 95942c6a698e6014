// Study (not part of the package): the fixed cost of one decoded token's ternary product, apart from its weights.
// For SmolLM2's and the 192M model's shapes, one token, weights hot in cache, best of 20,000 calls each:
// bc_quantize_padded (the activation row), bc_linear_quantized (the product from it) and bc_linear_rows (both, as
// the lean decoder calls it), at 1 and 2 threads. Fitting time = fixed + bytes / rate over the shapes of one row
// count gives the fixed part; a build whose one-thread calls still open an OpenMP parallel region pays ~0.5 us more
// per region (docs/kernels.md, "One-token fixed costs").
//     g++ -O3 -std=c++17 -fopenmp -I bitconvert/kernels/csrc benchmarks/layout_study/one_token_overhead.cpp \
//         bitconvert/kernels/csrc/ternary_core.cpp -o one_token_overhead && ./one_token_overhead
#include "ternary_core.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main() {
    const int layout = bc_default_layout(BC_ISA_AUTO);
    struct Shape { int64_t out, in; };
    const Shape shapes[] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}, {576, 4104},
                            {1536, 1024}, {1024, 1024}, {6144, 1024}, {1024, 3072}};
    std::mt19937 random(3);
    std::printf("layout %s; one token, best of 20000 calls, us\n", bc_layout_name(layout));
    std::printf("%-11s %9s %10s %10s %12s %12s\n", "out x in", "KB", "quantize", "product", "linear_rows",
                "2 threads");
    for (const Shape &shape : shapes) {
        std::vector<uint8_t> packed(size_t((shape.out + 3) / 4 * shape.in));
        for (auto &byte : packed) byte = uint8_t(random());  // any codes: the time does not depend on them
        std::vector<uint8_t> weight(bc_repacked_bytes(shape.out, shape.in, layout));
        bc_repack(packed.data(), shape.out, shape.in, layout, weight.data());
        std::vector<float> x(size_t(shape.in)), y(size_t(shape.out)), scales(size_t(shape.out), 1.0f);
        for (auto &value : x) value = float(int(random() % 2001) - 1000) / 1000.0f;
        std::vector<int8_t> x_q(size_t(bc_padded_in(shape.in, layout)));
        int32_t sum = 0;
        float s = 0.0f;
        double quantize = 1e9, product = 1e9, rows = 1e9, rows2 = 1e9;
        for (int repeat = 0; repeat < 20000; ++repeat) {
            auto start = std::chrono::steady_clock::now();
            bc_quantize_padded(x.data(), 1, shape.in, layout, x_q.data(), &sum, &s);
            quantize = std::min(quantize, seconds_since(start));
            start = std::chrono::steady_clock::now();
            bc_linear_quantized(x_q.data(), &sum, &s, 1, weight.data(), layout, 0, shape.out, shape.in, 1.0f,
                                y.data(), shape.out, BC_ISA_AUTO, 1);
            product = std::min(product, seconds_since(start));
            start = std::chrono::steady_clock::now();
            bc_linear_rows(x.data(), 1, weight.data(), layout, shape.out, shape.in, scales.data(), y.data(),
                           BC_ISA_AUTO, 1);
            rows = std::min(rows, seconds_since(start));
            start = std::chrono::steady_clock::now();
            bc_linear_rows(x.data(), 1, weight.data(), layout, shape.out, shape.in, scales.data(), y.data(),
                           BC_ISA_AUTO, 2);
            rows2 = std::min(rows2, seconds_since(start));
        }
        std::printf("%5lldx%-5lld %9.0f %10.2f %10.2f %12.2f %12.2f\n", (long long)shape.out, (long long)shape.in,
                    weight.size() / 1e3, quantize * 1e6, product * 1e6, rows * 1e6, rows2 * 1e6);
    }
    return 0;
}
