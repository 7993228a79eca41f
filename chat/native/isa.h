// chat's native CPU kernels: the ops of one decoded token's layer (see chat/native/__init__.py; the ops are
// listed in ops.cpp).
//
// At one token a decode step is a stream of weights through matrix-vector products. torch's own kernels
// for these run below the memory's pace on AVX-512 machines: in bfloat16 at about 15 GB/s, where these
// reach 22 (vdpbf16ps multiplies pairs of bfloat16 into float32 sums), and in float32 at about 24, where
// these reach 26-28. Each thread takes a run of adjacent rows and reads them in address order (matvec.cpp says
// why). Each kernel comes in AVX-512 and AVX2 forms, picked by the CPU at run time (bfloat16 takes
// the AVX2 form on AVX-512 CPUs without its bfloat16 part); CPUs with neither get torch's own kernels.
// $CHAT_NATIVE_ISA=avx2 (or torch) caps the choice, to test or compare the narrower forms on a wider CPU.
//
// This header: the choice of form, and the vector helpers both matvec.cpp and attention.cpp use.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#define CHAT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define CHAT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define CHAT_AVX512_VBMI_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")))
#define CHAT_AVX2 __attribute__((target("avx2,fma")))

namespace chat_native {

enum class Isa { kTorch, kAvx2, kAvx512 };

// The widest instruction set of this CPU that the kernels have a form for.
inline Isa cpu_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kTorch;
}

// The widest the kernels may use: the CPU's, capped by $CHAT_NATIVE_ISA (read at each op, so that a test can
// switch it; a fraction of a microsecond against an op's tens).
inline Isa isa() {
  static const Isa cpu = cpu_isa();
  const char* cap = std::getenv("CHAT_NATIVE_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(cpu, Isa::kAvx2);
  if (cap != nullptr && std::strcmp(cap, "torch") == 0) return Isa::kTorch;
  return cpu;
}

// 16 values as float32 lanes: float32, bfloat16 (widened exactly) or int8 (converted exactly).
CHAT_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
CHAT_AVX512 inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
CHAT_AVX512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// The lanes of mask only, zeros in the others.
CHAT_AVX512 inline __m512 load16_tail(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
CHAT_AVX512 inline __m512 load16_tail(__mmask16 mask, const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
CHAT_AVX512 inline __m512 load16_tail(__mmask16 mask, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
// The mask of the first min(count, 16) lanes.
CHAT_AVX512 inline __mmask16 lanes_below16(int64_t count) {
  return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
}

// The totals of 16 vectors of 16 float32 sums, lane i of the result holding v[i]'s: four rounds of pairwise
// adds over shuffled halves, 45 ops for 16 rows where reducing each vector alone takes 8 dependent steps.
CHAT_AVX512 inline __m512 lane_totals16(const __m512* v) {
  __m512 halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7 of v[i], then 8-15 of v[i + 8]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[i], halves[i + 4], 0x88),
                                _mm512_shuffle_f32x4(halves[i], halves[i + 4], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[i], quarters[i + 2], 0x44),
                               _mm512_shuffle_ps(quarters[i], quarters[i + 2], 0xEE));
  }
  const __m512 totals = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                                      _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
  // The rounds leave v[i]'s total in lane 0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15 for i = 0..15.
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0), totals);
}

// Hands store(block + i, total) the totals of sums[i], i < count (the rest of the 16 are ignored).
template <typename Store>
CHAT_AVX512 inline void store_totals16(__m512* sums, int64_t block, int64_t count, const Store& store) {
  for (int64_t i = count; i < 16; ++i) sums[i] = _mm512_setzero_ps();
  alignas(64) float totals[16];
  _mm512_store_ps(totals, lane_totals16(sums));
  for (int64_t i = 0; i < count; ++i) store(block + i, totals[i]);
}

// --- AVX2: 8 float32 lanes, bfloat16 and int8 widened to float32 (exact), no masked 16-bit loads ---

CHAT_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
CHAT_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
CHAT_AVX2 inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// The first `count` (< 8) values at p, zeros after.
template <typename T>
CHAT_AVX2 inline __m256 load8_tail(const T* p, int64_t count) {
  T lanes[8] = {};
  std::memcpy(lanes, p, count * sizeof(T));
  return load8(lanes);
}
// All ones in lanes below `count`.
CHAT_AVX2 inline __m256 lanes_below(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, 8))), index));
}
CHAT_AVX2 inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
CHAT_AVX2 inline float reduce_max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) = 2^n * e^r, r = x - n ln2 in [-ln2/2, ln2/2] (ln2 in two parts for precision), e^r by Cephes' expf
// polynomial: relative error about 1e-7. Below -87 (about float32's smallest normal) x counts as -87.
constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp as above, inf above 88.7.
CHAT_AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// exp_ps in AVX2: 2^n built in the exponent bits, so x is held to 88 (n <= 127) and inf set above 88.7.
CHAT_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(88.7228f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), _mm256_set1_ps(INFINITY), overflow);
}

// tanh as Cephes' tanhf: x + x^3 P(x^2) below |x| = 0.625, where 1 - 2 / (e^2x + 1) would lose x's digits
// to the subtraction; above, that with x's sign (1 once e^2|x| overflows). Relative error about 2e-7.
constexpr float kTanhPoly[] = {-5.70498872745e-3f, 2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f,
                               -3.33332819422e-1f};
constexpr float kTanhSmall = 0.625f;

CHAT_AVX512 inline __m512 tanh_ps(__m512 x) {
  const __m512 a = _mm512_abs_ps(x), z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kTanhPoly[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhPoly[i]));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __m512 e = exp_ps(_mm512_add_ps(a, a));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 large = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.0f));
  const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(kTanhSmall), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, _mm512_or_ps(large, sign), small);
}

CHAT_AVX2 inline __m256 tanh8(__m256 x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_bit, x), z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kTanhPoly[0]);
  for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhPoly[i]));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = exp8(_mm256_add_ps(a, a));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 large = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  const __m256 is_small = _mm256_cmp_ps(a, _mm256_set1_ps(kTanhSmall), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_or_ps(large, _mm256_and_ps(x, sign_bit)), small, is_small);
}

}  // namespace chat_native
