// chat's native CPU kernels: the ops of one decoded token's layer (see chat/native/__init__.py).
//
// At one token a decode step is a stream of weights through matrix-vector products. torch's own kernels
// for these run below the memory's pace on AVX-512 machines: in bfloat16 at about 15 GB/s, where these
// reach 22 (vdpbf16ps multiplies pairs of bfloat16 into float32 sums), and in float32 at about 24, where
// these reach 26-28. Each thread takes blocks of four rows, keeps their four sums in registers and reads x
// once per block. Each kernel comes in AVX-512 and AVX2 forms, picked by the CPU at run time (bfloat16 takes
// the AVX2 form on AVX-512 CPUs without its bfloat16 part); CPUs with neither get torch's own kernels.
// $CHAT_NATIVE_ISA=avx2 (or torch) caps the choice, to test or compare the narrower forms on a wider CPU.
//
// Ops (schemas at the end), for w (n, k) and x (k,) of one dtype, float32 or bfloat16, or w of int8 with
// `scales`, one float32 per row (weights exported with --quantize int8: row i is w[i] * scales[i]; the
// products are summed in float32, then scaled, and the result has x's dtype):
//   chat::matvec(w, x, unit_norm, norm_weight, scales) = w @ x, or w @ rmsnorm(x) when unit_norm (the norm's
//     eps term) is given: with norm_weight the norm as the exported module computes it (see rms_norm),
//     without it in float32 for a weight that holds the norm's weight (see unit_norm_scale);
//   chat::silu_mul_matvec(w, x, unit_norm, norm_weight, scales) = silu(gate) * up of the same, w = [gate; up];
//   chat::add_matvec(r, w, x, scales) = r + w @ x;
//   chat::dequantize(w, scales, like) = int8 w times its rows' scales, in like's dtype (a prefill's weights; like,
//     the prefill's input, is an argument so that freezing the module cannot fold the op into a constant: a
//     whole copy of the weights);
//   chat::cache_attend(qkv, cos, sin, k_cache, v_cache, positions, window) = RoPE, the cache write and
//     attention over the filled cache, for one token: the attention half of a decode layer in one op.
// bfloat16 results round as torch's ops would, step by step (a product to bfloat16, then the sum with r:
// transformers adds a layer's output to the residual that way).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kRows = 4;
// Blocks per thread chunk at least: 16 blocks of bfloat16 rows of 576 are 74 KB of weights.
constexpr int64_t kGrain = 16;

#define CHAT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define CHAT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define CHAT_AVX2 __attribute__((target("avx2,fma")))

enum class Isa { kTorch, kAvx2, kAvx512 };

// The widest instruction set of this CPU that the kernels have a form for.
Isa cpu_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kTorch;
}

