// The dsa_indexer_topk op: its schema and typed entry point (kernels: device/, meta/, autograd/).
#include "torch_mla/ops/dsa_indexer_topk.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torch_mla {

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def("dsa_indexer_topk(Tensor index_q, Tensor index_k, Tensor weights, int topk, Tensor? cu_seqlens, "
        "SymInt max_seqlen) -> (Tensor indices, Tensor scores)",
        {at::Tag::pt2_compliant_tag});
}

std::tuple<at::Tensor, at::Tensor> dsa_indexer_topk(const at::Tensor& index_q, const at::Tensor& index_k,
                                                    const at::Tensor& weights, int64_t topk,
                                                    const std::optional<at::Tensor>& cu_seqlens,
                                                    int64_t max_seqlen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::dsa_indexer_topk", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t,
                                                                 const std::optional<at::Tensor>&, c10::SymInt)>();
  return op.call(index_q, index_k, weights, topk, cu_seqlens, c10::SymInt(max_seqlen));
}

}  // namespace torch_mla
