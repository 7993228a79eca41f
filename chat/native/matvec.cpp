// The matrix-vector ops (see ops.cpp): matvec, silu_mul_matvec, gelu_tanh_mul_matvec, add_matvec and
// dequantize, and the RMSNorm the first three may take first.

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/bitwise_right_shift.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/hypot.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/silu.h>

#include <vector>

#include "int4.h"
#include "isa.h"
#include "ops.h"

namespace chat_native {
namespace {

// Rows per thread chunk at least: 64 bfloat16 rows of 576 are 74 KB of weights.
constexpr int64_t kGrain = 64;

CHAT_AVX512_BF16 inline __m512bh load(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
CHAT_AVX512_BF16 inline __m512bh load_tail(__mmask32 mask, const at::BFloat16* p) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// The kernels below take one row after another, so that the weights stream in address order: the hardware
// prefetcher follows one stream at the memory's pace, where four rows read side by side (four streams a row
// apart, each ramping up anew at every row) ran at less than half of it on AMD's Zen 4. Each row has two to
// four sums in flight, so that the multiply-adds do not wait on each other.

// Rows [first, last) of w (row stride k) times x; store(row, float32 sum) writes each result.
template <typename Store>
CHAT_AVX512_BF16 void dot_rows_bf16(
    const at::BFloat16* w, const at::BFloat16* x, int64_t first, int64_t last, int64_t k, const Store& store) {
  const int64_t tail = k % 32;
  const __mmask32 tail_mask = static_cast<__mmask32>((uint64_t{1} << tail) - 1);
  for (int64_t r = first; r < last; ++r) {
    const at::BFloat16* row = w + r * k;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) {
      s0 = _mm512_dpbf16_ps(s0, load(row + c), load(x + c));
      s1 = _mm512_dpbf16_ps(s1, load(row + c + 32), load(x + c + 32));
    }
    if (c + 32 <= k) {
      s0 = _mm512_dpbf16_ps(s0, load(row + c), load(x + c));
      c += 32;
    }
    if (tail) s1 = _mm512_dpbf16_ps(s1, load_tail(tail_mask, row + c), load_tail(tail_mask, x + c));
    store(r, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)));
  }
}

// dot_rows_bf16 for float32 x and weights of float32 or int8 (the int8 sums not yet scaled).
template <typename W, typename Store>
CHAT_AVX512 void dot_rows_wide(const W* w, const float* x, int64_t first, int64_t last, int64_t k, const Store& store) {
  const int64_t tail = k % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t r = first; r < last; ++r) {
    const W* row = w + r * k;
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) {
      for (int j = 0; j < 4; ++j) s[j] = _mm512_fmadd_ps(load16(row + c + 16 * j), _mm512_loadu_ps(x + c + 16 * j), s[j]);
    }
    for (int j = 0; c + 16 <= k; c += 16, ++j) s[j] = _mm512_fmadd_ps(load16(row + c), _mm512_loadu_ps(x + c), s[j]);
    if (tail) s[3] = _mm512_fmadd_ps(load16_tail(tail_mask, row + c), _mm512_maskz_loadu_ps(tail_mask, x + c), s[3]);
    store(r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))));
  }
}

// int8 weights by bfloat16 x, for CPUs with AVX-512 VBMI and BF16, rows of a multiple of 64: each weight made
// bfloat16 exactly (|q| <= 127 needs 7 significant bits), 64 at a time, from two 128-entry tables of the bytes
// of bfloat16 |q| (vpermi2b) with the sign ORed in, the bytes then interleaved into words, so that vdpbf16ps
// multiplies them by x; half the ops of widening to float32. The interleave works within 16-byte lanes, so x
// comes in that order: int8_x_order.
struct Int8Tables {
  __m512i high[2], low[2];  // bfloat16 |q|'s high byte (sign clear) and low byte, q = 0..127
};

inline const Int8Tables& int8_tables() {
  static const Int8Tables tables = [] {
    alignas(64) uint8_t high[128], low[128];
    for (int q = 0; q < 128; ++q) {
      const float value = static_cast<float>(q);
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof bits);
      high[q] = static_cast<uint8_t>(bits >> 24);
      low[q] = static_cast<uint8_t>(bits >> 16);
    }
    Int8Tables t;
    std::memcpy(t.high, high, sizeof high);
    std::memcpy(t.low, low, sizeof low);
    return t;
  }();
  return tables;
}