// The widest the kernels may use: the CPU's, capped by $CHAT_NATIVE_ISA (read at each op, so that a test can
// switch it; a fraction of a microsecond against an op's tens).
Isa isa() {
  static const Isa cpu = cpu_isa();
  const char* cap = std::getenv("CHAT_NATIVE_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(cpu, Isa::kAvx2);
  if (cap != nullptr && std::strcmp(cap, "torch") == 0) return Isa::kTorch;
  return cpu;
}

CHAT_AVX512_BF16 inline __m512bh load(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
CHAT_AVX512_BF16 inline __m512bh load_tail(__mmask32 mask, const at::BFloat16* p) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// The hardware prefetcher ramps up on each short row anew; asking for the next block's rows at the same
// column keeps the weight stream at the memory's pace (bfloat16 rows of 576 are 1.2 KB: +15-30% there).
template <typename T>
inline void prefetch_next_block(const T* block, int64_t k, int64_t c) {
  for (int64_t j = kRows; j < 2 * kRows; ++j) _mm_prefetch(reinterpret_cast<const char*>(block + j * k + c), _MM_HINT_T0);
}

// Rows [first, last) of w (row stride k) times x; store(row, float32 sum) writes each result.
template <typename Store>
CHAT_AVX512_BF16 void dot_rows_bf16(
    const at::BFloat16* w, const at::BFloat16* x, int64_t first, int64_t last, int64_t k, const Store& store) {
  const int64_t tail = k % 32;
  const __mmask32 tail_mask = static_cast<__mmask32>((uint64_t{1} << tail) - 1);
  int64_t r = first;
  for (; r + kRows <= last; r += kRows) {
    const at::BFloat16* row = w + r * k;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
      prefetch_next_block(row, k, c);
      const __m512bh xv = load(x + c);
      s0 = _mm512_dpbf16_ps(s0, load(row + c), xv);
      s1 = _mm512_dpbf16_ps(s1, load(row + k + c), xv);
      s2 = _mm512_dpbf16_ps(s2, load(row + 2 * k + c), xv);
      s3 = _mm512_dpbf16_ps(s3, load(row + 3 * k + c), xv);
    }
    if (tail) {
      const __m512bh xv = load_tail(tail_mask, x + c);
      s0 = _mm512_dpbf16_ps(s0, load_tail(tail_mask, row + c), xv);
      s1 = _mm512_dpbf16_ps(s1, load_tail(tail_mask, row + k + c), xv);
      s2 = _mm512_dpbf16_ps(s2, load_tail(tail_mask, row + 2 * k + c), xv);
      s3 = _mm512_dpbf16_ps(s3, load_tail(tail_mask, row + 3 * k + c), xv);
    }
    store(r, _mm512_reduce_add_ps(s0));
    store(r + 1, _mm512_reduce_add_ps(s1));
    store(r + 2, _mm512_reduce_add_ps(s2));
    store(r + 3, _mm512_reduce_add_ps(s3));
  }
  for (; r < last; ++r) {
    const at::BFloat16* row = w + r * k;
    __m512 s = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) s = _mm512_dpbf16_ps(s, load(row + c), load(x + c));
    if (tail) s = _mm512_dpbf16_ps(s, load_tail(tail_mask, row + c), load_tail(tail_mask, x + c));
    store(r, _mm512_reduce_add_ps(s));
  }
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
CHAT_AVX512 inline __m512 load16_tail(__mmask16 mask, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// dot_rows_bf16 for float32 x and weights of float32 or int8 (the int8 sums not yet scaled).
template <typename W, typename Store>
CHAT_AVX512 void dot_rows_wide(const W* w, const float* x, int64_t first, int64_t last, int64_t k, const Store& store) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line: one prefetch each
  const int64_t tail = k % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
  int64_t r = first;
  for (; r + kRows <= last; r += kRows) {
    const W* row = w + r * k;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
      if (c % kLine == 0) {
        prefetch_next_block(row, k, c);
        // int8 rows hold twice the weights per byte of bfloat16, so fewer bytes are in flight at a time; asking
        // for the block after next too keeps them coming (+9% decode, +20% on a cold matvec stream, here).
        if constexpr (sizeof(W) == 1) prefetch_next_block(row + kRows * k, k, c);
      }
      const __m512 xv = _mm512_loadu_ps(x + c);
      s0 = _mm512_fmadd_ps(load16(row + c), xv, s0);
      s1 = _mm512_fmadd_ps(load16(row + k + c), xv, s1);
      s2 = _mm512_fmadd_ps(load16(row + 2 * k + c), xv, s2);
      s3 = _mm512_fmadd_ps(load16(row + 3 * k + c), xv, s3);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail_mask, x + c);
      s0 = _mm512_fmadd_ps(load16_tail(tail_mask, row + c), xv, s0);
      s1 = _mm512_fmadd_ps(load16_tail(tail_mask, row + k + c), xv, s1);
      s2 = _mm512_fmadd_ps(load16_tail(tail_mask, row + 2 * k + c), xv, s2);
      s3 = _mm512_fmadd_ps(load16_tail(tail_mask, row + 3 * k + c), xv, s3);
    }
    store(r, _mm512_reduce_add_ps(s0));
    store(r + 1, _mm512_reduce_add_ps(s1));
    store(r + 2, _mm512_reduce_add_ps(s2));
    store(r + 3, _mm512_reduce_add_ps(s3));
  }
  for (; r < last; ++r) {
    const W* row = w + r * k;
    __m512 s = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) s = _mm512_fmadd_ps(load16(row + c), _mm512_loadu_ps(x + c), s);
    if (tail) s = _mm512_fmadd_ps(load16_tail(tail_mask, row + c), _mm512_maskz_loadu_ps(tail_mask, x + c), s);
    store(r, _mm512_reduce_add_ps(s));
  }
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

