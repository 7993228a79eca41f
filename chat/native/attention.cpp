// chat::cache_attend (see ops.cpp): RoPE, the cache write and attention over the cache for one token.

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/tanh.h>

#include <type_traits>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace chat_native {
namespace {

constexpr int64_t kMaxGroups = 16;    // query heads per kv head
constexpr int64_t kChunk = 64;        // cached positions per work item
constexpr int64_t kPrefetchRows = 8;  // keys asked for this many rows ahead

// acc (Vecs vectors of 16) = sum over rows j < count of weights[j] * v's row j (rows of d), the sums in
// registers: two sets, even and odd rows, so that the multiply-adds do not wait on each other.
template <int Vecs, typename T>
CHAT_AVX512 void weigh_rows(const float* weights, const T* v, int64_t count, int64_t d, float* acc) {
  __m512 even[Vecs], odd[Vecs];
  for (int c = 0; c < Vecs; ++c) even[c] = odd[c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= count; j += 2) {
    const __m512 w0 = _mm512_set1_ps(weights[j]), w1 = _mm512_set1_ps(weights[j + 1]);
    for (int c = 0; c < Vecs; ++c) {
      even[c] = _mm512_fmadd_ps(w0, load16(v + j * d + c * 16), even[c]);
      odd[c] = _mm512_fmadd_ps(w1, load16(v + (j + 1) * d + c * 16), odd[c]);
    }
  }
  if (j < count) {
    const __m512 w = _mm512_set1_ps(weights[j]);
    for (int c = 0; c < Vecs; ++c) even[c] = _mm512_fmadd_ps(w, load16(v + j * d + c * 16), even[c]);
  }
  for (int c = 0; c < Vecs; ++c) _mm512_storeu_ps(acc + c * 16, _mm512_add_ps(even[c], odd[c]));
}

// weigh_rows for any d (a multiple of 16): in registers up to 128 features, else in memory.
template <typename T>
CHAT_AVX512 void weigh_rows_any(const float* weights, const T* v, int64_t count, int64_t d, float* acc) {
  switch (d / 16) {
    case 1: return weigh_rows<1>(weights, v, count, d, acc);
    case 2: return weigh_rows<2>(weights, v, count, d, acc);
    case 3: return weigh_rows<3>(weights, v, count, d, acc);
    case 4: return weigh_rows<4>(weights, v, count, d, acc);
    case 5: return weigh_rows<5>(weights, v, count, d, acc);
    case 6: return weigh_rows<6>(weights, v, count, d, acc);
    case 7: return weigh_rows<7>(weights, v, count, d, acc);
    case 8: return weigh_rows<8>(weights, v, count, d, acc);
  }
  for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(acc + c, _mm512_setzero_ps());
  for (int64_t j = 0; j < count; ++j) {
    const __m512 w = _mm512_set1_ps(weights[j]);
    for (int64_t c = 0; c < d; c += 16)
      _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(w, load16(v + j * d + c), _mm512_loadu_ps(acc + c)));
  }
}

// Gemma 2's soft cap on `count` scores: softcap * tanh(score / softcap), in transformers' order of ops.
CHAT_AVX512 void cap_scores(float* scores, int64_t count, float softcap) {
  const __m512 cap = _mm512_set1_ps(softcap);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 mask = lanes_below16(count - j);
    const __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, scores + j), cap);
    _mm512_mask_storeu_ps(scores + j, mask, _mm512_mul_ps(tanh_ps(x), cap));
  }
}

// One work item of decode attention: the `groups` query heads of one kv head (q, float32, groups x d)
// over cached positions [first, last) of that head's keys and values (rows of d), scores times scale (then
// soft-capped when softcap > 0). Writes, per query head, the running max score m, the sum l of
// e^(score - m) and acc = sum of e^(score - m) * value.
template <typename T>
CHAT_AVX512 void attend_chunk(const float* q, const T* k, const T* v, int64_t groups, int64_t d, int64_t first,
                              int64_t last, float scale, float softcap, float* m, float* l, float* acc) {
  const int64_t count = last - first, vecs = d / 16;
  alignas(64) float scores[kMaxGroups][kChunk + 16];
  for (int64_t j = 0; j < count; ++j) {
    const T* key = k + (first + j) * d;
    // Cold caches are read at memory latency, not bandwidth: ask for the keys ahead and this row of values.
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(key + kPrefetchRows * d) + b, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + (first + j) * d) + b, _MM_HINT_T0);
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < vecs; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + c * 16), load16(key + c * 16), s);
      scores[g][j] = _mm512_reduce_add_ps(s) * scale;
    }
  }
  const int64_t padded = (count + 15) / 16 * 16;
  for (int64_t g = 0; g < groups; ++g) {
    if (softcap > 0.0f) cap_scores(scores[g], count, softcap);
    for (int64_t j = count; j < padded; ++j) scores[g][j] = -INFINITY;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 16) top = _mm512_max_ps(top, _mm512_load_ps(&scores[g][j]));
    m[g] = _mm512_reduce_max_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_load_ps(&scores[g][j]), _mm512_set1_ps(m[g])));
      const __m512 kept = _mm512_maskz_mov_ps(lanes_below16(count - j), e);
      _mm512_store_ps(&scores[g][j], kept);
      sum = _mm512_add_ps(sum, kept);
    }
    l[g] = _mm512_reduce_add_ps(sum);
  }
  const T* values = v + first * d;
  for (int64_t g = 0; g < groups; ++g) weigh_rows_any(scores[g], values, count, d, acc + g * d);
}

