#include "torch_mla/layer/checked_call.h"

namespace torch_mla {
namespace {

thread_local CheckedCall* current = nullptr;

const c10::TensorImpl* impl_of(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->unsafeGetTensorImpl() : nullptr;
}

}  // namespace

CheckedCall::CheckedCall(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                         const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens, const MlaDims& dims)
    : q_(q.unsafeGetTensorImpl()),
      kv_latent_(kv_latent.unsafeGetTensorImpl()),
      k_rope_(k_rope.unsafeGetTensorImpl()),
      wkv_b_(wkv_b.unsafeGetTensorImpl()),
      cu_seqlens_(impl_of(cu_seqlens)),
      dims_(dims),
      previous_(current) {
  current = this;
}

CheckedCall::~CheckedCall() { current = previous_; }

std::optional<MlaDims> CheckedCall::take(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                         const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens) {
  CheckedCall* c = current;
  if (c == nullptr || c->taken_ || c->q_ != q.unsafeGetTensorImpl() ||
      c->kv_latent_ != kv_latent.unsafeGetTensorImpl() || c->k_rope_ != k_rope.unsafeGetTensorImpl() ||
      c->wkv_b_ != wkv_b.unsafeGetTensorImpl() || c->cu_seqlens_ != impl_of(cu_seqlens)) {
    return std::nullopt;
  }
  c->taken_ = true;
  return c->dims_;
}

}  // namespace torch_mla
