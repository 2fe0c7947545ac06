#pragma once
// Forward flash-attention kernel of mla_attention (FlashAttention-2 scheme on mma.sync).
//
// One CTA per (query block of 128 rows, head, sequence), query blocks fastest in the grid by
// default (grid_order.h); 8 warps, each owning 16 query rows. The CTA walks the visible key blocks
// (64 keys) from the last to the first, so that the one or two blocks that need causal /
// sequence-end masking come first. Per key block: S = Q·Kᵀ on tensor
// cores, online softmax in registers (base 2), O += P·V with P kept in registers. K's tile is
// [k_nope from the expanded KV buffer | k_rope], k_rope read straight from its (T, Dr) tensor for
// every head. The V copy overlaps S and the softmax; the next K copy overlaps P·V.
#include <cmath>

// mla_target.cuh is the one switch between the targets: the CUDA headers and inline PTX under
// nvcc, the emulator of csrc/simt under TORCH_MLA_SIMT (host C++); global and shared accesses go
// through its load_global / global_ref / load_shared / store_shared (plain accesses on the GPU,
// checked by the emulator); launches through its launch_kernel.
#include "torch_mla/cores/cuda/mla_mma.cuh"
#include "torch_mla/cores/cuda/mla_params.h"
#include "torch_mla/cores/cuda/mla_target.cuh"
#include "torch_mla/layer/math.h"

