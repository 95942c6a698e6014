// Ternary x int8 kernels: the scalar reference and the AVX2, AVX-VNNI and AVX-512 VNNI paths on the 2-bit layout
// and on the base-3 layout (AVX-512 with VBMI; both layouts: ternary_core.h), one struct per path and layout, each
// computing the same thing, and the per-token activation quantization (scalar, AVX2, AVX-512). Every SIMD path is
// compiled with a function-level target attribute and only called after a CPUID check, so the library runs on any
// x86-64.
// Build with -ffp-contract=off and without fast-math: the float steps must round exactly as torch does.
#include "ternary_core.h"
#include "avxvnni.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kMaxTokens = 8;  // tokens per tile call: a tile's unpacked codes are reused across them
constexpr int kQuads = BC_BLOCK_COLS / 4;
// Software prefetch distance (4 KiB): the hardware prefetchers alone left weight streaming well below the
// bandwidth torch.sum reaches; prefetching is a hint, so reading past the matrix end is harmless.
constexpr int64_t kPrefetchBlocks = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A tile function: raw[t * 16 + r] = sum over all columns k of code(row r, k) * x[t * ldx + k], for t < NT, where
// w points at the tile's first unit (2-bit: k-block of 64 bytes; base3: pair of 80 bytes; lut: 16 words, the next
// unit 256 bytes on), `units` is their count, and x at the first of NT activation rows as the layout reads them
// (zero padded; base3: permuted; lut: tables and codes).
using TileFn = void (*)(const uint8_t *w, int64_t units, const int8_t *x, int64_t ldx, int32_t *raw);

int32_t load4(const int8_t *p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// Independent accumulator chains per token, to hide the multiply-add latency when few tokens share a tile.
template <int NT>
constexpr int chains() { return NT >= kQuads ? 1 : kQuads / NT; }

struct Scalar {
    template <int NT>
    static void tile(const uint8_t *w, int64_t kblocks, const int8_t *x, int64_t ldx, int32_t *raw) {
        for (int t = 0; t < NT; ++t) {
            for (int r = 0; r < BC_TILE_ROWS; ++r) {
                int32_t sum = 0;
                for (int64_t b = 0; b < kblocks; ++b) {
                    const uint8_t *block = w + b * BC_BLOCK_BYTES;
                    const int8_t *xb = x + t * ldx + b * BC_BLOCK_COLS;
                    for (int i = 0; i < kQuads; ++i)
                        for (int j = 0; j < 4; ++j) sum += ((block[4 * r + j] >> (2 * i)) & 3) * xb[4 * i + j];
                }
                raw[t * BC_TILE_ROWS + r] = sum;
            }
        }
    }
};

#define BC_TARGET_AVX2 __attribute__((target("avx2")))
#define BC_TARGET_AVXVNNI __attribute__((target("avx2," BC_AVXVNNI_FEATURES)))
#define BC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))

// AVX2 without VNNI: codes (u8) x activations (s8) with vpmaddubsw into int16 pairs (|c0x0 + c1x1| <= 512, no
// saturation), the four quads of a block summed in int16 (<= 2048), widened with vpmaddwd against ones.
// One 256-bit half-block holds 8 rows, so the tile is done as two passes of 8 rows.
struct Avx2 {
    template <int NT>
    BC_TARGET_AVX2 static void tile(const uint8_t *w, int64_t kblocks, const int8_t *x, int64_t ldx, int32_t *raw) {
        const __m256i mask = _mm256_set1_epi8(3);
        const __m256i ones = _mm256_set1_epi16(1);
        for (int half = 0; half < 2; ++half) {
            __m256i sum[NT];
            for (int t = 0; t < NT; ++t) sum[t] = _mm256_setzero_si256();
            for (int64_t b = 0; b < kblocks; ++b) {
                _mm_prefetch((const char *)(w + (b + kPrefetchBlocks) * BC_BLOCK_BYTES), _MM_HINT_T0);
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(w + b * BC_BLOCK_BYTES + 32 * half));
                __m256i codes[kQuads];
                for (int i = 0; i < kQuads; ++i) codes[i] = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * i), mask);
                for (int t = 0; t < NT; ++t) {
                    const int8_t *xb = x + t * ldx + b * BC_BLOCK_COLS;
                    __m256i pairs = _mm256_setzero_si256();
                    for (int i = 0; i < kQuads; ++i)
                        pairs = _mm256_add_epi16(
                            pairs, _mm256_maddubs_epi16(codes[i], _mm256_set1_epi32(load4(xb + 4 * i))));
                    sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(pairs, ones));
                }
            }
            for (int t = 0; t < NT; ++t)
                _mm256_storeu_si256((__m256i *)(raw + t * BC_TILE_ROWS + 8 * half), sum[t]);
        }
    }
};

// AVX-VNNI: one vpdpbusd per quad and token (u8 codes x s8 activations, 4 products summed into each int32 lane).
struct AvxVnni {
    template <int NT>
    BC_TARGET_AVXVNNI static void tile(const uint8_t *w, int64_t kblocks, const int8_t *x, int64_t ldx, int32_t *raw) {
        constexpr int C = chains<NT>();
        const __m256i mask = _mm256_set1_epi8(3);
        for (int half = 0; half < 2; ++half) {
            __m256i sum[NT][C];
            for (int t = 0; t < NT; ++t)
                for (int c = 0; c < C; ++c) sum[t][c] = _mm256_setzero_si256();
            for (int64_t b = 0; b < kblocks; ++b) {
                _mm_prefetch((const char *)(w + (b + kPrefetchBlocks) * BC_BLOCK_BYTES), _MM_HINT_T0);
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(w + b * BC_BLOCK_BYTES + 32 * half));
                for (int i = 0; i < kQuads; ++i) {
                    const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * i), mask);
                    for (int t = 0; t < NT; ++t) {
                        const __m256i xs = _mm256_set1_epi32(load4(x + t * ldx + b * BC_BLOCK_COLS + 4 * i));
                        sum[t][i % C] = bc_dpbusd256(sum[t][i % C], codes, xs);
                    }
                }
            }
            for (int t = 0; t < NT; ++t) {
                __m256i total = sum[t][0];
                for (int c = 1; c < C; ++c) total = _mm256_add_epi32(total, sum[t][c]);
                _mm256_storeu_si256((__m256i *)(raw + t * BC_TILE_ROWS + 8 * half), total);
            }
        }
    }
};