// dot_rows_wide and dot_rows_bf16 in AVX2: weights T of float32, bfloat16 or int8, x of float32 or bfloat16.
template <typename T, typename X, typename Store>
CHAT_AVX2 void dot_rows_avx2(const T* w, const X* x, int64_t first, int64_t last, int64_t k, const Store& store) {
  constexpr int64_t kLine = 64 / sizeof(T);  // weights per cache line: one prefetch each
  const int64_t tail = k % 8, body = k - tail;
  int64_t r = first;
  for (; r + kRows <= last; r += kRows) {
    const T* row = w + r * k;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t c = 0; c < body; c += 8) {
      if (c % kLine == 0) {
        prefetch_next_block(row, k, c);
        if constexpr (sizeof(T) == 1) prefetch_next_block(row + kRows * k, k, c);  // as dot_rows_wide
      }
      const __m256 xv = load8(x + c);
      s0 = _mm256_fmadd_ps(load8(row + c), xv, s0);
      s1 = _mm256_fmadd_ps(load8(row + k + c), xv, s1);
      s2 = _mm256_fmadd_ps(load8(row + 2 * k + c), xv, s2);
      s3 = _mm256_fmadd_ps(load8(row + 3 * k + c), xv, s3);
    }
    if (tail) {
      const __m256 xv = load8_tail(x + body, tail);
      s0 = _mm256_fmadd_ps(load8_tail(row + body, tail), xv, s0);
      s1 = _mm256_fmadd_ps(load8_tail(row + k + body, tail), xv, s1);
      s2 = _mm256_fmadd_ps(load8_tail(row + 2 * k + body, tail), xv, s2);
      s3 = _mm256_fmadd_ps(load8_tail(row + 3 * k + body, tail), xv, s3);
    }
    store(r, reduce_add8(s0));
    store(r + 1, reduce_add8(s1));
    store(r + 2, reduce_add8(s2));
    store(r + 3, reduce_add8(s3));
  }
  for (; r < last; ++r) {
    const T* row = w + r * k;
    __m256 s = _mm256_setzero_ps();
    for (int64_t c = 0; c < body; c += 8) s = _mm256_fmadd_ps(load8(row + c), load8(x + c), s);
    if (tail) s = _mm256_fmadd_ps(load8_tail(row + body, tail), load8_tail(x + body, tail), s);
    store(r, reduce_add8(s));
  }
}

// An op's int8 weights come with their scales (float32, one per row), and other weights without.
void check_scales(const at::Tensor& w, const std::optional<at::Tensor>& scales, const char* op) {
  if (w.scalar_type() != at::kChar) {
    TORCH_CHECK(!scales, op, ": scales are for int8 weights only");
    return;
  }
  TORCH_CHECK(scales && scales->scalar_type() == at::kFloat && scales->dim() == 1 && w.dim() == 2 &&
                  scales->size(0) == w.size(0),
              op, ": int8 weights need their scales, float32, one per row");
}

// The kernels' form for w @ x (kTorch: torch's own kernels, for shapes, dtypes and CPUs they do not take).
Isa matvec_form(const at::Tensor& w, const at::Tensor& x) {
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  const bool int8 = w.scalar_type() == at::kChar;
  const bool x_ok = int8 ? x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16
                         : w.scalar_type() == x.scalar_type();
  if (!w.device().is_cpu() || w.dim() != 2 || x.dim() != 1 || !x_ok || w.size(1) != x.size(0) || w.size(1) == 0) {
    return Isa::kTorch;
  }
  const Isa widest = isa();
  if (int8 || w.scalar_type() == at::kFloat) return widest;
  if (w.scalar_type() != at::kBFloat16) return Isa::kTorch;
  return widest == Isa::kAvx512 && !has_bf16 ? Isa::kAvx2 : widest;
}

// w @ x split between torch's threads in blocks of kRows rows; store(row, float32 sum) writes each result.
template <typename W, typename X, typename Store>
void dot_rows(Isa form, const at::Tensor& w, const at::Tensor& x, const Store& store) {
  const int64_t n = w.size(0), k = w.size(1);
  const W* wp = w.data_ptr<W>();
  const X* xp = x.data_ptr<X>();
  const bool wide = form == Isa::kAvx512;
  at::parallel_for(0, (n + kRows - 1) / kRows, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kRows, last = std::min(n, end * kRows);
    if (!wide) {
      dot_rows_avx2(wp, xp, first, last, k, store);
    } else if constexpr (std::is_same_v<W, at::BFloat16>) {
      dot_rows_bf16(wp, xp, first, last, k, store);
    } else {
      dot_rows_wide(wp, xp, first, last, k, store);
    }
  });
}