// x reordered for dot_rows_int8_bf16: in each run of 64, the weights come out as bytes 0-7 of each 16-byte lane,
// then bytes 8-15.
std::vector<at::BFloat16> int8_x_order(const at::BFloat16* x, int64_t k) {
  std::vector<at::BFloat16> ordered(k);
  for (int64_t run = 0; run < k; run += 64) {
    for (int64_t lane = 0; lane < 4; ++lane) {
      for (int64_t j = 0; j < 8; ++j) {
        ordered[run + 8 * lane + j] = x[run + 16 * lane + j];
        ordered[run + 32 + 8 * lane + j] = x[run + 16 * lane + 8 + j];
      }
    }
  }
  return ordered;
}

template <typename Store>
CHAT_AVX512_VBMI_BF16 void dot_rows_int8_bf16(const int8_t* w, const at::BFloat16* x, int64_t first, int64_t last,
                                              int64_t k, const Store& store) {
  const Int8Tables& t = int8_tables();
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  auto row_sums = [&](int64_t r) CHAT_AVX512_VBMI_BF16 {
    const int8_t* row = w + r * k;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (int64_t c = 0; c < k; c += 64) {
      const __m512i q = _mm512_loadu_si512(row + c);
      const __m512i magnitude = _mm512_abs_epi8(q);
      const __m512i high = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.high[0], magnitude, t.high[1]), q,
                                                     sign, 0xF8);  // a | (b & c)
      const __m512i low = _mm512_permutex2var_epi8(t.low[0], magnitude, t.low[1]);
      s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_unpacklo_epi8(low, high), load(x + c));
      s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_unpackhi_epi8(low, high), load(x + c + 32));
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

// dot_rows_wide and dot_rows_bf16 in AVX2: weights T of float32, bfloat16 or int8, x of float32 or bfloat16.
template <typename T, typename X, typename Store>
CHAT_AVX2 void dot_rows_avx2(const T* w, const X* x, int64_t first, int64_t last, int64_t k, const Store& store) {
  const int64_t tail = k % 8, body = k - tail;
  for (int64_t r = first; r < last; ++r) {
    const T* row = w + r * k;
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t c = 0;
    for (; c + 32 <= body; c += 32) {
      for (int j = 0; j < 4; ++j) s[j] = _mm256_fmadd_ps(load8(row + c + 8 * j), load8(x + c + 8 * j), s[j]);
    }
    for (int j = 0; c < body; c += 8, ++j) s[j] = _mm256_fmadd_ps(load8(row + c), load8(x + c), s[j]);
    if (tail) s[3] = _mm256_fmadd_ps(load8_tail(row + body, tail), load8_tail(x + body, tail), s[3]);
    store(r, reduce_add8(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]))));
  }
}

// An op's int8 weights come with their scales (float32, one per row), int4 weights (uint8, two a byte) with
// their groups' steps and offsets (float16, (rows, 2, groups): int4.h), and other weights without.
void check_scales(const at::Tensor& w, const std::optional<at::Tensor>& scales, const char* op) {
  if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(w.dim() == 2 && (2 * w.size(1)) % kInt4Run == 0, op, ": int4 rows hold a multiple of 64 weights");
    TORCH_CHECK(scales && scales->scalar_type() == at::kHalf && scales->dim() == 3 && scales->size(0) == w.size(0) &&
                    scales->size(1) == 2 && scales->size(2) == 2 * w.size(1) / kInt4Group,
                op, ": int4 weights need their steps and offsets, float16, (rows, 2, groups of 32)");
    return;
  }
  if (w.scalar_type() != at::kChar) {
    TORCH_CHECK(!scales, op, ": scales are for int8 and int4 weights only");
    return;
  }
  TORCH_CHECK(scales && scales->scalar_type() == at::kFloat && scales->dim() == 1 && w.dim() == 2 &&
                  scales->size(0) == w.size(0),
              op, ": int8 weights need their scales, float32, one per row");
}

// Weights per row: int4 rows hold two a byte.
int64_t row_width(const at::Tensor& w) { return w.scalar_type() == at::kByte ? 2 * w.size(1) : w.size(1); }

