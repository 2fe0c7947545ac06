// The `composed` sparse core (docs/design.md §16.4): ATen only, any device and dtype, in the
// absorbed (MQA) form. Per head i: qa_i = [q_nope_i · Wk_i | q_rope_i], keys [c | k_rope], values c,
// ol_i = softmax(σ qa_i · K(S_t)) · c(S_t), out_i = ol_i · Wv_iᵀ. Computed in lse's dtype (float32, or
// float64 for float64 inputs), chunked over queries so that one chunk's gathered keys, scores and
// their gradients stay within kChunkElements (§16.4 states the bound).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/layer/checks.h"

namespace torch_mla {
namespace {

// Elements of one chunk's transients (in the compute dtype): 2^22, 16 MiB in float32. A chunk holds
// at least one query, so the bound is max(2^22, one query's transient).
constexpr int64_t kChunkElements = int64_t{1} << 22;

int64_t queries_per_chunk(const SparseProblem& p) {
  const int64_t dk = p.dim_latent + p.dim_rope;
  // Gathered keys and their gradient (k × dk each), four (H × k) score-sized tensors (scores,
  // probabilities, dP, dS) and three (H × dk) query-sized ones (qa, its gradient, ol).
  const int64_t per_query = 2 * p.topk * dk + 4 * p.heads * p.topk + 3 * p.heads * dk;
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(per_query, 1));
}

// One chunk of queries [begin, begin + n): the absorbed queries, the gathered key rows and the
// masked scores, all in the compute dtype.
struct ChunkScores {
  at::Tensor q_nope;  // (n, H, Dn)
  at::Tensor qa;      // (n, H, Dc+Dr)
  at::Tensor keys;    // (n, k, Dc+Dr): [c | k_rope] of each selected row (row 0 for −1 entries)
  at::Tensor scores;  // (n, H, k): σ qa·K, −inf where the entry is −1
};

ChunkScores chunk_scores(const SparseProblem& p, const at::Tensor& q, const at::Tensor& key_rows,
                         const at::Tensor& w_k, const at::Tensor& rows, int64_t begin, int64_t n,
                         at::ScalarType acc) {
  const at::Tensor qc = q.narrow(0, begin, n).to(acc);
  const at::Tensor rc = rows.narrow(0, begin, n);
  ChunkScores c;
  c.q_nope = qc.narrow(2, 0, p.dim_nope);
  c.qa = at::cat({at::einsum("thn,hnc->thc", {c.q_nope, w_k}), qc.narrow(2, p.dim_nope, p.dim_rope)}, 2);
  c.keys = key_rows.index_select(0, rc.clamp_min(0).reshape({-1})).view({n, p.topk, -1}).to(acc);
  c.scores = at::bmm(c.qa, c.keys.transpose(1, 2)).mul_(p.softmax_scale);
  c.scores.masked_fill_(rc.lt(0).unsqueeze(1), -std::numeric_limits<double>::infinity());
  return c;
}

// exp(scores − lse): 0 for −1 entries, and for every entry of a query with none (lse −inf, which is
// replaced by 0 so that −inf − −inf cannot make a NaN).
at::Tensor probabilities(const at::Tensor& scores, const at::Tensor& lse) {
  return (scores - lse.masked_fill(lse.isinf(), 0).unsqueeze(2)).exp();
}

SparseOutputs sparse_composed_forward(const SparseProblem& p, const at::Tensor& q, const at::Tensor& kv_latent,
                                      const at::Tensor& k_rope, const at::Tensor& w_k, const at::Tensor& w_v,
                                      const at::Tensor& rows) {
  const int64_t T = q.size(0);
  const at::ScalarType acc = lse_dtype(q.scalar_type());
  const at::Tensor key_rows = at::cat({kv_latent, k_rope}, 1);
  const at::Tensor wk = w_k.to(acc), wv = w_v.to(acc);
  SparseOutputs o;
  o.out = at::empty({T, p.heads, p.dim_v}, q.options());
  o.lse = at::empty({T, p.heads}, q.options().dtype(acc));
  if (p.max_logits) o.max_logits = at::full({p.heads}, -std::numeric_limits<double>::infinity(), o.lse.options());
  const int64_t chunk = queries_per_chunk(p);
  for (int64_t begin = 0; begin < T; begin += chunk) {
    const int64_t n = std::min(chunk, T - begin);
    const ChunkScores c = chunk_scores(p, q, key_rows, wk, rows, begin, n, acc);
    const at::Tensor lse = at::logsumexp(c.scores, 2);
    const at::Tensor ol = at::bmm(probabilities(c.scores, lse), c.keys.narrow(2, 0, p.dim_latent));
    o.out.narrow(0, begin, n).copy_(at::einsum("thc,hvc->thv", {ol, wv}));
    o.lse.narrow(0, begin, n).copy_(lse);
    if (p.max_logits) o.max_logits = at::maximum(o.max_logits, c.scores.amax({0, 2}));
  }
  return o;
}

SparseGrads sparse_composed_backward(const SparseProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& w_k,
                                     const at::Tensor& w_v, const at::Tensor& rows, const at::Tensor& /*out*/,
                                     const at::Tensor& lse) {
  const int64_t T = q.size(0), Dc = p.dim_latent;
  const at::ScalarType acc = lse_dtype(q.scalar_type());
  const at::Tensor key_rows = at::cat({kv_latent, k_rope}, 1);
  const at::Tensor wk = w_k.to(acc), wv = w_v.to(acc);
  // dK/dV scatter-add into one (T, Dc+Dr) accumulator in the compute dtype (float32 at least).
  at::Tensor grad_keys = at::zeros({T, Dc + p.dim_rope}, key_rows.options().dtype(acc));
  at::Tensor grad_wk = at::zeros_like(wk), grad_wv = at::zeros_like(wv);
  at::Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  const int64_t chunk = queries_per_chunk(p);
  for (int64_t begin = 0; begin < T; begin += chunk) {
    const int64_t n = std::min(chunk, T - begin);
    const ChunkScores c = chunk_scores(p, q, key_rows, wk, rows, begin, n, acc);
    const at::Tensor prob = probabilities(c.scores, lse.narrow(0, begin, n).to(acc));
    const at::Tensor values = c.keys.narrow(2, 0, Dc);
    // The one extra P·V: ol is not saved (§16.2), only dWv needs it.
    const at::Tensor ol = at::bmm(prob, values);
    const at::Tensor dout = grad_out.narrow(0, begin, n).to(acc);
    grad_wv.add_(at::einsum("thv,thc->hvc", {dout, ol}));
    const at::Tensor dol = at::einsum("thv,hvc->thc", {dout, wv});
    // D = rowsum(dol ⊙ ol) (= dout · out): from the recomputed float32 ol rather than the saved out,
    // whose bf16 rounding would leave dS = P·(dP − D) a residue where it is exactly 0 (a row
    // with one selected key), since ol is at hand anyway.
    const at::Tensor delta = (dol * ol).sum(2, /*keepdim=*/true);
    const at::Tensor dscores = prob * (at::bmm(dol, values.transpose(1, 2)) - delta) * p.softmax_scale;
    const at::Tensor dqa = at::bmm(dscores, c.keys);
    const at::Tensor dqa_latent = dqa.narrow(2, 0, Dc);
    grad_wk.add_(at::einsum("thn,thc->hnc", {c.q_nope, dqa_latent}));
    grad_q.narrow(0, begin, n).copy_(
        at::cat({at::einsum("thc,hnc->thn", {dqa_latent, wk}), dqa.narrow(2, Dc, p.dim_rope)}, 2));
    at::Tensor dkeys = at::bmm(dscores.transpose(1, 2), c.qa);
    dkeys.narrow(2, 0, Dc).add_(at::bmm(prob.transpose(1, 2), dol));
    // −1 entries gathered row 0 but their probabilities, hence these rows, are exactly 0.
    grad_keys.index_add_(0, rows.narrow(0, begin, n).clamp_min(0).reshape({-1}), dkeys.view({n * p.topk, -1}));
  }
  // Copies, never views of the one accumulator: the op's outputs must not alias each other.
  return {grad_q, grad_keys.narrow(1, 0, Dc).to(kv_latent.scalar_type(), false, /*copy=*/true),
          grad_keys.narrow(1, Dc, p.dim_rope).to(k_rope.scalar_type(), false, /*copy=*/true),
          grad_wk.to(w_k.scalar_type()),
          grad_wv.to(w_v.scalar_type())};
}

const SparseCore kComposed{"composed", sparse_composed_forward, sparse_composed_backward};
const SparseCoreRegistration registration(kComposed);

}  // namespace
}  // namespace torch_mla
