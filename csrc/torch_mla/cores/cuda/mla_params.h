#pragma once
// The plain parameters of the CUDA kernels of mla_attention: pointers, element strides and sizes.
// The kernels know nothing of tensors, autograd or dispatch; cores/cuda/cuda_core.cu fills this in.
// Under TORCH_MLA_SIMT (mla_target.cuh) cudaStream_t is the emulator's simt::Stream*, so the same
// host code fills it in for a launch on the CPU.
#include "torch_mla/cores/cuda/grid_order.h"
#include "torch_mla/cores/cuda/mla_kernel_smem.h"
#include "torch_mla/cores/cuda/mla_target.cuh"

#include <cstdint>

namespace torch_mla::cuda {

struct MlaParams {
  // Sizes. Token t of the packed (T, ...) layout; sequence b is [cu_seqlens[b], cu_seqlens[b+1])
  // or, for a padded batch (cu_seqlens == nullptr), [b·seqlen, (b+1)·seqlen).
  int64_t tokens = 0;
  int batch = 0;
  int seqlen = 0;      // padded batch only
  int max_seqlen = 0;  // longest sequence: sizes the grid
  int heads = 0;
  int dim_nope = 0;    // Dn; Dn+Dr and Dv are template parameters of the kernels
  int dim_rope = 0;    // Dr
  const int32_t* cu_seqlens = nullptr;
  float softmax_scale = 0.f;
  float scale_log2 = 0.f;  // softmax_scale·log2(e): the kernels work with exp2
  bool causal = true;
  GridOrder grid_order = GridOrder::query_fastest;  // which index of blockIdx.x varies fastest

  // Forward operands (element strides; the last dimension of each is contiguous).
  const void* q = nullptr;  // (T, H, Dn+Dr)
  int64_t q_row_stride = 0, q_head_stride = 0;
  const void* kv = nullptr;  // (T, H, Dn+Dv): per head [k_nope | v], the expanded latents
  int64_t kv_row_stride = 0, kv_head_stride = 0;
  const void* k_rope = nullptr;  // (T, Dr), shared by all heads
  int64_t k_rope_row_stride = 0;
  void* out = nullptr;  // (T, H, Dv)
  int64_t out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;  // (T, H), contiguous
  float* row_max = nullptr;  // (T, H), contiguous: each row's max of softmax_scale·q·k; nullptr: not asked

  // Backward operands.
  const void* grad_out = nullptr;  // (T, H, Dv)
  int64_t do_row_stride = 0, do_head_stride = 0;
  float* lse_log2 = nullptr;  // (H, T): lse·log2(e), contiguous per head
  float* delta = nullptr;     // (H, T): rowsum(dO ⊙ O)
  float* dq_accum = nullptr;  // (T, H, Dn+Dr) float32, zeroed; the atomic dQ path adds into it
  void* dq = nullptr;         // (T, H, Dn+Dr), contiguous: written by the deterministic dQ kernel
  void* dkv = nullptr;        // (T, H, Dn+Dv), contiguous: per head [dk_nope | dv]
  float* dk_rope_accum = nullptr;  // (T, Dr) float32, zeroed: dk_rope summed over heads
  int heads_per_cta = 1;  // backward: heads one CTA handles in turn (all of them: deterministic)
};

// The block, sequence and inner index (head, or head group) of CTA `idx` (blockIdx.x) of a 1-D
// grid of `blocks` blocks per sequence × `batch` sequences × `inner`, in the order `order` names
// (grid_order.h). query_fastest: idx = (seq·inner + inner_idx)·blocks + block, so the CTAs launched
// together share one head's K/V; head_fastest: idx = block·batch·inner + seq·inner + inner_idx.
// 64-bit: a grid holds up to 2^31 - 1 CTAs (check_grid, mla_kernels_host.h).
struct GridCoords {
  int block, seq, inner;
};

__host__ __device__ __forceinline__ GridCoords grid_coords(GridOrder order, int64_t idx, int blocks, int batch,
                                                           int inner) {
  if (order == GridOrder::query_fastest) {
    const int64_t rest = idx / blocks;
    return {static_cast<int>(idx % blocks), static_cast<int>(rest / inner), static_cast<int>(rest % inner)};
  }
  const int64_t pairs = static_cast<int64_t>(batch) * inner;
  const int64_t rest = idx % pairs;
  return {static_cast<int>(idx / pairs), static_cast<int>(rest / inner), static_cast<int>(rest % inner)};
}

// The launchers, instantiated for T = __nv_bfloat16 / __half and the (Dn+Dr, Dv) of tuned_shapes.h.
// The caller guarantees: tokens > 0, batch > 0, max_seqlen > 0, Dn % 8 == 0, Dr % 8 == 0, and
// 16-byte aligned rows (pointers and row/head strides multiples of 8 elements).
template <typename T, int kDimQK, int kDimV>
void run_mla_forward(const MlaParams& params, cudaStream_t stream);

// lse_log2 and delta from lse, out and grad_out (one warp per (token, head) row).
template <typename T>
void run_mla_backward_preprocess(const MlaParams& params, int dim_v, cudaStream_t stream);

// dkv and dk_rope_accum; dq_accum too (atomics) unless `deterministic`, in which case a second
// kernel writes dq without atomics and dk_rope is reduced over heads inside one CTA.
template <typename T, int kDimQK, int kDimV>
void run_mla_backward(const MlaParams& params, bool deterministic, cudaStream_t stream);

}  // namespace torch_mla::cuda
