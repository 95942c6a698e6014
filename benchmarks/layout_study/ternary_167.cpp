// Layout study (not part of the package): the batch-1 ternary product in bitconvert's 2-bit layout (the AVX-512
// in-place loop of bitconvert/kernels/csrc/ternary_core.cpp, restated) against a 1.67-bit layout decoded with
// AVX-512 VBMI vpermb: 3 trits per 5-bit index (27 values), the low 4 bits packed two per byte, the fifth bit in a
// 64-bit mask per block loaded into a k-register. Both are checked bit for bit against a scalar reference on an
// 11008 x 4128 matrix, then timed at 2 threads L3-hot (one matrix) and streaming (COPIES matrices cycled), beside
// an integer sum over 1.5 GiB as the memory bound of the same moment.
//     g++ -O3 -march=native -fopenmp ternary_167.cpp -o ternary_167 && OMP_NUM_THREADS=2 ./ternary_167 [COPIES]
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

constexpr int R = 16;  // rows per tile

// ---- 2-bit: 64-byte block = 16 rows x 16 columns; byte 4r+j bits 2i = code(row r, col 4i+j)
void tile2(const uint8_t *w, int64_t kb, const int8_t *x, int32_t *raw) {
    __m512i s[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t b = 0; b < kb; ++b) {
        _mm_prefetch((const char *)(w + (b + 64) * 64), _MM_HINT_T0);
        const __m512i p = _mm512_loadu_si512(w + b * 64);
        for (int i = 0; i < 4; ++i) {
            int32_t xv; std::memcpy(&xv, x + b * 16 + 4 * i, 4);
            s[i] = _mm512_dpbusd_epi32(s[i], _mm512_and_si512(p, _mm512_set1_epi8(char(3 << (2 * i)))), _mm512_set1_epi32(xv));
        }
    }
    __m512i t = s[0];
    for (int i = 1; i < 4; ++i) t = _mm512_add_epi32(t, _mm512_srai_epi32(s[i], 2 * i));
    _mm512_storeu_si512(raw, t);
}

// ---- 1.67-bit: a block covers 16 rows x 12 columns = 64 indices (lane 4r+g: row r, column group g = cols 3g..3g+2),
// index = c0 + 3 c1 + 9 c2 (codes c = T + 1). A pair of blocks = 64 bytes of nibbles (block A low, block B high) +
// 2 x 8 bytes of fifth bits (A then B). xp: per block, per digit j, 4 bytes x[3g + j] for g = 0..3.
void tile167(const uint8_t *w, int64_t pairs, const int8_t *xp, int32_t *raw, const __m512i *tables) {
    __m512i s[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    const __m512i lo = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(16);
    for (int64_t p = 0; p < pairs; ++p) {
        const uint8_t *q = w + p * 80;
        _mm_prefetch((const char *)(q + 64 * 80), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + 64 * 80 + 64), _MM_HINT_T0);
        const __m512i nib = _mm512_loadu_si512(q);
        uint64_t ba, bb; std::memcpy(&ba, q + 64, 8); std::memcpy(&bb, q + 72, 8);
        __m512i ia = _mm512_and_si512(nib, lo);
        __m512i ib = _mm512_and_si512(_mm512_srli_epi16(nib, 4), lo);
        ia = _mm512_mask_add_epi8(ia, _cvtu64_mask64(ba), ia, sixteen);
        ib = _mm512_mask_add_epi8(ib, _cvtu64_mask64(bb), ib, sixteen);
        const int8_t *xa = xp + (2 * p) * 12, *xb = xa + 12;
        for (int j = 0; j < 3; ++j) {
            int32_t va, vb; std::memcpy(&va, xa + 4 * j, 4); std::memcpy(&vb, xb + 4 * j, 4);
            s[j] = _mm512_dpbusd_epi32(s[j], _mm512_permutexvar_epi8(ia, tables[j]), _mm512_set1_epi32(va));
            s[j] = _mm512_dpbusd_epi32(s[j], _mm512_permutexvar_epi8(ib, tables[j]), _mm512_set1_epi32(vb));
        }
    }
    // vpdpbusd sums the 4 bytes of each 32-bit lane, i.e. the 4 column groups of row r: int32 lane r = row r.
    _mm512_storeu_si512(raw, _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), s[2]));
}

