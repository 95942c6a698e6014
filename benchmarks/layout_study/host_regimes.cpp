// Study (not part of the package): what changes on this VM when its read bandwidth flips between its two modes
// (~30-37 and ~47-67 GB/s, docs/kernels.md). Alternates, with a 20 ms pause between rounds: the read bandwidth of 2
// threads over 512 MiB (best of 3 passes), the latency of an OpenMP barrier between the 2 threads (20,000 in one
// region), and one SmolLM2 layer's four one-token ternary products (q/k/v, o, gate/up, down: 0.74 MB in the default
// layout) from cache, in one team of 2 threads as decode_layer runs them (best of 50), and on 1 thread. Prints the
// medians of the rounds below and above 45 GB/s.
//     g++ -O3 -std=c++17 -fopenmp -I bitconvert/kernels/csrc benchmarks/layout_study/host_regimes.cpp \
//         bitconvert/kernels/csrc/ternary_core.cpp -o host_regimes && ./host_regimes 600
#include "ternary_core.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double median(std::vector<double> values) {
    if (values.empty()) return 0.0;
    std::sort(values.begin(), values.end());
    return values[values.size() / 2];
}

// GB/s that 2 threads read from `data` (4 floats of every 64-byte line), best of 3 passes.
double read_bandwidth(const std::vector<float> &data) {
    double best = 1e9;
    for (int pass = 0; pass < 3; ++pass) {
        const Clock::time_point start = Clock::now();
        float total = 0.0f;
#pragma omp parallel for num_threads(2) reduction(+ : total) schedule(static)
        for (size_t i = 0; i < data.size(); i += 16) total += data[i] + data[i + 4] + data[i + 8] + data[i + 12];
        best = std::min(best, seconds_since(start));
        if (total < 0.0f) std::puts("");  // keeps the sum alive
    }
    return double(data.size()) * sizeof(float) / best / 1e9;
}

// Nanoseconds per OpenMP barrier of a 2-thread team.
double barrier_ns() {
    constexpr int kBarriers = 20000;
    const Clock::time_point start = Clock::now();
#pragma omp parallel num_threads(2)
    for (int i = 0; i < kBarriers; ++i) {
#pragma omp barrier
    }
    return seconds_since(start) / kBarriers * 1e9;
}

struct Product {
    int64_t out, in;
    std::vector<uint8_t> weight;
    std::vector<float> scales, y;
    std::vector<int8_t> x_q;
    int32_t sum = 0;
    float s = 0.0f;
};

// Microseconds for the four products in a team of `threads` (bc_linear_rows_in_team, as decode_layer), best of 50.
double layer_products_us(std::vector<Product> &products, int threads) {
    double best = 1e9;
    for (int repeat = 0; repeat < 50; ++repeat) {
        const Clock::time_point start = Clock::now();
#pragma omp parallel num_threads(threads)
        for (Product &p : products)
            bc_linear_rows_in_team(p.x_q.data(), p.sum, p.s, p.weight.data(), bc_default_layout(BC_ISA_AUTO), p.out,
                                   p.in, p.scales.data(), p.y.data(), BC_ISA_AUTO);
        best = std::min(best, seconds_since(start));
    }
    return best * 1e6;
}

}  // namespace

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? std::atoi(argv[1]) : 300;
    const int layout = bc_default_layout(BC_ISA_AUTO);
    std::mt19937 random(5);
    std::vector<Product> products;
    for (const auto &shape : {std::pair<int64_t, int64_t>{960, 576}, {576, 576}, {3072, 576}, {576, 1536}}) {
        Product p{shape.first, shape.second};
        // valid codes (0..2 per weight, HF's packing), repacked into the kernels' layout
        std::vector<uint8_t> packed(size_t((p.out + 3) / 4 * p.in));
        for (uint8_t &byte : packed) {
            byte = 0;
            for (int i = 0; i < 4; ++i) byte |= uint8_t(random() % 3) << (2 * i);
        }
        p.weight.resize(bc_repacked_bytes(p.out, p.in, layout));
        bc_repack(packed.data(), p.out, p.in, layout, p.weight.data());
        p.scales.assign(size_t(p.out), 1.0f);
        p.y.resize(size_t(p.out));
        std::vector<float> x(size_t(p.in));
        for (float &value : x) value = float(random() % 2001) / 1000.0f - 1.0f;
        p.x_q.resize(size_t(bc_padded_in(p.in, layout)));
        bc_quantize_padded(x.data(), 1, p.in, layout, p.x_q.data(), &p.sum, &p.s);
        products.push_back(std::move(p));
    }
    const std::vector<float> data((size_t(512) << 20) / sizeof(float), 1.0f);
    struct Row { double gb_s, barrier, two, one; };
    std::vector<Row> rows;
    for (int round = 0; round < rounds; ++round) {
        Row row;
        row.gb_s = read_bandwidth(data);
        row.barrier = barrier_ns();
        row.two = layer_products_us(products, 2);
        row.one = layer_products_us(products, 1);
        rows.push_back(row);
        usleep(20000);
    }
    std::printf("%d rounds, 2 threads; medians per bandwidth mode\n", rounds);
    std::printf("%-10s %7s %10s %12s %22s %22s %10s\n", "mode", "rounds", "read GB/s", "barrier ns",
                "layer products 2 thr", "layer products 1 thr", "1t / 2t");
    for (int high = 0; high < 2; ++high) {
        std::vector<double> gb_s, barrier, two, one;
        for (const Row &row : rows)
            if ((row.gb_s >= 45.0) == bool(high)) {
                gb_s.push_back(row.gb_s);
                barrier.push_back(row.barrier);
                two.push_back(row.two);
                one.push_back(row.one);
            }
        if (gb_s.empty()) continue;
        std::printf("%-10s %7zu %10.1f %12.0f %19.2f us %19.2f us %10.2f\n", high ? ">= 45" : "< 45", gb_s.size(),
                    median(gb_s), median(barrier), median(two), median(one), median(one) / median(two));
    }
}
