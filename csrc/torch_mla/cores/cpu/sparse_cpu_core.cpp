// The `cpu` sparse core (docs/design.md §16.4): the absorbed form of §16.1 on raw-pointer GEMM tiles
// (cpu_blas.h); no at::Tensor is created inside the tile loops. Computed in acc_t (float for
// bf16/fp16/fp32, double for fp64), 16-bit inputs converted tile by tile, like the dense cpu core.
//
// Work items are blocks of up to kBlock consecutive queries (rows of the packed layout: the layer
// has already turned positions into rows, so a block may span sequences). Per block:
//   qa = [q_nope·Wk | q_rope] for every head (one GEMM per head over the block's queries);
//   per query, its selected key rows [c | k_rope] gathered (the rows ≥ 0 only, n ≤ k of them) into
//   an n × (Dc+Dr) tile, the H × n scores σ·qa·Kᵀ, one softmax pass over the whole selection, and
//   ol = P·C (H × Dc);
//   out = ol·Wvᵀ per head (one GEMM per head).
// Backward, per block: qa again, dol = dout·Wv; per query P from the saved lse, ol = P·C (the one
// extra P·V, §16.1), D = rowsum(dol ⊙ ol), dS = P ⊙ (dol·Cᵀ − D), dqa = σ·dS·K, and the key rows'
// dK = σ·dSᵀ·qa (Dc+Dr wide) plus dV = Pᵀ·dol (Dc wide), scatter-added into float accumulators;
// per block dWv += doutᵀ·ol, dWk += q_nopeᵀ·dqa[:Dc], dq = [dqa[:Dc]·Wkᵀ | dqa[Dc:]].
//
// Determinism: the forward's items write their own rows, so any schedule gives the same bits. The
// backward cuts the query blocks into `parts` contiguous ranges of about equal work, fixed by the
// indices and the thread count alone; each part scatter-adds into its own accumulators of dK/dV
// (the key rows its queries can reach) and dWk/dWv, and the parts are summed in part order. So two
// runs with the same thread count give the same bits; another thread count may round differently.
//
// Memory beyond the outputs (acc_t elements; Bq = kBlock, Dk = Dc+Dr):
//   per thread, forward   Bq·H·(Dk + Dc) (qa, ol) + k·Dk (keys) + H·k (scores) + Bq·H·Dv (out)
//   per thread, backward  2·Bq·H·(Dk + Dc) (qa, dqa, ol, dol) + 2·k·Dk (keys, dK) + 2·H·k (P, dS)
//                         + Bq·H·Dq (dq)
//   16-bit inputs add their converted q (and dout) block, Bq·H·Dq (+ Bq·H·Dv);
//   per call, backward    Wk, Wv in acc_t (H·(Dn+Dv)·Dc), the (T, Dk) accumulator of dK/dV, and
//                         for each part after the first, the key rows it reaches × Dk plus its
//                         own dWk, dWv (H·(Dn+Dv)·Dc): at most (threads − 1)·(T·Dk + H·(Dn+Dv)·Dc).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "torch_mla/cores/cpu/cpu_blas.h"
#include "torch_mla/cores/cpu/cpu_threads.h"
#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/layer/checks.h"

namespace torch_mla {
namespace {

// Queries per work item: enough rows for the per-head projections (qa, out, dWk, dWv, dq) to be
// GEMMs rather than matrix-vector products, few enough that the block's tiles stay in cache.
constexpr int64_t kBlock = 16;

// Everything of one call the kernels share: shapes, pointers, and the work of each query block.
struct Call {
  int64_t T, H, Dn, Dr, Dv, Dc, Dq, Dk, topk, blocks;
  const int64_t* rows;         // (T, k)
  std::vector<double> work;    // FLOPs of each query block's forward
  double total_work = 0;

  Call(const SparseProblem& p, int64_t tokens, const at::Tensor& rows_t)
      : T(tokens), H(p.heads), Dn(p.dim_nope), Dr(p.dim_rope), Dv(p.dim_v), Dc(p.dim_latent),
        Dq(p.dim_nope + p.dim_rope), Dk(p.dim_latent + p.dim_rope), topk(p.topk),
        blocks((tokens + kBlock - 1) / kBlock), rows(rows_t.const_data_ptr<int64_t>()), work(blocks) {
    // Per query the projections (qa, out), per selected pair the scores and P·C.
    const double per_query = 2.0 * H * (Dn + Dv) * Dc, per_pair = 2.0 * H * (Dk + Dc);
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t pairs = 0;
      const int64_t end = std::min(T, (b + 1) * kBlock);
      for (const int64_t* r = rows + b * kBlock * topk; r < rows + end * topk; ++r) pairs += *r >= 0;
      work[b] = per_query * static_cast<double>(end - b * kBlock) + per_pair * static_cast<double>(pairs);
      total_work += work[b];
    }
  }