// weigh_rows in AVX2: one set of sums (16 registers in all), in registers up to 64 features.
template <int Vecs, typename T>
CHAT_AVX2 void weigh_rows_avx2(const float* weights, const T* v, int64_t count, int64_t d, float* acc) {
  __m256 sums[Vecs];
  for (int c = 0; c < Vecs; ++c) sums[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const __m256 w = _mm256_set1_ps(weights[j]);
    for (int c = 0; c < Vecs; ++c) sums[c] = _mm256_fmadd_ps(w, load8(v + j * d + c * 8), sums[c]);
  }
  for (int c = 0; c < Vecs; ++c) _mm256_storeu_ps(acc + c * 8, sums[c]);
}

template <typename T>
CHAT_AVX2 void weigh_rows_any_avx2(const float* weights, const T* v, int64_t count, int64_t d, float* acc) {
  switch (d / 8) {
    case 1: return weigh_rows_avx2<1>(weights, v, count, d, acc);
    case 2: return weigh_rows_avx2<2>(weights, v, count, d, acc);
    case 3: return weigh_rows_avx2<3>(weights, v, count, d, acc);
    case 4: return weigh_rows_avx2<4>(weights, v, count, d, acc);
    case 5: return weigh_rows_avx2<5>(weights, v, count, d, acc);
    case 6: return weigh_rows_avx2<6>(weights, v, count, d, acc);
    case 7: return weigh_rows_avx2<7>(weights, v, count, d, acc);
    case 8: return weigh_rows_avx2<8>(weights, v, count, d, acc);
  }
  for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(acc + c, _mm256_setzero_ps());
  for (int64_t j = 0; j < count; ++j) {
    const __m256 w = _mm256_set1_ps(weights[j]);
    for (int64_t c = 0; c < d; c += 8)
      _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(w, load8(v + j * d + c), _mm256_loadu_ps(acc + c)));
  }
}

CHAT_AVX2 void cap_scores_avx2(float* scores, int64_t count, float softcap) {
  const __m256 cap = _mm256_set1_ps(softcap);
  for (int64_t j = 0; j < count; j += 8) {
    const __m256i mask = _mm256_castps_si256(lanes_below(count - j));
    const __m256 x = _mm256_div_ps(_mm256_maskload_ps(scores + j, mask), cap);
    _mm256_maskstore_ps(scores + j, mask, _mm256_mul_ps(tanh8(x), cap));
  }
}

// attend_chunk in AVX2, for d a multiple of 8.
template <typename T>
CHAT_AVX2 void attend_chunk_avx2(const float* q, const T* k, const T* v, int64_t groups, int64_t d, int64_t first,
                                 int64_t last, float scale, float softcap, float* m, float* l, float* acc) {
  const int64_t count = last - first, vecs = d / 8;
  alignas(32) float scores[kMaxGroups][kChunk + 8];
  for (int64_t j = 0; j < count; ++j) {
    const T* key = k + (first + j) * d;
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(key + kPrefetchRows * d) + b, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + (first + j) * d) + b, _MM_HINT_T0);
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t c = 0; c < vecs; ++c) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c * 8), load8(key + c * 8), s);
      scores[g][j] = reduce_add8(s) * scale;
    }
  }
  const int64_t padded = (count + 7) / 8 * 8;
  for (int64_t g = 0; g < groups; ++g) {
    if (softcap > 0.0f) cap_scores_avx2(scores[g], count, softcap);
    for (int64_t j = count; j < padded; ++j) scores[g][j] = -INFINITY;
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 8) top = _mm256_max_ps(top, _mm256_load_ps(&scores[g][j]));
    m[g] = reduce_max8(top);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(&scores[g][j]), _mm256_set1_ps(m[g])));
      const __m256 kept = _mm256_and_ps(e, lanes_below(count - j));
      _mm256_store_ps(&scores[g][j], kept);
      sum = _mm256_add_ps(sum, kept);
    }
    l[g] = reduce_add8(sum);
  }
  const T* values = v + first * d;
  for (int64_t g = 0; g < groups; ++g) weigh_rows_any_avx2(scores[g], values, count, d, acc + g * d);
}