// The kernels' form for w @ x (kTorch: torch's own kernels, for shapes, dtypes and CPUs they do not take).
Isa matvec_form(const at::Tensor& w, const at::Tensor& x) {
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  const bool int8 = w.scalar_type() == at::kChar, int4 = w.scalar_type() == at::kByte;
  const bool x_ok = int8   ? x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16
                    : int4 ? x.scalar_type() == at::kBFloat16
                           : w.scalar_type() == x.scalar_type();
  if (!w.device().is_cpu() || w.dim() != 2 || x.dim() != 1 || !x_ok || row_width(w) != x.size(0) || w.size(1) == 0) {
    return Isa::kTorch;
  }
  const Isa widest = isa();
  if (int8 || w.scalar_type() == at::kFloat) return widest;
  if (w.scalar_type() != at::kBFloat16 && !int4) return Isa::kTorch;
  return widest == Isa::kAvx512 && !has_bf16 ? Isa::kAvx2 : widest;
}

// w @ x split between torch's threads in runs of rows; store(row, float32 sum) writes each result.
template <typename W, typename X, typename Store>
void dot_rows(Isa form, const at::Tensor& w, const at::Tensor& x, const Store& store) {
  const int64_t n = w.size(0), k = w.size(1);
  const W* wp = w.data_ptr<W>();
  const X* xp = x.data_ptr<X>();
  const bool wide = form == Isa::kAvx512;
  at::parallel_for(0, n, kGrain, [&](int64_t first, int64_t last) {
    if (!wide) {
      dot_rows_avx2(wp, xp, first, last, k, store);
    } else if constexpr (std::is_same_v<W, at::BFloat16>) {
      dot_rows_bf16(wp, xp, first, last, k, store);
    } else {
      dot_rows_wide(wp, xp, first, last, k, store);
    }
  });
}

// int4 w @ bfloat16 x split between torch's threads as dot_rows does.
template <typename Store>
void int4_rows(Isa form, const at::Tensor& w, const at::Tensor& x, const at::Tensor& scales, const Store& store) {
  const int64_t n = w.size(0), k = row_width(w);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const std::vector<float> sums = form == Isa::kAvx512 ? int4_group_sums_avx512(xp, k) : int4_group_sums(xp, k);
  at::parallel_for(0, n, kGrain, [&](int64_t first, int64_t last) {
    if (form == Isa::kAvx512) {
      dot_rows_int4(wp, sp, xp, sums.data(), first, last, k, store);
    } else {
      dot_rows_int4_avx2(wp, sp, xp, sums.data(), first, last, k, store);
    }
  });
}

// w @ x (contiguous, in a form matvec_form gave) as float32 sums, store(row, sum) writing each: w of x's dtype,
// int8, whose sums over x in float32 are then scaled by their rows' scales, or int4 (int4.h).
template <typename Store>
void row_sums(Isa form, const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& scales,
              const Store& store) {
  if (w.scalar_type() == at::kByte) {
    int4_rows(form, w, x, scales->contiguous(), store);
  } else if (w.scalar_type() == at::kChar) {
    const at::Tensor s = scales->contiguous();
    const float* sp = s.data_ptr<float>();
    auto scaled = [sp, &store](int64_t i, float sum) { store(i, sum * sp[i]); };
    static const bool has_vbmi_bf16 = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
    const int64_t k = w.size(1);
    if (form == Isa::kAvx512 && has_vbmi_bf16 && x.scalar_type() == at::kBFloat16 && k % 64 == 0) {
      const std::vector<at::BFloat16> ordered = int8_x_order(x.data_ptr<at::BFloat16>(), k);
      const int8_t* wp = w.data_ptr<int8_t>();
      at::parallel_for(0, w.size(0), kGrain, [&](int64_t first, int64_t last) {
        dot_rows_int8_bf16(wp, ordered.data(), first, last, k, scaled);
      });
      return;
    }
    dot_rows<int8_t, float>(form, w, x.to(at::kFloat).contiguous(), scaled);
  } else if (w.scalar_type() == at::kFloat) {
    dot_rows<float, float>(form, w, x, store);
  } else {
    dot_rows<at::BFloat16, at::BFloat16>(form, w, x, store);
  }
}

