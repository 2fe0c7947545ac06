// The `cpu` core (docs/design.md §10.2): a memory-lean flash-attention whose tiles call a GEMM on
// raw pointers (the BLAS torch links, cpu_blas.h); no at::Tensor is created inside the tile loops.
//
// Forward: one work item per (sequence, query block, head), an online-softmax loop over its key
// blocks. Backward (docs/design.md §4.2): one item per (sequence, head), a FlashAttention-2 loop
// (key blocks outer, query blocks inner) that accumulates dK/dV per key block and dQ in place.
// Scores, softmax and accumulators are in acc_t (float for bf16/fp16/fp32, double for fp64);
// 16-bit inputs are converted to acc_t tile by tile, fp32/fp64 ones are read in place.
//
// Threads: a problem runs on min(torch threads, FLOPs / kMinThreadFlops) threads, so a small one
// never starts an OpenMP team; the threads take items from a shared counter, largest first, so
// that causal blocks of unequal work and a thread slowed by other processes do not leave the
// others waiting. Every item writes its own rows, so results do not depend on the schedule.
//
// Memory beyond the outputs, per thread (acc_t elements, Bq × Bk the tile, D = Dn+Dr, fp32/fp64):
//   forward   Bq·Bk (scores/probabilities) + Bq·Dv (output accumulator) + 2·Bq (row statistics)
//   backward  Bq·Bk (P) + Bq·Bk (dP, then dS) + Bk·(Dn+Dv) (dK, dV accumulators) + 2·Bq
// 16-bit inputs add the converted tiles: Bq·D + Bk·(D+Dv) forward, Bq·(D+Dv) + Bk·(D+Dv) backward.
// The backward runs Bq × Bk/2 tiles, so its P and dS together are one forward tile. Plus one
// (T, H) acc_t tensor of the softmax correction D = rowsum(dO ⊙ O), allocated once per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/cpu/cpu_blas.h"
#include "torch_mla/cores/cpu/cpu_threads.h"
#include "torch_mla/layer/math.h"

namespace torch_mla {
namespace {

struct Tiles {
  int64_t q, k;  // query rows × key columns of one score tile
};

// Forward tiles: 64 query rows (the causal waste on the diagonal stays small) × up to 256 keys
// (fewer GEMM calls and softmax passes per row), keys cut to the longest sequence.
int64_t longest_sequence(const CoreProblem& p) {
  int64_t longest = 1;
  for (const SeqSpan& seq : p.seqs.spans) longest = std::max(longest, seq.len);
  return longest;
}

Tiles forward_tiles(const CoreProblem& p) {
  const int64_t longest = longest_sequence(p);
  return {std::min<int64_t>(64, longest), std::min<int64_t>(256, longest)};
}

// Backward tiles: half the forward's keys, so that P and dS together are one forward tile.
Tiles backward_tiles(const CoreProblem& p) {
  const int64_t longest = longest_sequence(p);
  return {std::min<int64_t>(64, longest), std::min<int64_t>(128, longest)};
}

// Rows [row0, row0 + rows) of one head, `width` values from column `col` of a (T, H, *) tensor
// with row stride ld: in place (src itself) when scalar_t is acc_t, else converted into dst
// (row stride width). Returns the tile's pointer and row stride.
template <typename acc_t, typename scalar_t>
std::pair<const acc_t*, int64_t> tile_of(const scalar_t* src, int64_t ld, int64_t rows, int64_t width,
                                         acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return {src, ld};
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * ld;
      acc_t* d = dst + r * width;
      for (int64_t c = 0; c < width; ++c) d[c] = static_cast<acc_t>(s[c]);
    }
    return {dst, width};
  }
}

// Causal-visible (query, key) pairs of a query block [q0, q0 + rows) of a sequence: its work.
double visible_pairs(int64_t q0, int64_t rows, int64_t len, bool causal) {
  if (!causal) return static_cast<double>(rows) * static_cast<double>(len);
  const double a = static_cast<double>(q0 + 1), b = static_cast<double>(q0 + rows);
  return (a + b) * static_cast<double>(rows) / 2;
}

