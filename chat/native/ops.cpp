// The ops' schemas and their registration as torch.ops.chat (kernels: matvec.cpp, attention.cpp).
//
// Ops, for w (n, k) and x (k,) of one dtype, float32 or bfloat16, or w of int8 with `scales`, one float32 per
// row (weights exported with --quantize int8: row i is w[i] * scales[i]; the products are summed in float32,
// then scaled, and the result has x's dtype), or w of int4, (n, k / 2) uint8 with bfloat16 x and `scales` the
// float16 steps and offsets of each group of 32 (--quantize int4: int4.h):
//   chat::matvec(w, x, unit_norm, norm_weight, scales) = w @ x, or w @ rmsnorm(x) when unit_norm (the norm's
//     eps term) is given: with norm_weight the norm as the exported module computes it (see rms_norm),
//     without it in float32 for a weight that holds the norm's weight (see unit_norm_scale);
//   chat::silu_mul_matvec(w, x, unit_norm, norm_weight, scales) = silu(gate) * up of the same, w = [gate; up];
//   chat::gelu_tanh_mul_matvec(w, x, unit_norm, norm_weight, scales) = gelu(gate, approximate='tanh') * up of the
//     same (GeGLU: Gemma);
//   chat::add_matvec(r, w, x, scales) = r + w @ x;
//   chat::dequantize(w, scales, like) = int8 or int4 w made whole, in like's dtype (a prefill's weights; like,
//     the prefill's input, is an argument so that freezing the module cannot fold the op into a constant: a
//     whole copy of the weights);
//   chat::cache_attend(qkv, cos, sin, k_cache, v_cache, positions, window, scale, softcap, sliding_window) =
//     RoPE, the cache write and attention over the filled cache, for one token: the attention half of a decode
//     layer in one op. Scores are q.k * scale (default 1/sqrt(head_dim); Gemma's query_pre_attn_scalar^-0.5,
//     Granite's attention_multiplier), then softcap * tanh(score / softcap) when softcap is given (Gemma 2);
//     a sliding_window W keeps the last W positions only (the cache write is the same).
// bfloat16 results round as torch's ops would, step by step (a product to bfloat16, then the sum with r:
// transformers adds a layer's output to the residual that way).

#include <torch/library.h>

#include <string>

#include "isa.h"
#include "ops.h"

namespace {

// Which form runs the kernels here, for !status: "avx512", "avx2", or "torch" (torch's own kernels).
std::string instruction_set() {
  switch (chat_native::isa()) {
    case chat_native::Isa::kAvx512: return "avx512";
    case chat_native::Isa::kAvx2: return "avx2";
    default: return "torch";
  }
}

}  // namespace

TORCH_LIBRARY(chat, m) {
  m.def("matvec(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, Tensor? scales=None) -> Tensor");
  m.def(
      "silu_mul_matvec(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, Tensor? scales=None) "
      "-> Tensor");
  m.def(
      "gelu_tanh_mul_matvec(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, "
      "Tensor? scales=None) -> Tensor");
  m.def("add_matvec(Tensor r, Tensor w, Tensor x, Tensor? scales=None) -> Tensor");
  m.def("dequantize(Tensor w, Tensor scales, Tensor like) -> Tensor");
  m.def(
      "cache_attend(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
      "Tensor window, float? scale=None, float? softcap=None, int? sliding_window=None) -> Tensor");
  m.def("instruction_set() -> str", &instruction_set);
}

TORCH_LIBRARY_IMPL(chat, CPU, m) {
  m.impl("matvec", &chat_native::matvec);
  m.impl("silu_mul_matvec", &chat_native::silu_mul_matvec);
  m.impl("gelu_tanh_mul_matvec", &chat_native::gelu_tanh_mul_matvec);
  m.impl("add_matvec", &chat_native::add_matvec);
  m.impl("dequantize", &chat_native::dequantize);
  m.impl("cache_attend", &chat_native::cache_attend);
}
