// The CPU and CUDA kernel of dsa_indexer_topk (docs/design.md §17): plain ATen, streamed over
// blocks of kQueryBlock queries so that no (S × S) or (S × H_I × S) tensor ever exists.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/indexer_checks.h"
#include "torch_mla/layer/math.h"
#include "torch_mla/layer/sequences.h"

namespace torch_mla {
namespace {

constexpr const char* kOp = "torch_mla.dsa_indexer_topk: ";

// One step holds the (kQueryBlock·kHeadBlock × L) logits of a head block, the (kQueryBlock × L)
// score sum and its stable sort, L ≤ S the keys visible to the block: the bound of §17.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kHeadBlock = 8;

// The spans of the call's sequences in the flattened (T, ...) layout; a packed call reads
// cu_seqlens once on the host (read_on_host: a device sync on CUDA) and checks its values.
std::vector<SeqSpan> indexer_spans(const IndexerDims& d, const std::optional<at::Tensor>& cu_seqlens,
                                   int64_t max_seqlen) {
  const int64_t count = d.batch.expect_int();
  std::vector<SeqSpan> spans;
  spans.reserve(count);
  if (d.varlen) {
    const at::Tensor cu_host = read_on_host(*cu_seqlens);
    naming_errors_as(kOp, [&] { return check_cu_seqlens_values(cu_host, d.tokens.expect_int(), max_seqlen); });
    const int32_t* v = cu_host.data_ptr<int32_t>();
    for (int64_t b = 0; b < count; ++b) spans.push_back(sequence_span(v, b, 0));
  } else {
    const int64_t seqlen = d.seqlen.expect_int();
    TORCH_CHECK_VALUE(max_seqlen == 0 || count == 0 || seqlen <= max_seqlen, kOp, "max_seqlen (", max_seqlen,
                      ") is smaller than the longest sequence (S = ", seqlen, ")");
    for (int64_t b = 0; b < count; ++b) spans.push_back(sequence_span(nullptr, b, seqlen));
  }
  return spans;
}

// The scores of queries [q0, q0 + rows) of one sequence against its keys [0, q0 + rows), in the
// accumulation dtype: Σ_j w[t, j] · ReLU(q[t, j] · k[s]), -inf where s > t. Each element is one
// GEMM dot product, then a multiply and an add per head in head order: elementwise ATen ops round
// once per element wherever it lies, so equal terms give equal scores (the tie rule needs them).
at::Tensor block_scores(const at::Tensor& q, const at::Tensor& w, const at::Tensor& keys, int64_t q0,
                        at::ScalarType acc) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2), visible = keys.size(0);
  at::Tensor scores = at::zeros({rows, visible}, keys.options());
  for (int64_t h0 = 0; h0 < heads; h0 += kHeadBlock) {
    const int64_t hb = std::min(kHeadBlock, heads - h0);
    const at::Tensor qb = q.narrow(1, h0, hb).to(acc).reshape({rows * hb, dim});
    at::Tensor logits = at::mm(qb, keys.t()).view({rows, hb, visible});
    logits.relu_().mul_(w.narrow(1, h0, hb).to(acc).unsqueeze(-1));
    for (int64_t j = 0; j < hb; ++j) scores.add_(logits.select(1, j));
  }
  const auto opts = keys.options().dtype(at::kLong);
  const at::Tensor later = at::arange(visible, opts).unsqueeze(0) > at::arange(q0, q0 + rows, opts).unsqueeze(1);
  return scores.masked_fill_(later, -std::numeric_limits<double>::infinity());
}

std::tuple<at::Tensor, at::Tensor> dsa_indexer_topk_device(const at::Tensor& index_q, const at::Tensor& index_k,
                                                           const at::Tensor& weights, int64_t topk,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           c10::SymInt max_seqlen_arg) {
  KernelDtypeGuard no_autocast;
  const IndexerDims d = check_indexer_inputs(index_q, index_k, weights, topk, cu_seqlens, max_seqlen_arg);
  const int64_t max_seqlen = max_seqlen_arg.expect_int();
  const std::vector<SeqSpan> spans = indexer_spans(d, cu_seqlens, max_seqlen);
  const int64_t tokens = d.tokens.expect_int(), heads = d.heads.expect_int(), dim = d.dim.expect_int();
  const at::ScalarType acc = lse_dtype(index_q.scalar_type());

  const at::Tensor q = index_q.reshape({tokens, heads, dim});
  const at::Tensor k = index_k.reshape({tokens, dim});
  const at::Tensor w = weights.reshape({tokens, heads});
  at::Tensor indices = at::full({tokens, topk}, -1, index_q.options().dtype(at::kInt));
  at::Tensor scores =
      at::full({tokens, topk}, -std::numeric_limits<double>::infinity(), index_q.options().dtype(acc));

  for (const SeqSpan& span : spans) {
    const at::Tensor keys = k.narrow(0, span.begin, span.len).to(acc);
    for (int64_t q0 = 0; q0 < span.len; q0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, span.len - q0), visible = q0 + rows;
      const at::Tensor s = block_scores(q.narrow(0, span.begin + q0, rows), w.narrow(0, span.begin + q0, rows),
                                        keys.narrow(0, 0, visible), q0, acc);
      // The tie rule: a stable sort keeps equal scores in ascending position. The masked keys
      // (-inf, all after the visible ones) sort after every visible key, even one scoring -inf.
      const auto sorted = at::sort(s, /*stable=*/true, /*dim=*/1, /*descending=*/true);
      const int64_t kept = std::min(topk, visible);
      const auto opts = s.options().dtype(at::kLong);
      const at::Tensor past = at::arange(kept, opts).unsqueeze(0) > at::arange(q0, q0 + rows, opts).unsqueeze(1);
      indices.narrow(0, span.begin + q0, rows).narrow(1, 0, kept)
          .copy_(std::get<1>(sorted).narrow(1, 0, kept).masked_fill(past, -1));
      scores.narrow(0, span.begin + q0, rows).narrow(1, 0, kept).copy_(std::get<0>(sorted).narrow(1, 0, kept));
    }
  }
  std::vector<int64_t> shape(index_q.sizes().begin(), index_q.sizes().end() - 1);
  shape.back() = topk;
  return {indices.view(shape), scores.view(shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CPU, m) {
  m.impl("dsa_indexer_topk", TORCH_FN(dsa_indexer_topk_device));
}

TORCH_LIBRARY_IMPL(torch_mla, CUDA, m) {
  m.impl("dsa_indexer_topk", TORCH_FN(dsa_indexer_topk_device));
}

}  // namespace torch_mla
