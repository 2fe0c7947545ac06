// Composed-ATen CUDA path of mla_attention (see mla_fallback.h). Scores, softmax and gradient
// accumulators are in float32 (float64 for float64 inputs); K and V are expanded with one GEMM as
// in the kernels, and dkv_latent / dwkv_b come from the same two GEMMs.
#include "torch_mla/cuda/mla_fallback.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "torch_mla/mla_math.h"

namespace torch_mla::cuda {
namespace {

// Elements of one chunk's (heads × query rows × keys) score tensor: 2^25 (128 MiB in float32).
constexpr int64_t kChunkElements = int64_t{1} << 25;

std::vector<SeqSpan> host_sequences(const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens) {
  std::vector<SeqSpan> seqs;
  if (d.varlen) {
    check_cu_seqlens_values(*cu_seqlens, d.tokens.expect_int(), 0);
    const at::Tensor cu = cu_seqlens->to(at::kCPU).contiguous();
    for (int64_t b = 0; b + 1 < cu.numel(); ++b) seqs.push_back(sequence_span(cu.data_ptr<int32_t>(), b, 0));
  } else {
    for (int64_t b = 0; b < d.batch.expect_int(); ++b) seqs.push_back(sequence_span(nullptr, b, d.seqlen.expect_int()));
  }
  return seqs;
}

// Query rows and heads per chunk for a sequence of `len` keys.
std::pair<int64_t, int64_t> chunk_sizes(int64_t len, int64_t heads) {
  const int64_t rows = std::clamp<int64_t>(kChunkElements / len, 1, len);
  const int64_t chunk_heads = std::clamp<int64_t>(kChunkElements / (rows * len), 1, heads);
  return {rows, chunk_heads};
}

// The (heads, len, ·) operands of one (sequence, head chunk), in the accumulation dtype.
struct HeadChunk {
  at::Tensor q;  // (nh, L, Dn+Dr)
  at::Tensor k;  // (nh, L, Dn+Dr): [k_nope | k_rope]
  at::Tensor v;  // (nh, L, Dv)
};

HeadChunk head_chunk(const at::Tensor& q3, const at::Tensor& kv3, const at::Tensor& kr2, const SeqSpan& seq,
                     int64_t h0, int64_t nh, int64_t dim_nope, at::ScalarType acc) {
  const at::Tensor kv = kv3.narrow(0, seq.begin, seq.len).narrow(1, h0, nh).transpose(0, 1).to(acc);
  const at::Tensor kr = kr2.narrow(0, seq.begin, seq.len).to(acc);
  return {q3.narrow(0, seq.begin, seq.len).narrow(1, h0, nh).transpose(0, 1).to(acc),
          at::cat({kv.narrow(2, 0, dim_nope), kr.unsqueeze(0).expand({nh, seq.len, kr.size(1)})}, 2),
          kv.narrow(2, dim_nope, kv.size(2) - dim_nope)};
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> mla_attention_fallback(
    const MlaDims& d,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens) {
  const int64_t T = d.tokens.expect_int(), H = d.heads.expect_int(), Dn = d.dim_nope.expect_int();
  const int64_t Dr = d.dim_rope.expect_int(), Dv = d.dim_v.expect_int(), Dc = d.dim_latent.expect_int();
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor out = at::empty({T, H, Dv}, q.options());
  at::Tensor lse = at::empty({T, H}, q.options().dtype(acc));
  if (T > 0) {
    const at::Tensor q3 = q.reshape({T, H, Dn + Dr});
    const at::Tensor kr2 = k_rope.reshape({T, Dr});
    const at::Tensor kv3 = at::mm(kv_latent.reshape({T, Dc}), wkv_b.t()).view({T, H, Dn + Dv});
    for (const SeqSpan& seq : host_sequences(d, cu_seqlens)) {
      if (seq.len == 0) continue;
      const auto [rows, chunk_heads] = chunk_sizes(seq.len, H);
      for (int64_t h0 = 0; h0 < H; h0 += chunk_heads) {
        const int64_t nh = std::min(chunk_heads, H - h0);
        const HeadChunk c = head_chunk(q3, kv3, kr2, seq, h0, nh, Dn, acc);
        for (int64_t q0 = 0; q0 < seq.len; q0 += rows) {
          const int64_t nq = std::min(rows, seq.len - q0);
          const at::Tensor s = scores(c, q0, nq, softmax_scale, causal);
          const at::Tensor l = at::logsumexp(s, {-1});
          const at::Tensor o = at::bmm(s.sub_(l.unsqueeze(-1)).exp_(), c.v);
          out.narrow(0, seq.begin + q0, nq).narrow(1, h0, nh).copy_(o.transpose(0, 1));
          lse.narrow(0, seq.begin + q0, nq).narrow(1, h0, nh).copy_(l.transpose(0, 1));
        }
      }
    }
  }
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = Dv;
  return {out.view(out_shape), lse.view(q.sizes().slice(0, q.dim() - 1))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_fallback(
    const MlaDims& d,
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens) {
  const int64_t T = d.tokens.expect_int(), H = d.heads.expect_int(), Dn = d.dim_nope.expect_int();
  const int64_t Dr = d.dim_rope.expect_int(), Dv = d.dim_v.expect_int(), Dc = d.dim_latent.expect_int();
  const auto acc = lse_dtype(q.scalar_type());
  const at::Tensor c2 = kv_latent.reshape({T, Dc});
  at::Tensor dq = at::zeros({T, H, Dn + Dr}, q.options().dtype(acc));
  at::Tensor dkv = at::zeros({T, H, Dn + Dv}, q.options().dtype(acc));
  at::Tensor dk_rope = at::zeros({T, Dr}, q.options().dtype(acc));
  if (T > 0) {
    const at::Tensor q3 = q.reshape({T, H, Dn + Dr});
    const at::Tensor kr2 = k_rope.reshape({T, Dr});
    const at::Tensor do3 = grad_out.reshape({T, H, Dv});
    const at::Tensor o3 = out.reshape({T, H, Dv});
    const at::Tensor lse2 = lse.reshape({T, H});
    const at::Tensor kv3 = at::mm(c2, wkv_b.t()).view({T, H, Dn + Dv});
    for (const SeqSpan& seq : host_sequences(d, cu_seqlens)) {
      if (seq.len == 0) continue;
      const auto [rows, chunk_heads] = chunk_sizes(seq.len, H);
      for (int64_t h0 = 0; h0 < H; h0 += chunk_heads) {
        const int64_t nh = std::min(chunk_heads, H - h0);
        const HeadChunk c = head_chunk(q3, kv3, kr2, seq, h0, nh, Dn, acc);
        const auto seq_heads = [&](const at::Tensor& t) {
          return t.narrow(0, seq.begin, seq.len).narrow(1, h0, nh).transpose(0, 1).to(acc);
        };
        const at::Tensor d_o = seq_heads(do3);                        // (nh, L, Dv)
        const at::Tensor delta = (d_o * seq_heads(o3)).sum(-1);       // (nh, L)
        const at::Tensor row_lse = seq_heads(lse2);                   // (nh, L)
        at::Tensor dk = at::zeros_like(c.k);
        at::Tensor dv = at::zeros_like(c.v);
        for (int64_t q0 = 0; q0 < seq.len; q0 += rows) {
          const int64_t nq = std::min(rows, seq.len - q0);
          const at::Tensor p = scores(c, q0, nq, softmax_scale, causal)
                                   .sub_(row_lse.narrow(1, q0, nq).unsqueeze(-1))
                                   .exp_();
          const at::Tensor d_o_rows = d_o.narrow(1, q0, nq);
          const at::Tensor ds = at::bmm(d_o_rows, c.v.transpose(1, 2))
                                    .sub_(delta.narrow(1, q0, nq).unsqueeze(-1))
                                    .mul_(p);
          dq.narrow(0, seq.begin + q0, nq)
              .narrow(1, h0, nh)
              .copy_(at::bmm(ds, c.k).mul_(softmax_scale).transpose(0, 1));
          dk.baddbmm_(ds.transpose(1, 2), c.q.narrow(1, q0, nq), 1, softmax_scale);
          dv.baddbmm_(p.transpose(1, 2), d_o_rows);
        }
        at::Tensor dkv_rows = dkv.narrow(0, seq.begin, seq.len).narrow(1, h0, nh);
        dkv_rows.narrow(2, 0, Dn).copy_(dk.narrow(2, 0, Dn).transpose(0, 1));
        dkv_rows.narrow(2, Dn, Dv).copy_(dv.transpose(0, 1));
        dk_rope.narrow(0, seq.begin, seq.len).add_(dk.narrow(2, Dn, Dr).sum(0));
      }
    }
  }
  // dc = dKV · wkv_b and dwkv_b = dKVᵀ · c, dKV rounded to the input dtype as the kernels do.
  const at::Tensor dkv2 = dkv.to(q.scalar_type()).view({T, H * (Dn + Dv)});
  return {dq.to(q.scalar_type()).view(q.sizes()), at::mm(dkv2, wkv_b).view(kv_latent.sizes()),
          dk_rope.to(q.scalar_type()).view(k_rope.sizes()), at::mm(dkv2.t(), c2)};
}

}  // namespace torch_mla::cuda