namespace torch_mla::cuda {

template <int kDimQK_, int kDimV_>
struct ForwardTraits {
  static constexpr int kDimQK = kDimQK_;
  static constexpr int kDimV = kDimV_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  using TileQ = SmemTile<kBlockM, kDimQK>;
  using TileK = SmemTile<kBlockN, kDimQK>;
  using TileV = SmemTile<kBlockN, kDimV>;
  static_assert(kDimV <= kDimQK, "the epilogue stages O in Q's tile");
  static constexpr int kSmemBytes = TileQ::kBytes + TileK::kBytes + TileV::kBytes;
};

// Copies the K tile of keys [k0, k0 + kBlockN) of head h: columns [0, Dn) from the KV buffer,
// [Dn, Dn+Dr) from k_rope.
template <typename T, int kRows, int kDimQK, int kThreads>
__device__ __forceinline__ void load_k_tile(const MlaParams& p, uint32_t dst, int64_t token0, int valid_rows,
                                            int h, int tid) {
  const T* kv = static_cast<const T*>(p.kv) + token0 * p.kv_row_stride + h * p.kv_head_stride;
  const T* kr = static_cast<const T*>(p.k_rope) + token0 * p.k_rope_row_stride;
  const int nope_chunks = p.dim_nope / 8;
  load_tile_async<kRows, kDimQK, kThreads>(dst, valid_rows, p.kv, [&](int r, int c) {
    return c < nope_chunks ? static_cast<const void*>(kv + r * p.kv_row_stride + c * 8)
                           : static_cast<const void*>(kr + r * p.k_rope_row_stride + (c - nope_chunks) * 8);
  }, tid);
}

template <typename T, int kRows, int kDimV, int kThreads>
__device__ __forceinline__ void load_v_tile(const MlaParams& p, uint32_t dst, int64_t token0, int valid_rows,
                                            int h, int tid) {
  const T* v = static_cast<const T*>(p.kv) + token0 * p.kv_row_stride + h * p.kv_head_stride + p.dim_nope;
  load_tile_async<kRows, kDimV, kThreads>(dst, valid_rows, p.kv, [&](int r, int c) {
    return static_cast<const void*>(v + r * p.kv_row_stride + c * 8);
  }, tid);
}

// Copies rows [0, valid_rows) of a warp's 16-row T tile in shared memory to global rows
// row_ptr(r), 16 bytes per lane per step.
template <typename T, int kCols, int kStride, typename RowPtr>
__device__ __forceinline__ void warp_copy_rows_to_global(const T* tile, int valid_rows, RowPtr row_ptr,
                                                         int lane) {
  constexpr int kChunks = kCols / 8;
  static_assert((16 * kChunks) % kWarpSize == 0, "row copy must divide evenly among the lanes");
#pragma unroll
  for (int i = 0; i < 16 * kChunks / kWarpSize; ++i) {
    const int idx = lane + i * kWarpSize;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    if (r < valid_rows) {
      global_ref(reinterpret_cast<uint4*>(row_ptr(r) + c * 8)) =
          load_shared(reinterpret_cast<const uint4*>(tile + r * kStride + c * 8));
    }
  }
}

template <typename T, typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) mla_forward_kernel(const MlaParams p) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kDimQK = Traits::kDimQK, kDimV = Traits::kDimV;
  constexpr int kThreads = Traits::kThreads;
  using TileQ = typename Traits::TileQ;
  using TileK = typename Traits::TileK;
  using TileV = typename Traits::TileV;

  // The last query block of each (head, sequence) goes first, in either grid order: under causal
  // masking it sees the most keys, so the heaviest CTAs start first and the grid ends on light
  // ones (a short tail), FlashAttention 3's longest-processing-time-first order for causal. Blocks
  // past a short packed sequence's end return at once wherever they land.
  const int num_m_blocks = static_cast<int>(ceil_div(p.max_seqlen, kBlockM));
  const GridCoords cta = grid_coords(p.grid_order, blockIdx.x, num_m_blocks, p.batch, p.heads);
  const int m_block = num_m_blocks - 1 - cta.block;
  const int b = cta.seq;
  const int h = cta.inner;
  const SeqSpan seq = sequence_span(p.cu_seqlens, b, p.seqlen);
  CUDA_KERNEL_ASSERT(seq.begin >= 0 && seq.len >= 0 && seq.begin + seq.len <= p.tokens &&
                     seq.len <= p.max_seqlen);
  // With max_seqlen given the host never reads cu_seqlens (docs/design.md §3.2): its ends are
  // checked here, so that tokens outside every sequence cannot go silently unwritten.
  CUDA_KERNEL_ASSERT(p.cu_seqlens == nullptr || (p.cu_seqlens[0] == 0 && p.cu_seqlens[p.batch] == p.tokens));
  const int len = static_cast<int>(seq.len);
  const int m0 = m_block * kBlockM;
  if (m0 >= len) return;

  TORCH_MLA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  const uint32_t sQ_addr = smem_addr(smem);
  const uint32_t sK_addr = sQ_addr + TileQ::kBytes;
  const uint32_t sV_addr = sK_addr + TileK::kBytes;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int warp_m0 = warp * 16;

  const int q_rows = min(kBlockM, len - m0);
  const int k_end = static_cast<int>(visible_key_end(m0 + q_rows, len, p.causal));
  const int num_n_blocks = static_cast<int>(ceil_div(k_end, kBlockN));

  {
    const T* q = static_cast<const T*>(p.q) + (seq.begin + m0) * p.q_row_stride + h * p.q_head_stride;
    load_tile_async<kBlockM, kDimQK, kThreads>(sQ_addr, q_rows, p.q, [&](int r, int c) {
      return static_cast<const void*>(q + r * p.q_row_stride + c * 8);
    }, tid);
  }
  {
    const int n0 = (num_n_blocks - 1) * kBlockN;
    load_k_tile<T, kBlockN, kDimQK, kThreads>(p, sK_addr, seq.begin + n0, min(kBlockN, len - n0), h, tid);
  }
  cp_async_commit();

  float acc_o[kDimV / 8][4] = {};
  // Per row (g and g+8 of this warp): running max of the log2-scaled scores and this thread's
  // part of the running denominator (summed over the quad at the end).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  for (int n_block = num_n_blocks - 1; n_block >= 0; --n_block) {
    const int n0 = n_block * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K(n_block) landed; every warp is done with V(n_block + 1)
    load_v_tile<T, kBlockN, kDimV, kThreads>(p, sV_addr, seq.begin + n0, min(kBlockN, len - n0), h, tid);
    cp_async_commit();

    float s[kBlockN / 8][4] = {};
    warp_gemm_ss<T, kBlockN / 8, kDimQK / 16, false, false, TileQ::kStride, TileK::kStride>(
        s, sQ_addr, warp_m0, sK_addr, 0, lane);

    const bool need_mask = tile_needs_mask(m0, q_rows, n0, kBlockN, len, p.causal);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q_pos = m0 + warp_m0 + g + (e >> 1) * 8;
        const int k_pos = n0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = (need_mask && (k_pos >= len || is_masked(q_pos, k_pos, p.causal)))
                      ? -INFINITY
                      : s[j][e] * p.scale_log2;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) block_max = fmaxf(block_max, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      const float new_max = fmaxf(row_max[i], quad_max(block_max));
      // A row that has seen no visible key yet keeps max = -inf; exponentiate against 0 so that
      // its probabilities are exp2(-inf) = 0 rather than NaN.
      const float base = new_max == -INFINITY ? 0.f : new_max;
      const float factor = exp2f(row_max[i] - base);
      row_max[i] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        s[j][2 * i] = exp2f(s[j][2 * i] - base);
        s[j][2 * i + 1] = exp2f(s[j][2 * i + 1] - base);
        sum += s[j][2 * i] + s[j][2 * i + 1];
      }
      row_sum[i] = row_sum[i] * factor + sum;
