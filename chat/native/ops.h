// The ops' entry points (what each computes: ops.cpp), defined in matvec.cpp and attention.cpp and registered
// in ops.cpp.

#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace chat_native {

at::Tensor matvec(const at::Tensor& w, const at::Tensor& x, std::optional<double> unit_norm,
                  const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales);
at::Tensor silu_mul_matvec(const at::Tensor& w, const at::Tensor& x, std::optional<double> unit_norm,
                           const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales);
at::Tensor gelu_tanh_mul_matvec(const at::Tensor& w, const at::Tensor& x, std::optional<double> unit_norm,
                                const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& scales);
at::Tensor add_matvec(const at::Tensor& r, const at::Tensor& w, const at::Tensor& x,
                      const std::optional<at::Tensor>& scales);
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& like);
at::Tensor cache_attend(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                        const std::optional<at::Tensor>& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& positions, const at::Tensor& window, std::optional<double> scale,
                        std::optional<double> softcap, std::optional<int64_t> sliding_window);

}  // namespace chat_native
