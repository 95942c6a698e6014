// Layout study (not part of the package): what bounds the one-token base3 loop on one core. The package's own
// Base3Avx512::tile<1> (ternary_core.cpp, compiled in here) runs beside variants of the same loop that each drop
// one kind of work, on a tile set that stays in L1/L2 (so memory is out of the picture):
//   asm dp       the same loop, vpdpbusd reading its activation dword as an embedded broadcast {1to16} (GCC
//                keeps a separate vpbroadcastd, and copies the accumulators around: 45 instructions per pair)
//   no vpermb    the 5-bit indices fed to vpdpbusd as they are (the digit lookups dropped)
//   no vpdpbusd  the digit planes xor-ed together (the products dropped)
//   index only   only the index build (nibble split, fifth bit added under a k-mask)
//   ymm          the whole loop at 256 bits (vpermb with 32-entry tables, 8 rows per register)
// "asm dp" and "ymm" are checked bit for bit against tile<1>; the others compute something else on purpose.
// Cycles are ns x the clock given (lscpu's or the measured one; this VM ran at 3.67 GHz).
//     g++ -O3 -std=c++17 -fopenmp benchmarks/layout_study/base3_floor.cpp -o base3_floor && ./base3_floor 3.67
#include "../../bitconvert/kernels/csrc/ternary_core.cpp"

#include <chrono>
#include <cstdio>
#include <random>

namespace {

#define BC_TARGET_VBMI_VL __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

alignas(64) const uint8_t kDigitTables[3][64] = {
    {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2},
    {0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2},
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2}};

// acc += a (u8) x broadcast dword at x (s8), the broadcast folded into vpdpbusd.
BC_TARGET_VBMI_VL inline __m512i dpbusd_broadcast(__m512i acc, __m512i a, const int8_t *x) {
    asm("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*(const int32_t *)x), "v"(a));
    return acc;
}
BC_TARGET_VBMI_VL inline __m256i dpbusd_broadcast(__m256i acc, __m256i a, const int8_t *x) {
    asm("vpdpbusd %1%{1to8%}, %2, %0" : "+v"(acc) : "m"(*(const int32_t *)x), "v"(a));
    return acc;
}

enum class Variant { AsmDp, NoPermute, NoProduct, IndexOnly };

// Digit plane j of block index `index` as the variant asks: the lookup (or the index itself), then accumulated into
// acc against the activation dword at x (or xor-ed in).
template <Variant V>
BC_TARGET_VBMI_VL inline __m512i step(__m512i acc, __m512i index, __m512i table, const int8_t *x) {
    const __m512i plane = V == Variant::NoPermute ? index : _mm512_permutexvar_epi8(index, table);
    return V == Variant::NoProduct ? _mm512_xor_si512(acc, plane) : dpbusd_broadcast(acc, plane, x);
}

// The one-token base3 tile (16 rows, `pairs` pairs of 80 bytes) in zmm registers, as the variant asks; written out
// statement by statement (arrays of registers indexed in loops made GCC spill them).
template <Variant V>
BC_TARGET_VBMI_VL void tile512(const uint8_t *w, int64_t pairs, const int8_t *x, int64_t, int32_t *raw) {
    const __m512i t0 = _mm512_load_si512(kDigitTables[0]), t1 = _mm512_load_si512(kDigitTables[1]),
                  t2 = _mm512_load_si512(kDigitTables[2]);
    const __m512i low = _mm512_set1_epi8(15), sixteen = _mm512_set1_epi8(16);
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0;
    for (int64_t p = 0; p < pairs; ++p) {
        const uint8_t *pair = w + p * BC_PAIR_BYTES;
        _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES + 64), _MM_HINT_T0);
        const __m512i nibbles = _mm512_loadu_si512(pair);
        uint64_t fifth[2];
        std::memcpy(fifth, pair + 64, sizeof fifth);
        const __m512i a = _mm512_and_si512(nibbles, low), b = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low);
        const __m512i index_a = _mm512_mask_add_epi8(a, _cvtu64_mask64(fifth[0]), a, sixteen);
        const __m512i index_b = _mm512_mask_add_epi8(b, _cvtu64_mask64(fifth[1]), b, sixteen);
        const int8_t *xb = x + 24 * p;
        if (V == Variant::IndexOnly) {
            s0 = _mm512_xor_si512(s0, index_a);
            s1 = _mm512_xor_si512(s1, index_b);
            continue;
        }
        s0 = step<V>(s0, index_a, t0, xb);
        s1 = step<V>(s1, index_a, t1, xb + 4);
        s2 = step<V>(s2, index_a, t2, xb + 8);
        s3 = step<V>(s3, index_b, t0, xb + 12);
        s4 = step<V>(s4, index_b, t1, xb + 16);
        s5 = step<V>(s5, index_b, t2, xb + 20);
    }
    const __m512i total = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)),
                                           _mm512_add_epi32(s4, s5));
    _mm512_storeu_si512(raw, total);
}

// Six accumulators of 8 rows at 256 bits.
struct Sums256 {
    __m256i s0, s1, s2, s3, s4, s5;
};

