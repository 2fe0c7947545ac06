// The CPU and CUDA kernels of dsa_indexer_loss (docs/design.md §18): plain ATen in lse's dtype,
// streamed over chunks of queries so that no (S × S) tensor ever exists. A chunk holds its
// (rows × H × n) teacher scores and (rows × H_I × n) indexer scores, n the keys its rows may see,
// each within the chunk budget (chunk_rows) or one query's worth; the backward recomputes both per
// chunk from the inputs (docs/design.md §18.3).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "torch_mla/layer/chunking.h"
#include "torch_mla/layer/indexer_loss_checks.h"
#include "torch_mla/layer/sequences.h"
#include "torch_mla/layer/sparse_checks.h"

namespace torch_mla {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One call's tensors flattened to the packed (T, ...) layout, and its sizes.
struct Call {
  IndexerLossDims d;
  Sequences seqs;
  at::ScalarType acc;                     // lse's dtype: every product and sum is taken in it
  at::Tensor index_q, index_k, weights;   // (T, H_I, D_I), (T, D_I), (T, H_I)
  at::Tensor q, kv_latent, k_rope, lse;   // (T, H, Dn+Dr), (T, Dc), (T, Dr), (T, H)
  at::Tensor w_k;                         // (H, Dn, Dc) in acc: the key half of wkv_b per head
  at::Tensor topk;                        // (T, k) int64 in sparse mode, else undefined
  double scale;
  int64_t heads, index_heads, dim_nope;
};

// Checks, the sequence list (cu_seqlens read once on the host, read_on_host: this op is not on the
// attention's hot path) and, in sparse mode, topk_indices' entries as mla_sparse_attention checks
// them (§16.3: by row on CPU tensors, a device-side assert on CUDA).
Call prepare(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights, const at::Tensor& q,
             const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b, const at::Tensor& lse,
             double softmax_scale, const std::optional<at::Tensor>& topk_indices,
             const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, IndexerLossDims d) {
  Call c;
  c.d = d;
  c.seqs = naming_errors_as(kIndexerLossOp, [&] { return make_sequences(d.mla, cu_seqlens, max_seqlen, true); });
  c.acc = lse.scalar_type();
  const int64_t T = c.seqs.tokens;
  c.heads = d.mla.heads.expect_int();
  c.index_heads = d.index.heads.expect_int();
  c.dim_nope = d.mla.dim_nope.expect_int();
  // Explicit sizes: a reshape to -1 is ambiguous when T = 0.
  c.index_q = index_q.reshape({T, c.index_heads, index_q.size(-1)});
  c.index_k = index_k.reshape({T, index_k.size(-1)});
  c.weights = weights.reshape({T, c.index_heads});
  c.q = q.reshape({T, c.heads, q.size(-1)});
  c.kv_latent = kv_latent.reshape({T, kv_latent.size(-1)});
  c.k_rope = k_rope.reshape({T, k_rope.size(-1)});
  c.lse = lse.reshape({T, c.heads});
  c.w_k = wkv_b.view({c.heads, c.dim_nope + d.mla.dim_v.expect_int(), -1}).narrow(1, 0, c.dim_nope).to(c.acc);
  c.scale = softmax_scale;
  if (d.sparse && T > 0) {
    if (topk_indices->is_cpu()) {
      naming_errors_as(kIndexerLossOp, [&] { return check_topk_values_on_host(*topk_indices, c.seqs); });
    } else {
      at::Tensor rows_len = at::empty({T}, at::kLong);
      for (const SeqSpan& span : c.seqs.spans) rows_len.narrow(0, span.begin, span.len).fill_(span.len);
      assert_topk_values_on_device(*topk_indices, rows_len.to(q.device()));
    }
    c.topk = topk_indices->reshape({T, topk_indices->size(-1)}).to(at::kLong);
  }
  return c;
}

// A sequence's key rows in acc: the teacher's [c | k_rope] (len, Dc+Dr) and the indexer's (len, D_I).
struct SpanKeys {
  at::Tensor teacher, index;
};

SpanKeys span_keys(const Call& c, const SeqSpan& span) {
  return {at::cat({c.kv_latent.narrow(0, span.begin, span.len), c.k_rope.narrow(0, span.begin, span.len)}, 1)
              .to(c.acc),
          c.index_k.narrow(0, span.begin, span.len).to(c.acc)};
}

// The chunk budget: layer/chunking.h's (a test hook may lower it), at most 2^22 elements (16 MiB
// in float32) as the sparse composed core's chunks.
constexpr int64_t kMaxChunkElements = int64_t{1} << 22;

// Queries per chunk: the largest (rows × max(H, H_I) × n) score tensor, and in sparse mode the
// gathered (rows × k × (Dc+Dr)) key rows, stay within the budget; at least one query.
int64_t chunk_rows(const Call& c, const SeqSpan& span) {
  const int64_t columns = c.d.sparse ? c.topk.size(1) * std::max({c.heads, c.index_heads, c.kv_latent.size(1) +
                                                                      c.k_rope.size(1), c.index_k.size(1)})
                                     : std::max(c.heads, c.index_heads) * span.len;
  const int64_t budget = std::min(chunk_elements(), kMaxChunkElements);
  return std::clamp<int64_t>(budget / std::max<int64_t>(columns, 1), 1, span.len);
}

// Queries [q0, q0 + rows) of a sequence against their n key columns: dense mode the sequence's
// first n = q0 + rows keys (shared by the rows), sparse mode each row's k selected keys (gathered).
struct Chunk {
  at::Tensor valid;       // (rows, n) bool: the column is in V_t
  at::Tensor p;           // (rows, n) the teacher, 0 outside V_t
  at::Tensor log_q;       // (rows, n) the indexer's log_softmax over V_t, -inf outside
  at::Tensor relu;        // (rows, H_I, n) ReLU(index_q · index_k)
  at::Tensor index_q;     // (rows, H_I, D_I) in acc
  at::Tensor weights;     // (rows, H_I) in acc
  at::Tensor index_keys;  // (n, D_I) shared or (rows, n, D_I) gathered
  at::Tensor key_rows;    // sparse mode: (rows, n) int64 rows of the packed layout; else undefined
};

Chunk chunk_scores(const Call& c, const SpanKeys& keys, const SeqSpan& span, int64_t q0, int64_t rows) {
  Chunk k;
  const int64_t t0 = span.begin + q0;
  const auto longs = c.q.options().dtype(at::kLong);
  const at::Tensor position = at::arange(q0, q0 + rows, longs).unsqueeze(1);
  at::Tensor teacher_keys;
  if (c.d.sparse) {
    const at::Tensor idx = c.topk.narrow(0, t0, rows);
    k.valid = idx.ge(0) & idx.le(position);
    const at::Tensor safe = at::where(k.valid, idx, 0);
    const int64_t n = idx.size(1);
    teacher_keys = keys.teacher.index_select(0, safe.flatten()).view({rows, n, -1});
    k.index_keys = keys.index.index_select(0, safe.flatten()).view({rows, n, -1});
    k.key_rows = safe + span.begin;
  } else {
    const int64_t n = q0 + rows;
    k.valid = at::arange(n, longs).unsqueeze(0).le(position);
    teacher_keys = keys.teacher.narrow(0, 0, n);
    k.index_keys = keys.index.narrow(0, 0, n);
  }
  const at::Tensor outside = k.valid.logical_not();

  // The teacher (docs/design.md §18.1), absorbed as in §16.1: qa_h = [q_nope_h · Wk_h | q_rope_h]
  // against the key rows [c | k_rope].
  const at::Tensor qc = c.q.narrow(0, t0, rows).to(c.acc);
  const at::Tensor qa = at::cat({at::matmul(qc.narrow(2, 0, c.dim_nope).transpose(0, 1), c.w_k).transpose(0, 1),
                                 qc.narrow(2, c.dim_nope, qc.size(2) - c.dim_nope)},
                                2);
  // A head whose lse is -inf (no key in a sparse row) has no probability anywhere.
  const at::Tensor lse = c.lse.narrow(0, t0, rows).to(c.acc);
  at::Tensor probs = at::matmul(qa, teacher_keys.transpose(-1, -2));  // (rows, H, n)
  probs.mul_(c.scale).sub_(lse.masked_fill(lse.eq(-kInf), kInf).unsqueeze(-1)).exp_();
  probs.masked_fill_(outside.unsqueeze(1), 0);
  const at::Tensor mass = probs.sum(1);
  probs.reset();
  const at::Tensor total = mass.sum(-1, /*keepdim=*/true);
  k.p = mass / at::where(total.gt(0), total, at::ones_like(total));

  // The student: I = Σ_j w_j · ReLU(index_q_j · index_k), log_softmax over V_t.
  k.index_q = c.index_q.narrow(0, t0, rows).to(c.acc);
  k.weights = c.weights.narrow(0, t0, rows).to(c.acc);
  k.relu = at::matmul(k.index_q, k.index_keys.transpose(-1, -2)).relu_();
  at::Tensor scores = at::matmul(k.weights.unsqueeze(1), k.relu).squeeze(1).masked_fill_(outside, -kInf);
  const at::Tensor lse_scores = scores.logsumexp(-1, /*keepdim=*/true);
  // An empty V_t: every column -inf, log_q -inf (the row's p is 0 too, so its terms vanish).
  k.log_q = scores.sub_(at::where(lse_scores.eq(-kInf), at::zeros_like(lse_scores), lse_scores));
  return k;
}

std::vector<int64_t> kl_shape(const at::Tensor& lse) { return lse.sizes().slice(0, lse.dim() - 1).vec(); }

at::Tensor dsa_indexer_loss_device(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                                   const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                   const at::Tensor& wkv_b, const at::Tensor& lse, double softmax_scale,
                                   const std::optional<at::Tensor>& topk_indices,
                                   const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const KernelDtypeGuard no_autocast;
  const c10::OptionalDeviceGuard device_guard(q.device());
  const IndexerLossDims d = check_indexer_loss_inputs(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
                                                      topk_indices, cu_seqlens, max_seqlen);
  const Call c = prepare(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale, topk_indices,
                         cu_seqlens, max_seqlen, d);
  at::Tensor kl = at::zeros({c.seqs.tokens}, lse.options());
  for (const SeqSpan& span : c.seqs.spans) {
    if (span.len == 0) continue;
    const SpanKeys keys = span_keys(c, span);
    const int64_t step = chunk_rows(c, span);
    for (int64_t q0 = 0; q0 < span.len; q0 += step) {
      const int64_t rows = std::min(step, span.len - q0);
      const Chunk k = chunk_scores(c, keys, span, q0, rows);
      // Σ p (log p − log q) over V_t; terms with p = 0 are 0.
      const at::Tensor terms = at::where(k.p.gt(0), k.p * (k.p.log() - k.log_q), at::zeros_like(k.p));
      kl.narrow(0, span.begin + q0, rows).copy_(terms.sum(-1));
    }
  }
  return kl.view(kl_shape(lse));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dsa_indexer_loss_backward_device(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, double softmax_scale, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const KernelDtypeGuard no_autocast;
  const c10::OptionalDeviceGuard device_guard(q.device());
  const IndexerLossDims d = check_indexer_loss_backward_inputs(
      grad_kl, index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, topk_indices, cu_seqlens, max_seqlen);
  const Call c = prepare(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale, topk_indices,
                         cu_seqlens, max_seqlen, d);
  const at::Tensor grad = grad_kl.reshape({c.seqs.tokens}).to(c.acc);
  const auto acc = index_q.options().dtype(c.acc);
  at::Tensor grad_index_q = at::zeros(c.index_q.sizes(), acc);
  at::Tensor grad_index_k = at::zeros(c.index_k.sizes(), acc);
  at::Tensor grad_weights = at::zeros(c.weights.sizes(), acc);
  for (const SeqSpan& span : c.seqs.spans) {
    if (span.len == 0) continue;
    const SpanKeys keys = span_keys(c, span);
    const int64_t step = chunk_rows(c, span);
    for (int64_t q0 = 0; q0 < span.len; q0 += step) {
      const int64_t rows = std::min(step, span.len - q0), t0 = span.begin + q0;
      Chunk k = chunk_scores(c, keys, span, q0, rows);
      // dkl/dI = softmax(I) − p on V_t (both 0 outside), times the incoming gradient.
      const at::Tensor g = (k.log_q.exp_() - k.p).mul_(grad.narrow(0, t0, rows).unsqueeze(1));
      grad_weights.narrow(0, t0, rows).copy_(at::matmul(k.relu, g.unsqueeze(-1)).squeeze(-1));
      // dI/dlogit_j = w_j · ReLU'(logit_j), ReLU'(0) = 0: the ReLU tensor becomes the logits' gradient.
      at::Tensor grad_logits = k.relu.gt_(0).mul_(g.unsqueeze(1)).mul_(k.weights.unsqueeze(-1));
      grad_index_q.narrow(0, t0, rows).copy_(at::matmul(grad_logits, k.index_keys));
      const int64_t heads = c.index_heads, dim = c.index_k.size(1);
      if (c.d.sparse) {
        const at::Tensor per_column = at::matmul(grad_logits.transpose(1, 2), k.index_q);  // (rows, k, D_I)
        grad_index_k.index_add_(0, k.key_rows.flatten(), per_column.reshape({-1, dim}));
      } else {
        const int64_t n = k.index_keys.size(0);
        grad_index_k.narrow(0, span.begin, n)
            .add_(at::matmul(grad_logits.reshape({rows * heads, n}).t(), k.index_q.reshape({rows * heads, dim})));
      }
    }
  }
  return {grad_index_q.to(index_q.scalar_type()).view(index_q.sizes()),
          grad_index_k.to(index_k.scalar_type()).view(index_k.sizes()),
          grad_weights.to(weights.scalar_type()).view(weights.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CPU, m) {
  m.impl("dsa_indexer_loss", TORCH_FN(dsa_indexer_loss_device));
  m.impl("dsa_indexer_loss_backward", TORCH_FN(dsa_indexer_loss_backward_device));
}

TORCH_LIBRARY_IMPL(torch_mla, CUDA, m) {
  m.impl("dsa_indexer_loss", TORCH_FN(dsa_indexer_loss_device));
  m.impl("dsa_indexer_loss_backward", TORCH_FN(dsa_indexer_loss_backward_device));
}

}  // namespace torch_mla
