// RMSNorm's math (layer/rms_norm.h).
#include "torch_mla/layer/rms_norm.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace torch_mla {

void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op,
                           const char* x_name, const char* weight_name) {
  TORCH_CHECK_VALUE(x.defined() && weight.defined(), op, x_name, " and ", weight_name,
                    " must be defined tensors");
  TORCH_CHECK_VALUE(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op, x_name,
                    " must be a floating-point tensor of shape (..., N), got ", x.scalar_type(),
                    " of shape ", x.sym_sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.sym_size(0) == x.sym_size(-1), op, weight_name,
                    " must have shape (N,) with N = ", x.sym_size(-1), " (", x_name,
                    "'s last dimension), got shape ", weight.sym_sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()) && weight.device() == x.device(), op,
                    weight_name, " must be a floating-point tensor on ", x_name, "'s device (", x.device(),
                    "), got ", weight.scalar_type(), " on ", weight.device());
}

at::Tensor rms_norm_rstd(const at::Tensor& x, double eps) {
  const at::Tensor h = x.to(at::toOpMathType(x.scalar_type()));
  return at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
}

at::Tensor rms_norm_apply(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  return weight * (x.to(rstd.scalar_type()) * rstd).to(x.scalar_type());
}

RmsNormGrads rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& rstd, bool need_x, bool need_weight) {
  RmsNormGrads grads;
  const auto opmath = rstd.scalar_type();
  at::Tensor x_hat = x.to(opmath) * rstd;
  at::Tensor grad = grad_y.to(opmath);
  if (need_weight) {
    // The weight multiplies x̂ rounded to x's dtype (rms_norm_apply), so its grad does too.
    const at::Tensor y_hat = x_hat.to(x.scalar_type()).to(opmath);
    grads.weight = (grad * y_hat).reshape_symint({-1, x.sym_size(-1)}).sum(0).to(weight.scalar_type());
  }
  if (need_x) {
    // dx = rstd·(g − x̂·mean(g·x̂)) one step at a time, each input released once used: at most
    // three row-sized float buffers at once (this is part of the block's transient peak), and no
    // in-place op, so that a backward under create_graph stays differentiable.
    at::Tensor g = grad * weight.to(opmath);
    grad.reset();
    const at::Tensor g_dot_x_hat = (g * x_hat).mean(-1, /*keepdim=*/true);
    at::Tensor dx = x_hat * g_dot_x_hat;
    x_hat.reset();
    dx = g - dx;
    g.reset();
    grads.x = (dx * rstd).to(x.scalar_type());
  }
  return grads;
}

}  // namespace torch_mla
