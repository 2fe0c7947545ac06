#pragma once
// The host side of our kernels (mla_forward.cuh, mla_backward.cuh), written once for both targets
// of mla_target.cuh (docs/design.md §10.2): the `cuda` core (cores/cuda/cuda_core.cu, nvcc, a CUDA
// stream) and the `simt` core (cores/simt/simt_core.cpp, host C++ under TORCH_MLA_SIMT, the
// emulator of csrc/simt). Forward: the fused attention kernel reads q, k_nope / v from the latent
// layer's KV buffer and k_rope from its own tensor. Backward: delta = rowsum(dO ⊙ O) and
// lse·log2(e) (preprocess kernel), then the fused backward kernel(s) writing dKV in KV's layout
// and dk_rope summed over heads.
//
// What differs between the targets is a `Target` object:
//   cudaStream_t stream()                           where the launchers launch;
//   void memory(const at::Tensor& t, const char*)   t's extent is memory the kernels may touch
//                                                   (the emulator checks every access against it);
//   void run(F&& f)                                 runs the launches (the emulator turns its
//                                                   errors into a c10::Error here).
// Include ATen before this header: under TORCH_MLA_SIMT mla_target.cuh defines CUDA's names.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/cuda/mla_params.h"
#include "torch_mla/cores/cuda/tuned_shapes.h"

namespace torch_mla::kernels_host {

using cuda::MlaParams;

constexpr double kLog2e = 1.4426950408889634;

// The kernels copy rows in 16-byte chunks: the pointer and every stride but the last (of a
// dimension longer than 1) must be multiples of 16 bytes. Returns `t` when they are, else a copy.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    aligned = aligned && (t.size(i) <= 1 || (t.stride(i) * t.element_size()) % 16 == 0);
  }
  // The rows themselves must be dense: an expanded tensor (a broadcast grad_out) has stride 0.
  aligned = aligned && (t.size(-1) <= 1 || t.stride(-1) == 1);
  if (aligned) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();
}

// Bytes from t's first element to the end of its last one (its logical extent in memory).
inline size_t extent_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  return static_cast<size_t>(last + 1) * t.element_size();
}

// Grid sizes must fit a 1-D grid (gridDim.x ≤ 2^31 - 1): the attention kernels' are products of
// blocks per sequence, sequences and heads, largest with the smallest row block (64: backward, dQ);
// the preprocess kernel's is ceil(T·H / 8). The kernels split blockIdx.x in 64-bit arithmetic
// (grid_coords, mla_params.h), and positions within a sequence stay below 2^30 so that int
// arithmetic on them cannot overflow.
inline void check_grid(const CoreProblem& p) {
  const int64_t blocks = std::max((p.seqs.longest + 63) / 64 * p.seqs.count * p.heads,
                                  (p.seqs.tokens * p.heads + 7) / 8);
  TORCH_CHECK(blocks < (int64_t{1} << 31) && p.seqs.longest < (int64_t{1} << 30),
              "torch_mla.mla_attention: problem too large for one CUDA launch (", blocks, " blocks)");
}

// The forward's parameters: sizes, sequences, q, KV, k_rope, out, lse and (when asked) the rows'
// maxima. Every tensor is registered with the target.
template <typename Target>
MlaParams fprop_params(Target& target, const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                       const at::Tensor& k_rope, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& row_max) {
  check_grid(p);
  MlaParams params;
  params.tokens = p.seqs.tokens;
  params.batch = static_cast<int>(p.seqs.count);
  params.seqlen = static_cast<int>(p.seqs.padded_len);
  params.max_seqlen = static_cast<int>(p.seqs.longest);
  params.heads = static_cast<int>(p.heads);
  params.dim_nope = static_cast<int>(p.dim_nope);
  params.dim_rope = static_cast<int>(p.dim_rope);
  params.cu_seqlens = p.seqs.packed ? p.seqs.cu_seqlens.data_ptr<int32_t>() : nullptr;
  if (p.seqs.packed) target.memory(p.seqs.cu_seqlens, "cu_seqlens");
  params.softmax_scale = static_cast<float>(p.softmax_scale);
  params.scale_log2 = static_cast<float>(p.softmax_scale * kLog2e);
  params.causal = p.causal;
  params.grid_order = cuda::grid_order_setting.load(std::memory_order_relaxed);
  params.q = q.data_ptr();
  params.q_row_stride = q.stride(0);
  params.q_head_stride = q.stride(1);
  params.kv = kv.data_ptr();
  params.kv_row_stride = kv.stride(0);
  params.kv_head_stride = kv.stride(1);
  params.k_rope = k_rope.data_ptr();
  params.k_rope_row_stride = k_rope.stride(0);
  params.out = out.data_ptr();
  params.out_row_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.lse = lse.data_ptr<float>();
  params.row_max = row_max.defined() ? row_max.data_ptr<float>() : nullptr;
  target.memory(q, "q");
  target.memory(kv, "kv");
  target.memory(k_rope, "k_rope");
  target.memory(out, "out");
  target.memory(lse, "lse");
  if (row_max.defined()) target.memory(row_max, "row_max");
  return params;
}

// The backward's buffers, made by backward() below; dq_accum (atomic dQ) or grad_q (deterministic).
struct DgradBuffers {
  at::Tensor grad_out, row_stats, dq_accum, grad_q, dkv, dk_rope_accum;
};

