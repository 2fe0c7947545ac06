#pragma once
// RMSNorm, the one formula of torch_mla's norms (docs/design.md §13.2): Hugging Face's DeepSeek
// RMSNorm, y = weight · (x · rstd).to(x.dtype) with rstd = rsqrt(mean(x²) + eps) per row, the
// statistics in float32 (float64 for float64 x), the weight applied in x's dtype (type promotion
// as HF's `weight * hidden_states.to(input_dtype)`, so a float32 weight on bf16 x gives float32).
// Its backward needs only x, the weight and rstd: nothing else of the forward is kept.
#include <ATen/core/Tensor.h>


namespace torch_mla {

// Checks x (…, N) and weight (N,) for the op named by `op` ("torch_mla.rms_norm: " …);
// `x_name` and `weight_name` name them in the messages.
void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op,
                           const char* x_name = "x", const char* weight_name = "weight");

// rstd (…, 1) of x (…, N): rsqrt(mean(x²) + eps) in float32 (float64 for float64 x).
at::Tensor rms_norm_rstd(const at::Tensor& x, double eps);

// weight · (x · rstd).to(x.dtype): the norm's output from its saved statistic.
at::Tensor rms_norm_apply(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd);

struct RmsNormGrads {
  at::Tensor x, weight;  // undefined where not asked for
};

// The vector-Jacobian product of rms_norm_apply(x, weight, rms_norm_rstd(x, eps)) for grad_y
// (…, N, any float dtype), computed in rstd's dtype: with x̂ = x·rstd and g = grad_y·weight,
// dx = rstd·(g − x̂·mean(g·x̂)), dweight = Σ_rows grad_y·x̂.to(x.dtype).
RmsNormGrads rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& rstd, bool need_x, bool need_weight);

}  // namespace torch_mla
