// Autograd for rms_norm, registered at the Autograd key (every device): the forward saves x, the
// weight and the per-row rstd (float32), never a float32 copy of x or the output; the backward
// recomputes x̂ from them (docs/design.md §13.2).
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mla/layer/rms_norm.h"
#include "torch_mla/ops/rms_norm.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = rms_norm_with_rstd(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    if (!grad_outputs[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    RmsNormGrads g = rms_norm_backward(grad_outputs[0], saved[0], saved[1], saved[2],
                                       ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return {g.x, g.weight, at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RmsNormFunction::apply(x, weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("rms_norm", TORCH_FN(rms_norm_autograd));
}

}  // namespace torch_mla