// w @ x (contiguous, in a form matvec_form gave) as float32 sums, store(row, sum) writing each: w of x's dtype,
// or int8, whose sums over x in float32 are then scaled by their rows' scales.
template <typename Store>
void row_sums(Isa form, const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& scales,
              const Store& store) {
  if (w.scalar_type() == at::kChar) {
    const at::Tensor x32 = x.to(at::kFloat).contiguous(), s = scales->contiguous();
    const float* sp = s.data_ptr<float>();
    dot_rows<int8_t, float>(form, w, x32, [sp, &store](int64_t i, float sum) { store(i, sum * sp[i]); });
  } else if (w.scalar_type() == at::kFloat) {
    dot_rows<float, float>(form, w, x, store);
  } else {
    dot_rows<at::BFloat16, at::BFloat16>(form, w, x, store);
  }
}

// w @ x on torch's own kernels (the kTorch form); int8 weights are summed in float32, then scaled.
at::Tensor mv_torch(const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& scales) {
  if (!scales) return at::mv(w, x);
  return (at::mv(w.to(at::kFloat), x.to(at::kFloat)) * *scales).to(x.scalar_type());
}

// sqrt(sum(x^2) + eps_root^2), summed in double: the divisor of both RMSNorm forms below.
template <typename T>
double norm_hypot(const T* x, int64_t k, double eps_root) {
  double sum = eps_root * eps_root;
  for (int64_t i = 0; i < k; ++i) sum += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return std::sqrt(sum);
}

// RMSNorm's scale, 1 / sqrt(sum(x^2) + eps_root^2), for a weight that holds the norm's weight and sqrt(hidden)
// (the float32 export folds them in: chat/export/model.py, fold_norms): w @ norm(x) = scale * (w @ x).
float unit_norm_scale(const at::Tensor& x, std::optional<double> eps_root) {
  return eps_root ? static_cast<float>(1.0 / norm_hypot(x.data_ptr<float>(), x.numel(), *eps_root)) : 1.0f;
}

at::Tensor unit_norm_fallback(const at::Tensor& x, std::optional<double> eps_root) {
  if (!eps_root) return x;
  return x / at::hypot(at::linalg_vector_norm(x), at::scalar_tensor(*eps_root, x.options()));
}

// RMSNorm as the exported module computes it in torch's ops, each step rounded to x's dtype as they would be:
// weight * (x / hypot(|x|, eps_root) * sqrt(k)), the inner part in float32.
template <typename T>
void rms_norm_into(const T* x, const T* weight, int64_t k, double eps_root, T* out) {
  const float hypot = static_cast<float>(norm_hypot(x, k, eps_root)), root = std::sqrt(static_cast<float>(k));
  for (int64_t i = 0; i < k; ++i) {
    const T normed = static_cast<T>(static_cast<float>(x[i]) / hypot * root);
    out[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

at::Tensor rms_norm(const at::Tensor& x_in, double eps_root, const at::Tensor& weight_in) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const auto dtype = x.scalar_type();
  if (x.dim() != 1 || weight.sizes() != x.sizes() || weight.scalar_type() != dtype ||
      (dtype != at::kFloat && dtype != at::kBFloat16)) {
    const at::Tensor unit = unit_norm_fallback(x.to(at::kFloat), eps_root);
    return weight * (unit * std::sqrt(static_cast<double>(x.size(-1)))).to(dtype);
  }
  at::Tensor out = at::empty_like(x);
  if (dtype == at::kFloat) {
    rms_norm_into(x.data_ptr<float>(), weight.data_ptr<float>(), x.numel(), eps_root, out.data_ptr<float>());
  } else {
    rms_norm_into(x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), x.numel(), eps_root,
                  out.data_ptr<at::BFloat16>());
  }
  return out;
}

at::Tensor matvec(const at::Tensor& w_in, const at::Tensor& x_in, std::optional<double> unit_norm,
                  const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales) {
  check_scales(w_in, scales, "chat::matvec");
  if (unit_norm && norm_weight) return matvec(w_in, rms_norm(x_in, *unit_norm, *norm_weight), {}, {}, scales);
  const Isa form = matvec_form(w_in, x_in);
  if (form == Isa::kTorch || (unit_norm && x_in.scalar_type() != at::kFloat)) {
    return mv_torch(w_in, unit_norm_fallback(x_in, unit_norm), scales);
  }
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  at::Tensor out = at::empty({w.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    float* o = out.data_ptr<float>();
    const float norm_scale = unit_norm_scale(x, unit_norm);
    row_sums(form, w, x, scales, [o, norm_scale](int64_t i, float s) { o[i] = s * norm_scale; });
  } else {
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    row_sums(form, w, x, scales, [o](int64_t i, float s) { o[i] = at::BFloat16(s); });
  }
  return out;
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

// Rounds float32 lanes to the nearest bfloat16 (ties to even), kept as float32: what torch's ops on bfloat16 store.
CHAT_AVX512 inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// out = silu(gate) * up over count lanes; with bfloat16 rounding, silu(gate) rounds before the product.
CHAT_AVX512 void silu_products_avx512(const float* gate, const float* up, float* out, int64_t count, bool bf16) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = count - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
    __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    if (bf16) silu = round_bf16(silu);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, up + i)));
  }
}