// AVX-512 VNNI: a whole 64-byte block (16 rows) per register, one vpdpbusd per quad and token.
// For one token (decoding) the shifts are skipped: quad i is masked in place, i.e. codes scaled by 4^i (<= 128, still
// u8), accumulated in its own chain and shifted back once at the end (exact: every term is a multiple of 4^i).
struct Avx512 {
    template <int NT>
    BC_TARGET_AVX512 static void tile(const uint8_t *w, int64_t kblocks, const int8_t *x, int64_t ldx, int32_t *raw) {
        constexpr int C = chains<NT>();
        constexpr bool in_place = NT == 1;  // C == kQuads: one chain per quad
        __m512i sum[NT][C];
        for (int t = 0; t < NT; ++t)
            for (int c = 0; c < C; ++c) sum[t][c] = _mm512_setzero_si512();
        for (int64_t b = 0; b < kblocks; ++b) {
            _mm_prefetch((const char *)(w + (b + kPrefetchBlocks) * BC_BLOCK_BYTES), _MM_HINT_T0);
            const __m512i packed = _mm512_loadu_si512(w + b * BC_BLOCK_BYTES);
            for (int i = 0; i < kQuads; ++i) {
                const __m512i codes = in_place ? _mm512_and_si512(packed, _mm512_set1_epi8(char(3 << (2 * i))))
                                               : _mm512_and_si512(_mm512_srli_epi16(packed, 2 * i), _mm512_set1_epi8(3));
                for (int t = 0; t < NT; ++t) {
                    const __m512i xs = _mm512_set1_epi32(load4(x + t * ldx + b * BC_BLOCK_COLS + 4 * i));
                    sum[t][i % C] = _mm512_dpbusd_epi32(sum[t][i % C], codes, xs);
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            __m512i total = sum[t][0];
            for (int c = 1; c < C; ++c)
                total = _mm512_add_epi32(total, in_place ? _mm512_srai_epi32(sum[t][c], 2 * c) : sum[t][c]);
            _mm512_storeu_si512(raw + t * BC_TILE_ROWS, total);
        }
    }
};

// ---- base-3 layout (ternary_core.h): 16 rows x 24 columns per 80-byte pair, 64 five-bit indices per 12-column block.
constexpr int kPairBlocks = 2, kGroups = 4, kDigits = 3, kBlockCols = kGroups * kDigits;

// The index of lane l of block h (0: A, 1: B) of a pair.
int base3_index(const uint8_t *pair, int h, int lane) {
    return ((pair[lane] >> (4 * h)) & 15) | (((pair[64 + 8 * h + lane / 8] >> (lane % 8)) & 1) << 4);
}

struct Base3Scalar {
    template <int NT>
    static void tile(const uint8_t *w, int64_t pairs, const int8_t *x, int64_t ldx, int32_t *raw) {
        for (int t = 0; t < NT; ++t) {
            for (int r = 0; r < BC_TILE_ROWS; ++r) {
                int32_t sum = 0;
                for (int64_t p = 0; p < pairs; ++p)
                    for (int h = 0; h < kPairBlocks; ++h) {
                        const int8_t *xb = x + t * ldx + (kPairBlocks * p + h) * kBlockCols;  // permuted block
                        for (int g = 0; g < kGroups; ++g) {
                            int index = base3_index(w + p * BC_PAIR_BYTES, h, kGroups * r + g);
                            for (int j = 0; j < kDigits; ++j, index /= 3) sum += (index % 3) * xb[kGroups * j + g];
                        }
                    }
                raw[t * BC_TILE_ROWS + r] = sum;
            }
        }
    }
};

#define BC_TARGET_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi")))

// AVX-512 VBMI: per pair, the 64 indices of each block rebuilt with one masked add of 16, then vpermb against three
// 64-byte tables gives digit plane j (lane 4r+g = digit j of row r's group g), one vpdpbusd per plane and token
// against the 4 permuted activation bytes of digit j: lane r sums its 4 groups. All six planes of a pair add into
// the same int32 lanes; with few tokens they rotate over several accumulator chains to hide the vpdpbusd latency.
// For several token groups of one tile (prefill), `decode` writes a tile's planes out once (6 x 64 bytes per pair,
// kept in the thread's cache) and `planes_tile` reads them back per group instead of decoding again.
struct Base3Avx512 {
    static constexpr int kPlanes = kPairBlocks * kDigits;
    static constexpr int64_t kPlaneBytes = kPlanes * 64;  // decoded bytes per pair

    // The six digit planes of pair p of w: planes[3h + j] = digit j of block h.
    BC_TARGET_AVX512VBMI static inline void decode_pair(const uint8_t *w, int64_t p, __m512i planes[kPlanes]) {
        alignas(64) static const uint8_t kTables[kDigits][64] = {
            {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2},
            {0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2},
            {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2}};
        const uint8_t *pair = w + p * BC_PAIR_BYTES;
        _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES + 64), _MM_HINT_T0);
        const __m512i nibbles = _mm512_loadu_si512(pair), low = _mm512_set1_epi8(15);
        uint64_t fifth[kPairBlocks];
        std::memcpy(fifth, pair + 64, sizeof fifth);
        const __m512i index[kPairBlocks] = {_mm512_and_si512(nibbles, low),
                                            _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low)};
        for (int h = 0; h < kPairBlocks; ++h) {
            const __m512i full = _mm512_mask_add_epi8(index[h], _cvtu64_mask64(fifth[h]), index[h],
                                                      _mm512_set1_epi8(16));
            for (int j = 0; j < kDigits; ++j)
                planes[kDigits * h + j] = _mm512_permutexvar_epi8(full, _mm512_load_si512(kTables[j]));
        }
    }

    // raw[t * 16 + r] for NT tokens, the six planes of each pair p given by planes_of(p, planes): one vpdpbusd per
    // plane and token, rotating over C accumulator chains per token.
    template <int NT, class PlanesOf>
    BC_TARGET_AVX512VBMI static inline void compute(int64_t pairs, const int8_t *x, int64_t ldx, int32_t *raw,
                                                    PlanesOf planes_of) {
        constexpr int C = NT >= kPlanes ? 1 : kPlanes / NT;
        __m512i sum[NT][C];
        for (int t = 0; t < NT; ++t)
            for (int c = 0; c < C; ++c) sum[t][c] = _mm512_setzero_si512();
        for (int64_t p = 0; p < pairs; ++p) {
            __m512i planes[kPlanes];
            planes_of(p, planes);
            for (int plane = 0; plane < kPlanes; ++plane) {
                const int h = plane / kDigits, j = plane % kDigits;
                for (int t = 0; t < NT; ++t) {
                    const int8_t *xb = x + t * ldx + (kPairBlocks * p + h) * kBlockCols + kGroups * j;
                    sum[t][plane % C] = _mm512_dpbusd_epi32(sum[t][plane % C], planes[plane],
                                                            _mm512_set1_epi32(load4(xb)));
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            __m512i total = sum[t][0];
            for (int c = 1; c < C; ++c) total = _mm512_add_epi32(total, sum[t][c]);
            _mm512_storeu_si512(raw + t * BC_TILE_ROWS, total);
        }
    }

    struct DecodeFrom {  // the planes of the repacked weights w
        const uint8_t *w;
        BC_TARGET_AVX512VBMI void operator()(int64_t p, __m512i *planes) const { decode_pair(w, p, planes); }
    };

    struct LoadFrom {  // the planes `decode` wrote
        const uint8_t *decoded;
        BC_TARGET_AVX512VBMI void operator()(int64_t p, __m512i *planes) const {
            for (int i = 0; i < kPlanes; ++i) planes[i] = _mm512_loadu_si512(decoded + p * kPlaneBytes + 64 * i);
        }
    };

    template <int NT>
    BC_TARGET_AVX512VBMI static void tile(const uint8_t *w, int64_t pairs, const int8_t *x, int64_t ldx,
                                          int32_t *raw) {
        compute<NT>(pairs, x, ldx, raw, DecodeFrom{w});
    }

    // out (pairs * kPlaneBytes): the planes of a tile's pairs, in order.
    BC_TARGET_AVX512VBMI static void decode(const uint8_t *w, int64_t pairs, uint8_t *out) {
        for (int64_t p = 0; p < pairs; ++p) {
            __m512i planes[kPlanes];
            decode_pair(w, p, planes);
            for (int i = 0; i < kPlanes; ++i) _mm512_storeu_si512(out + p * kPlaneBytes + 64 * i, planes[i]);
        }
    }

    // As tile, from the planes `decode` wrote.
    template <int NT>
    BC_TARGET_AVX512VBMI static void planes_tile(const uint8_t *decoded, int64_t pairs, const int8_t *x, int64_t ldx,
                                                 int32_t *raw) {
        compute<NT>(pairs, x, ldx, raw, LoadFrom{decoded});
    }
};

// AVX2 and AVX-VNNI on base3: a pair as two halves of 8 rows (32 lanes: lane 4r+g of the half holds row r's group
// g). Without vpermb, a digit of a 5-bit index is looked up in two 16-entry vpshufb tables (indices 0-15 and 16-31)
// on the low 4 bits, and vpblendvb picks by the fifth bit (a byte mask expanded from the half's 32 bits). The six
// digit planes of a half-pair are decoded once and used for every token: AVX2 multiplies each with vpmaddubsw
// (u8 digit x s8 activation pairs, |2 x 2 x 128| <= 512 per int16, six planes <= 3072) and widens once per pair with
// vpmaddwd; AVX-VNNI adds each plane with one vpdpbusd.
struct Base3Avx2Planes {
    static constexpr int kPlanes = kPairBlocks * kDigits;

    // Byte i of the result: 0xFF if bit i of bits is set, else 0.
    BC_TARGET_AVX2 static inline __m256i expand_bits(uint32_t bits) {
        const __m256i spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(int(bits)), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
        const __m256i select = _mm256_set1_epi64x(int64_t(0x8040201008040201));
        return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
    }

    // The six digit planes (planes[3h + j] = digit j of block h) of half `half` (rows 8 half .. 8 half + 7) of pair p.
    BC_TARGET_AVX2 static inline void decode_half(const uint8_t *w, int64_t p, int half, __m256i planes[kPlanes]) {
        // kLow[j] / kHigh[j]: digit j of the indices 0-15 / 16-31 (27-31 never occur), in both 128-bit lanes
        alignas(32) static const uint8_t kLow[kDigits][32] = {
            {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0},
            {0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2},
            {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1}};
        alignas(32) static const uint8_t kHigh[kDigits][32] = {
            {1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0},
            {2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0},
            {1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0}};
        const uint8_t *pair = w + p * BC_PAIR_BYTES;
        if (half == 0) {
            _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(pair + kPrefetchBlocks * BC_PAIR_BYTES + 64), _MM_HINT_T0);
        }
        const __m256i nibbles = _mm256_loadu_si256((const __m256i *)(pair + 32 * half)), low = _mm256_set1_epi8(15);
        const __m256i index[kPairBlocks] = {_mm256_and_si256(nibbles, low),
                                            _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), low)};
        for (int h = 0; h < kPairBlocks; ++h) {
            uint32_t bits;
            std::memcpy(&bits, pair + 64 + 8 * h + 4 * half, sizeof bits);
            const __m256i fifth = expand_bits(bits);
            for (int j = 0; j < kDigits; ++j)
                planes[kDigits * h + j] =
                    _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)kLow[j]), index[h]),
                                       _mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)kHigh[j]), index[h]),
                                       fifth);
        }
    }
};

