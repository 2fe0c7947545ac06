// The `cpu` core (docs/design.md §10.2): a memory-lean flash-attention on ATen GEMM tiles.
//
// Forward: for every (sequence, head, query block) an online-softmax loop over key blocks; the
// extra memory per thread is one query-block × key-block score tile. Backward (docs/design.md
// §4.2): for every (sequence, head) a FlashAttention-2 loop (key blocks outer, query blocks inner)
// that accumulates dK/dV per key block and dQ in place. Scores, softmax and accumulators are in
// acc_t (float for bf16/fp16/fp32, double for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "torch_mla/cores/core.h"
#include "torch_mla/mla_math.h"

namespace torch_mla {
namespace {

// Tile sizes. The tests' sequence lengths (63, 64, 65, 127, 128, 129) sit on their edges.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

// The least work (FLOPs) a thread's chunk of items gets. Below it a problem runs on one thread:
// an OpenMP team costs more than it saves on small tiles, and spins badly when the machine's
// cores are busy with other processes.
constexpr double kMinChunkFlops = 1 << 24;

// Attention FLOPs of one head over all sequences: 2·(Dn+Dr+Dv) per visible (query, key) pair.
double attention_flops_per_head(const CoreProblem& p) {
  double pairs = 0;
  for (const SeqSpan& seq : p.seqs.spans) {
    const double n = static_cast<double>(seq.len);
    pairs += p.causal ? n * (n + 1) / 2 : n * n;
  }
  return 2.0 * pairs * static_cast<double>(p.dim_nope + p.dim_rope + p.dim_v);
}

// Items per chunk of at::parallel_for so that a chunk holds at least kMinChunkFlops.
int64_t grain_size(double total_flops, int64_t n_items) {
  if (n_items == 0 || total_flops <= 0) return 1;
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(kMinChunkFlops * n_items / total_flops)));
}