// int4 weights made whole in float32, on torch's ops.
at::Tensor int4_weights_torch(const at::Tensor& w, const at::Tensor& scales) {
  const int64_t n = w.size(0), k = row_width(w);
  const at::Tensor runs = w.view({n, k / kInt4Run, 1, 32});
  const at::Tensor levels = at::cat({at::bitwise_and(runs, 15), at::bitwise_right_shift(runs, 4)}, 2);
  const at::Tensor groups = levels.reshape({n, k / kInt4Group, kInt4Group}).to(at::kFloat);
  const at::Tensor steps = scales.select(1, 0).to(at::kFloat).unsqueeze(2), offsets = scales.select(1, 1).to(at::kFloat).unsqueeze(2);
  return (groups * steps + offsets).reshape({n, k});
}

// w @ x on torch's own kernels (the kTorch form); int8 weights are summed in float32, then scaled.
at::Tensor mv_torch(const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& scales) {
  if (!scales) return at::mv(w, x);
  if (w.scalar_type() == at::kByte) return at::mv(int4_weights_torch(w, *scales), x.to(at::kFloat)).to(x.scalar_type());
  return (at::mv(w.to(at::kFloat), x.to(at::kFloat)) * *scales).to(x.scalar_type());
}

// sqrt(sum(x^2) + eps_root^2), summed in double: the divisor of both RMSNorm forms below.
template <typename T>
double norm_hypot(const T* x, int64_t k, double eps_root) {
  double sums[8] = {};  // eight running sums, so that the adds do not wait on each other
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int j = 0; j < 8; ++j) sums[j] += static_cast<double>(x[i + j]) * static_cast<double>(x[i + j]);
  }
  double sum = eps_root * eps_root;
  for (; i < k; ++i) sum += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (double part : sums) sum += part;
  return std::sqrt(sum);
}

// RMSNorm's scale, 1 / sqrt(sum(x^2) + eps_root^2), for a weight that holds the norm's weight and sqrt(hidden)
// (the float32 export folds them in: chat/lean/layers.py, FoldedRMSNorm): w @ norm(x) = scale * (w @ x).
float unit_norm_scale(const at::Tensor& x, std::optional<double> eps_root) {
  return eps_root ? static_cast<float>(1.0 / norm_hypot(x.data_ptr<float>(), x.numel(), *eps_root)) : 1.0f;
}

at::Tensor unit_norm_fallback(const at::Tensor& x, std::optional<double> eps_root) {
  if (!eps_root) return x;
  return x / at::hypot(at::linalg_vector_norm(x), at::scalar_tensor(*eps_root, x.options()));
}

// Rounds float32 lanes to the nearest bfloat16 (ties to even), kept as float32: what torch's ops on bfloat16 store.
CHAT_AVX512 inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Stores the lanes of mask of v, float32 lanes already rounded to bfloat16, as bfloat16.
CHAT_AVX512 inline void store16_tail(__mmask16 mask, at::BFloat16* p, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
CHAT_AVX512 inline void store16_tail(__mmask16 mask, float* p, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }

// rms_norm_into's steps, 16 lanes at a time.
template <typename T>
CHAT_AVX512 void rms_norm_avx512(const T* x, const T* weight, int64_t k, float hypot, float root, T* out) {
  constexpr bool bf16 = std::is_same_v<T, at::BFloat16>;
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = lanes_below16(k - i);
    __m512 normed = _mm512_mul_ps(_mm512_div_ps(load16_tail(mask, x + i), _mm512_set1_ps(hypot)), _mm512_set1_ps(root));
    if (bf16) normed = round_bf16(normed);
    __m512 product = _mm512_mul_ps(load16_tail(mask, weight + i), normed);
    if (bf16) product = round_bf16(product);
    store16_tail(mask, out + i, product);
  }
}