struct Base3Avx2 {
    template <int NT>
    BC_TARGET_AVX2 static void tile(const uint8_t *w, int64_t pairs, const int8_t *x, int64_t ldx, int32_t *raw) {
        const __m256i ones = _mm256_set1_epi16(1);
        for (int half = 0; half < 2; ++half) {
            __m256i sum[NT];
            for (int t = 0; t < NT; ++t) sum[t] = _mm256_setzero_si256();
            for (int64_t p = 0; p < pairs; ++p) {
                __m256i planes[Base3Avx2Planes::kPlanes];
                Base3Avx2Planes::decode_half(w, p, half, planes);
                for (int t = 0; t < NT; ++t) {
                    const int8_t *xp = x + t * ldx + kPairBlocks * p * kBlockCols;
                    __m256i products = _mm256_setzero_si256();
                    for (int plane = 0; plane < Base3Avx2Planes::kPlanes; ++plane) {
                        const int h = plane / kDigits, j = plane % kDigits;
                        const __m256i xs = _mm256_set1_epi32(load4(xp + h * kBlockCols + kGroups * j));
                        products = _mm256_add_epi16(products, _mm256_maddubs_epi16(planes[plane], xs));
                    }
                    sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(products, ones));
                }
            }
            for (int t = 0; t < NT; ++t)
                _mm256_storeu_si256((__m256i *)(raw + t * BC_TILE_ROWS + 8 * half), sum[t]);
        }
    }
};

struct Base3AvxVnni {
    template <int NT>
    BC_TARGET_AVXVNNI static void tile(const uint8_t *w, int64_t pairs, const int8_t *x, int64_t ldx, int32_t *raw) {
        constexpr int kPlanes = Base3Avx2Planes::kPlanes, C = NT >= kPlanes ? 1 : kPlanes / NT;
        for (int half = 0; half < 2; ++half) {
            __m256i sum[NT][C];
            for (int t = 0; t < NT; ++t)
                for (int c = 0; c < C; ++c) sum[t][c] = _mm256_setzero_si256();
            for (int64_t p = 0; p < pairs; ++p) {
                __m256i planes[kPlanes];
                Base3Avx2Planes::decode_half(w, p, half, planes);
                for (int plane = 0; plane < kPlanes; ++plane) {
                    const int h = plane / kDigits, j = plane % kDigits;
                    for (int t = 0; t < NT; ++t) {
                        const int8_t *xb = x + t * ldx + (kPairBlocks * p + h) * kBlockCols + kGroups * j;
                        sum[t][plane % C] = bc_dpbusd256(sum[t][plane % C], planes[plane], _mm256_set1_epi32(load4(xb)));
                    }
                }
            }
            for (int t = 0; t < NT; ++t) {
                __m256i total = sum[t][0];
                for (int c = 1; c < C; ++c) total = _mm256_add_epi32(total, sum[t][c]);
                _mm256_storeu_si256((__m256i *)(raw + t * BC_TILE_ROWS + 8 * half), total);
            }
        }
    }
};


// ---- lut layout (ternary_core.h): groups of 8 tiles (128 rows); per 9-column unit, the group's 128 words (256
// bytes, tile i's 16 words at byte 32 i), each holding three five-bit base-3 indices of its row; the activations as
// lookup tables plus the int8 codes (lut_tables / lut_codes).
constexpr int kLutLookups = 3;                                    // indices per word, 3 columns each
constexpr int kLutEntries = 32;                                   // int16 entries per table (27 used)
constexpr int64_t kLutTableBytes = kLutLookups * kLutEntries * 2;  // 192 table bytes per unit
constexpr int64_t kLutCodeBytes = kLutLookups * 4;                 // 12 code bytes per unit: (x0, x1, x2, 0) per index
constexpr int kLutWiden = 14;  // units summed in int16: 14 x 3 lookups x |3 x 2 x 128| = 32,256 <= 32,767
constexpr int kBandTiles = BC_LUT_GROUP_ROWS / BC_TILE_ROWS;  // a lut group: 4 tile pairs share each table load
constexpr int64_t kLutUnitStride = kBandTiles * BC_LUT_UNIT_BYTES;  // bytes from one unit of a tile to its next
// Software prefetch distance (into L2) of the one-token loop: 64 units of a group. With T0 and 2 KiB the loop
// streamed at ~44 GB/s where this reached ~60 (a standalone version of the loop, 24 matrices of 11008 x 4096).
constexpr int64_t kLutPrefetchBytes = 16384;

// Index k of row r in unit u of a lut tile (tile: the tile's first word).
int lut_index(const uint8_t *tile, int64_t u, int r, int k) {
    const uint8_t *word = tile + u * kLutUnitStride + 2 * r;
    return ((word[0] | word[1] << 8) >> (5 * k)) & 31;
}

// Digit j (< 3) of a base-3 index.
int base3_digit(int index, int j) {
    for (; j > 0; --j) index /= 3;
    return index % 3;
}

struct LutScalar {  // from the int8 codes of the activations, digit by digit
    template <int NT>
    static void tile(const uint8_t *w, int64_t units, const int8_t *x, int64_t ldx, int32_t *raw) {
        for (int t = 0; t < NT; ++t)
            for (int r = 0; r < BC_TILE_ROWS; ++r) {
                int32_t sum = 0;
                for (int64_t u = 0; u < units; ++u)
                    for (int k = 0; k < kLutLookups; ++k) {
                        const int8_t *codes = x + t * ldx + units * kLutTableBytes + u * kLutCodeBytes + 4 * k;
                        const int index = lut_index(w, u, r, k);
                        for (int j = 0; j < 3; ++j) sum += base3_digit(index, j) * codes[j];
                    }
                raw[t * BC_TILE_ROWS + r] = sum;
            }
    }
};

// AVX-512 (F/BW, VNNI) on lut. One token (band): a tile pair's words in one register (32 word lanes, rows of tile
// 2p then 2p + 1), and each index k of a unit is one vpermw against that unit's table k: 32 lanes x 3 weights per
// instruction, summed in int16 for kLutWiden units, then widened to int32; a whole group per call, so that the three
// tables of a unit are loaded once for its four pairs. Several tokens: the words become digit planes (vpermt2d
// from the index to the dword (d0, d1, d2, 0)), one vpdpbusd per plane and token against the 4 code bytes
// (x0, x1, x2, 0); with several token groups `decode` writes a tile's planes once (as Base3Avx512 does).
struct LutAvx512 {
    static constexpr int64_t kPlaneBytes = kLutLookups * 64;  // decoded bytes per unit

    // lut_tables, 32 entries per vector: table = D0 x0 + D1 x1 + D2 x2 with Dj[i] = digit j of i (0 from i = 27),
    // in int16 (exact: |entry| <= 768).
    BC_TARGET_AVX512 static void tables(const int8_t *codes, int64_t units, int8_t *out) {
        alignas(64) static const int16_t kDigitTables[3][kLutEntries] = {
            {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2},
            {0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2},
            {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2}};
        const __m512i d0 = _mm512_load_si512(kDigitTables[0]), d1 = _mm512_load_si512(kDigitTables[1]),
                      d2 = _mm512_load_si512(kDigitTables[2]);
        for (int64_t g = 0; g < units * kLutLookups; ++g) {
            const int8_t *x = codes + 4 * g;
            const __m512i table = _mm512_add_epi16(
                _mm512_add_epi16(_mm512_mullo_epi16(d0, _mm512_set1_epi16(x[0])),
                                 _mm512_mullo_epi16(d1, _mm512_set1_epi16(x[1]))),
                _mm512_mullo_epi16(d2, _mm512_set1_epi16(x[2])));
            _mm512_storeu_si512(out + g * 64, table);
        }
    }

