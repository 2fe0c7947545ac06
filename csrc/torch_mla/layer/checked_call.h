#pragma once
// One check per call (docs/design.md §10.1). The Autograd kernel of mla_attention needs the
// checked dims to pick the core, and the device kernel below it must check on its own when called
// without it (inference_mode, torch.compile's graphs, opcheck). The Autograd kernel therefore
// hands its checked dims down for the one redispatch it makes: a thread-local token naming the
// call's tensors, which the device kernel takes (once) when its tensors are those same tensors.
// A token cannot be forged from Python or through the schema, and a call on other tensors (a
// dispatch mode swapping them) finds no token and checks everything.
#include <ATen/core/Tensor.h>

#include <optional>

#include "torch_mla/layer/checks.h"

namespace torch_mla {

class CheckedCall {
 public:
  // Offers `dims`, checked for these tensors, to the device kernel this thread calls next.
  CheckedCall(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
              const std::optional<at::Tensor>& cu_seqlens, const MlaDims& dims);
  ~CheckedCall();
  CheckedCall(const CheckedCall&) = delete;
  CheckedCall& operator=(const CheckedCall&) = delete;

  // The dims checked for exactly these tensors, taken (a second take finds none); else nullopt.
  static std::optional<MlaDims> take(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                     const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens);

 private:
  const c10::TensorImpl *q_, *kv_latent_, *k_rope_, *wkv_b_, *cu_seqlens_;
  MlaDims dims_;
  CheckedCall* previous_;
  bool taken_ = false;
};

}  // namespace torch_mla
