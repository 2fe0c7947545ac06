// The CompositeExplicitAutograd kernels of rms_norm: plain ATen (layer/rms_norm.h), so CPU, CUDA and
// Meta/fake tensors run the same code.
#include <torch/library.h>

#include <tuple>

#include "torch_mla/layer/rms_norm.h"

namespace torch_mla {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_with_rstd_composite(const at::Tensor& x, const at::Tensor& weight,
                                                                 double eps) {
  check_rms_norm_inputs(x, weight, "torch_mla.rms_norm: ");
  at::Tensor rstd = rms_norm_rstd(x, eps);
  return {rms_norm_apply(x, weight, rstd), rstd};
}

at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(rms_norm_with_rstd_composite(x, weight, eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", TORCH_FN(rms_norm_composite));
  m.impl("_rms_norm_with_rstd", TORCH_FN(rms_norm_with_rstd_composite));
}

}  // namespace torch_mla
