// SiLU-gated product (the fused decode step's swiglu) with std::exp against bitconvert/kernels/csrc/fast_exp.h's
// scalar reference and AVX2 loop, one thread, at the intermediate sizes of SmolLM2 (1,536), the 192M model (3,072)
// and Llama-2-7B (11,008): best of 3000 calls each. Prints a table and writes JSON (argument 1, default
// bench-out/silu_exp.json). Build and run from the repository root:
//     g++ -O3 -ffp-contract=off -fno-fast-math benchmarks/silu_exp.cpp -o /tmp/silu_exp && /tmp/silu_exp
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "../bitconvert/kernels/csrc/fast_exp.h"

namespace {

void swiglu_std_exp(const float *gate_up, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = gate_up[i] / (1.0f + std::exp(-gate_up[i])) * gate_up[n + i];
}

template <class Function>
double best_us(Function function) {
    double best = 1e30;
    for (int call = 0; call < 3000; ++call) {
        const auto start = std::chrono::steady_clock::now();
        function();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best * 1e6;
}

}  // namespace

int main(int argc, char **argv) {
    const char *json_path = argc > 1 ? argv[1] : "bench-out/silu_exp.json";
    FILE *json = std::fopen(json_path, "w");
    if (!json) {
        std::fprintf(stderr, "error: cannot write %s (create its folder, or pass another path)\n", json_path);
        return 1;
    }
    std::printf("%8s %14s %18s %10s %10s\n", "n", "std::exp us", "fast_exp scalar us", "AVX2 us", "std / AVX2");
    std::fprintf(json, "[");
    const int64_t sizes[] = {1536, 3072, 11008};
    for (int s = 0; s < 3; ++s) {
        const int64_t n = sizes[s];
        std::vector<float> gate_up(2 * n), out(n);
        for (int64_t i = 0; i < 2 * n; ++i) gate_up[i] = float(i % 97) * 0.1f - 4.8f;
        const double standard = best_us([&] { swiglu_std_exp(gate_up.data(), n, out.data()); });
        const double scalar = best_us([&] { bitconvert::fast_exp::swiglu_scalar(gate_up.data(), n, out.data()); });
        const double avx2 = best_us([&] { bitconvert::fast_exp::swiglu_avx2(gate_up.data(), n, out.data()); });
        std::printf("%8lld %14.2f %18.2f %10.2f %10.2f\n", (long long)n, standard, scalar, avx2, standard / avx2);
        std::fprintf(json, "%s{\"n\": %lld, \"std_exp_us\": %.3f, \"fast_exp_scalar_us\": %.3f, \"avx2_us\": %.3f}",
                     s ? ", " : "", (long long)n, standard, scalar, avx2);
    }
    std::fprintf(json, "]\n");
    std::fclose(json);
    return 0;
}