  int64_t block_rows(int64_t b) const { return std::min(kBlock, T - b * kBlock); }
};

// The block's `rows` × `width` values from src (row stride ld): in place when scalar_t is acc_t,
// else converted into dst (row stride width). Returns the tile's pointer and row stride.
template <typename acc_t, typename scalar_t>
std::pair<const acc_t*, int64_t> tile_of(const scalar_t* src, int64_t ld, int64_t rows, int64_t width, acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return {src, ld};
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) dst[r * width + c] = static_cast<acc_t>(src[r * ld + c]);
    }
    return {dst, width};
  }
}

// qa (rows, H, Dk) of a block: per head q_nope·Wk (one GEMM), then q_rope copied beside it.
template <typename acc_t>
void absorbed_queries(const Call& c, const acc_t* q, int64_t ldq, int64_t rows, const acc_t* w_k, acc_t* qa) {
  for (int64_t h = 0; h < c.H; ++h) {
    cpu::gemm(false, false, rows, c.Dc, c.Dn, acc_t(1), q + h * c.Dq, ldq, w_k + h * c.Dn * c.Dc, c.Dc, acc_t(0),
              qa + h * c.Dk, c.H * c.Dk);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(q + r * ldq + h * c.Dq + c.Dn, c.Dr, qa + (r * c.H + h) * c.Dk + c.Dc);
    }
  }
}

// Query t's selected key rows [c | k_rope] into keys (n × Dk) and their row numbers into ids;
// returns n, the count of entries ≥ 0.
template <typename acc_t, typename scalar_t>
int64_t gather_keys(const Call& c, int64_t t, const scalar_t* kv_latent, const scalar_t* k_rope, acc_t* keys,
                    int64_t* ids) {
  int64_t n = 0;
  for (const int64_t* r = c.rows + t * c.topk; r < c.rows + (t + 1) * c.topk; ++r) {
    if (*r < 0) continue;
    acc_t* key = keys + n * c.Dk;
    const scalar_t* latent = kv_latent + *r * c.Dc;
    const scalar_t* rope = k_rope + *r * c.Dr;
    for (int64_t j = 0; j < c.Dc; ++j) key[j] = static_cast<acc_t>(latent[j]);
    for (int64_t j = 0; j < c.Dr; ++j) key[c.Dc + j] = static_cast<acc_t>(rope[j]);
    ids[n++] = *r;
  }
  return n;
}