    // One token, the 8 tiles of the group at w (a group's 256 bytes per unit read as one stream): raw[16 i + r] =
    // tile i's row r. Each register holds the words of a tile pair (32 word lanes).
    BC_TARGET_AVX512 static void band(const uint8_t *w, int64_t units, const int8_t *x, int32_t *raw) {
        constexpr int kPairs = kBandTiles / 2;
        __m512i low[kPairs], high[kPairs];
        for (int p = 0; p < kPairs; ++p) low[p] = high[p] = _mm512_setzero_si512();
        for (int64_t u0 = 0; u0 < units; u0 += kLutWiden) {
            const int64_t u1 = std::min<int64_t>(units, u0 + kLutWiden);
            __m512i sum[kPairs];
            for (int p = 0; p < kPairs; ++p) sum[p] = _mm512_setzero_si512();
            for (int64_t u = u0; u < u1; ++u) {
                const int8_t *tables = x + u * kLutTableBytes;
                const __m512i table0 = _mm512_loadu_si512(tables), table1 = _mm512_loadu_si512(tables + 64),
                              table2 = _mm512_loadu_si512(tables + 128);
                const uint8_t *unit = w + u * kLutUnitStride;
                for (int p = 0; p < kPairs; ++p) {
                    _mm_prefetch((const char *)(unit + 64 * p + kLutPrefetchBytes), _MM_HINT_T1);
                    const __m512i words = _mm512_loadu_si512(unit + 64 * p);
                    // vpermw reads the low 5 bits of each word: index 0 as is, 1 and 2 shifted down
                    sum[p] = _mm512_add_epi16(sum[p], _mm512_permutexvar_epi16(words, table0));
                    sum[p] = _mm512_add_epi16(sum[p], _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 5), table1));
                    sum[p] = _mm512_add_epi16(sum[p], _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 10), table2));
                }
            }
            for (int p = 0; p < kPairs; ++p) {
                low[p] = _mm512_add_epi32(low[p], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(sum[p])));
                high[p] = _mm512_add_epi32(high[p], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sum[p], 1)));
            }
        }
        for (int p = 0; p < kPairs; ++p) {
            _mm512_storeu_si512(raw + 2 * p * BC_TILE_ROWS, low[p]);
            _mm512_storeu_si512(raw + (2 * p + 1) * BC_TILE_ROWS, high[p]);
        }
    }

    // The three digit planes of unit u of a tile: plane k, dword lane r = (d0, d1, d2, 0) of row r's index k.
    BC_TARGET_AVX512 static inline void decode_unit(const uint8_t *w, int64_t u, __m512i planes[kLutLookups]) {
        alignas(64) static const uint32_t kDigits[kLutEntries] = {
            0x00000, 0x00001, 0x00002, 0x00100, 0x00101, 0x00102, 0x00200, 0x00201, 0x00202,
            0x10000, 0x10001, 0x10002, 0x10100, 0x10101, 0x10102, 0x10200, 0x10201, 0x10202,
            0x20000, 0x20001, 0x20002, 0x20100, 0x20101, 0x20102, 0x20200, 0x20201, 0x20202};
        const uint8_t *unit = w + u * kLutUnitStride;
        const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)unit));
        const __m512i lower = _mm512_load_si512(kDigits), upper = _mm512_load_si512(kDigits + 16);
        for (int k = 0; k < kLutLookups; ++k)  // vpermt2d reads the low 5 bits of each dword
            planes[k] = _mm512_permutex2var_epi32(lower, _mm512_srli_epi32(words, 5 * k), upper);
    }

    // raw[t * 16 + r] for NT tokens, the planes of each unit u given by planes_of(u, planes).
    template <int NT, class PlanesOf>
    BC_TARGET_AVX512 static inline void compute(int64_t units, const int8_t *x, int64_t ldx, int32_t *raw,
                                                PlanesOf planes_of) {
        constexpr int C = NT >= kLutLookups ? 1 : kLutLookups;
        __m512i sum[NT][C];
        for (int t = 0; t < NT; ++t)
            for (int c = 0; c < C; ++c) sum[t][c] = _mm512_setzero_si512();
        const int8_t *codes = x + units * kLutTableBytes;
        for (int64_t u = 0; u < units; ++u) {
            __m512i planes[kLutLookups];
            planes_of(u, planes);
            for (int k = 0; k < kLutLookups; ++k)
                for (int t = 0; t < NT; ++t) {
                    const __m512i xs = _mm512_set1_epi32(load4(codes + t * ldx + u * kLutCodeBytes + 4 * k));
                    sum[t][k % C] = _mm512_dpbusd_epi32(sum[t][k % C], planes[k], xs);
                }
        }
        for (int t = 0; t < NT; ++t) {
            __m512i total = sum[t][0];
            for (int c = 1; c < C; ++c) total = _mm512_add_epi32(total, sum[t][c]);
            _mm512_storeu_si512(raw + t * BC_TILE_ROWS, total);
        }
    }

    struct DecodeFrom {  // the planes of the repacked weights w
        const uint8_t *w;
        BC_TARGET_AVX512 void operator()(int64_t u, __m512i *planes) const { decode_unit(w, u, planes); }
    };

    struct LoadFrom {  // the planes `decode` wrote
        const uint8_t *decoded;
        BC_TARGET_AVX512 void operator()(int64_t u, __m512i *planes) const {
            for (int k = 0; k < kLutLookups; ++k) planes[k] = _mm512_loadu_si512(decoded + u * kPlaneBytes + 64 * k);
        }
    };

    template <int NT>
    BC_TARGET_AVX512 static void tile(const uint8_t *w, int64_t units, const int8_t *x, int64_t ldx, int32_t *raw) {
        compute<NT>(units, x, ldx, raw, DecodeFrom{w});
    }

    // out (units * kPlaneBytes): the planes of a tile's units, in order.
    BC_TARGET_AVX512 static void decode(const uint8_t *w, int64_t units, uint8_t *out) {
        for (int64_t u = 0; u < units; ++u) {
            __m512i planes[kLutLookups];
            decode_unit(w, u, planes);
            for (int k = 0; k < kLutLookups; ++k) _mm512_storeu_si512(out + u * kPlaneBytes + 64 * k, planes[k]);
        }
    }

    template <int NT>
    BC_TARGET_AVX512 static void planes_tile(const uint8_t *decoded, int64_t units, const int8_t *x, int64_t ldx,
                                             int32_t *raw) {
        compute<NT>(units, x, ldx, raw, LoadFrom{decoded});
    }
};

// A band function: one token, the band_tiles tiles from w (a multiple of band_tiles): raw[16 i + r] = tile i's row r.
using BandFn = void (*)(const uint8_t *w, int64_t units, const int8_t *x, int32_t *raw);

// The band of a path whose one-token work is its one-tile function (band_tiles 1).
template <class Path>
void tile_band(const uint8_t *w, int64_t units, const int8_t *x, int32_t *raw) {
    Path::template tile<1>(w, units, x, 0, raw);
}

// A table builder: the lut tables (units * 192 bytes, out) from the activation codes of one token.
using TablesFn = void (*)(const int8_t *codes, int64_t units, int8_t *out);

// tiles[nt] handles nt tokens (1 <= nt <= kMaxTokens); band, the band_tiles tiles of one token (null: the path does
// not compute on the layout); tables, for a band that reads lut tables: each helper thread of run_band builds its
// own copy with it, since reading the copy the calling thread wrote pulls it line by line from that core's cache
// (one 4096 x 4096 product from cache: 166 -> 254-257 G weights/s on 2 threads of the Zen 4 VM).
struct Kernels {
    TileFn tiles[kMaxTokens + 1];
    BandFn band;
    int band_tiles;
    TablesFn tables;
};

template <class Path>
constexpr Kernels kernels_of(BandFn band = &tile_band<Path>, int band_tiles = 1, TablesFn tables = nullptr) {
    return {{nullptr, &Path::template tile<1>, &Path::template tile<2>, &Path::template tile<3>,
             &Path::template tile<4>, &Path::template tile<5>, &Path::template tile<6>, &Path::template tile<7>,
             &Path::template tile<8>},
            band,
            band_tiles,
            tables};
}

// A path that decodes a tile once for several token groups: decode(w, units, out) writes unit_bytes per unit, and
// tiles[nt] computes from them what the path's own tiles compute from w.
struct DecodedKernels {
    int64_t unit_bytes;
    void (*decode)(const uint8_t *w, int64_t units, uint8_t *out);
    TileFn tiles[kMaxTokens + 1];
};

constexpr DecodedKernels kBase3Avx512Decoded = {
    Base3Avx512::kPlaneBytes, &Base3Avx512::decode,
    {nullptr, &Base3Avx512::planes_tile<1>, &Base3Avx512::planes_tile<2>, &Base3Avx512::planes_tile<3>,
     &Base3Avx512::planes_tile<4>, &Base3Avx512::planes_tile<5>, &Base3Avx512::planes_tile<6>,
     &Base3Avx512::planes_tile<7>, &Base3Avx512::planes_tile<8>}};

constexpr DecodedKernels kLutAvx512Decoded = {
    LutAvx512::kPlaneBytes, &LutAvx512::decode,
    {nullptr, &LutAvx512::planes_tile<1>, &LutAvx512::planes_tile<2>, &LutAvx512::planes_tile<3>,
     &LutAvx512::planes_tile<4>, &LutAvx512::planes_tile<5>, &LutAvx512::planes_tile<6>,
     &LutAvx512::planes_tile<7>, &LutAvx512::planes_tile<8>}};

