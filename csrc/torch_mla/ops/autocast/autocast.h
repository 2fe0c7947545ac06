#pragma once
// The one autocast rule of torch_mla's ops: inside torch.autocast an op runs in the autocast dtype,
// as the linear layers around it do (a float32 RMSNorm output or parameter is cast), with autocast
// switched off below it so that every kernel it reaches sees one dtype. No backward needs an
// autocast kernel: the kernels compute in the dtype of the tensors the forward saved.
#include <ATen/autocast_mode.h>

namespace torch_mla {

template <c10::DeviceType device_type>
struct AutocastScope {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{at::autocast::get_autocast_dispatch_key_from_device_type(device_type)};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);

  at::Tensor cast(const at::Tensor& t) const { return at::autocast::cached_cast(dtype, t, device_type); }
};

}  // namespace torch_mla