CHAT_AVX2 inline __m256 round_bf16_8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

CHAT_AVX2 void silu_products_avx2(const float* gate, const float* up, float* out, int64_t count, bool bf16) {
  for (int64_t i = 0; i < count; i += 8) {
    const __m256i mask = _mm256_castps_si256(lanes_below(count - i));
    const __m256 g = _mm256_maskload_ps(gate + i, mask);
    __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    if (bf16) silu = round_bf16_8(silu);
    _mm256_maskstore_ps(out + i, mask, _mm256_mul_ps(silu, _mm256_maskload_ps(up + i, mask)));
  }
}

void silu_products(Isa form, const float* gate, const float* up, float* out, int64_t count, bool bf16) {
  if (form == Isa::kAvx512) {
    silu_products_avx512(gate, up, out, count, bf16);
  } else {
    silu_products_avx2(gate, up, out, count, bf16);
  }
}


// silu(gate) * up for w holding the gate rows, then the up rows: one op for a gated MLP's first half. In
// bfloat16 each step rounds as torch's ops do: gate and up, silu(gate), then the product.
at::Tensor silu_mul_matvec(const at::Tensor& w_in, const at::Tensor& x_in, std::optional<double> unit_norm,
                           const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) % 2 == 0, "chat::silu_mul_matvec: w needs an even number of rows");
  check_scales(w_in, scales, "chat::silu_mul_matvec");
  if (unit_norm && norm_weight) {
    return silu_mul_matvec(w_in, rms_norm(x_in, *unit_norm, *norm_weight), {}, {}, scales);
  }
  const int64_t half = w_in.size(0) / 2;
  const Isa form = matvec_form(w_in, x_in);
  if (form == Isa::kTorch || (unit_norm && x_in.scalar_type() != at::kFloat)) {
    const auto gate_up = mv_torch(w_in, unit_norm_fallback(x_in, unit_norm), scales).chunk(2);
    return at::silu(gate_up[0]) * gate_up[1];
  }
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  std::vector<float> sums(w.size(0));
  float* sp = sums.data();
  at::Tensor out = at::empty({half}, x.options());
  if (x.scalar_type() == at::kFloat) {
    const float norm_scale = unit_norm_scale(x, unit_norm);
    row_sums(form, w, x, scales, [sp, norm_scale](int64_t i, float s) { sp[i] = s * norm_scale; });
    silu_products(form, sp, sp + half, out.data_ptr<float>(), half, false);
  } else {
    row_sums(form, w, x, scales, [sp](int64_t i, float s) { sp[i] = static_cast<float>(at::BFloat16(s)); });
    silu_products(form, sp, sp + half, sp, half, true);
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < half; ++i) o[i] = at::BFloat16(sp[i]);
  }
  return out;
}