const DecodedKernels *decoded_kernels(int layout, int isa) {
    if (isa != BC_ISA_AVX512) return nullptr;
    return layout == BC_LAYOUT_BASE3 ? &kBase3Avx512Decoded : layout == BC_LAYOUT_LUT ? &kLutAvx512Decoded : nullptr;
}

// kKernels[layout][isa]: every path computes on 2bit and base3 (base3 on avx512 also needs VBMI); lut has the
// scalar reference and AVX-512 (vpermw needs AVX-512 BW; the AVX2 tables hold 16 entries, not 27).
constexpr Kernels kKernels[BC_LAYOUT_COUNT][BC_ISA_COUNT] = {
    {kernels_of<Scalar>(), kernels_of<Avx2>(), kernels_of<AvxVnni>(), kernels_of<Avx512>()},
    {kernels_of<Base3Scalar>(), kernels_of<Base3Avx2>(), kernels_of<Base3AvxVnni>(), kernels_of<Base3Avx512>()},
    {kernels_of<LutScalar>(), Kernels{}, Kernels{}, kernels_of<LutAvx512>(&LutAvx512::band, kBandTiles, &LutAvx512::tables)}};

const char *const kIsaNames[BC_ISA_COUNT] = {"scalar", "avx2", "avxvnni", "avx512"};
const char *const kLayoutNames[BC_LAYOUT_COUNT] = {"2bit", "base3", "lut"};

// A layout's tile unit (2bit: k-block, base3: pair, lut: word column): the columns it covers and its bytes.
struct Unit {
    int64_t cols, bytes;
};
constexpr Unit kUnits[BC_LAYOUT_COUNT] = {
    {BC_BLOCK_COLS, BC_BLOCK_BYTES}, {BC_PAIR_COLS, BC_PAIR_BYTES}, {BC_LUT_UNIT_COLS, BC_LUT_UNIT_BYTES}};

// Units per tile row for in_features columns.
int64_t units_of(int64_t in_features, int layout) { return ceil_div(in_features, kUnits[layout].cols); }

// Where tile `tile` of a repacked matrix starts: 2bit and base3 store tiles one after another; lut interleaves the
// tiles of each group of 8 unit by unit (tile i of a group at byte 32 i of the group's units).
const uint8_t *tile_at(const uint8_t *weight, int64_t tile, int64_t in_features, int layout) {
    const int64_t tile_bytes = bc_tile_bytes(in_features, layout);
    if (layout != BC_LAYOUT_LUT) return weight + tile * tile_bytes;
    return weight + tile / kBandTiles * kBandTiles * tile_bytes + tile % kBandTiles * BC_LUT_UNIT_BYTES;
}

// Columns of the zero-padded int8 activation row: in_features rounded up to whole units.
int64_t padded_cols(int64_t in_features, int layout) { return units_of(in_features, layout) * kUnits[layout].cols; }

// What to do with the exact int32 products: store them, or scale them to the layer's fp32 output.
struct Output {
    int32_t *acc;               // (n, out) or null
    float *y;                   // n rows of stride ldy, or null
    int64_t ldy;                // y's row stride (>= out)
    const float *scale;         // per-token s (n), for y
    float weight_scale;         // for y, when row_scales is null
    const float *row_scales;    // (out) per-row weight scales, or null
};

// y[r] = float(raw[r] - sum) / row_scales[r] / s for a whole tile's 16 rows (row_scales null: / weight_scale), 8 at a
// time: the same divisions as write_tile's loops (IEEE division rounds alike at every width), which the library's SSE2
// baseline runs 4 at a time (they were most of the 9% of a one-thread hot SmolLM2 layer that perf put in this
// epilogue; docs/kernels.md, "The layer's serial steps").
BC_TARGET_AVX2 void scale_tile_avx2(const int32_t *raw, int32_t sum, const float *row_scales, float weight_scale,
                                    float s, float *y) {
    const __m256i bias = _mm256_set1_epi32(sum);
    const __m256 token_scale = _mm256_set1_ps(s);
    for (int r = 0; r < BC_TILE_ROWS; r += 8) {
        const __m256 acc = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(raw + r)), bias));
        const __m256 weight = row_scales ? _mm256_loadu_ps(row_scales + r) : _mm256_set1_ps(weight_scale);
        _mm256_storeu_ps(y + r, _mm256_div_ps(_mm256_div_ps(acc, weight), token_scale));
    }
}

// Writes one tile's raw sums (tokens t0 .. t0 + nt - 1, `rows` valid rows from row0) as `out` asks.
// Branch-free loops over the tile's rows, so the compiler vectorizes them (divps rounds as divss does); a whole tile's
// fp32 rows go through scale_tile_avx2 where the CPU has AVX2.
void write_tile(const Output &out, const int32_t *raw, const int32_t *x_sum, int64_t t0, int nt, int64_t row0,
                int rows, int64_t out_features) {
    static const bool avx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
    for (int t = 0; t < nt; ++t) {
        const int64_t token = t0 + t;
        const int32_t *tile_acc = raw + t * BC_TILE_ROWS;
        const int32_t sum = x_sum[token];
        if (out.acc) {
            int32_t *acc = out.acc + token * out_features + row0;
            for (int r = 0; r < rows; ++r) acc[r] = tile_acc[r] - sum;
            continue;
        }
        const float s = out.scale[token], *ws = out.row_scales ? out.row_scales + row0 : nullptr;
        float *y = out.y + token * out.ldy + row0;
        if (avx2 && rows == BC_TILE_ROWS) {
            scale_tile_avx2(tile_acc, sum, ws, out.weight_scale, s, y);
        } else if (ws) {
            for (int r = 0; r < rows; ++r) y[r] = float(tile_acc[r] - sum) / ws[r] / s;
        } else {
            const float weight_scale = out.weight_scale;
            for (int r = 0; r < rows; ++r) y[r] = float(tile_acc[r] - sum) / weight_scale / s;
        }
    }
}

// One token's product as tasks of kernels.band_tiles tiles each, aligned to the band: run(x, task) computes and
// writes the tiles of a task in range from activations x (x_q, or a helper thread's own lut tables: own_x).
struct BandTasks {
    const Kernels &kernels;
    const int8_t *x_q;
    const int32_t *x_sum;
    const uint8_t *weight;
    int layout;
    int64_t first_tile, out_features, in_features;
    const Output &out;
    int64_t units = units_of(in_features, layout), band = kernels.band_tiles;
    int64_t end_tile = first_tile + ceil_div(out_features, BC_TILE_ROWS), begin = first_tile / band * band;
    int64_t count = out_features == 0 ? 0 : ceil_div(end_tile - begin, band);

    void run(const int8_t *x, int64_t task) const {
        const int64_t tile0 = begin + task * band;
        int32_t raw[kBandTiles * BC_TILE_ROWS];
        kernels.band(tile_at(weight, tile0, in_features, layout), units, x, raw);
        for (int64_t tile = std::max(tile0, first_tile); tile < std::min(tile0 + band, end_tile); ++tile) {
            const int64_t row0 = (tile - first_tile) * BC_TILE_ROWS;
            write_tile(out, raw + (tile - tile0) * BC_TILE_ROWS, x_sum, 0, 1, row0,
                       int(std::min<int64_t>(BC_TILE_ROWS, out_features - row0)), out_features);
        }
    }

    // The activations this thread of the enclosing team reads: x_q, or for a lut band on a helper thread its own
    // tables (reading the copy the first thread wrote pulls it line by line from that core's cache).
    const int8_t *own_x() const {
#ifdef _OPENMP
        if (kernels.tables != nullptr && omp_get_thread_num() > 0) {
            thread_local std::vector<int8_t> own;
            own.resize(size_t(units * kLutTableBytes));
            kernels.tables(x_q + units * kLutTableBytes, units, own.data());
            return own.data();
        }
#endif
        return x_q;
    }

    // Every thread of the enclosing team (or a lone caller) calls this: the tasks split statically over the team,
    // with the worksharing loop's barrier at the end.
    void run_in_team() const {
        const int8_t *x = own_x();
#pragma omp for schedule(static)
        for (int64_t task = 0; task < count; ++task) run(x, task);
    }
};