// RMSNorm as the exported module computes it in torch's ops, each step rounded to x's dtype as they would be:
// weight * (x / hypot(|x|, eps_root) * sqrt(k)), the inner part in float32.
template <typename T>
void rms_norm_into(const T* x, const T* weight, int64_t k, double eps_root, T* out) {
  const float hypot = static_cast<float>(norm_hypot(x, k, eps_root)), root = std::sqrt(static_cast<float>(k));
  if (isa() == Isa::kAvx512) return rms_norm_avx512(x, weight, k, hypot, root, out);
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

// The activations of a gated MLP's gate, in torch's order of ops: silu(g) = g / (1 + e^-g) and gelu with
// approximate='tanh', 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))) (GeGLU: Gemma).
enum class Gate { kSilu, kGeluTanh };
constexpr float kGeluBeta = 0.7978845608028654f, kGeluKappa = 0.044715f;

template <Gate G>
CHAT_AVX512 inline __m512 activate(__m512 g) {
  if constexpr (G == Gate::kSilu) {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  }
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
  const __m512 sum = _mm512_add_ps(g, _mm512_mul_ps(_mm512_set1_ps(kGeluKappa), cube));
  const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(kGeluBeta), sum);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh_ps(inner)));
}

// out = act(gate) * up over count lanes; with bfloat16 rounding, act(gate) rounds before the product.
template <Gate G>
CHAT_AVX512 void gate_products_avx512(const float* gate, const float* up, float* out, int64_t count, bool bf16) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = lanes_below16(count - i);
    __m512 act = activate<G>(_mm512_maskz_loadu_ps(mask, gate + i));
    if (bf16) act = round_bf16(act);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(act, _mm512_maskz_loadu_ps(mask, up + i)));
  }
}

CHAT_AVX2 inline __m256 round_bf16_8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <Gate G>
CHAT_AVX2 inline __m256 activate8(__m256 g) {
  if constexpr (G == Gate::kSilu) {
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  }
  const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
  const __m256 sum = _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(kGeluKappa), cube));
  const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(kGeluBeta), sum);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh8(inner)));
}

template <Gate G>
CHAT_AVX2 void gate_products_avx2(const float* gate, const float* up, float* out, int64_t count, bool bf16) {
  for (int64_t i = 0; i < count; i += 8) {
    const __m256i mask = _mm256_castps_si256(lanes_below(count - i));
    __m256 act = activate8<G>(_mm256_maskload_ps(gate + i, mask));
    if (bf16) act = round_bf16_8(act);
    _mm256_maskstore_ps(out + i, mask, _mm256_mul_ps(act, _mm256_maskload_ps(up + i, mask)));
  }
}

template <Gate G>
void gate_products(Isa form, const float* gate, const float* up, float* out, int64_t count, bool bf16) {
  if (form == Isa::kAvx512) {
    gate_products_avx512<G>(gate, up, out, count, bf16);
  } else {
    gate_products_avx2<G>(gate, up, out, count, bf16);
  }
}

// `rows` int8 rows of k times their scales, rounded to bfloat16 (to nearest, ties to even, as torch's .to).
CHAT_AVX512 void dequantize_rows_bf16(const int8_t* w, const float* scales, int64_t rows, int64_t k,
                                      at::BFloat16* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 scale = _mm512_set1_ps(scales[i]);
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 mask = lanes_below16(k - c);
      store16_tail(mask, out + i * k + c, round_bf16(_mm512_mul_ps(load16_tail(mask, w + i * k + c), scale)));
    }
  }
}

// `rows` int4 rows of k (int4.h) made whole, d * q + m rounded to bfloat16 as int4_weights_torch then .to would.
CHAT_AVX512 void dequantize_rows_int4(const uint8_t* w, const at::Half* scales, int64_t rows, int64_t k,
                                      at::BFloat16* out) {
  const int64_t groups = k / kInt4Group;
  std::vector<float> dm(2 * groups);
  for (int64_t i = 0; i < rows; ++i) {
    int4_scales_avx512(scales + i * 2 * groups, groups, dm.data());
    for (int64_t b = 0; b < k / 2; b += 16) {  // 16 bytes: 16 weights of a run's first group, 16 of its second
      const int64_t run = b / 32, j = b % 32;
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i * k / 2 + b)));
      const __m512 levels[2] = {_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))),
                                _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4))};
      for (int half = 0; half < 2; ++half) {
        const int64_t g = 2 * run + half;
        const __m512 v = _mm512_add_ps(_mm512_mul_ps(levels[half], _mm512_set1_ps(dm[g])), _mm512_set1_ps(dm[groups + g]));
        store16_tail(0xFFFF, out + i * k + kInt4Run * run + 32 * half + j, round_bf16(v));
      }
    }
  }
}

