// The `composed` core (docs/design.md §10.2): the math of §4 in plain ATen ops, for any device and
// dtype — what no fused core takes (float64, odd head dims, devices without one). Chunked over
// heads and query rows so that no (S × S) score matrix of all heads is ever materialised. Scores,
// softmax and gradient accumulators are in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "torch_mla/cores/core.h"
#include "torch_mla/layer/chunking.h"

namespace torch_mla {
namespace {

// Query rows and heads per chunk for a sequence of `len` keys.
std::pair<int64_t, int64_t> chunk_sizes(int64_t len, int64_t heads) {
  // At most chunk_elements() scores (heads × query rows × keys) at a time (layer/chunking.h).
  const int64_t budget = chunk_elements();
  const int64_t rows = std::clamp<int64_t>(budget / len, 1, len);
  const int64_t chunk_heads = std::clamp<int64_t>(budget / (rows * len), 1, heads);
  return {rows, chunk_heads};
}

// The (heads, len, ·) operands of one (sequence, head chunk), in the accumulation dtype.
struct HeadChunk {
  at::Tensor q;  // (nh, L, Dn+Dr)
  at::Tensor k;  // (nh, L, Dn+Dr): [k_nope | k_rope]
  at::Tensor v;  // (nh, L, Dv)
};

// Rows of one sequence and a run of heads of a (T, H, ·) tensor, as (nh, L, ·) in `acc`.
at::Tensor seq_heads(const at::Tensor& t, const SeqSpan& seq, int64_t h0, int64_t nh, at::ScalarType acc) {
  return t.narrow(0, seq.begin, seq.len).narrow(1, h0, nh).transpose(0, 1).to(acc);
}

HeadChunk head_chunk(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& k_rope,
                     const SeqSpan& seq, int64_t h0, int64_t nh, at::ScalarType acc) {
  const at::Tensor kv_chunk = seq_heads(kv, seq, h0, nh, acc);
  const at::Tensor kr = k_rope.narrow(0, seq.begin, seq.len).to(acc);
  return {seq_heads(q, seq, h0, nh, acc),
          at::cat({kv_chunk.narrow(2, 0, p.dim_nope), kr.unsqueeze(0).expand({nh, seq.len, p.dim_rope})}, 2),
          kv_chunk.narrow(2, p.dim_nope, p.dim_v)};
}

// Scaled, masked scores of query rows [q0, q0 + rows) against all keys: (nh, rows, L).
at::Tensor scores(const HeadChunk& c, int64_t q0, int64_t rows, double scale, bool causal) {
  at::Tensor s = at::bmm(c.q.narrow(1, q0, rows), c.k.transpose(1, 2)).mul_(scale);
  if (causal) {
    const int64_t len = c.k.size(1);
    const auto opts = s.options().dtype(at::kLong);
    const at::Tensor masked = at::arange(len, opts).unsqueeze(0) > at::arange(q0, q0 + rows, opts).unsqueeze(1);
    s.masked_fill_(masked, -std::numeric_limits<double>::infinity());
  }
  return s;
}

CoreOutputs composed_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                             const at::Tensor& k_rope) {
  const int64_t T = p.seqs.tokens, H = p.heads;
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor out = at::empty({T, H, p.dim_v}, q.options());
  at::Tensor lse = at::empty({T, H}, q.options().dtype(acc));
  // max_logits from the scores this core materialises anyway (docs/design.md §12).
  at::Tensor max_logits =
      p.max_logits ? at::full({H}, -std::numeric_limits<double>::infinity(), lse.options()) : at::Tensor();
  for (const SeqSpan& seq : p.seqs.spans) {
    if (seq.len == 0) continue;
    const auto [rows, chunk_heads] = chunk_sizes(seq.len, H);
    for (int64_t h0 = 0; h0 < H; h0 += chunk_heads) {
      const int64_t nh = std::min(chunk_heads, H - h0);
      const HeadChunk c = head_chunk(p, q, kv, k_rope, seq, h0, nh, acc);
      for (int64_t q0 = 0; q0 < seq.len; q0 += rows) {
        const int64_t nq = std::min(rows, seq.len - q0);
        const at::Tensor s = scores(c, q0, nq, p.softmax_scale, p.causal);
        if (p.max_logits) {
          at::Tensor m = max_logits.narrow(0, h0, nh);
          m.copy_(at::maximum(m, s.amax({1, 2})));
        }
        const at::Tensor l = at::logsumexp(s, {-1});
        const at::Tensor o = at::bmm(s.sub_(l.unsqueeze(-1)).exp_(), c.v);
        out.narrow(0, seq.begin + q0, nq).narrow(1, h0, nh).copy_(o.transpose(0, 1));
        lse.narrow(0, seq.begin + q0, nq).narrow(1, h0, nh).copy_(l.transpose(0, 1));
      }
    }
  }
  return {out, lse, max_logits};
}

CoreGrads composed_backward(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                            const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                            const at::Tensor& lse) {
  const int64_t T = p.seqs.tokens, H = p.heads, Dn = p.dim_nope, Dv = p.dim_v;
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor dq = at::zeros({T, H, Dn + p.dim_rope}, q.options().dtype(acc));
  at::Tensor dkv = at::zeros({T, H, Dn + Dv}, q.options().dtype(acc));
  at::Tensor dk_rope = at::zeros({T, p.dim_rope}, q.options().dtype(acc));
  const at::Tensor lse3 = lse.unsqueeze(-1);  // (T, H, 1): seq_heads takes (T, H, ·)
  for (const SeqSpan& seq : p.seqs.spans) {
    if (seq.len == 0) continue;
    const auto [rows, chunk_heads] = chunk_sizes(seq.len, H);
    for (int64_t h0 = 0; h0 < H; h0 += chunk_heads) {
      const int64_t nh = std::min(chunk_heads, H - h0);
      const HeadChunk c = head_chunk(p, q, kv, k_rope, seq, h0, nh, acc);
      const at::Tensor d_o = seq_heads(grad_out, seq, h0, nh, acc);           // (nh, L, Dv)
      const at::Tensor delta = (d_o * seq_heads(out, seq, h0, nh, acc)).sum(-1);  // (nh, L)
      const at::Tensor row_lse = seq_heads(lse3, seq, h0, nh, acc).squeeze(-1);   // (nh, L)
      at::Tensor dk = at::zeros_like(c.k);
      at::Tensor dv = at::zeros_like(c.v);
      for (int64_t q0 = 0; q0 < seq.len; q0 += rows) {
        const int64_t nq = std::min(rows, seq.len - q0);
        const at::Tensor prob = scores(c, q0, nq, p.softmax_scale, p.causal)
                                    .sub_(row_lse.narrow(1, q0, nq).unsqueeze(-1))
                                    .exp_();
        const at::Tensor d_o_rows = d_o.narrow(1, q0, nq);
        const at::Tensor ds =
            at::bmm(d_o_rows, c.v.transpose(1, 2)).sub_(delta.narrow(1, q0, nq).unsqueeze(-1)).mul_(prob);
        dq.narrow(0, seq.begin + q0, nq).narrow(1, h0, nh).copy_(at::bmm(ds, c.k).mul_(p.softmax_scale).transpose(0, 1));
        dk.baddbmm_(ds.transpose(1, 2), c.q.narrow(1, q0, nq), 1, p.softmax_scale);
        dv.baddbmm_(prob.transpose(1, 2), d_o_rows);
      }
      at::Tensor dkv_rows = dkv.narrow(0, seq.begin, seq.len).narrow(1, h0, nh);
      dkv_rows.narrow(2, 0, Dn).copy_(dk.narrow(2, 0, Dn).transpose(0, 1));
      dkv_rows.narrow(2, Dn, Dv).copy_(dv.transpose(0, 1));
      dk_rope.narrow(0, seq.begin, seq.len).add_(dk.narrow(2, Dn, p.dim_rope).sum(0));
    }
  }
  return {dq, dkv, dk_rope};
}

const AttentionCore kComposed{"composed", composed_forward, composed_backward};
const CoreRegistration kRegistration(kComposed);

}  // namespace
}  // namespace torch_mla