// One token: BandTasks on bc_thread_count threads, in a parallel region of its own.
void run_band(const Kernels &kernels, const int8_t *x_q, const int32_t *x_sum, const uint8_t *weight, int layout,
              int64_t first_tile, int64_t out_features, int64_t in_features, const Output &out, int threads) {
    const BandTasks tasks{kernels, x_q, x_sum, weight, layout, first_tile, out_features, in_features, out};
    if (tasks.count == 0) return;
    const int nthreads = bc_thread_count(threads, tasks.count,
                                         tasks.count * tasks.band * BC_TILE_ROWS * padded_cols(in_features, layout));
    if (nthreads == 1) {  // no parallel region: even one that runs on one thread costs ~0.5 us (measured)
        for (int64_t task = 0; task < tasks.count; ++task) tasks.run(x_q, task);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    tasks.run_in_team();
}

// x_q: n rows of ldx = bc_padded_in(in_features, layout) bytes, the activations as the layout reads them
// (quantize_tokens); x_sum: per-token sum of the int8 codes. Computes the out_features rows from tile first_tile of
// the repacked matrix at weight, written as output rows 0 .. out_features - 1. One token goes through the path's
// band function; several are split into (tile, token group) tasks, tile-major, so a thread reuses a tile's weights
// across groups; with several groups, a path that has DecodedKernels decodes each of its tiles once into the
// thread's buffer.
void run(int isa, const int8_t *x_q, const int32_t *x_sum, int64_t n, const uint8_t *weight, int layout,
         int64_t first_tile, int64_t out_features, int64_t in_features, const Output &out, int threads) {
    const Kernels &kernels = kKernels[layout][isa];
    if (n == 1)
        return run_band(kernels, x_q, x_sum, weight, layout, first_tile, out_features, in_features, out, threads);
    const int64_t units = units_of(in_features, layout);
    const int64_t ldx = bc_padded_in(in_features, layout);
    const int64_t tiles = ceil_div(out_features, BC_TILE_ROWS);
    const int64_t groups = ceil_div(n, kMaxTokens);
    const int64_t tasks = tiles * groups;
    const int nthreads = bc_thread_count(threads, tasks, tiles * BC_TILE_ROWS * n * padded_cols(in_features, layout));
    const DecodedKernels *decoded = groups > 1 ? decoded_kernels(layout, isa) : nullptr;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        std::vector<uint8_t> buffer(decoded ? size_t(units * decoded->unit_bytes) : 0);
        int64_t buffered_tile = -1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t tile = task / groups, t0 = (task % groups) * kMaxTokens;
            const int nt = int(std::min<int64_t>(kMaxTokens, n - t0));
            const uint8_t *w = tile_at(weight, first_tile + tile, in_features, layout);
            int32_t raw[kMaxTokens * BC_TILE_ROWS];
            if (decoded) {
                if (tile != buffered_tile) decoded->decode(w, units, buffer.data());
                buffered_tile = tile;
                decoded->tiles[nt](buffer.data(), units, x_q + t0 * ldx, ldx, raw);
            } else {
                kernels.tiles[nt](w, units, x_q + t0 * ldx, ldx, raw);
            }
            const int64_t row0 = tile * BC_TILE_ROWS;
            write_tile(out, raw, x_sum, t0, nt, row0, int(std::min<int64_t>(BC_TILE_ROWS, out_features - row0)),
                       out_features);
        }
    }
}

int check(int &isa, int layout, int64_t n, int64_t out_features, int64_t in_features) {
    if (isa == BC_ISA_AUTO) isa = bc_default_isa();
    if (!bc_isa_supported(isa)) return BC_ERR_ISA;
    if (!bc_layout_supported(layout, isa)) return BC_ERR_LAYOUT;
    if (n < 0 || out_features < 0 || in_features < 0 || in_features > BC_MAX_IN_FEATURES) return BC_ERR_SHAPE;
    return BC_OK;
}

// dst (ldx) = the zero-padded int8 row src (ldx values) permuted as base3 reads it: within each 12-column block,
// byte 4*j + g = column 3g + j.
void permute_base3(const int8_t *src, int64_t ldx, int8_t *dst) {
    for (int64_t block = 0; block < ldx; block += kBlockCols)
        for (int j = 0; j < kDigits; ++j)
            for (int g = 0; g < kGroups; ++g) dst[block + kGroups * j + g] = src[block + kDigits * g + j];
}

// The lut activations (ternary_core.h): lut_codes writes the codes of the zero-padded int8 row (units * 9 values)
// into dst, lut_tables the int16 tables from those codes (the scalar reference; LutAvx512::tables computes the same).
void lut_tables(const int8_t *codes, int64_t units, int8_t *dst) {
    for (int64_t u = 0; u < units; ++u)
        for (int k = 0; k < kLutLookups; ++k) {
            const int8_t *x = codes + u * kLutCodeBytes + 4 * k;
            int16_t table[kLutEntries] = {};
            for (int index = 0; index < 27; ++index)
                table[index] = int16_t(base3_digit(index, 0) * x[0] + base3_digit(index, 1) * x[1] +
                                       base3_digit(index, 2) * x[2]);
            std::memcpy(dst + (u * kLutLookups + k) * 64, table, sizeof table);
        }
}

void lut_codes(const int8_t *row, int64_t units, int8_t *dst) {
    int8_t *codes = dst + units * kLutTableBytes;
    for (int64_t u = 0; u < units; ++u)
        for (int k = 0; k < kLutLookups; ++k) {
            int8_t *quad = codes + u * kLutCodeBytes + 4 * k;
            for (int j = 0; j < 3; ++j) quad[j] = row[u * BC_LUT_UNIT_COLS + 3 * k + j];
            quad[3] = 0;
        }
}

// dst (ldx bytes) from the zero-padded int8 row `row` (padded_cols values, in aside unless 2bit): 2bit reads the
// row itself (row == dst), base3 permuted (permute_base3), lut as tables and codes (lut_tables / lut_codes).
void scalar_layout_tail(int layout, const int8_t *row, int64_t in_features, int8_t *dst) {
    if (layout == BC_LAYOUT_BASE3) permute_base3(row, padded_cols(in_features, layout), dst);
    if (layout == BC_LAYOUT_LUT) {
        const int64_t units = units_of(in_features, layout);
        lut_codes(row, units, dst);
        lut_tables(dst + units * kLutTableBytes, units, dst);
    }
}

// Writes the int8 activation row src (in_features values) as the kernels read it, dst (ldx bytes): zero padded,
// then in the layout's order (scalar_layout_tail); returns the sum of its values. aside: padded_cols bytes of
// scratch for base3 and lut. For 2bit, dst may be src (the row is then only padded).
int32_t layout_row(const int8_t *src, int64_t in_features, int layout, int8_t *dst, int8_t *aside) {
    int32_t sum = 0;
    for (int64_t k = 0; k < in_features; ++k) sum += src[k];
    int8_t *row = layout == BC_LAYOUT_2BIT ? dst : aside;
    if (row != src) std::memcpy(row, src, size_t(in_features));
    std::memset(row + in_features, 0, size_t(padded_cols(in_features, layout) - in_features));
    scalar_layout_tail(layout, row, in_features, dst);
    return sum;
}

// ---- activation quantization (bc_quantize_activations' math), one token at a time: the scalar reference and AVX2 /
// AVX-512 loops that equal it bit for bit. The max of |x| is exact in any order; x * s is one fp32 multiply per value
// (no contraction); clamping to [-128, 127] before rounding gives what rounding then clamping gives (the bounds are
// integers); the conversion rounds in the current rounding mode, as nearbyint does (half to even by default). NaN
// values are skipped by the max, as std::max(amax, NaN) skips them, and quantize to 0 on every path (quantize_value),
// as does x * s = inf * 0 when an activation is infinite; torch's reference gives NaN outputs for such a token.
// A path's row(x, in_features, layout, dst, aside, &s) writes the token's codes as the kernels read them (dst, ldx
// values; layout_row's order) and its scale s, and returns the sum of the codes; aside: padded_cols bytes of scratch.
using QuantizeRowFn = int32_t (*)(const float *x, int64_t in_features, int layout, int8_t *dst, int8_t *aside,
                                  float *scale);

int32_t quantize_row_scalar(const float *x, int64_t in_features, int layout, int8_t *dst, int8_t *aside,
                            float *scale) {
    int8_t *row = layout == BC_LAYOUT_2BIT ? dst : aside;
    bc_quantize_activations(x, 1, in_features, row, scale);
    return layout_row(row, in_features, layout, dst, aside);
}

float absmax_scale(float amax) { return (1.0f / std::max(amax, 1e-5f)) * 127.0f; }

// The code of a scaled activation v = x * s: round half to even (the current mode), clamp to [-128, 127]; NaN -> 0.
int8_t quantize_value(float v) {
    return v != v ? int8_t(0) : int8_t(std::min(std::max(std::nearbyint(v), -128.0f), 127.0f));
}

