// int4 weights (export --quantize int4, chat/export/quantize.py): the row kernels matvec.cpp runs them with.
//
// A row of k weights (k a multiple of 64) is k / 2 bytes: each run of 64 weights is 32 bytes, byte j holding
// weight j in its low nibble and weight 32 + j in its high one, so that one 32-byte load gives two groups of 32
// in order. Each group g of 32 has a step d and an offset m (float16; scales (n, 2, k / 32) holds a row's steps,
// then its offsets): w = d * q + m, q in [0, 15]. Then w . x = sum_g d_g (q_g . x_g) + sum_g m_g sum(x_g): the
// products of levels and x per group, scaled, and the offsets against x's group sums, taken once per op.
//
// AVX-512: the levels are made bfloat16 128 + q by one OR, 0x4300 | q (exact: 128..143 need 8 significant
// bits), so that vdpbf16ps multiplies them by bfloat16 x 32 at a time into float32 sums; (128 + q) . x is
// q . x + 128 sum(x), and the 128 d sum(x) goes with the offsets. A row's 16 partial sums wait for 15 more rows,
// to be added up together (lane_totals16). AVX2: the levels are widened to float32 8 at a time.

#pragma once

#include <c10/util/Half.h>

#include <vector>

#include "isa.h"

namespace chat_native {

constexpr int64_t kInt4Group = 32;  // weights per step and offset
constexpr int64_t kInt4Run = 64;    // weights per 32 bytes

// A row's steps and offsets as float32: d[0..groups), then m[0..groups).
CHAT_AVX512 inline void int4_scales_avx512(const at::Half* scales, int64_t groups, float* out) {
  for (int64_t i = 0; i < 2 * groups; i += 16) {
    const __mmask16 mask = lanes_below16(2 * groups - i);
    const __m256i halves = _mm256_maskz_loadu_epi16(mask, scales + i);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_cvtph_ps(halves));
  }
}

// sum(x) over each group of 32 (float32 sums of bfloat16 x).
inline std::vector<float> int4_group_sums(const at::BFloat16* x, int64_t k) {
  std::vector<float> sums(k / kInt4Group, 0.0f);
  for (int64_t i = 0; i < k; ++i) sums[i / kInt4Group] += static_cast<float>(x[i]);
  return sums;
}

// int4_group_sums, 32 lanes at a time (the order of the adds differs: float32 sums of the same values).
CHAT_AVX512 inline std::vector<float> int4_group_sums_avx512(const at::BFloat16* x, int64_t k) {
  std::vector<float> sums(k / kInt4Group);
  for (int64_t g = 0; g < k / kInt4Group; ++g) {
    sums[g] = _mm512_reduce_add_ps(_mm512_add_ps(load16(x + g * kInt4Group), load16(x + g * kInt4Group + 16)));
  }
  return sums;
}

// Rows [first, last) of int4 w times bfloat16 x; store(row, float32 sum) writes each result.
template <typename Store>
CHAT_AVX512_BF16 void dot_rows_int4(const uint8_t* w, const at::Half* scales, const at::BFloat16* x,
                                    const float* group_sums, int64_t first, int64_t last, int64_t k,
                                    const Store& store) {
  const int64_t groups = k / kInt4Group, runs = k / kInt4Run;
  const __m512i low_nibbles = _mm512_set1_epi16(15), level_base = _mm512_set1_epi16(0x4300);
  std::vector<float> dm(2 * groups);
  const float* d = dm.data();
  const float* m = d + groups;
  auto row_sums = [&](int64_t r) CHAT_AVX512_BF16 {
    const uint8_t* row = w + r * (k / 2);
    int4_scales_avx512(scales + r * 2 * groups, groups, dm.data());
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (int64_t run = 0; run < runs; ++run) {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * run)));
      const __m512bh first32 = (__m512bh)_mm512_ternarylogic_epi32(bytes, low_nibbles, level_base, 0xEA);  // a & b | c
      const __m512bh next32 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), level_base);
      const __m512bh* xs = reinterpret_cast<const __m512bh*>(x + kInt4Run * run);
      const __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), first32, (__m512bh)_mm512_loadu_si512(xs));
      const __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), next32, (__m512bh)_mm512_loadu_si512(xs + 1));
      s0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d[2 * run]), s0);
      s1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(d[2 * run + 1]), s1);
    }
    for (int64_t g = 0; g < groups; g += 16) {  // (m - 128 d) . group sums
      const __mmask16 mask = lanes_below16(groups - g);
      const __m512 offsets = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), _mm512_maskz_loadu_ps(mask, d + g),
                                              _mm512_maskz_loadu_ps(mask, m + g));
      s0 = _mm512_fmadd_ps(offsets, _mm512_maskz_loadu_ps(mask, group_sums + g), s0);
    }
    return _mm512_add_ps(s0, s1);
  };
  for (int64_t block = first; block < last; block += 16) {  // the rows in turn, their totals 16 at a time
    const int64_t count = std::min<int64_t>(16, last - block);
    __m512 sums[16];
    for (int64_t i = 0; i < count; ++i) sums[i] = row_sums(block + i);
    store_totals16(sums, block, count, store);
  }
}

// dot_rows_int4 in AVX2: levels and x widened to float32, 8 at a time.
template <typename Store>
CHAT_AVX2 void dot_rows_int4_avx2(const uint8_t* w, const at::Half* scales, const at::BFloat16* x,
                                  const float* group_sums, int64_t first, int64_t last, int64_t k,
                                  const Store& store) {
  const int64_t groups = k / kInt4Group, runs = k / kInt4Run;
  const __m256i low_nibbles = _mm256_set1_epi32(15);
  std::vector<float> dm(2 * groups);
  for (int64_t r = first; r < last; ++r) {
    const uint8_t* row = w + r * (k / 2);
    const at::Half* sc = scales + r * 2 * groups;
    for (int64_t i = 0; i < 2 * groups; ++i) dm[i] = static_cast<float>(sc[i]);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    for (int64_t run = 0; run < runs; ++run) {
      const at::BFloat16* xs = x + kInt4Run * run;
      __m256 p0 = _mm256_setzero_ps(), p1 = p0;
      for (int64_t j = 0; j < 32; j += 8) {
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 32 * run + j)));
        const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibbles));
        const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
        p0 = _mm256_fmadd_ps(low, load8(xs + j), p0);
        p1 = _mm256_fmadd_ps(high, load8(xs + 32 + j), p1);
      }
      s0 = _mm256_fmadd_ps(p0, _mm256_set1_ps(dm[2 * run]), s0);
      s1 = _mm256_fmadd_ps(p1, _mm256_set1_ps(dm[2 * run + 1]), s1);
    }
    float offsets = 0.0f;
    for (int64_t g = 0; g < groups; ++g) offsets += dm[groups + g] * group_sums[g];
    store(r, reduce_add8(_mm256_add_ps(s0, s1)) + offsets);
  }
}

}  // namespace chat_native