template <typename scalar_t>
void forward_kernel(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                    const at::Tensor& k_rope, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t H = p.heads, Dn = p.dim_nope, Dr = p.dim_rope, Dv = p.dim_v;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);

  struct QueryBlock { int64_t seq, q_begin; };
  std::vector<QueryBlock> blocks;
  for (int64_t s = 0; s < static_cast<int64_t>(p.seqs.spans.size()); ++s) {
    for (int64_t q0 = 0; q0 < p.seqs.spans[s].len; q0 += kBlockQ) blocks.push_back({s, q0});
  }
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const int64_t n_items = static_cast<int64_t>(blocks.size()) * H;
  const int64_t grain = grain_size(attention_flops_per_head(p) * H, n_items);

  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const QueryBlock& blk = blocks[item / H];
      const int64_t h = item % H;
      const SeqSpan& seq = p.seqs.spans[blk.seq];
      const int64_t q0 = blk.q_begin;
      const int64_t rows = std::min(kBlockQ, seq.len - q0);
      const at::Tensor q_tile = q.narrow(0, seq.begin + q0, rows).select(1, h).to(acc_opts.dtype());
      const at::Tensor qn = q_tile.narrow(1, 0, Dn);
      const at::Tensor qr = q_tile.narrow(1, Dn, Dr);

      at::Tensor acc = at::zeros({rows, Dv}, acc_opts);
      acc_t* acc_ptr = acc.data_ptr<acc_t>();
      std::vector<OnlineSoftmaxRow<acc_t>> softmax(rows);
      const int64_t k_end = visible_key_end(q0 + rows, seq.len, p.causal);
      for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, k_end - k0);
        const at::Tensor kv_tile = kv.narrow(0, seq.begin + k0, cols).select(1, h).to(acc_opts.dtype());
        const at::Tensor kr = k_rope.narrow(0, seq.begin + k0, cols).to(acc_opts.dtype());
        at::Tensor scores = at::mm(qn, kv_tile.narrow(1, 0, Dn).t()).addmm_(qr, kr.t());
        acc_t* s_ptr = scores.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s_row = s_ptr + r * cols;
          acc_t block_max = -std::numeric_limits<acc_t>::infinity();
          for (int64_t c = 0; c < cols; ++c) {
            s_row[c] = is_masked(q0 + r, k0 + c, p.causal) ? -std::numeric_limits<acc_t>::infinity()
                                                          : s_row[c] * scale;
            block_max = std::max(block_max, s_row[c]);
          }
          const acc_t factor = softmax[r].rescale_to(block_max);
          acc_t row_sum = 0;
          for (int64_t c = 0; c < cols; ++c) {
            s_row[c] = std::exp(s_row[c] - softmax[r].max);
            row_sum += s_row[c];
          }
          softmax[r].sum += row_sum;
          for (int64_t c = 0; c < Dv; ++c) acc_ptr[r * Dv + c] *= factor;
        }
        acc.addmm_(scores, kv_tile.narrow(1, Dn, Dv));
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < Dv; ++c) acc_ptr[r * Dv + c] /= softmax[r].sum;
        lse_ptr[(seq.begin + q0 + r) * H + h] = softmax[r].lse();
      }
      out.narrow(0, seq.begin + q0, rows).select(1, h).copy_(acc);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                     const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                     const at::Tensor& lse, at::Tensor& dq_acc, at::Tensor& dkv,
                     at::Tensor& dk_rope_per_head) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t H = p.heads, Dn = p.dim_nope, Dr = p.dim_rope, Dv = p.dim_v;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const int64_t n_seqs = static_cast<int64_t>(p.seqs.spans.size());

  // One item per (sequence, head): it alone writes that head's rows of dQ, dKV and dk_rope.
  // The backward does 2.5× the forward's FLOPs (docs/design.md §6).
  const int64_t grain = grain_size(2.5 * attention_flops_per_head(p) * H, n_seqs * H);
  at::parallel_for(0, n_seqs * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const SeqSpan& seq = p.seqs.spans[item / H];
      const int64_t h = item % H;
      if (seq.len == 0) continue;
      const at::Tensor q_seq = q.narrow(0, seq.begin, seq.len).select(1, h).to(acc_dtype);
      const at::Tensor do_seq = grad_out.narrow(0, seq.begin, seq.len).select(1, h).to(acc_dtype);
      // D_i = rowsum(dO ⊙ O), the softmax-backward correction term.
      const at::Tensor delta =
          (do_seq * out.narrow(0, seq.begin, seq.len).select(1, h).to(acc_dtype)).sum(1);
      const at::Tensor lse_seq = lse.narrow(0, seq.begin, seq.len).select(1, h).contiguous();
      const acc_t* delta_ptr = delta.data_ptr<acc_t>();
      const acc_t* lse_ptr = lse_seq.data_ptr<acc_t>();
      at::Tensor dq_seq = dq_acc.narrow(0, seq.begin, seq.len).select(1, h);

      for (int64_t k0 = 0; k0 < seq.len; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, seq.len - k0);
        const at::Tensor kv_tile = kv.narrow(0, seq.begin + k0, cols).select(1, h).to(acc_dtype);
        const at::Tensor kn = kv_tile.narrow(1, 0, Dn);
        const at::Tensor v = kv_tile.narrow(1, Dn, Dv);
        const at::Tensor kr = k_rope.narrow(0, seq.begin + k0, cols).to(acc_dtype);
        at::Tensor dk = at::zeros({cols, Dn}, kv_tile.options());
        at::Tensor dv = at::zeros({cols, Dv}, kv_tile.options());
        at::Tensor dkr = dk_rope_per_head.select(0, h).narrow(0, seq.begin + k0, cols);

        const int64_t q_first = first_query_seeing(k0, p.causal) / kBlockQ * kBlockQ;
        for (int64_t q0 = q_first; q0 < seq.len; q0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, seq.len - q0);
          const at::Tensor qn = q_seq.narrow(0, q0, rows).narrow(1, 0, Dn);
          const at::Tensor qr = q_seq.narrow(0, q0, rows).narrow(1, Dn, Dr);
          const at::Tensor d_out = do_seq.narrow(0, q0, rows);
          // P = exp(scale·S − lse): the forward's softmax, recomputed from the saved lse.
          at::Tensor probs = at::mm(qn, kn.t()).addmm_(qr, kr.t());
          acc_t* p_ptr = probs.data_ptr<acc_t>();
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t c = 0; c < cols; ++c) {
              acc_t& x = p_ptr[r * cols + c];
              x = is_masked(q0 + r, k0 + c, p.causal) ? acc_t(0) : std::exp(x * scale - lse_ptr[q0 + r]);
            }
          }
          dv.addmm_(probs.t(), d_out);
          // dS = P ⊙ (dO·Vᵀ − D), computed in place of dP.
          at::Tensor ds = at::mm(d_out, v.t());
          acc_t* ds_ptr = ds.data_ptr<acc_t>();
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t c = 0; c < cols; ++c) {
              ds_ptr[r * cols + c] = p_ptr[r * cols + c] * (ds_ptr[r * cols + c] - delta_ptr[q0 + r]);
            }
          }
          at::Tensor dq_rows = dq_seq.narrow(0, q0, rows);
          dq_rows.narrow(1, 0, Dn).addmm_(ds, kn, 1, scale);
          dq_rows.narrow(1, Dn, Dr).addmm_(ds, kr, 1, scale);
          dk.addmm_(ds.t(), qn, 1, scale);
          dkr.addmm_(ds.t(), qr, 1, scale);
        }
        at::Tensor dkv_tile = dkv.narrow(0, seq.begin + k0, cols).select(1, h);
        dkv_tile.narrow(1, 0, Dn).copy_(dk);
        dkv_tile.narrow(1, Dn, Dv).copy_(dv);
      }
    }
  });
}

CoreOutputs cpu_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                        const at::Tensor& k_rope) {
  at::Tensor out = at::empty({p.seqs.tokens, p.heads, p.dim_v}, q.options());
  at::Tensor lse = at::empty({p.seqs.tokens, p.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  const at::Tensor q3 = q.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_attention_cpu", [&] {
    forward_kernel<scalar_t>(p, q3, kv, k_rope, out, lse);
  });
  return {out, lse};
}

CoreGrads cpu_backward(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                       const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                       const at::Tensor& lse) {
  const int64_t T = p.seqs.tokens, H = p.heads;
  const auto acc_dtype = lse_dtype(q.scalar_type());
  at::Tensor dq_acc = at::zeros({T, H, p.dim_nope + p.dim_rope}, q.options().dtype(acc_dtype));
  at::Tensor dk_rope_per_head = at::zeros({H, T, p.dim_rope}, q.options().dtype(acc_dtype));
  // Every token belongs to exactly one sequence, so the kernel writes every row of dKV.
  at::Tensor dkv = at::empty({T, H, p.dim_nope + p.dim_v}, q.options());
  const at::Tensor q3 = q.contiguous(), out3 = out.contiguous(), do3 = grad_out.contiguous();
  const at::Tensor lse2 = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, do3, q3, kv, k_rope, out3, lse2, dq_acc, dkv, dk_rope_per_head);
  });
  return {dq_acc, dkv, dk_rope_per_head.sum(0)};
}

const AttentionCore kCpu{"cpu", cpu_forward, cpu_backward};
const CoreRegistration kRegistration(kCpu);

}  // namespace
}  // namespace torch_mla