at::Tensor add_matvec(const at::Tensor& r_in, const at::Tensor& w_in, const at::Tensor& x_in,
                      const std::optional<at::Tensor>& scales) {
  check_scales(w_in, scales, "chat::add_matvec");
  const Isa form = matvec_form(w_in, x_in);
  if (form == Isa::kTorch || r_in.scalar_type() != x_in.scalar_type() || r_in.dim() != 1 ||
      r_in.size(0) != w_in.size(0)) {
    return r_in + mv_torch(w_in, x_in, scales);
  }
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous(), r = r_in.contiguous();
  at::Tensor out = at::empty({w.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    float* o = out.data_ptr<float>();
    const float* rp = r.data_ptr<float>();
    row_sums(form, w, x, scales, [o, rp](int64_t i, float s) { o[i] = rp[i] + s; });
  } else {
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    const at::BFloat16* rp = r.data_ptr<at::BFloat16>();
    // The product rounds to bfloat16 before the add, as torch's mv then add would.
    row_sums(form, w, x, scales, [o, rp](int64_t i, float s) {
      o[i] = at::BFloat16(static_cast<float>(rp[i]) + static_cast<float>(at::BFloat16(s)));
    });
  }
  return out;
}

// `rows` int8 rows of k times their scales, rounded to bfloat16 (to nearest, ties to even, as torch's .to).
CHAT_AVX512 void dequantize_rows_bf16(const int8_t* w, const float* scales, int64_t rows, int64_t k,
                                      at::BFloat16* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 scale = _mm512_set1_ps(scales[i]);
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 mask = k - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - c)) - 1);
      const __m512 v = round_bf16(_mm512_mul_ps(load16_tail(mask, w + i * k + c), scale));
      const __m256i bf16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
      _mm256_mask_storeu_epi16(out + i * k + c, mask, bf16);
    }
  }
}

// int8 weights times their rows' scales, as a tensor of dtype: the weights of a prefill's matmul (many tokens
// at once, where a matmul on torch's kernels beats a pass of the int8 weights per token).
at::Tensor dequantize(const at::Tensor& w_in, const at::Tensor& scales, const at::Tensor& like) {
  check_scales(w_in, scales, "chat::dequantize");
  const at::ScalarType dtype = like.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return (w_in.to(at::kFloat) * scales.unsqueeze(1)).to(dtype);
  const at::Tensor w = w_in.contiguous(), s = scales.contiguous();
  const int64_t k = w.size(1);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  if (dtype == at::kBFloat16 && isa() == Isa::kAvx512) {  // one pass; a short prompt's prefill waits on it
    at::Tensor out = at::empty(w.sizes(), w.options().dtype(dtype));
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    at::parallel_for(0, w.size(0), kGrain, [&](int64_t begin, int64_t end) {
      dequantize_rows_bf16(wp + begin * k, sp + begin, end - begin, k, o + begin * k);
    });
    return out;
  }
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, w.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t c = 0; c < k; ++c) o[i * k + c] = static_cast<float>(wp[i * k + c]) * sp[i];
    }
  });
  return out.to(dtype);  // bfloat16 on AVX2: torch's vectorized rounding
}

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

// One work item of decode attention: the `groups` query heads of one kv head (q, float32, groups x d)
// over cached positions [first, last) of that head's keys and values (rows of d). Writes, per query
// head, the running max score m, the sum l of e^(score - m) and acc = sum of e^(score - m) * value.
template <typename T>
CHAT_AVX512 void attend_chunk(const float* q, const T* k, const T* v, int64_t groups, int64_t d, int64_t first,
                              int64_t last, float scale, float* m, float* l, float* acc) {
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
    for (int64_t j = count; j < padded; ++j) scores[g][j] = -INFINITY;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 16) top = _mm512_max_ps(top, _mm512_load_ps(&scores[g][j]));
    m[g] = _mm512_reduce_max_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_load_ps(&scores[g][j]), _mm512_set1_ps(m[g])));
      const __m512 kept = _mm512_maskz_mov_ps(j + 16 <= count ? 0xFFFF : (1u << (count - j)) - 1, e);
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