// The form of attend_chunk for heads of d features here; kTorch for torch's own attention.
Isa attend_form(int64_t d) {
  const Isa widest = isa();
  if (widest == Isa::kAvx512 && d % 16 == 0) return Isa::kAvx512;
  return widest != Isa::kTorch && d % 8 == 0 ? Isa::kAvx2 : Isa::kTorch;
}

// Attention of float32 queries qp (kv_heads x groups x d) over positions [start, n) of k and v (1, kv_heads, len,
// d), rows contiguous, with attend_chunk's scale and softcap. Work items are (kv head, 64 positions from start);
// their partial results merge as in flash-decoding. Keys and values stream once, shared by the query heads of
// their group. Returns (kv_heads * groups * d) in the caches' dtype.
at::Tensor attend_float(Isa form, const float* qp, const at::Tensor& k, const at::Tensor& v, int64_t groups,
                        int64_t start, int64_t n, float scale, float softcap) {
  const int64_t heads = k.size(1), d = k.size(3);
  const int64_t chunks = (n - start + kChunk - 1) / kChunk, items = heads * chunks;
  // Per item and query head: m, l, then acc (d floats).
  std::vector<float> parts(items * groups * (d + 2));
  float* pp = parts.data();
  const bool wide = form == Isa::kAvx512;
  auto run = [&](auto* kp, auto* vp) {
    using T = std::remove_pointer_t<decltype(kp)>;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float m[kMaxGroups], l[kMaxGroups];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t h = item / chunks, first = start + item % chunks * kChunk, last = std::min(n, first + kChunk);
        float* out = pp + item * groups * (d + 2);
        const auto chunk = wide ? attend_chunk<T> : attend_chunk_avx2<T>;
        chunk(qp + h * groups * d, kp + h * k.stride(1), vp + h * v.stride(1), groups, d, first, last, scale,
              softcap, m, l, out + 2 * groups);
        for (int64_t g = 0; g < groups; ++g) {
          out[g] = m[g];
          out[groups + g] = l[g];
        }
      }
    });
  };
  if (k.scalar_type() == at::kFloat) {
    run(k.data_ptr<float>(), v.data_ptr<float>());
  } else {
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  }
  at::Tensor result = at::empty({heads * groups * d}, k.options());
  std::vector<float> o(d);
  auto merge = [&](auto* rp) {
    using T = std::remove_pointer_t<decltype(rp)>;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t g = 0; g < groups; ++g) {
        float top = -INFINITY;
        for (int64_t c = 0; c < chunks; ++c) top = std::max(top, pp[(h * chunks + c) * groups * (d + 2) + g]);
        float total = 0.0f;
        std::fill(o.begin(), o.end(), 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          const float* part = pp + (h * chunks + c) * groups * (d + 2);
          const float w = std::exp(part[g] - top);
          total += w * part[groups + g];
          const float* a = part + 2 * groups + g * d;
          for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
        }
        T* out = rp + (h * groups + g) * d;
        for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(o[i] / total);
      }
    }
  };
  if (k.scalar_type() == at::kFloat) {
    merge(result.data_ptr<float>());
  } else {
    merge(result.data_ptr<at::BFloat16>());
  }
  return result;
}

// x * cos + swap(x) * sin on the first `rotary` features of a head (RoPE, rotate-half form; sin holds the
// sign), each product and the sum rounded to T as torch's ops on T would (hence no fused multiply-add).
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t rotary, int64_t d, T* out) {
  const int64_t half = rotary / 2;
  for (int64_t i = 0; i < rotary; ++i) {
    const T swapped = x[i < half ? i + half : i - half];
    const T a = static_cast<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
    const T b = static_cast<T>(static_cast<float>(swapped) * static_cast<float>(sin[i]));
    out[i] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
  for (int64_t i = rotary; i < d; ++i) out[i] = x[i];
}

}  // namespace