// One half (8 rows) of a pair at 256 bits into `sums`: its 32 nibble bytes and two 32-bit fifth-bit masks.
BC_TARGET_VBMI_VL inline void half256(const uint8_t *pair, int half, const int8_t *xb, const __m256i tables[3],
                                      Sums256 &sums) {
    const __m256i low = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
    const __m256i nibbles = _mm256_loadu_si256((const __m256i *)(pair + 32 * half));
    uint32_t fifth_a, fifth_b;
    std::memcpy(&fifth_a, pair + 64 + 4 * half, 4);
    std::memcpy(&fifth_b, pair + 72 + 4 * half, 4);
    const __m256i a = _mm256_and_si256(nibbles, low), b = _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), low);
    const __m256i index_a = _mm256_mask_add_epi8(a, _cvtu32_mask32(fifth_a), a, sixteen);
    const __m256i index_b = _mm256_mask_add_epi8(b, _cvtu32_mask32(fifth_b), b, sixteen);
    sums.s0 = dpbusd_broadcast(sums.s0, _mm256_permutexvar_epi8(index_a, tables[0]), xb);
    sums.s1 = dpbusd_broadcast(sums.s1, _mm256_permutexvar_epi8(index_a, tables[1]), xb + 4);
    sums.s2 = dpbusd_broadcast(sums.s2, _mm256_permutexvar_epi8(index_a, tables[2]), xb + 8);
    sums.s3 = dpbusd_broadcast(sums.s3, _mm256_permutexvar_epi8(index_b, tables[0]), xb + 12);
    sums.s4 = dpbusd_broadcast(sums.s4, _mm256_permutexvar_epi8(index_b, tables[1]), xb + 16);
    sums.s5 = dpbusd_broadcast(sums.s5, _mm256_permutexvar_epi8(index_b, tables[2]), xb + 20);
}

// The same tile at 256 bits: rows 0-7 and 8-15 of a pair as two halves (lane 4r+g, r < 8).
BC_TARGET_VBMI_VL void tile256(const uint8_t *w, int64_t pairs, const int8_t *x, int64_t, int32_t *raw) {
    const __m256i tables[3] = {_mm256_load_si256((const __m256i *)kDigitTables[0]),
                               _mm256_load_si256((const __m256i *)kDigitTables[1]),
                               _mm256_load_si256((const __m256i *)kDigitTables[2])};
    const __m256i zero = _mm256_setzero_si256();
    Sums256 upper{zero, zero, zero, zero, zero, zero}, lower = upper;
    for (int64_t p = 0; p < pairs; ++p) {
        const uint8_t *pair = w + p * BC_PAIR_BYTES;
        _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES + 64), _MM_HINT_T0);
        half256(pair, 0, x + 24 * p, tables, upper);
        half256(pair, 1, x + 24 * p, tables, lower);
    }
    for (const Sums256 *sums : {&upper, &lower}) {
        const __m256i total = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_add_epi32(sums->s0, sums->s1), _mm256_add_epi32(sums->s2, sums->s3)),
            _mm256_add_epi32(sums->s4, sums->s5));
        _mm256_storeu_si256((__m256i *)(raw + (sums == &upper ? 0 : 8)), total);
    }
}

}  // namespace

int main(int argc, char **argv) {
    const double ghz = argc > 1 ? std::atof(argv[1]) : 3.67;
    if (!__builtin_cpu_supports("avx512vbmi") || !__builtin_cpu_supports("avx512vnni")) {
        std::fprintf(stderr, "error: this study needs AVX-512 VBMI and VNNI (the package's base3 path)\n");
        return 1;
    }
    constexpr int64_t kPairs = 171, kTiles = 16;  // 4104 columns, 16 tiles: 219 KB, L2-resident
    std::vector<uint8_t> w(kTiles * kPairs * BC_PAIR_BYTES + 8192);
    std::vector<int8_t> x(kPairs * 24 + 64);
    std::mt19937 random(7);
    for (auto &v : w) v = uint8_t(random());
    for (int64_t t = 0; t < kTiles * kPairs; ++t)  // valid indices (< 27): clear the fifth bit where the nibble >= 11
        for (int h = 0; h < 2; ++h)
            for (int lane = 0; lane < 64; ++lane) {
                uint8_t *pair = w.data() + t * BC_PAIR_BYTES;
                if (((pair[lane] >> (4 * h)) & 15) >= 11) pair[64 + 8 * h + lane / 8] &= uint8_t(~(1u << (lane % 8)));
            }
    for (auto &v : x) v = int8_t(int(random() % 255) - 127);

    auto time_ns_per_pair = [&](TileFn fn, std::vector<int32_t> &raw) {
        double best = 1e30;
        for (int repeat = 0; repeat < 300; ++repeat) {
            const auto start = std::chrono::steady_clock::now();
            for (int64_t t = 0; t < kTiles; ++t) fn(w.data() + t * kPairs * BC_PAIR_BYTES, kPairs, x.data(), 0,
                                                     raw.data() + 16 * t);
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        }
        return best / double(kTiles * kPairs) * 1e9;
    };
    struct Row { const char *name; TileFn fn; bool exact; };
    const Row rows[] = {{"tile<1> (package)", &Base3Avx512::tile<1>, true},
                        {"asm dp", &tile512<Variant::AsmDp>, true},
                        {"no vpermb", &tile512<Variant::NoPermute>, false},
                        {"no vpdpbusd", &tile512<Variant::NoProduct>, false},
                        {"index only", &tile512<Variant::IndexOnly>, false},
                        {"ymm", &tile256, true}};
    std::vector<int32_t> reference(16 * kTiles), raw(16 * kTiles);
    time_ns_per_pair(rows[0].fn, reference);
    std::printf("one core, %lld pairs x %lld tiles from L1/L2, best of 300; cycles at %.2f GHz\n", (long long)kPairs,
                (long long)kTiles, ghz);
    std::printf("%-20s %10s %14s %18s %s\n", "loop", "ns/pair", "cycles/pair", "GB/s of base3", "exact");
    for (int pass = 0; pass < 3; ++pass)
        for (const Row &row : rows) {
            const double ns = time_ns_per_pair(row.fn, raw);
            std::printf("%-20s %10.3f %14.2f %18.1f %s\n", row.name, ns, ns * ghz, BC_PAIR_BYTES / ns,
                        row.exact ? (raw == reference ? "yes" : "NO") : "-");
        }
    return 0;
}