struct QuantizeAvx2 {
    BC_TARGET_AVX2 static int32_t row(const float *x, int64_t in_features, int layout, int8_t *dst, int8_t *aside,
                                      float *scale) {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 largest = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= in_features; k += 8)  // max(|x|, m): m where |x| is NaN
            largest = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), largest);
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, largest);
        float amax = 0.0f;
        for (float lane : lanes) amax = std::max(amax, lane);
        for (; k < in_features; ++k) amax = std::max(amax, std::fabs(x[k]));
        const float s = absmax_scale(amax);
        *scale = s;
        int8_t *row = layout == BC_LAYOUT_2BIT ? dst : aside;
        const __m256 factor = _mm256_set1_ps(s), low = _mm256_set1_ps(-128.0f), high = _mm256_set1_ps(127.0f);
        __m256i total = _mm256_setzero_si256();
        for (k = 0; k + 8 <= in_features; k += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), factor);
            const __m256 number = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
            const __m256i codes = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(number, low), high));
            total = _mm256_add_epi32(total, codes);
            const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
            _mm_storel_epi64((__m128i *)(row + k), _mm_packs_epi16(words, words));
        }
        alignas(32) int32_t parts[8];
        _mm256_store_si256((__m256i *)parts, total);
        int32_t sum = 0;
        for (int32_t part : parts) sum += part;
        for (; k < in_features; ++k) {
            row[k] = quantize_value(x[k] * s);
            sum += row[k];
        }
        std::memset(row + in_features, 0, size_t(padded_cols(in_features, layout) - in_features));
        scalar_layout_tail(layout, row, in_features, dst);
        return sum;
    }
};

struct QuantizeAvx512 {
    BC_TARGET_AVX512 static int32_t row(const float *x, int64_t in_features, int layout, int8_t *dst, int8_t *aside,
                                        float *scale) {
        __m512 largest = _mm512_setzero_ps();
        for (int64_t k = 0; k < in_features; k += 16)  // masked-off lanes load 0; max(|x|, m): m where |x| is NaN
            largest = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(valid(in_features - k), x + k)), largest);
        const float s = absmax_scale(_mm512_reduce_max_ps(largest));
        *scale = s;
        int8_t *row = layout == BC_LAYOUT_2BIT ? dst : aside;
        const __m512 factor = _mm512_set1_ps(s), low = _mm512_set1_ps(-128.0f), high = _mm512_set1_ps(127.0f);
        __m512i total = _mm512_setzero_si512();
        for (int64_t k = 0; k < in_features; k += 16) {
            const __mmask16 mask = valid(in_features - k);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + k), factor);
            const __m512 number = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
            const __m512i codes = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(number, low), high));
            total = _mm512_add_epi32(total, codes);  // masked-off lanes hold 0
            _mm512_mask_cvtepi32_storeu_epi8(row + k, mask, codes);
        }
        const int64_t cols = padded_cols(in_features, layout);
        std::memset(row + in_features, 0, size_t(cols - in_features));
        if (layout == BC_LAYOUT_BASE3) {
            static const bool vbmi = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vbmi"));
            vbmi ? permute_base3_vbmi(aside, cols, dst) : permute_base3(aside, cols, dst);
        } else if (layout == BC_LAYOUT_LUT) {
            const int64_t units = units_of(in_features, layout);
            lut_codes(row, units, dst);
            LutAvx512::tables(dst + units * kLutTableBytes, units, dst);
        }
        return _mm512_reduce_add_epi32(total);
    }

    // Lanes 0 .. min(remaining, 16) - 1.
    static __mmask16 valid(int64_t remaining) {
        return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1);
    }

    // permute_base3 four 12-column blocks (48 bytes) per vpermb; ldx is a multiple of 24.
    BC_TARGET_AVX512VBMI static void permute_base3_vbmi(const int8_t *src, int64_t ldx, int8_t *dst) {
        alignas(64) static const uint8_t kOrder[64] = {
            0,  3,  6,  9,  1,  4,  7,  10, 2,  5,  8,  11,  // byte 4j + g of a block <- column 3g + j
            12, 15, 18, 21, 13, 16, 19, 22, 14, 17, 20, 23, 24, 27, 30, 33, 25, 28, 31, 34, 26, 29, 32, 35,
            36, 39, 42, 45, 37, 40, 43, 46, 38, 41, 44, 47};
        const __m512i order = _mm512_load_si512(kOrder);
        for (int64_t k = 0; k < ldx; k += 4 * kBlockCols) {
            const __mmask64 mask = _cvtu64_mask64(ldx - k >= 4 * kBlockCols ? (uint64_t(1) << 48) - 1
                                                                              : (uint64_t(1) << (ldx - k)) - 1);
            _mm512_mask_storeu_epi8(dst + k, mask, _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(mask, src + k)));
        }
    }
};

// kQuantizeRow[isa]: AVX-VNNI quantizes with the AVX2 loop.
constexpr QuantizeRowFn kQuantizeRow[BC_ISA_COUNT] = {&quantize_row_scalar, &QuantizeAvx2::row, &QuantizeAvx2::row,
                                                      &QuantizeAvx512::row};

// Quantization work per activation, in the multiply-adds bc_thread_count weighs a thread against.
constexpr int64_t kQuantizeCost = 16;

// bc_quantize_padded's outputs for x (n, in_features) with path isa (a supported path), tokens split over threads.
void quantize_tokens(int isa, const float *x, int64_t n, int64_t in_features, int layout, int8_t *x_q, int32_t *sums,
                     float *s, int threads) {
    const int64_t ldx = bc_padded_in(in_features, layout);
    const QuantizeRowFn row = kQuantizeRow[isa];
    const int team = bc_thread_count(threads, n, n * in_features * kQuantizeCost);
    const size_t aside_bytes = layout == BC_LAYOUT_2BIT ? 0 : size_t(padded_cols(in_features, layout));
    auto quantize = [&](int64_t t) {  // the thread's scratch row is kept between calls
        thread_local std::vector<int8_t> aside;
        if (aside.size() < aside_bytes) aside.resize(aside_bytes);
        sums[t] = row(x + t * in_features, in_features, layout, x_q + t * ldx, aside.data(), &s[t]);
    };
    if (team == 1) {  // no parallel region: even one that runs on one thread costs ~0.5 us
        for (int64_t t = 0; t < n; ++t) quantize(t);
        return;
    }
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t t = 0; t < n; ++t) quantize(t);
}

// bc_linear / bc_linear_rows: quantize x per token, then the product scaled by one or per-row weight scales.
int scaled_linear(const float *x, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
                  int64_t in_features, float weight_scale, const float *row_scales, float *y, int isa, int threads) {
    if (const int err = check(isa, layout, n, out_features, in_features)) return err;
    std::vector<int8_t> padded(size_t(n * bc_padded_in(in_features, layout)));
    std::vector<int32_t> sums(static_cast<size_t>(n));
    std::vector<float> scales(static_cast<size_t>(n));
    quantize_tokens(isa, x, n, in_features, layout, padded.data(), sums.data(), scales.data(), threads);
    run(isa, padded.data(), sums.data(), n, weight, layout, 0, out_features, in_features,
        Output{nullptr, y, out_features, scales.data(), weight_scale, row_scales}, threads);
    return BC_OK;
}

}  // namespace

