/* The AVX-VNNI path's compile target, CPU check and its one VNNI instruction (internal to the cores).
 *
 * AVX-VNNI (Alder Lake and later) is the VEX encoding of AVX-512 VNNI's 256-bit vpdpbusd: the same u8 x s8 -> int32
 * sums, no saturation. Built with -DBC_AVXVNNI_VIA_EVEX (a test build only: tests/test_kernels_avxvnni.py), the
 * avxvnni path uses that EVEX instruction instead and runs on CPUs with AVX-512 VL and VNNI, so its code is checked
 * bit for bit on machines that lack AVX-VNNI itself; the default build never does this. */
#ifndef BC_AVXVNNI_H
#define BC_AVXVNNI_H

#include <immintrin.h>

#ifdef BC_AVXVNNI_VIA_EVEX
#define BC_AVXVNNI_FEATURES "avx512vl,avx512vnni"
#define bc_dpbusd256 _mm256_dpbusd_epi32
static inline int bc_cpu_has_avxvnni(void) {
    return __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#else
#define BC_AVXVNNI_FEATURES "avxvnni"
#define bc_dpbusd256 _mm256_dpbusd_avx_epi32
static inline int bc_cpu_has_avxvnni(void) { return __builtin_cpu_supports("avxvnni"); }
#endif

#endif /* BC_AVXVNNI_H */