// row_max_out: nullptr, or (T, H) acc_t for each row's running maximum (docs/design.md §12).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                    const at::Tensor& k_rope, at::Tensor& out, at::Tensor& lse, acc_t* row_max_out) {
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const int64_t H = p.heads, Dn = p.dim_nope, Dr = p.dim_rope, Dv = p.dim_v;
  const int64_t Dq = Dn + Dr, Dkv = Dn + Dv, ldq = H * Dq, ldkv = H * Dkv, ldo = H * Dv;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const Tiles t = forward_tiles(p);

  // Query blocks, the most work first (causal blocks late in a sequence see the most keys).
  struct Block { int64_t seq, q0; double pairs; };
  std::vector<Block> blocks;
  double pairs = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(p.seqs.spans.size()); ++s) {
    const int64_t len = p.seqs.spans[s].len;
    for (int64_t q0 = 0; q0 < len; q0 += t.q) {
      blocks.push_back({s, q0, visible_pairs(q0, std::min(t.q, len - q0), len, p.causal)});
      pairs += blocks.back().pairs;
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.pairs > b.pairs; });
  const int64_t n_items = static_cast<int64_t>(blocks.size()) * H;
  const int64_t threads = cpu::threads_for(2.0 * pairs * H * (Dq + Dv), n_items);

  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* kv_ptr = kv.const_data_ptr<scalar_t>();
  const scalar_t* kr_ptr = k_rope.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_ptr = lse.mutable_data_ptr<acc_t>();

  size_t scratch = cpu::scratch_bytes<acc_t>(t.q * t.k) + cpu::scratch_bytes<acc_t>(t.q * Dv) +
                   2 * cpu::scratch_bytes<acc_t>(t.q);
  if (kConvert) {
    scratch += cpu::scratch_bytes<acc_t>(t.q * Dq) + cpu::scratch_bytes<acc_t>(t.k * Dq) +
               cpu::scratch_bytes<acc_t>(t.k * Dv);
  }

  cpu::run_workers(threads, n_items, [&](const auto& take) {
    cpu::Scratch buf(scratch);
    acc_t* s_tile = buf.take<acc_t>(t.q * t.k);
    acc_t* acc = buf.take<acc_t>(t.q * Dv);
    acc_t* row_max = buf.take<acc_t>(t.q);
    acc_t* row_sum = buf.take<acc_t>(t.q);
    acc_t* q_buf = kConvert ? buf.take<acc_t>(t.q * Dq) : nullptr;
    acc_t* k_buf = kConvert ? buf.take<acc_t>(t.k * Dq) : nullptr;
    acc_t* v_buf = kConvert ? buf.take<acc_t>(t.k * Dv) : nullptr;
    for (int64_t item = take(); item >= 0; item = take()) {
      const Block& blk = blocks[item / H];
      const int64_t h = item % H;
      const SeqSpan& seq = p.seqs.spans[blk.seq];
      const int64_t q0 = blk.q0, rows = std::min(t.q, seq.len - q0);
      const int64_t row0 = seq.begin + q0;
      const auto [qt, ldqt] = tile_of<acc_t>(q_ptr + row0 * ldq + h * Dq, ldq, rows, Dq, q_buf);

      std::fill(acc, acc + rows * Dv, acc_t(0));
      std::fill(row_max, row_max + rows, -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum, row_sum + rows, acc_t(0));
      const int64_t k_end = visible_key_end(q0 + rows, seq.len, p.causal);
      for (int64_t k0 = 0; k0 < k_end; k0 += t.k) {
        const int64_t cols = std::min(t.k, k_end - k0);
        const int64_t key0 = seq.begin + k0;
        const acc_t *kn, *kr, *v;
        int64_t ldk, ldkr, ldv;
        if constexpr (kConvert) {
          // k_buf: per key [k_nope | k_rope]; v_buf: v.
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t* src = kv_ptr + (key0 + c) * ldkv + h * Dkv;
            const scalar_t* rope = kr_ptr + (key0 + c) * Dr;
            acc_t* kd = k_buf + c * Dq;
            acc_t* vd = v_buf + c * Dv;
            for (int64_t j = 0; j < Dn; ++j) kd[j] = static_cast<acc_t>(src[j]);
            for (int64_t j = 0; j < Dr; ++j) kd[Dn + j] = static_cast<acc_t>(rope[j]);
            for (int64_t j = 0; j < Dv; ++j) vd[j] = static_cast<acc_t>(src[Dn + j]);
          }
          kn = k_buf, kr = k_buf + Dn, v = v_buf, ldk = Dq, ldkr = Dq, ldv = Dv;
        } else {
          kn = kv_ptr + key0 * ldkv + h * Dkv, ldk = ldkv;
          kr = kr_ptr + key0 * Dr, ldkr = Dr;
          v = kn + Dn, ldv = ldkv;
        }
        // S = Qn·Knᵀ + Qr·Krᵀ
        cpu::gemm(false, true, rows, cols, Dn, acc_t(1), qt, ldqt, kn, ldk, acc_t(0), s_tile, t.k);
        if (Dr > 0) cpu::gemm(false, true, rows, cols, Dr, acc_t(1), qt + Dn, ldqt, kr, ldkr, acc_t(1), s_tile, t.k);
        cpu::softmax_forward_tile(s_tile, t.k, rows, cols, q0 - k0, p.causal, scale, row_max, row_sum, acc, Dv, Dv);
        // O += P·V
        cpu::gemm(false, false, rows, Dv, cols, acc_t(1), s_tile, t.k, v, ldv, acc_t(1), acc, Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t inv = row_sum[r] > 0 ? acc_t(1) / row_sum[r] : acc_t(0);
        const acc_t* a = acc + r * Dv;
        scalar_t* o = out_ptr + (row0 + r) * ldo + h * Dv;
        for (int64_t c = 0; c < Dv; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
        lse_ptr[(row0 + r) * H + h] = row_sum[r] > 0 ? row_max[r] + std::log(row_sum[r])
                                                     : -std::numeric_limits<acc_t>::infinity();
        // The running maximum is of the scaled scores: max_logits' units.
        if (row_max_out != nullptr) row_max_out[(row0 + r) * H + h] = row_max[r];
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                     const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                     const at::Tensor& lse, at::Tensor& dq_acc, at::Tensor& dkv,
                     at::Tensor& dk_rope_per_head) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const int64_t T = p.seqs.tokens, H = p.heads, Dn = p.dim_nope, Dr = p.dim_rope, Dv = p.dim_v;
  const int64_t Dq = Dn + Dr, Dkv = Dn + Dv, ldq = H * Dq, ldkv = H * Dkv, ldo = H * Dv;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const Tiles t = backward_tiles(p);

  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* kv_ptr = kv.const_data_ptr<scalar_t>();
  const scalar_t* kr_ptr = k_rope.const_data_ptr<scalar_t>();
  const scalar_t* do_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* o_ptr = out.const_data_ptr<scalar_t>();
  const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
  acc_t* dq_ptr = dq_acc.mutable_data_ptr<acc_t>();
  scalar_t* dkv_ptr = dkv.mutable_data_ptr<scalar_t>();
  acc_t* dkr_ptr = dk_rope_per_head.mutable_data_ptr<acc_t>();

  // Items: (sequence, head), the longest sequences first. It alone writes that head's rows of
  // dQ, dKV and dk_rope.
  std::vector<int64_t> seq_order(p.seqs.spans.size());
  std::iota(seq_order.begin(), seq_order.end(), 0);
  std::stable_sort(seq_order.begin(), seq_order.end(),
                   [&](int64_t a, int64_t b) { return p.seqs.spans[a].len > p.seqs.spans[b].len; });
  double pairs = 0;
  for (const SeqSpan& seq : p.seqs.spans) pairs += visible_pairs(0, seq.len, seq.len, p.causal);
  const int64_t n_items = static_cast<int64_t>(seq_order.size()) * H;
  // The backward does 2.5× the forward's FLOPs (docs/design.md §6).
  const int64_t threads = cpu::threads_for(2.5 * 2.0 * pairs * H * (Dq + Dv), n_items);

  // D = rowsum(dO ⊙ O) per (token, head), the softmax-backward correction term.
  at::Tensor delta_t = at::empty({T, H}, dq_acc.options());
  acc_t* delta = delta_t.mutable_data_ptr<acc_t>();
  auto delta_rows = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* d = do_ptr + i * Dv;
      const scalar_t* o = o_ptr + i * Dv;
      acc_t sum = 0;
      for (int64_t c = 0; c < Dv; ++c) sum += static_cast<acc_t>(d[c]) * static_cast<acc_t>(o[c]);
      delta[i] = sum;
    }
  };
  if (threads > 1) {
    at::parallel_for(0, T * H, (T * H + threads - 1) / threads, delta_rows);
  } else {
    delta_rows(0, T * H);
  }

  size_t scratch = 2 * cpu::scratch_bytes<acc_t>(t.q * t.k) + cpu::scratch_bytes<acc_t>(t.k * Dkv) +
                   2 * cpu::scratch_bytes<acc_t>(t.q);
  if (kConvert) {
    scratch += cpu::scratch_bytes<acc_t>(t.q * (Dq + Dv)) + cpu::scratch_bytes<acc_t>(t.k * (Dq + Dv));
  }

  cpu::run_workers(threads, n_items, [&](const auto& take) {
    cpu::Scratch buf(scratch);
    acc_t* p_tile = buf.take<acc_t>(t.q * t.k);
    acc_t* ds_tile = buf.take<acc_t>(t.q * t.k);
    acc_t* dk = buf.take<acc_t>(t.k * Dkv);  // per key [dk_nope | dv]
    acc_t* lse_rows = buf.take<acc_t>(t.q);
    acc_t* delta_rows_buf = buf.take<acc_t>(t.q);
    acc_t* q_buf = kConvert ? buf.take<acc_t>(t.q * (Dq + Dv)) : nullptr;  // [q | dO] per query
    acc_t* k_buf = kConvert ? buf.take<acc_t>(t.k * (Dq + Dv)) : nullptr;  // [k_nope | k_rope | v]
    for (int64_t item = take(); item >= 0; item = take()) {
      const SeqSpan& seq = p.seqs.spans[seq_order[item / H]];
      const int64_t h = item % H;
      if (seq.len == 0) continue;
      for (int64_t k0 = 0; k0 < seq.len; k0 += t.k) {
        const int64_t cols = std::min(t.k, seq.len - k0);
        const int64_t key0 = seq.begin + k0;
        const acc_t *kn, *kr, *v;
        int64_t ldk, ldkr, ldv;
        if constexpr (kConvert) {
          const int64_t w = Dq + Dv;
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t* src = kv_ptr + (key0 + c) * ldkv + h * Dkv;
            const scalar_t* rope = kr_ptr + (key0 + c) * Dr;
            acc_t* d = k_buf + c * w;
            for (int64_t j = 0; j < Dn; ++j) d[j] = static_cast<acc_t>(src[j]);
            for (int64_t j = 0; j < Dr; ++j) d[Dn + j] = static_cast<acc_t>(rope[j]);
            for (int64_t j = 0; j < Dv; ++j) d[Dq + j] = static_cast<acc_t>(src[Dn + j]);
          }
          kn = k_buf, kr = k_buf + Dn, v = k_buf + Dq, ldk = ldkr = ldv = w;
        } else {
          kn = kv_ptr + key0 * ldkv + h * Dkv, ldk = ldkv;
          kr = kr_ptr + key0 * Dr, ldkr = Dr;
          v = kn + Dn, ldv = ldkv;
        }
        std::fill(dk, dk + cols * Dkv, acc_t(0));
        acc_t* dkr = dkr_ptr + (h * T + key0) * Dr;  // (H, T, Dr), accumulated in place

        const int64_t q_first = first_query_seeing(k0, p.causal) / t.q * t.q;
        for (int64_t q0 = q_first; q0 < seq.len; q0 += t.q) {
          const int64_t rows = std::min(t.q, seq.len - q0);
          const int64_t row0 = seq.begin + q0;
          const acc_t *qt, *dot;
          int64_t ldqt, lddo;
          if constexpr (kConvert) {
            const int64_t w = Dq + Dv;
            for (int64_t r = 0; r < rows; ++r) {
              const scalar_t* qs = q_ptr + (row0 + r) * ldq + h * Dq;
              const scalar_t* ds = do_ptr + (row0 + r) * ldo + h * Dv;
              acc_t* d = q_buf + r * w;
              for (int64_t j = 0; j < Dq; ++j) d[j] = static_cast<acc_t>(qs[j]);
              for (int64_t j = 0; j < Dv; ++j) d[Dq + j] = static_cast<acc_t>(ds[j]);
            }
            qt = q_buf, dot = q_buf + Dq, ldqt = lddo = w;
          } else {
            qt = q_ptr + row0 * ldq + h * Dq, ldqt = ldq;
            dot = do_ptr + row0 * ldo + h * Dv, lddo = ldo;
          }
          for (int64_t r = 0; r < rows; ++r) {
            lse_rows[r] = lse_ptr[(row0 + r) * H + h];
            delta_rows_buf[r] = delta[(row0 + r) * H + h];
          }
          // P = exp(scale·S − lse): the forward's softmax, recomputed from the saved lse.
          cpu::gemm(false, true, rows, cols, Dn, acc_t(1), qt, ldqt, kn, ldk, acc_t(0), p_tile, t.k);
          if (Dr > 0) cpu::gemm(false, true, rows, cols, Dr, acc_t(1), qt + Dn, ldqt, kr, ldkr, acc_t(1), p_tile, t.k);
          cpu::softmax_backward_probs(p_tile, t.k, rows, cols, q0 - k0, p.causal, scale, lse_rows);
          // dV += Pᵀ·dO
          cpu::gemm(true, false, cols, Dv, rows, acc_t(1), p_tile, t.k, dot, lddo, acc_t(1), dk + Dn, Dkv);
          // dP = dO·Vᵀ, then dS = P ⊙ (dP − D) in its place
          cpu::gemm(false, true, rows, cols, Dv, acc_t(1), dot, lddo, v, ldv, acc_t(0), ds_tile, t.k);
          cpu::softmax_backward_ds(p_tile, ds_tile, t.k, rows, cols, delta_rows_buf);
          // dQ += scale·dS·[Kn | Kr], dKn += scale·dSᵀ·Qn, dKr += scale·dSᵀ·Qr
          acc_t* dq = dq_ptr + row0 * ldq + h * Dq;
          cpu::gemm(false, false, rows, Dn, cols, scale, ds_tile, t.k, kn, ldk, acc_t(1), dq, ldq);
          if (Dr > 0) cpu::gemm(false, false, rows, Dr, cols, scale, ds_tile, t.k, kr, ldkr, acc_t(1), dq + Dn, ldq);
          cpu::gemm(true, false, cols, Dn, rows, scale, ds_tile, t.k, qt, ldqt, acc_t(1), dk, Dkv);
          if (Dr > 0) cpu::gemm(true, false, cols, Dr, rows, scale, ds_tile, t.k, qt + Dn, ldqt, acc_t(1), dkr, Dr);
        }
        for (int64_t c = 0; c < cols; ++c) {
          const acc_t* s = dk + c * Dkv;
          scalar_t* d = dkv_ptr + (key0 + c) * ldkv + h * Dkv;
          for (int64_t j = 0; j < Dkv; ++j) d[j] = static_cast<scalar_t>(s[j]);
        }
      }
    }
  });
}