extern "C" {

// Below this many multiply-adds per thread the fork/join costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;

int bc_thread_count(int requested, int64_t tasks, int64_t work) {
#ifdef _OPENMP
    int threads = requested > 0 ? requested : omp_get_max_threads();
#else
    int threads = 1;
    (void)requested;
#endif
    threads = int(std::min<int64_t>({int64_t(threads), tasks, std::max<int64_t>(1, work / kMinWorkPerThread)}));
    return std::max(threads, 1);
}

const char *bc_isa_name(int isa) { return isa >= 0 && isa < BC_ISA_COUNT ? kIsaNames[isa] : nullptr; }

int bc_isa_from_name(const char *name) {
    for (int isa = 0; isa < BC_ISA_COUNT; ++isa)
        if (std::strcmp(name, kIsaNames[isa]) == 0) return isa;
    return -2;
}

int bc_isa_supported(int isa) {
    __builtin_cpu_init();
    switch (isa) {
        case BC_ISA_SCALAR:
            return 1;
        case BC_ISA_AVX2:
            return __builtin_cpu_supports("avx2");
        case BC_ISA_AVXVNNI:
            return __builtin_cpu_supports("avx2") && bc_cpu_has_avxvnni();
        case BC_ISA_AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vnni");
        default:
            return 0;
    }
}

int bc_best_isa(void) {
    for (int isa = BC_ISA_COUNT - 1; isa > BC_ISA_SCALAR; --isa)
        if (bc_isa_supported(isa)) return isa;
    return BC_ISA_SCALAR;
}

int bc_default_isa(void) {
    const char *name = std::getenv("BITCONVERT_ISA");
    if (name == nullptr || *name == '\0') return bc_best_isa();
    const int isa = bc_isa_from_name(name);
    if (isa < 0) return -2;
    return bc_isa_supported(isa) ? isa : -3;
}

const char *bc_layout_name(int layout) {
    return layout >= 0 && layout < BC_LAYOUT_COUNT ? kLayoutNames[layout] : nullptr;
}

int bc_layout_from_name(const char *name) {
    for (int layout = 0; layout < BC_LAYOUT_COUNT; ++layout)
        if (std::strcmp(name, kLayoutNames[layout]) == 0) return layout;
    return -2;
}

int bc_layout_supported(int layout, int isa) {
    if (layout < 0 || layout >= BC_LAYOUT_COUNT || !bc_isa_supported(isa)) return 0;
    if (kKernels[layout][isa].band == nullptr) return 0;
    __builtin_cpu_init();
    return layout != BC_LAYOUT_BASE3 || isa != BC_ISA_AVX512 || __builtin_cpu_supports("avx512vbmi");
}

int bc_default_layout(int isa) {
    if (isa == BC_ISA_AUTO) isa = bc_default_isa();
    if (!bc_isa_supported(isa)) return -3;
    const char *name = std::getenv("BITCONVERT_LAYOUT");
    if (name == nullptr || *name == '\0')  // base3 only where its decoding keeps up with the memory (AVX-512 VBMI)
        return isa == BC_ISA_AVX512 && bc_layout_supported(BC_LAYOUT_BASE3, isa) ? BC_LAYOUT_BASE3 : BC_LAYOUT_2BIT;
    const int layout = bc_layout_from_name(name);
    if (layout < 0) return -2;
    return bc_layout_supported(layout, isa) ? layout : -3;
}

int64_t bc_tile_bytes(int64_t in_features, int layout) {
    return units_of(in_features, layout) * kUnits[layout].bytes;
}

// Tiles of a repacked matrix: out_features rounded up to 16 rows (lut: to its 128-row groups).
int64_t stored_tiles(int64_t out_features, int layout) {
    if (layout == BC_LAYOUT_LUT) return ceil_div(out_features, BC_LUT_GROUP_ROWS) * kBandTiles;
    return ceil_div(out_features, BC_TILE_ROWS);
}

size_t bc_repacked_bytes(int64_t out_features, int64_t in_features, int layout) {
    return size_t(stored_tiles(out_features, layout) * bc_tile_bytes(in_features, layout));
}

void bc_repack(const uint8_t *packed, int64_t out_features, int64_t in_features, int layout, uint8_t *dst) {
    const int64_t packed_rows = ceil_div(out_features, 4);
    // code T + 1 of (row o, column k); 1 (weight 0) in the padding
    auto code = [&](int64_t o, int64_t k) -> int {
        if (o >= out_features || k >= in_features) return 1;
        return (packed[(o % packed_rows) * in_features + k] >> (2 * int(o / packed_rows))) & 3;
    };
    const int64_t tiles = stored_tiles(out_features, layout), units = units_of(in_features, layout);
    std::memset(dst, 0, bc_repacked_bytes(out_features, in_features, layout));
    for (int64_t o = 0; o < tiles * BC_TILE_ROWS; ++o) {
        const int64_t tile = o / BC_TILE_ROWS, r = o % BC_TILE_ROWS;
        uint8_t *tile_bytes = const_cast<uint8_t *>(tile_at(dst, tile, in_features, layout));
        if (layout == BC_LAYOUT_2BIT) {
            for (int64_t k = 0; k < units * BC_BLOCK_COLS; ++k) {
                const int64_t b = k / BC_BLOCK_COLS, i = (k % BC_BLOCK_COLS) / 4, j = k % 4;
                tile_bytes[b * BC_BLOCK_BYTES + 4 * r + j] |= uint8_t(code(o, k) << (2 * i));
            }
            continue;
        }
        if (layout == BC_LAYOUT_LUT) {
            for (int64_t u = 0; u < units; ++u) {
                int word = 0;
                for (int k = 0; k < kLutLookups; ++k) {
                    const int64_t col = u * BC_LUT_UNIT_COLS + 3 * k;
                    word |= (code(o, col) + 3 * code(o, col + 1) + 9 * code(o, col + 2)) << (5 * k);
                }
                tile_bytes[u * kLutUnitStride + 2 * r] = uint8_t(word);
                tile_bytes[u * kLutUnitStride + 2 * r + 1] = uint8_t(word >> 8);
            }
            continue;
        }
        for (int64_t block = 0; block < units * kPairBlocks; ++block)
            for (int g = 0; g < kGroups; ++g) {
                const int64_t k = block * kBlockCols + kDigits * g;
                const int index = code(o, k) + 3 * code(o, k + 1) + 9 * code(o, k + 2);
                uint8_t *pair = tile_bytes + block / kPairBlocks * BC_PAIR_BYTES;
                const int h = int(block % kPairBlocks), lane = kGroups * int(r) + g;
                pair[lane] |= uint8_t((index & 15) << (4 * h));
                pair[64 + 8 * h + lane / 8] |= uint8_t((index >> 4) << (lane % 8));
            }
    }
}

void bc_quantize_activations(const float *x, int64_t n, int64_t in_features, int8_t *x_q, float *s) {
    for (int64_t t = 0; t < n; ++t) {
        const float *row = x + t * in_features;
        float amax = 0.0f;
        for (int64_t k = 0; k < in_features; ++k) amax = std::max(amax, std::fabs(row[k]));
        const float scale = (1.0f / std::max(amax, 1e-5f)) * 127.0f;
        for (int64_t k = 0; k < in_features; ++k) {
            x_q[t * in_features + k] = quantize_value(row[k] * scale);
        }
        s[t] = scale;
    }
}

int bc_matmul_int(const int8_t *x_q, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
                  int64_t in_features, int32_t *acc, int isa, int threads) {
    if (const int err = check(isa, layout, n, out_features, in_features)) return err;
    const int64_t ldx = bc_padded_in(in_features, layout);
    std::vector<int8_t> padded(size_t(n * ldx));
    std::vector<int32_t> sums(static_cast<size_t>(n));
    std::vector<int8_t> aside(size_t(padded_cols(in_features, layout)));
    for (int64_t t = 0; t < n; ++t)
        sums[t] = layout_row(x_q + t * in_features, in_features, layout, &padded[t * ldx], aside.data());
    run(isa, padded.data(), sums.data(), n, weight, layout, 0, out_features, in_features,
        Output{acc, nullptr, 0, nullptr, 0.0f, nullptr}, threads);
    return BC_OK;
}

int64_t bc_padded_in(int64_t in_features, int layout) {
    if (layout == BC_LAYOUT_LUT) return units_of(in_features, layout) * (kLutTableBytes + kLutCodeBytes);
    return padded_cols(in_features, layout);
}

void bc_quantize_padded(const float *x, int64_t n, int64_t in_features, int layout, int8_t *x_q, int32_t *sums,
                        float *s) {
    const int isa = bc_default_isa();
    quantize_tokens(isa >= 0 ? isa : BC_ISA_SCALAR, x, n, in_features, layout, x_q, sums, s, 1);
}

int bc_linear_rows_in_team(const int8_t *x_q, int32_t sum, float s, const uint8_t *weight, int layout,
                           int64_t out_features, int64_t in_features, const float *weight_scales, float *y, int isa) {
    if (const int err = check(isa, layout, 1, out_features, in_features)) return err;
    const Output out{nullptr, y, out_features, &s, 0.0f, weight_scales};
    BandTasks{kKernels[layout][isa], x_q, &sum, weight, layout, 0, out_features, in_features, out}.run_in_team();
    return BC_OK;
}

int bc_linear_quantized(const int8_t *x_q, const int32_t *sums, const float *s, int64_t n, const uint8_t *weight,
                        int layout, int64_t row0, int64_t out_features, int64_t in_features, float weight_scale,
                        float *y, int64_t ldy, int isa, int threads) {
    if (const int err = check(isa, layout, n, out_features, in_features)) return err;
    if (ldy < out_features || row0 < 0 || row0 % BC_TILE_ROWS != 0) return BC_ERR_SHAPE;
    run(isa, x_q, sums, n, weight, layout, row0 / BC_TILE_ROWS, out_features, in_features,
        Output{nullptr, y, ldy, s, weight_scale, nullptr}, threads);
    return BC_OK;
}

int bc_linear(const float *x, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
              int64_t in_features, float weight_scale, float *y, int isa, int threads) {
    return scaled_linear(x, n, weight, layout, out_features, in_features, weight_scale, nullptr, y, isa, threads);
}

int bc_linear_rows(const float *x, int64_t n, const uint8_t *weight, int layout, int64_t out_features,
                   int64_t in_features, const float *weight_scales, float *y, int isa, int threads) {
    return scaled_linear(x, n, weight, layout, out_features, in_features, 0.0f, weight_scales, y, isa, threads);
}

}  // extern "C"