// attend_chunk in AVX2, for d a multiple of 8.
template <typename T>
CHAT_AVX2 void attend_chunk_avx2(const float* q, const T* k, const T* v, int64_t groups, int64_t d, int64_t first,
                                 int64_t last, float scale, float* m, float* l, float* acc) {
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

// Attention of float32 queries qp (kv_heads x groups x d) over positions [0, n) of k and v (1, kv_heads, len, d),
// rows contiguous. Work items are (kv head, 64 positions); their partial results merge as in flash-decoding.
// Keys and values stream once, shared by the query heads of their group. Returns (1, kv_heads, groups, d).
at::Tensor attend_float(Isa form, const float* qp, const at::Tensor& k, const at::Tensor& v, int64_t groups,
                        int64_t n) {
  const int64_t heads = k.size(1), d = k.size(3);
  const int64_t chunks = (n + kChunk - 1) / kChunk, items = heads * chunks;
  const auto floats = k.options().dtype(at::kFloat);
  // Per item and query head: m, l, then acc (d floats).
  at::Tensor parts = at::empty({items, groups, d + 2}, floats);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  float* pp = parts.data_ptr<float>();
  const bool wide = form == Isa::kAvx512;
  auto run = [&](auto* kp, auto* vp) {
    using T = std::remove_pointer_t<decltype(kp)>;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float m[kMaxGroups], l[kMaxGroups];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t h = item / chunks, first = item % chunks * kChunk, last = std::min(n, first + kChunk);
        float* out = pp + item * groups * (d + 2);
        const auto chunk = wide ? attend_chunk<T> : attend_chunk_avx2<T>;
        chunk(qp + h * groups * d, kp + h * k.stride(1), vp + h * v.stride(1), groups, d, first, last, scale, m,
              l, out + 2 * groups);
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
  at::Tensor result = at::empty({1, heads, groups, d}, floats);
  float* rp = result.data_ptr<float>();
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t g = 0; g < groups; ++g) {
      float top = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, pp[(h * chunks + c) * groups * (d + 2) + g]);
      float total = 0.0f;
      float* o = rp + (h * groups + g) * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = pp + (h * chunks + c) * groups * (d + 2);
        const float w = std::exp(part[g] - top);
        total += w * part[groups + g];
        const float* a = part + 2 * groups + g * d;
        for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
      }
      for (int64_t i = 0; i < d; ++i) o[i] /= total;
    }
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

// The attention half of a decode layer after its q/k/v product: RoPE on q and k (when cos and sin are given:
// their rows for the token's position), k and v written into the caches at that position, then attend over
// the window's positions. qkv is (heads + 2 kv_heads) * d; the caches (1, kv_heads, len, d). Returns (heads * d).
at::Tensor cache_attend(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                        const std::optional<at::Tensor>& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& positions, const at::Tensor& window) {
  const int64_t kv_heads = k_cache.size(1), d = k_cache.size(3), n = window.size(0);
  const int64_t heads = qkv.numel() / d - 2 * kv_heads;
  const int64_t rotary = cos ? cos->numel() : 0;
  TORCH_CHECK(qkv.dim() == 1 && heads > 0 && heads % kv_heads == 0 && positions.numel() == 1 && rotary % 2 == 0 &&
                  rotary <= d && (sin ? sin->numel() : 0) == rotary && n >= 1 && n <= k_cache.size(2),
              "chat::cache_attend: shapes do not match");
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
    return at::scaled_dot_product_attention(q, k_cache.narrow(2, 0, n), v_cache.narrow(2, 0, n)).reshape({-1});
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
  return attend_float(form, q.data(), k_cache, v_cache, heads / kv_heads, n).reshape({-1}).to(dtype);
}

// Which form runs the kernels here, for !status: "avx512", "avx2", or "torch" (torch's own kernels).
std::string instruction_set() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "torch";
  }
}

}  // namespace

TORCH_LIBRARY(chat, m) {
  m.def("matvec(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, Tensor? scales=None) -> Tensor");
  m.def(
      "silu_mul_matvec(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, Tensor? scales=None) "
      "-> Tensor");
  m.def("add_matvec(Tensor r, Tensor w, Tensor x, Tensor? scales=None) -> Tensor");
  m.def("dequantize(Tensor w, Tensor scales, Tensor like) -> Tensor");
  m.def(
      "cache_attend(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
      "Tensor window) -> Tensor");
  m.def("instruction_set() -> str", &instruction_set);
}

TORCH_LIBRARY_IMPL(chat, CPU, m) {
  m.impl("matvec", &matvec);
  m.impl("silu_mul_matvec", &silu_mul_matvec);
  m.impl("add_matvec", &add_matvec);
  m.impl("dequantize", &dequantize);
  m.impl("cache_attend", &cache_attend);
}