#pragma unroll
      for (int j = 0; j < kDimV / 8; ++j) {
        acc_o[j][2 * i] *= factor;
        acc_o[j][2 * i + 1] *= factor;
      }
    }
    uint32_t p_frag[kBlockN / 16][4];
    to_a_fragments<T, kBlockN / 16>(p_frag, s);

    cp_async_wait<0>();
    __syncthreads();  // V(n_block) landed; every warp is done with K(n_block)
    if (n_block > 0) {
      const int prev0 = (n_block - 1) * kBlockN;
      load_k_tile<T, kBlockN, kDimQK, kThreads>(p, sK_addr, seq.begin + prev0, min(kBlockN, len - prev0), h,
                                                tid);
    }
    cp_async_commit();
    warp_gemm_rs<T, kDimV / 8, kBlockN / 16, TileV::kStride>(acc_o, p_frag, sV_addr, 0, lane);
  }

  // Epilogue: O / rowsum staged in this warp's own rows of sQ (only this warp reads them), then
  // 16-byte stores; lse = max·ln 2 + ln(sum) in natural-log units, and when asked the row maximum
  // max·ln 2 = max of softmax_scale·q·k (docs/design.md §12).
  constexpr float kLn2 = 0.693147180559945309f;
  float inv_sum[2];
  float lse[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float sum = quad_sum(row_sum[i]);
    inv_sum[i] = sum > 0.f ? 1.f / sum : 0.f;
    lse[i] = sum > 0.f ? row_max[i] * kLn2 + logf(sum) : -INFINITY;
  }
  store_c_to_smem<T, kDimV / 8, TileQ::kStride>(acc_o, inv_sum, sQ, warp_m0, 0, lane);
  __syncwarp();
  const int warp_rows = min(16, q_rows - warp_m0);
  T* out = static_cast<T*>(p.out) + (seq.begin + m0 + warp_m0) * p.out_row_stride + h * p.out_head_stride;
  warp_copy_rows_to_global<T, kDimV, TileQ::kStride>(
      sQ + warp_m0 * TileQ::kStride, warp_rows, [&](int r) { return out + r * p.out_row_stride; }, lane);
  if (t == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = g + 8 * i;
      if (r < warp_rows) {
        const int64_t row = (seq.begin + m0 + warp_m0 + r) * p.heads + h;
        global_ref(&p.lse[row]) = lse[i];
        if (p.row_max != nullptr) global_ref(&p.row_max[row]) = row_max[i] * kLn2;
      }
    }
  }
}

template <typename T, int kDimQK, int kDimV>
void run_mla_forward(const MlaParams& params, cudaStream_t stream) {
  using Traits = ForwardTraits<kDimQK, kDimV>;
  const int64_t blocks =
      ceil_div(params.max_seqlen, Traits::kBlockM) * static_cast<int64_t>(params.batch) * params.heads;
  launch_kernel<mla_forward_kernel<T, Traits>>(blocks, Traits::kThreads, Traits::kSmemBytes, stream, params);
}

// The tiles' shared memory is the formula the selection rule reads (mla_kernel_smem.h, included by
// mla_params.h). Here, after the kernels, so that their code and PTX do not move.
static_assert(ForwardTraits<192, 128>::kSmemBytes == forward_smem_bytes(192, 128), "mla_kernel_smem.h disagrees");
static_assert(ForwardTraits<96, 64>::kSmemBytes == forward_smem_bytes(96, 64), "mla_kernel_smem.h disagrees");

}  // namespace torch_mla::cuda
