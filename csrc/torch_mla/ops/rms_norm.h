#pragma once
// The rms_norm op (docs/design.md §13.2): its math is layer/rms_norm.h.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace torch_mla {

// The dispatcher op torch_mla::rms_norm (autograd included).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// The dispatcher op torch_mla::_rms_norm_with_rstd: (y, rstd), no autograd. What the autograd
// Function runs below the Autograd key, so that tracing and schema checks see one op.
std::tuple<at::Tensor, at::Tensor> rms_norm_with_rstd(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace torch_mla