template <typename acc_t, typename scalar_t>
void store(const acc_t* src, scalar_t* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// row_max_out: nullptr, or (T, H) for each (query, head)'s maximum scaled score (max_logits, §12).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const SparseProblem& p, const Call& c, const at::Tensor& q, const at::Tensor& kv_latent,
                    const at::Tensor& k_rope, const at::Tensor& w_k, const at::Tensor& w_v, at::Tensor& out,
                    at::Tensor& lse, acc_t* row_max_out) {
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const int64_t H = c.H, Dc = c.Dc, Dk = c.Dk, Dv = c.Dv, k = c.topk, ldq = H * c.Dq;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* kv_ptr = kv_latent.const_data_ptr<scalar_t>();
  const scalar_t* kr_ptr = k_rope.const_data_ptr<scalar_t>();
  const acc_t* wk_ptr = w_k.const_data_ptr<acc_t>();
  const acc_t* wv_ptr = w_v.const_data_ptr<acc_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_ptr = lse.mutable_data_ptr<acc_t>();

  const size_t scratch = cpu::scratch_bytes<acc_t>(kBlock * H * Dk) + cpu::scratch_bytes<acc_t>(kBlock * H * Dc) +
                         cpu::scratch_bytes<acc_t>(k * Dk) + cpu::scratch_bytes<acc_t>(H * k) +
                         cpu::scratch_bytes<acc_t>(kBlock * H * Dv) + 2 * cpu::scratch_bytes<acc_t>(H) +
                         cpu::scratch_bytes<int64_t>(k) + (kConvert ? cpu::scratch_bytes<acc_t>(kBlock * ldq) : 0);
  const int64_t threads = cpu::threads_for(c.total_work, c.blocks);
  cpu::run_workers(threads, c.blocks, [&](const auto& take) {
    cpu::Scratch buf(scratch);
    acc_t* qa = buf.take<acc_t>(kBlock * H * Dk);
    acc_t* ol = buf.take<acc_t>(kBlock * H * Dc);
    acc_t* keys = buf.take<acc_t>(k * Dk);
    acc_t* s = buf.take<acc_t>(H * k);
    acc_t* o = buf.take<acc_t>(kBlock * H * Dv);
    acc_t* row_max = buf.take<acc_t>(H);
    acc_t* row_sum = buf.take<acc_t>(H);
    int64_t* ids = buf.take<int64_t>(k);
    acc_t* q_buf = kConvert ? buf.take<acc_t>(kBlock * ldq) : nullptr;
    for (int64_t b = take(); b >= 0; b = take()) {
      const int64_t t0 = b * kBlock, rows = c.block_rows(b);
      const auto [qt, ldqt] = tile_of<acc_t>(q_ptr + t0 * ldq, ldq, rows, ldq, q_buf);
      absorbed_queries(c, qt, ldqt, rows, wk_ptr, qa);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = t0 + i;
        const acc_t* qa_t = qa + i * H * Dk;
        acc_t* ol_t = ol + i * H * Dc;
        std::fill(ol_t, ol_t + H * Dc, acc_t(0));
        std::fill(row_max, row_max + H, -std::numeric_limits<acc_t>::infinity());
        std::fill(row_sum, row_sum + H, acc_t(0));
        const int64_t n = gather_keys(c, t, kv_ptr, kr_ptr, keys, ids);
        if (n > 0) {
          // S = qa·Kᵀ; softmax over the whole selection in one tile; ol = P·C.
          cpu::gemm(false, true, H, n, Dk, acc_t(1), qa_t, Dk, keys, Dk, acc_t(0), s, k);
          cpu::softmax_forward_tile(s, k, H, n, 0, /*causal=*/false, scale, row_max, row_sum, ol_t, Dc, Dc);
          cpu::gemm(false, false, H, Dc, n, acc_t(1), s, k, keys, Dk, acc_t(1), ol_t, Dc);
        }
        for (int64_t h = 0; h < H; ++h) {
          const acc_t inv = row_sum[h] > 0 ? acc_t(1) / row_sum[h] : acc_t(0);
          for (int64_t j = 0; j < Dc; ++j) ol_t[h * Dc + j] *= inv;
          lse_ptr[t * H + h] = row_sum[h] > 0 ? row_max[h] + std::log(row_sum[h])
                                              : -std::numeric_limits<acc_t>::infinity();
          if (row_max_out != nullptr) row_max_out[t * H + h] = row_max[h];
        }
      }
      // out = ol·Wvᵀ per head, into the block's (rows, H, Dv) rows of out.
      acc_t* o_rows;
      if constexpr (kConvert) {
        o_rows = o;
      } else {
        o_rows = out_ptr + t0 * H * Dv;
      }
      for (int64_t h = 0; h < H; ++h) {
        cpu::gemm(false, true, rows, Dv, Dc, acc_t(1), ol + h * Dc, H * Dc, wv_ptr + h * Dv * Dc, Dc, acc_t(0),
                  o_rows + h * Dv, H * Dv);
      }
      if constexpr (kConvert) store(o, out_ptr + t0 * H * Dv, rows * H * Dv);
    }
  });
}