// act(gate) * up for w holding the gate rows, then the up rows: one op for a gated MLP's first half. In
// bfloat16 each step rounds as torch's ops do: gate and up, act(gate), then the product. op names the op.
template <Gate G>
at::Tensor gated_matvec(const at::Tensor& w_in, const at::Tensor& x_in, std::optional<double> unit_norm,
                        const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales,
                        const char* op) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) % 2 == 0, op, ": w needs an even number of rows");
  check_scales(w_in, scales, op);
  if (unit_norm && norm_weight) {
    return gated_matvec<G>(w_in, rms_norm(x_in, *unit_norm, *norm_weight), {}, {}, scales, op);
  }
  const int64_t half = w_in.size(0) / 2;
  const Isa form = matvec_form(w_in, x_in);
  if (form == Isa::kTorch || (unit_norm && x_in.scalar_type() != at::kFloat)) {
    const auto gate_up = mv_torch(w_in, unit_norm_fallback(x_in, unit_norm), scales).chunk(2);
    return (G == Gate::kSilu ? at::silu(gate_up[0]) : at::gelu(gate_up[0], "tanh")) * gate_up[1];
  }
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  std::vector<float> sums(w.size(0));
  float* sp = sums.data();
  at::Tensor out = at::empty({half}, x.options());
  if (x.scalar_type() == at::kFloat) {
    const float norm_scale = unit_norm_scale(x, unit_norm);
    row_sums(form, w, x, scales, [sp, norm_scale](int64_t i, float s) { sp[i] = s * norm_scale; });
    gate_products<G>(form, sp, sp + half, out.data_ptr<float>(), half, false);
  } else {
    row_sums(form, w, x, scales, [sp](int64_t i, float s) { sp[i] = static_cast<float>(at::BFloat16(s)); });
    gate_products<G>(form, sp, sp + half, sp, half, true);
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < half; ++i) o[i] = at::BFloat16(sp[i]);
  }
  return out;
}

}  // namespace

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

// silu(gate) * up for w holding the gate rows, then the up rows: one op for a gated MLP's first half. In
// bfloat16 each step rounds as torch's ops do: gate and up, silu(gate), then the product.
at::Tensor silu_mul_matvec(const at::Tensor& w, const at::Tensor& x, std::optional<double> unit_norm,
                           const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales) {
  return gated_matvec<Gate::kSilu>(w, x, unit_norm, norm_weight, scales, "chat::silu_mul_matvec");
}

// silu_mul_matvec with gelu(gate, approximate='tanh') for silu (GeGLU).
at::Tensor gelu_tanh_mul_matvec(const at::Tensor& w, const at::Tensor& x, std::optional<double> unit_norm,
                                const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales) {
  return gated_matvec<Gate::kGeluTanh>(w, x, unit_norm, norm_weight, scales, "chat::gelu_tanh_mul_matvec");
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

// int8 weights times their rows' scales, as a tensor of dtype: the weights of a prefill's matmul (many tokens
// at once, where a matmul on torch's kernels beats a pass of the int8 weights per token).
at::Tensor dequantize(const at::Tensor& w_in, const at::Tensor& scales, const at::Tensor& like) {
  check_scales(w_in, scales, "chat::dequantize");
  const at::ScalarType dtype = like.scalar_type();
  if (w_in.scalar_type() == at::kByte) {
    const at::Tensor w = w_in.contiguous(), s = scales.contiguous();
    if (dtype != at::kBFloat16 || isa() != Isa::kAvx512) return int4_weights_torch(w, s).to(dtype);
    const int64_t k = row_width(w);
    at::Tensor out = at::empty({w.size(0), k}, w.options().dtype(dtype));
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const at::Half* sp = s.data_ptr<at::Half>();
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    at::parallel_for(0, w.size(0), kGrain, [&](int64_t begin, int64_t end) {
      dequantize_rows_int4(wp + begin * k / 2, sp + begin * 2 * (k / kInt4Group), end - begin, k, o + begin * k);
    });
    return out;
  }
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

}  // namespace chat_native