// The attention half of a decode layer after its q/k/v product: RoPE on q and k (when cos and sin are given:
// their rows for the token's position), k and v written into the caches at that position, then attend over
// the window's positions [0, n), or with a sliding window W its last W, [max(0, n - W), n) (transformers' rule:
// query i sees key j when i - j < W; the token is at n - 1). Scores are q.k times scale (default 1/sqrt(d)),
// then with a softcap c, c * tanh(score / c). qkv is (heads + 2 kv_heads) * d; the caches (1, kv_heads, len, d).
// Returns (heads * d).
at::Tensor cache_attend(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                        const std::optional<at::Tensor>& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& positions, const at::Tensor& window, std::optional<double> scale,
                        std::optional<double> softcap, std::optional<int64_t> sliding_window) {
  const int64_t kv_heads = k_cache.size(1), d = k_cache.size(3), n = window.size(0);
  const int64_t heads = qkv.numel() / d - 2 * kv_heads;
  const int64_t rotary = cos ? cos->numel() : 0;
  TORCH_CHECK(qkv.dim() == 1 && heads > 0 && heads % kv_heads == 0 && positions.numel() == 1 && rotary % 2 == 0 &&
                  rotary <= d && (sin ? sin->numel() : 0) == rotary && n >= 1 && n <= k_cache.size(2),
              "chat::cache_attend: shapes do not match");
  TORCH_CHECK(!softcap || *softcap > 0.0, "chat::cache_attend: softcap must be positive");
  TORCH_CHECK(!sliding_window || *sliding_window > 0, "chat::cache_attend: sliding_window must be positive");
  const int64_t start = sliding_window ? std::max<int64_t>(0, n - *sliding_window) : 0;
  const auto dtype = qkv.scalar_type();
  const Isa form = attend_form(d);
  const bool fast = form != Isa::kTorch && (dtype == at::kFloat || dtype == at::kBFloat16) &&
                    qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype &&
                    heads / kv_heads <= kMaxGroups && (!cos || (cos->is_contiguous() && sin->is_contiguous() &&
                                                                cos->scalar_type() == dtype && sin->scalar_type() == dtype));
  if (!fast) {  // the same steps in torch's ops
    auto parts = qkv.split({heads * d, kv_heads * d, kv_heads * d});
    auto rope = [&](const at::Tensor& x, int64_t count) {
      at::Tensor h = x.reshape({count, d});
      if (!cos) return h;
      at::Tensor r = h.narrow(1, 0, rotary);
      at::Tensor swapped = at::cat({r.narrow(1, rotary / 2, rotary / 2), r.narrow(1, 0, rotary / 2)}, 1);
      at::Tensor out = r * cos->reshape({1, rotary}) + swapped * sin->reshape({1, rotary});
      return rotary < d ? at::cat({out, h.narrow(1, rotary, d - rotary)}, 1) : out;
    };
    at::Tensor q = rope(parts[0], heads).reshape({1, kv_heads, heads / kv_heads, d});
    k_cache.index_copy_(2, positions, rope(parts[1], kv_heads).reshape({1, kv_heads, 1, d}));
    v_cache.index_copy_(2, positions, parts[2].reshape({1, kv_heads, 1, d}));
    const at::Tensor keys = k_cache.narrow(2, start, n - start), values = v_cache.narrow(2, start, n - start);
    if (!softcap) return at::scaled_dot_product_attention(q, keys, values, {}, 0.0, false, scale).reshape({-1});
    // SDPA takes no soft cap: the scores explicitly, in float32 at least, as the kernels compute them.
    const auto wide = at::promote_types(dtype, at::kFloat);
    at::Tensor scores = at::matmul(q.to(wide), keys.to(wide).transpose(2, 3));
    scores = at::tanh(scores * scale.value_or(1.0 / std::sqrt(static_cast<double>(d))) / *softcap) * *softcap;
    return at::matmul(at::softmax(scores, -1), values.to(wide)).to(dtype).reshape({-1});
  }
  const int64_t pos = positions.item<int64_t>();
  TORCH_CHECK(pos >= 0 && pos < k_cache.size(2), "chat::cache_attend: position outside the cache");
  std::vector<float> q(heads * d);
  auto run = [&](auto* x, auto* kc, auto* vc, auto* c, auto* s) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
    std::vector<T> rotated(d);
    for (int64_t h = 0; h < heads; ++h) {
      const T* head = x + h * d;
      if (c) rotate(head, c, s, rotary, d, rotated.data());
      for (int64_t i = 0; i < d; ++i) q[h * d + i] = static_cast<float>(c ? rotated[i] : head[i]);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      const T* key = x + (heads + h) * d;
      T* key_slot = kc + (h * k_cache.size(2) + pos) * d;
      if (c) {
        rotate(key, c, s, rotary, d, key_slot);
      } else {
        std::copy(key, key + d, key_slot);
      }
      const T* value = x + (heads + kv_heads + h) * d;
      std::copy(value, value + d, vc + (h * v_cache.size(2) + pos) * d);
    }
  };
  if (dtype == at::kFloat) {
    run(qkv.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
        cos ? cos->data_ptr<float>() : nullptr, sin ? sin->data_ptr<float>() : nullptr);
  } else {
    run(qkv.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
        cos ? cos->data_ptr<at::BFloat16>() : nullptr, sin ? sin->data_ptr<at::BFloat16>() : nullptr);
  }
  const float factor = scale ? static_cast<float>(*scale) : 1.0f / std::sqrt(static_cast<float>(d));
  const float cap = softcap ? static_cast<float>(*softcap) : 0.0f;
  return attend_float(form, q.data(), k_cache, v_cache, heads / kv_heads, start, n, factor, cap);
}

}  // namespace chat_native