// The accumulators one part of the backward scatter-adds into: the key rows [lo, hi) × Dk, and dWk,
// dWv (H, Dn, Dc), (H, Dv, Dc).
template <typename acc_t>
struct PartGrads {
  acc_t* keys;  // row r of the key accumulator at keys + (r − lo)·Dk
  int64_t lo, hi;
  acc_t *w_k, *w_v;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_part(const SparseProblem& p, const Call& c, int64_t block_begin, int64_t block_end,
                   const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv_latent,
                   const at::Tensor& k_rope, const at::Tensor& w_k, const at::Tensor& w_v, const at::Tensor& lse,
                   at::Tensor& grad_q, const PartGrads<acc_t>& g) {
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const int64_t H = c.H, Dn = c.Dn, Dc = c.Dc, Dk = c.Dk, Dv = c.Dv, Dq = c.Dq, k = c.topk;
  const int64_t ldq = H * Dq, ldo = H * Dv;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* do_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* kv_ptr = kv_latent.const_data_ptr<scalar_t>();
  const scalar_t* kr_ptr = k_rope.const_data_ptr<scalar_t>();
  const acc_t* wk_ptr = w_k.const_data_ptr<acc_t>();
  const acc_t* wv_ptr = w_v.const_data_ptr<acc_t>();
  const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
  scalar_t* dq_ptr = grad_q.mutable_data_ptr<scalar_t>();

  cpu::Scratch buf(2 * cpu::scratch_bytes<acc_t>(kBlock * H * Dk) + 2 * cpu::scratch_bytes<acc_t>(kBlock * H * Dc) +
                   2 * cpu::scratch_bytes<acc_t>(k * Dk) + 2 * cpu::scratch_bytes<acc_t>(H * k) +
                   cpu::scratch_bytes<acc_t>(H) + cpu::scratch_bytes<int64_t>(k) +
                   cpu::scratch_bytes<acc_t>(kBlock * ldq) +
                   (kConvert ? cpu::scratch_bytes<acc_t>(kBlock * ldq) + cpu::scratch_bytes<acc_t>(kBlock * ldo) : 0));
  acc_t* qa = buf.take<acc_t>(kBlock * H * Dk);
  acc_t* dqa = buf.take<acc_t>(kBlock * H * Dk);
  acc_t* ol = buf.take<acc_t>(kBlock * H * Dc);
  acc_t* dol = buf.take<acc_t>(kBlock * H * Dc);
  acc_t* keys = buf.take<acc_t>(k * Dk);
  acc_t* dkeys = buf.take<acc_t>(k * Dk);
  acc_t* prob = buf.take<acc_t>(H * k);
  acc_t* ds = buf.take<acc_t>(H * k);
  acc_t* delta = buf.take<acc_t>(H);
  int64_t* ids = buf.take<int64_t>(k);
  acc_t* dq = buf.take<acc_t>(kBlock * ldq);
  acc_t* q_buf = kConvert ? buf.take<acc_t>(kBlock * ldq) : nullptr;
  acc_t* do_buf = kConvert ? buf.take<acc_t>(kBlock * ldo) : nullptr;

  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t t0 = b * kBlock, rows = c.block_rows(b);
    const auto [qt, ldqt] = tile_of<acc_t>(q_ptr + t0 * ldq, ldq, rows, ldq, q_buf);
    const auto [dot, lddo] = tile_of<acc_t>(do_ptr + t0 * ldo, ldo, rows, ldo, do_buf);
    absorbed_queries(c, qt, ldqt, rows, wk_ptr, qa);
    // dol = dout·Wv per head: (rows × Dv)·(Dv × Dc).
    for (int64_t h = 0; h < H; ++h) {
      cpu::gemm(false, false, rows, Dc, Dv, acc_t(1), dot + h * Dv, lddo, wv_ptr + h * Dv * Dc, Dc, acc_t(0),
                dol + h * Dc, H * Dc);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = t0 + i;
      const acc_t* qa_t = qa + i * H * Dk;
      const acc_t* dol_t = dol + i * H * Dc;
      acc_t* dqa_t = dqa + i * H * Dk;
      acc_t* ol_t = ol + i * H * Dc;
      const int64_t n = gather_keys(c, t, kv_ptr, kr_ptr, keys, ids);
      if (n == 0) {  // nothing selected: no gradient through this query
        std::fill(dqa_t, dqa_t + H * Dk, acc_t(0));
        std::fill(ol_t, ol_t + H * Dc, acc_t(0));
        continue;
      }
      // P = exp(σ·qa·Kᵀ − lse), then the recomputed ol = P·C and D = rowsum(dol ⊙ ol): from the
      // float ol rather than the saved out, as the composed core does (§16.1).
      cpu::gemm(false, true, H, n, Dk, acc_t(1), qa_t, Dk, keys, Dk, acc_t(0), prob, k);
      cpu::softmax_backward_probs(prob, k, H, n, 0, /*causal=*/false, scale, lse_ptr + t * H);
      cpu::gemm(false, false, H, Dc, n, acc_t(1), prob, k, keys, Dk, acc_t(0), ol_t, Dc);
      for (int64_t h = 0; h < H; ++h) {
        acc_t sum = 0;
        for (int64_t j = 0; j < Dc; ++j) sum += dol_t[h * Dc + j] * ol_t[h * Dc + j];
        delta[h] = sum;
      }
      // dS = P ⊙ (dol·Cᵀ − D), in place of dP.
      cpu::gemm(false, true, H, n, Dc, acc_t(1), dol_t, Dc, keys, Dk, acc_t(0), ds, k);
      cpu::softmax_backward_ds(prob, ds, k, H, n, delta);
      // dqa = σ·dS·K; the key rows' dK = σ·dSᵀ·qa and dV = Pᵀ·dol (its latent columns).
      cpu::gemm(false, false, H, Dk, n, scale, ds, k, keys, Dk, acc_t(0), dqa_t, Dk);
      cpu::gemm(true, false, n, Dk, H, scale, ds, k, qa_t, Dk, acc_t(0), dkeys, Dk);
      cpu::gemm(true, false, n, Dc, H, acc_t(1), prob, k, dol_t, Dc, acc_t(1), dkeys, Dk);
      for (int64_t j = 0; j < n; ++j) {
        acc_t* dst = g.keys + (ids[j] - g.lo) * Dk;
        const acc_t* src = dkeys + j * Dk;
        for (int64_t e = 0; e < Dk; ++e) dst[e] += src[e];
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      // dWv += doutᵀ·ol, dWk += q_nopeᵀ·dqa[:Dc], dq_nope = dqa[:Dc]·Wkᵀ.
      cpu::gemm(true, false, Dv, Dc, rows, acc_t(1), dot + h * Dv, lddo, ol + h * Dc, H * Dc, acc_t(1),
                g.w_v + h * Dv * Dc, Dc);
      cpu::gemm(true, false, Dn, Dc, rows, acc_t(1), qt + h * Dq, ldqt, dqa + h * Dk, H * Dk, acc_t(1),
                g.w_k + h * Dn * Dc, Dc);
      cpu::gemm(false, true, rows, Dn, Dc, acc_t(1), dqa + h * Dk, H * Dk, wk_ptr + h * Dn * Dc, Dc, acc_t(0),
                dq + h * Dq, ldq);
      for (int64_t r = 0; r < rows; ++r) {
        std::copy_n(dqa + (r * H + h) * Dk + Dc, c.Dr, dq + r * ldq + h * Dq + Dn);
      }
    }
    store(dq, dq_ptr + t0 * ldq, rows * ldq);
  }
}

SparseOutputs sparse_cpu_forward(const SparseProblem& p, const at::Tensor& q, const at::Tensor& kv_latent,
                                 const at::Tensor& k_rope, const at::Tensor& w_k, const at::Tensor& w_v,
                                 const at::Tensor& rows) {
  const int64_t T = q.size(0);
  const auto acc = lse_dtype(q.scalar_type());
  const at::Tensor rows_c = rows.contiguous();
  const Call c(p, T, rows_c);
  at::Tensor out = at::empty({T, p.heads, p.dim_v}, q.options());
  at::Tensor lse = at::empty({T, p.heads}, q.options().dtype(acc));
  // Each (query, head)'s maximum, reduced over queries afterwards.
  const at::Tensor row_max = p.max_logits ? at::empty_like(lse) : at::Tensor();
  const at::Tensor q3 = q.contiguous(), kv = kv_latent.contiguous(), kr = k_rope.contiguous();
  const at::Tensor wk = w_k.to(acc).contiguous(), wv = w_v.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_sparse_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(p, c, q3, kv, kr, wk, wv, out, lse,
                             p.max_logits ? row_max.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {out, lse, p.max_logits ? row_max.amax(0) : at::Tensor()};
}

// Block boundaries of `parts` contiguous ranges of about equal work: part i takes the blocks
// [bounds[i], bounds[i + 1]).
std::vector<int64_t> part_bounds(const Call& c, int64_t parts) {
  std::vector<int64_t> bounds{0};
  double done = 0;
  for (int64_t b = 0; b < c.blocks; ++b) {
    done += c.work[b];
    const auto next = static_cast<int64_t>(bounds.size());
    if (next < parts && done >= c.total_work * static_cast<double>(next) / static_cast<double>(parts)) {
      bounds.push_back(b + 1);
    }
  }
  while (static_cast<int64_t>(bounds.size()) <= parts) bounds.push_back(c.blocks);
  return bounds;
}

// The key rows [lo, hi) the queries of blocks [begin, end) select (hi = lo when none).
std::pair<int64_t, int64_t> reached_rows(const Call& c, int64_t begin, int64_t end) {
  int64_t lo = c.T, hi = 0;
  const int64_t t_end = std::min(c.T, end * kBlock);
  for (const int64_t* r = c.rows + begin * kBlock * c.topk; r < c.rows + t_end * c.topk; ++r) {
    if (*r < 0) continue;
    lo = std::min(lo, *r);
    hi = std::max(hi, *r + 1);
  }
  return lo < hi ? std::make_pair(lo, hi) : std::make_pair(int64_t{0}, int64_t{0});
}

SparseGrads sparse_cpu_backward(const SparseProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& w_k,
                                const at::Tensor& w_v, const at::Tensor& rows, const at::Tensor& /*out*/,
                                const at::Tensor& lse) {
  const int64_t T = q.size(0), Dk = p.dim_latent + p.dim_rope;
  const auto acc = lse_dtype(q.scalar_type());
  const at::Tensor rows_c = rows.contiguous();
  const Call c(p, T, rows_c);
  const at::Tensor q3 = q.contiguous(), kv = kv_latent.contiguous(), kr = k_rope.contiguous();
  const at::Tensor do3 = grad_out.contiguous(), lse2 = lse.to(acc).contiguous();
  const at::Tensor wk = w_k.to(acc).contiguous(), wv = w_v.to(acc).contiguous();
  at::Tensor grad_q = at::empty({T, p.heads, p.dim_nope + p.dim_rope}, q.options());
  // Part 0 accumulates into these; every other part into its own, added afterwards in part order.
  at::Tensor grad_keys = at::zeros({T, Dk}, q.options().dtype(acc));
  at::Tensor grad_wk = at::zeros_like(wk), grad_wv = at::zeros_like(wv);
  // The backward does about 3× the forward's FLOPs.
  const int64_t parts = cpu::threads_for(3.0 * c.total_work, c.blocks);
  const std::vector<int64_t> bounds = part_bounds(c, parts);
  std::vector<at::Tensor> part_keys(parts), part_wk(parts), part_wv(parts);
  std::vector<std::pair<int64_t, int64_t>> reach(parts);
  for (int64_t i = 1; i < parts; ++i) {
    reach[i] = reached_rows(c, bounds[i], bounds[i + 1]);
    part_keys[i] = at::zeros({reach[i].second - reach[i].first, Dk}, grad_keys.options());
    part_wk[i] = at::zeros_like(wk);
    part_wv[i] = at::zeros_like(wv);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_sparse_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::run_parts(parts, [&](int64_t i) {
      const PartGrads<acc_t> g =
          i == 0 ? PartGrads<acc_t>{grad_keys.mutable_data_ptr<acc_t>(), 0, T, grad_wk.mutable_data_ptr<acc_t>(),
                                    grad_wv.mutable_data_ptr<acc_t>()}
                 : PartGrads<acc_t>{part_keys[i].mutable_data_ptr<acc_t>(), reach[i].first, reach[i].second,
                                    part_wk[i].mutable_data_ptr<acc_t>(), part_wv[i].mutable_data_ptr<acc_t>()};
      backward_part<scalar_t>(p, c, bounds[i], bounds[i + 1], do3, q3, kv, kr, wk, wv, lse2, grad_q, g);
    });
  });
  // The parts' sums in part order: a fixed order, so the same bits on every run.
  for (int64_t i = 1; i < parts; ++i) {
    grad_keys.narrow(0, reach[i].first, reach[i].second - reach[i].first).add_(part_keys[i]);
    grad_wk.add_(part_wk[i]);
    grad_wv.add_(part_wv[i]);
  }
  // Copies, never views of the one accumulator: the op's outputs must not alias each other.
  return {grad_q, grad_keys.narrow(1, 0, p.dim_latent).to(kv_latent.scalar_type(), false, /*copy=*/true),
          grad_keys.narrow(1, p.dim_latent, p.dim_rope).to(k_rope.scalar_type(), false, /*copy=*/true),
          grad_wk.to(w_k.scalar_type()), grad_wv.to(w_v.scalar_type())};
}

const SparseCore kSparseCpu{"cpu", sparse_cpu_forward, sparse_cpu_backward};
const SparseCoreRegistration registration(kSparseCpu);

}  // namespace
}  // namespace torch_mla