CoreOutputs cpu_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                        const at::Tensor& k_rope) {
  at::Tensor out = at::empty({p.seqs.tokens, p.heads, p.dim_v}, q.options());
  at::Tensor lse = at::empty({p.seqs.tokens, p.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  // Each row's maximum, reduced over rows afterwards (a (T, H) pass, not one over the scores).
  const at::Tensor row_max = p.max_logits ? at::empty_like(lse) : at::Tensor();
  const at::Tensor q3 = q.contiguous(), kv3 = kv.contiguous(), kr = k_rope.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(p, q3, kv3, kr, out, lse, p.max_logits ? row_max.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {out, lse, p.max_logits ? row_max.amax(0) : at::Tensor()};
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
  const at::Tensor q3 = q.contiguous(), kv3 = kv.contiguous(), kr = k_rope.contiguous();
  const at::Tensor out3 = out.contiguous(), do3 = grad_out.contiguous();
  const at::Tensor lse2 = lse.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, do3, q3, kv3, kr, out3, lse2, dq_acc, dkv, dk_rope_per_head);
  });
  return {dq_acc, dkv, H == 1 ? dk_rope_per_head.squeeze(0) : dk_rope_per_head.sum(0)};
}

const AttentionCore kCpu{"cpu", cpu_forward, cpu_backward};
const CoreRegistration kRegistration(kCpu);

}  // namespace
}  // namespace torch_mla
