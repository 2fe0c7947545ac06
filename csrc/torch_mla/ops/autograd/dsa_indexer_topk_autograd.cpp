// dsa_indexer_topk at the Autograd key: the selection is discrete and its scores train nothing
// (the indexer learns from its own loss, docs/design.md §17), so the op runs below autograd and
// its outputs never require grad, whatever its inputs do.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torch_mla {
namespace {

std::tuple<at::Tensor, at::Tensor> dsa_indexer_topk_autograd(const at::Tensor& index_q, const at::Tensor& index_k,
                                                             const at::Tensor& weights, int64_t topk,
                                                             const std::optional<at::Tensor>& cu_seqlens,
                                                             c10::SymInt max_seqlen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::dsa_indexer_topk", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t,
                                                                 const std::optional<at::Tensor>&, c10::SymInt)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(index_q, index_k, weights, topk, cu_seqlens, std::move(max_seqlen));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("dsa_indexer_topk", TORCH_FN(dsa_indexer_topk_autograd));
}

}  // namespace torch_mla
