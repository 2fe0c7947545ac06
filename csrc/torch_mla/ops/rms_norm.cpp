// The rms_norm op: its schema and typed entry points (kernels: autograd/, composite/).
#include "torch_mla/ops/rms_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torch_mla {

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("_rms_norm_with_rstd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::rms_norm", "")
                       .typed<decltype(rms_norm)>();
  return op.call(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_with_rstd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::_rms_norm_with_rstd", "")
                       .typed<decltype(rms_norm_with_rstd)>();
  return op.call(x, weight, eps);
}

}  // namespace torch_mla