// The backward's parameters: the forward's (out and lse as inputs), then grad_out, the row
// statistics and the gradient buffers.
template <typename Target>
MlaParams dgrad_params(Target& target, const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                       const at::Tensor& k_rope, const at::Tensor& out, const at::Tensor& lse,
                       const DgradBuffers& b) {
  MlaParams params = fprop_params(target, p, q, kv, k_rope, out, lse, at::Tensor());
  params.grad_out = b.grad_out.data_ptr();
  params.do_row_stride = b.grad_out.stride(0);
  params.do_head_stride = b.grad_out.stride(1);
  params.lse_log2 = b.row_stats[0].data_ptr<float>();
  params.delta = b.row_stats[1].data_ptr<float>();
  params.dq_accum = b.dq_accum.defined() ? b.dq_accum.data_ptr<float>() : nullptr;
  params.dq = b.grad_q.defined() ? b.grad_q.data_ptr() : nullptr;
  params.dkv = b.dkv.data_ptr();
  params.dk_rope_accum = b.dk_rope_accum.data_ptr<float>();
  target.memory(b.grad_out, "grad_out");
  target.memory(b.row_stats[0], "lse_log2");
  target.memory(b.row_stats[1], "delta");
  target.memory(b.grad_q.defined() ? b.grad_q : b.dq_accum, b.grad_q.defined() ? "grad_q" : "dq_accum");
  target.memory(b.dk_rope_accum, "dk_rope_accum");
  target.memory(b.dkv, "dkv");
  return params;
}

// Calls f<T, Dn+Dr, Dv>() for the instantiated dtype and head shape (cores/cuda/tuned_shapes.h);
// selection admits no other, so anything else is a bug reported as one.
template <typename F>
void dispatch_tuned(at::ScalarType dtype, int64_t dim_qk, int64_t dim_v, F&& f) {
  const auto by_shape = [&](auto type_tag) {
    using T = decltype(type_tag);
    const bool tuned = cuda::dispatch_tuned_shape(dim_qk, dim_v, [&]<int kDimQK, int kDimV>() {
      f.template operator()<T, kDimQK, kDimV>();
    });
    TORCH_CHECK(tuned, "torch_mla cuda core: no kernel instantiated for (Dn+Dr, Dv) = (", dim_qk, ", ", dim_v, ")");
  };
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "torch_mla cuda core: no kernel for dtype ", dtype);
  if (dtype == at::kBFloat16) {
    by_shape(__nv_bfloat16{});
  } else {
    by_shape(__half{});
  }
}

template <typename Target>
CoreOutputs forward(Target& target, const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                    const at::Tensor& k_rope) {
  at::Tensor out = at::empty({p.seqs.tokens, p.heads, p.dim_v}, q.options());
  at::Tensor lse = at::empty({p.seqs.tokens, p.heads}, q.options().dtype(at::kFloat));
  // Per-row maxima from the epilogue, reduced to (H,) here (docs/design.md §12).
  const at::Tensor row_max = p.max_logits ? at::empty_like(lse) : at::Tensor();
  const MlaParams params =
      fprop_params(target, p, with_aligned_rows(q), kv, with_aligned_rows(k_rope), out, lse, row_max);
  const cudaStream_t stream = target.stream();
  target.run([&] {
    dispatch_tuned(q.scalar_type(), p.dim_nope + p.dim_rope, p.dim_v, [&]<typename T, int kDimQK, int kDimV>() {
      cuda::run_mla_forward<T, kDimQK, kDimV>(params, stream);
    });
  });
  return {out, lse, p.max_logits ? row_max.amax(0) : at::Tensor()};
}

template <typename Target>
CoreGrads backward(Target& target, const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                   const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t T = p.seqs.tokens, H = p.heads, Dqk = p.dim_nope + p.dim_rope;
  const auto f32 = q.options().dtype(at::kFloat);
  DgradBuffers b;
  b.grad_out = with_aligned_rows(grad_out);
  b.row_stats = at::empty({2, H, T}, f32);  // lse·log2(e) and delta, per head
  if (p.deterministic) {
    b.grad_q = at::empty({T, H, Dqk}, q.options());
  } else {
    b.dq_accum = at::zeros({T, H, Dqk}, f32);
  }
  b.dk_rope_accum = at::zeros({T, p.dim_rope}, f32);
  b.dkv = at::empty({T, H, p.dim_nope + p.dim_v}, q.options());
  const MlaParams params = dgrad_params(target, p, with_aligned_rows(q), kv, with_aligned_rows(k_rope),
                                        with_aligned_rows(out), lse.contiguous(), b);
  const cudaStream_t stream = target.stream();
  target.run([&] {
    dispatch_tuned(q.scalar_type(), Dqk, p.dim_v, [&]<typename T, int kDimQK, int kDimV>() {
      cuda::run_mla_backward_preprocess<T>(params, kDimV, stream);
      cuda::run_mla_backward<T, kDimQK, kDimV>(params, p.deterministic, stream);
    });
  });
  return {p.deterministic ? b.grad_q : b.dq_accum, b.dkv, b.dk_rope_accum};
}

}  // namespace torch_mla::kernels_host