int main(int argc, char **argv) {
    const int64_t out = 11008, in = 4128;  // in: a multiple of 48 (pairs of 12-column blocks, and 16)
    const int copies = argc > 1 ? atoi(argv[1]) : 24;
    std::mt19937 rng(1);
    std::vector<int8_t> T(size_t(out * in));
    for (auto &t : T) t = int8_t(int(rng() % 3) - 1);
    std::vector<int8_t> x(static_cast<size_t>(in));
    for (auto &v : x) v = int8_t(int(rng() % 255) - 127);
    // reference
    std::vector<int64_t> ref(static_cast<size_t>(out));
    for (int64_t o = 0; o < out; ++o) { int64_t s = 0; for (int64_t k = 0; k < in; ++k) s += int64_t(T[o * in + k] + 1) * x[k]; ref[o] = s; }
    // 2-bit pack
    const int64_t kb2 = in / 16, tiles = out / R;
    std::vector<uint8_t> w2(size_t(tiles * kb2 * 64), 0);
    for (int64_t o = 0; o < out; ++o) for (int64_t k = 0; k < in; ++k) {
        const int64_t t = o / R, r = o % R, b = k / 16, i = (k % 16) / 4, j = k % 4;
        w2[(t * kb2 + b) * 64 + 4 * r + j] |= uint8_t((T[o * in + k] + 1) << (2 * i));
    }
    // 1.67-bit pack
    const int64_t blocks = in / 12, pairs = blocks / 2;
    std::vector<uint8_t> w3(size_t(tiles * pairs * 80), 0);
    for (int64_t o = 0; o < out; ++o) for (int64_t bl = 0; bl < blocks; ++bl) for (int g = 0; g < 4; ++g) {
        const int64_t t = o / R, r = o % R, k0 = bl * 12 + 3 * g;
        const int idx = (T[o * in + k0] + 1) + 3 * (T[o * in + k0 + 1] + 1) + 9 * (T[o * in + k0 + 2] + 1);
        uint8_t *q = &w3[(t * pairs + bl / 2) * 80];
        const int lane = 4 * int(r) + g, hi = int(bl % 2);
        q[lane] |= uint8_t((idx & 15) << (4 * hi));
        if (idx & 16) q[64 + 8 * hi + lane / 8] |= uint8_t(1 << (lane % 8));
    }
    std::vector<int8_t> xp(size_t(blocks * 12));
    for (int64_t bl = 0; bl < blocks; ++bl) for (int j = 0; j < 3; ++j) for (int g = 0; g < 4; ++g)
        xp[bl * 12 + 4 * j + g] = x[bl * 12 + 3 * g + j];
    alignas(64) uint8_t tab[3][64] = {};
    for (int idx = 0; idx < 27; ++idx) { tab[0][idx] = idx % 3; tab[1][idx] = (idx / 3) % 3; tab[2][idx] = idx / 9; }
    __m512i tables[3];
    for (int j = 0; j < 3; ++j) tables[j] = _mm512_loadu_si512(tab[j]);
    // check
    std::vector<int32_t> y2(static_cast<size_t>(out)), y3(static_cast<size_t>(out));
    for (int64_t t = 0; t < tiles; ++t) { tile2(&w2[t * kb2 * 64], kb2, x.data(), &y2[t * R]); tile167(&w3[t * pairs * 80], pairs, xp.data(), &y3[t * R], tables); }
    for (int64_t o = 0; o < out; ++o) if (y2[o] != ref[o] || y3[o] != ref[o]) { printf("MISMATCH row %ld: ref %ld 2bit %d 167 %d\n", long(o), long(ref[o]), y2[o], y3[o]); return 1; }
    printf("both layouts exact on %ldx%ld; bytes 2-bit %zu, 1.67-bit %zu (%.3f)\n", long(out), long(in), w2.size(), w3.size(), double(w3.size()) / w2.size());
    // timing
    std::vector<std::vector<uint8_t>> c2(copies, w2), c3(copies, w3);
    std::vector<uint32_t> big(size_t(3) << 27, 1u);  // 1.5 GiB; an integer sum vectorizes without fast-math
    auto now = [] { return std::chrono::steady_clock::now(); };
    auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
    for (int rep = 0; rep < 3; ++rep) {
        auto a = now(); uint64_t sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
        for (size_t i = 0; i < big.size(); ++i) sum += big[i];
        const double bw = big.size() * 4.0 / secs(a, now());
        for (int mode = 0; mode < 4; ++mode) {
            const bool stream = mode >= 2, three = mode % 2;
            const int n = stream ? copies : 1, reps = stream ? 3 : 200;
            double best = 1e9;
            for (int it = 0; it < reps; ++it) {
                auto s = now();
                for (int c = 0; c < n; ++c) {
                    const uint8_t *W = three ? c3[c].data() : c2[c].data();
#pragma omp parallel for schedule(static)
                    for (int64_t t = 0; t < tiles; ++t) {
                        if (three) tile167(W + t * pairs * 80, pairs, xp.data(), &y3[t * R], tables);
                        else tile2(W + t * kb2 * 64, kb2, x.data(), &y2[t * R]);
                    }
                }
                best = std::min(best, secs(s, now()) / n);
            }
            const double bytes = three ? w3.size() : w2.size();
            printf("rep %d %-8s %-6s %7.1f us/matrix  %5.1f GB/s  %6.1f Gweights/s  (sum %.1f GB/s, %lu)\n", rep, three ? "1.67bit" : "2bit",
                   stream ? "DRAM" : "L3hot", best * 1e6, bytes / best / 1e9, double(out) * in / best / 1e9, bw / 1e9, (unsigned long)sum);
        }
    }
    return 0;
}
