#pragma once
// Backward kernels of mla_attention (FlashAttention-2 scheme on mma.sync), docs/design.md §4:
//
// 1. preprocess: delta = rowsum(dO ⊙ O) and lse·log2(e), both stored (H, T) so that a query
//    block's values are contiguous.
// 2. dK/dV: one CTA per (key block of 64, group of heads, sequence), key blocks fastest in the grid
//    by default (grid_order.h), 8 warps. K and V of the block stay in shared memory; the CTA walks
//    the query blocks (64) that see it, Q/dO/lse/delta double buffered, and per block recomputes
//    P = exp2(S·scale·log2e − lse·log2e), dS = P ⊙ (dO·Vᵀ − delta), then dV += Pᵀ·dO, dK += dSᵀ·Q
//    and (atomic path) dQ += dS·K into a float32 accumulator.
//    dK's last Dr columns are the k_rope gradient of this head: they are not written per head but
//    kept in registers across the CTA's heads and added once into dk_rope_accum, so dk_rope is
//    summed over heads in-kernel (with one group of all heads, deterministically).
// 3. dQ (deterministic path only): one CTA per (query block, head, sequence), in the forward's
//    grid order, that recomputes P and dS over the visible key blocks and owns its dQ rows, so no
//    atomics are needed.
#include <cmath>

// mla_target.cuh is the one switch between the targets: the CUDA headers and inline PTX under
// nvcc, the emulator of csrc/simt under TORCH_MLA_SIMT (host C++); global and shared accesses go
// through its load_global / global_ref / load_shared / store_shared (plain accesses on the GPU,
// checked by the emulator); launches through its launch_kernel.
#include "torch_mla/cores/cuda/mla_forward.cuh"
#include "torch_mla/cores/cuda/mla_mma.cuh"
#include "torch_mla/cores/cuda/mla_params.h"
#include "torch_mla/cores/cuda/mla_target.cuh"
#include "torch_mla/layer/math.h"

namespace torch_mla::cuda {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__global__ void mla_backward_preprocess_kernel(const MlaParams p, int dim_v) {
  constexpr int kWarpsPerBlock = 8;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.tokens * p.heads) return;
  const int64_t token = row / p.heads;
  const int h = static_cast<int>(row % p.heads);
  const T* o = static_cast<const T*>(p.out) + token * p.out_row_stride + h * p.out_head_stride;
  const T* d_o = static_cast<const T*>(p.grad_out) + token * p.do_row_stride + h * p.do_head_stride;
  float acc = 0.f;
  for (int c = lane * 8; c < dim_v; c += kWarpSize * 8) {
    const uint4 ov = load_global(reinterpret_cast<const uint4*>(o + c));
    const uint4 dv = load_global(reinterpret_cast<const uint4*>(d_o + c));
    const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
    const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 a = unpack2<T>(ow[k]);
      const float2 b = unpack2<T>(dw[k]);
      acc += a.x * b.x + a.y * b.y;
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    global_ref(&p.delta[h * p.tokens + token]) = acc;
    global_ref(&p.lse_log2[h * p.tokens + token]) = load_global(&p.lse[token * p.heads + h]) * kLog2e;
  }
}

template <int kDimQK_, int kDimV_>
struct BackwardTraits {
  static constexpr int kDimQK = kDimQK_;
  static constexpr int kDimV = kDimV_;
  static constexpr int kBlockM = 64;  // queries per step
  static constexpr int kBlockN = 64;  // keys per CTA
  static constexpr int kWarps = 8;    // 4 × 2: warp w owns rows 16·(w % 4) and half the columns
  static constexpr int kThreads = kWarps * kWarpSize;
  using TileQ = SmemTile<kBlockM, kDimQK>;
  using TileDO = SmemTile<kBlockM, kDimV>;
  using TileK = SmemTile<kBlockN, kDimQK>;
  using TileV = SmemTile<kBlockN, kDimV>;
  using TileP = SmemTile<kBlockM, kBlockN>;  // P and dS, [query][key]
  static constexpr int kRowStatsBytes = 2 * kBlockM * 4;  // lse·log2e and delta of one step
  static constexpr int kSmemBytes = TileK::kBytes + TileV::kBytes + 2 * (TileQ::kBytes + TileDO::kBytes) +
                                    2 * TileP::kBytes + 2 * kRowStatsBytes;
};

// Copies one query block's Q, dO, lse·log2e and delta of head h into shared memory (async).
template <typename T, typename Traits>
__device__ __forceinline__ void load_query_step(const MlaParams& p, uint32_t sQ, uint32_t sDO, uint32_t sStats,
                                                int64_t token0, int valid_rows, int h, int tid) {
  constexpr int kBlockM = Traits::kBlockM, kThreads = Traits::kThreads;
  const T* q = static_cast<const T*>(p.q) + token0 * p.q_row_stride + h * p.q_head_stride;
  load_tile_async<kBlockM, Traits::kDimQK, kThreads>(sQ, valid_rows, p.q, [&](int r, int c) {
    return static_cast<const void*>(q + r * p.q_row_stride + c * 8);
  }, tid);
  const T* d_o = static_cast<const T*>(p.grad_out) + token0 * p.do_row_stride + h * p.do_head_stride;
  load_tile_async<kBlockM, Traits::kDimV, kThreads>(sDO, valid_rows, p.grad_out, [&](int r, int c) {
    return static_cast<const void*>(d_o + r * p.do_row_stride + c * 8);
  }, tid);
  static_assert(2 * kBlockM <= kThreads, "one thread per row statistic");
  if (tid < 2 * kBlockM) {
    const int r = tid % kBlockM;
    const float* src = (tid < kBlockM ? p.lse_log2 : p.delta) + h * p.tokens + token0 + r;
    cp_async_4(sStats + tid * 4, r < valid_rows ? src : p.delta, r < valid_rows);
  }
}

template <typename T, typename Traits, bool kAtomicDq>
__global__ void __launch_bounds__(Traits::kThreads, 1) mla_backward_kernel(const MlaParams p) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kDimQK = Traits::kDimQK, kDimV = Traits::kDimV;
  constexpr int kThreads = Traits::kThreads;
  using TileQ = typename Traits::TileQ;
  using TileDO = typename Traits::TileDO;
  using TileK = typename Traits::TileK;
  using TileV = typename Traits::TileV;
  using TileP = typename Traits::TileP;

  // Key blocks are the grid's fastest index by default (grid_order.h). Key blocks at the start of
  // causal sequences see the most queries: in either order they go first within their (head
  // group, sequence).
  const int groups = (p.heads + p.heads_per_cta - 1) / p.heads_per_cta;
  const GridCoords cta =
      grid_coords(p.grid_order, blockIdx.x, static_cast<int>(ceil_div(p.max_seqlen, kBlockN)), p.batch, groups);
  const int n_block = cta.block;
  const int b = cta.seq;
  const int group = cta.inner;
  const SeqSpan seq = sequence_span(p.cu_seqlens, b, p.seqlen);
  CUDA_KERNEL_ASSERT(seq.begin >= 0 && seq.len >= 0 && seq.begin + seq.len <= p.tokens &&
                     seq.len <= p.max_seqlen);
  // With max_seqlen given the host never reads cu_seqlens (docs/design.md §3.2): its ends are
  // checked here, so that tokens outside every sequence cannot go silently unwritten.
  CUDA_KERNEL_ASSERT(p.cu_seqlens == nullptr || (p.cu_seqlens[0] == 0 && p.cu_seqlens[p.batch] == p.tokens));
  const int len = static_cast<int>(seq.len);
  const int n0 = n_block * kBlockN;
  if (n0 >= len) return;
  const int k_rows = min(kBlockN, len - n0);
  const int m_begin = static_cast<int>(first_query_seeing(n0, p.causal)) / kBlockM * kBlockM;
  const int num_steps = static_cast<int>(ceil_div(len - m_begin, kBlockM));
  const int h_begin = group * p.heads_per_cta;
  const int h_end = min(p.heads, h_begin + p.heads_per_cta);

  TORCH_MLA_DYNAMIC_SMEM(smem);
  const uint32_t sK = smem_addr(smem);
  const uint32_t sV = sK + TileK::kBytes;
  const uint32_t sQ0 = sV + TileV::kBytes;  // two buffers each of Q, dO and row statistics
  const uint32_t sDO0 = sQ0 + 2 * TileQ::kBytes;
  const uint32_t sP = sDO0 + 2 * TileDO::kBytes;
  const uint32_t sDS = sP + TileP::kBytes;
  const uint32_t sStats0 = sDS + TileP::kBytes;
  unsigned char* const smem_q0 = smem + (sQ0 - sK);
  unsigned char* const smem_do0 = smem + (sDO0 - sK);
  T* const sP_ptr = reinterpret_cast<T*>(smem + (sP - sK));
  T* const sDS_ptr = reinterpret_cast<T*>(smem + (sDS - sK));
  const float* const sStats_ptr = reinterpret_cast<const float*>(smem + (sStats0 - sK));

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % 4, wn = warp / 4;
  const int row0 = wm * 16;                 // this warp's rows of the S/dP tile and of dK/dV/dQ
  const int s_col0 = wn * (kBlockN / 2);    // its key columns of the S/dP tile
  const int dk_col0 = wn * (kDimQK / 2);    // its columns of dK and dQ
  const int dv_col0 = wn * (kDimV / 2);     // its columns of dV
  const int dim_rope = kDimQK - p.dim_nope;
  const float one[2] = {1.f, 1.f};

  float acc_dk[kDimQK / 16][4] = {};
  float acc_dv[kDimV / 16][4];

  for (int h = h_begin; h < h_end; ++h) {
    // dK's nope columns and dV restart per head; its rope columns keep summing over heads.
#pragma unroll
    for (int j = 0; j < kDimQK / 16; ++j) {
      if (dk_col0 + j * 8 < p.dim_nope) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < kDimV / 16; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dv[j][e] = 0.f;
    }

    load_k_tile<T, kBlockN, kDimQK, kThreads>(p, sK, seq.begin + n0, k_rows, h, tid);
    load_v_tile<T, kBlockN, kDimV, kThreads>(p, sV, seq.begin + n0, k_rows, h, tid);
    load_query_step<T, Traits>(p, sQ0, sDO0, sStats0, seq.begin + m_begin, min(kBlockM, len - m_begin), h, tid);
    cp_async_commit();

    for (int step = 0; step < num_steps; ++step) {
      const int m0 = m_begin + step * kBlockM;
      const int buf = step & 1;
      const uint32_t sQ = sQ0 + buf * TileQ::kBytes;
      const uint32_t sDO = sDO0 + buf * TileDO::kBytes;
      const float* const lse_log2 = sStats_ptr + buf * 2 * kBlockM;
      const float* const delta = lse_log2 + kBlockM;
      if (step + 1 < num_steps) {
        // The other buffer was released by the barrier that ended the previous step.
        const int next = buf ^ 1;
        load_query_step<T, Traits>(p, sQ0 + next * TileQ::kBytes, sDO0 + next * TileDO::kBytes,
                                   sStats0 + next * Traits::kRowStatsBytes, seq.begin + m0 + kBlockM,
                                   min(kBlockM, len - m0 - kBlockM), h, tid);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // this step's Q, dO and statistics (and K, V on the first step) landed

      float s[kBlockN / 16][4] = {};
      warp_gemm_ss<T, kBlockN / 16, kDimQK / 16, false, false, TileQ::kStride, TileK::kStride>(
          s, sQ, row0, sK, s_col0, lane);
      float dp[kBlockN / 16][4] = {};
      warp_gemm_ss<T, kBlockN / 16, kDimV / 16, false, false, TileDO::kStride, TileV::kStride>(
          dp, sDO, row0, sV, s_col0, lane);

      const bool need_mask = tile_needs_mask(m0, kBlockM, n0, kBlockN, len, p.causal);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = row0 + g + 8 * i;
        const int q_pos = m0 + r;
        const float row_lse = load_shared(&lse_log2[r]);
        const float row_delta = load_shared(&delta[r]);
#pragma unroll
        for (int j = 0; j < kBlockN / 16; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int k_pos = n0 + s_col0 + j * 8 + 2 * t + e;
            const bool visible =
                !need_mask || (q_pos < len && k_pos < len && !is_masked(q_pos, k_pos, p.causal));
            const float prob = visible ? exp2f(s[j][2 * i + e] * p.scale_log2 - row_lse) : 0.f;
            s[j][2 * i + e] = prob;
            dp[j][2 * i + e] = prob * (dp[j][2 * i + e] - row_delta);
          }
        }
      }
      store_c_to_smem<T, kBlockN / 16, TileP::kStride>(s, one, sP_ptr, row0, s_col0, lane);
      store_c_to_smem<T, kBlockN / 16, TileP::kStride>(dp, one, sDS_ptr, row0, s_col0, lane);
      __syncthreads();  // the whole P and dS tiles are in shared memory

      // dV += Pᵀ·dO and dK += dSᵀ·Q: A is the transpose of the [query][key] tile.
      warp_gemm_ss<T, kDimV / 16, kBlockM / 16, true, true, TileP::kStride, TileDO::kStride>(
          acc_dv, sP, row0, sDO, dv_col0, lane);
      warp_gemm_ss<T, kDimQK / 16, kBlockM / 16, true, true, TileP::kStride, TileQ::kStride>(
          acc_dk, sDS, row0, sQ, dk_col0, lane);
      if constexpr (kAtomicDq) {
        float dq[kDimQK / 16][4] = {};
        warp_gemm_ss<T, kDimQK / 16, kBlockN / 16, false, true, TileP::kStride, TileK::kStride>(
            dq, sDS, row0, sK, dk_col0, lane);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int q_pos = m0 + row0 + g + 8 * i;
          if (q_pos < len) {
            float* dst = p.dq_accum + ((seq.begin + q_pos) * p.heads + h) * kDimQK + dk_col0 + 2 * t;
#pragma unroll
            for (int j = 0; j < kDimQK / 16; ++j) {
              atomic_add_float2(dst + j * 8, dq[j][2 * i] * p.softmax_scale, dq[j][2 * i + 1] * p.softmax_scale);
            }
          }
        }
      }
      __syncthreads();  // this step's buffers, P and dS are free
    }

    // dk_nope (scaled) and dv of head h, staged in the first Q and dO buffers (free now), then
    // written as whole 16-byte chunks of dKV rows [dk_nope | dv].
    T* const sDK_ptr = reinterpret_cast<T*>(smem_q0);
    T* const sDV_ptr = reinterpret_cast<T*>(smem_do0);
    const float scale[2] = {p.softmax_scale, p.softmax_scale};
    store_c_to_smem<T, kDimQK / 16, TileQ::kStride>(acc_dk, scale, sDK_ptr, row0, dk_col0, lane);
    store_c_to_smem<T, kDimV / 16, TileDO::kStride>(acc_dv, one, sDV_ptr, row0, dv_col0, lane);
    __syncthreads();
    const int nope_chunks = p.dim_nope / 8;
    const int row_chunks = nope_chunks + kDimV / 8;
    const int64_t dkv_row_stride = static_cast<int64_t>(p.heads) * (p.dim_nope + kDimV);
    T* const dkv = static_cast<T*>(p.dkv) + (seq.begin + n0) * dkv_row_stride + h * (p.dim_nope + kDimV);
    for (int idx = tid; idx < k_rows * row_chunks; idx += kThreads) {
      const int r = idx / row_chunks;
      const int c = idx % row_chunks;
      const T* src = c < nope_chunks ? sDK_ptr + r * TileQ::kStride + c * 8
                                     : sDV_ptr + r * TileDO::kStride + (c - nope_chunks) * 8;
      global_ref(reinterpret_cast<uint4*>(dkv + r * dkv_row_stride + c * 8)) =
          load_shared(reinterpret_cast<const uint4*>(src));
    }
    __syncthreads();  // staging buffers free before the next head's copies
  }

  // dk_rope of this block, summed over the CTA's heads; one addition per element and group.
#pragma unroll
  for (int j = 0; j < kDimQK / 16; ++j) {
    const int col = dk_col0 + j * 8 + 2 * t;
    if (dk_col0 + j * 8 >= p.dim_nope) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = row0 + g + 8 * i;
        if (r < k_rows) {
          atomic_add_float2(p.dk_rope_accum + (seq.begin + n0 + r) * dim_rope + col - p.dim_nope,
                            acc_dk[j][2 * i] * p.softmax_scale, acc_dk[j][2 * i + 1] * p.softmax_scale);
        }
      }
    }
  }
}

template <int kDimQK_, int kDimV_>
struct DqTraits {
  static constexpr int kDimQK = kDimQK_;
  static constexpr int kDimV = kDimV_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 32;  // small: the warp holds dQ (16 × Dn+Dr) in registers
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  using TileQ = SmemTile<kBlockM, kDimQK>;
  using TileDO = SmemTile<kBlockM, kDimV>;
  using TileK = SmemTile<kBlockN, kDimQK>;
  using TileV = SmemTile<kBlockN, kDimV>;
  static constexpr int kSmemBytes = TileQ::kBytes + TileDO::kBytes + TileK::kBytes + TileV::kBytes;
};

template <typename T, typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) mla_backward_dq_kernel(const MlaParams p) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kDimQK = Traits::kDimQK, kDimV = Traits::kDimV;
  constexpr int kThreads = Traits::kThreads;
  using TileQ = typename Traits::TileQ;
  using TileDO = typename Traits::TileDO;
  using TileK = typename Traits::TileK;
  using TileV = typename Traits::TileV;

  // As the forward: query blocks fastest by default, the last (heaviest under causal) first.
  const int num_m_blocks = static_cast<int>(ceil_div(p.max_seqlen, kBlockM));
  const GridCoords cta = grid_coords(p.grid_order, blockIdx.x, num_m_blocks, p.batch, p.heads);
  const int m_block = num_m_blocks - 1 - cta.block;
  const int b = cta.seq;
  const int h = cta.inner;
  const SeqSpan seq = sequence_span(p.cu_seqlens, b, p.seqlen);
  const int len = static_cast<int>(seq.len);
  const int m0 = m_block * kBlockM;
  if (m0 >= len) return;

  TORCH_MLA_DYNAMIC_SMEM(smem);
  T* const sQ_ptr = reinterpret_cast<T*>(smem);
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sDO = sQ + TileQ::kBytes;
  const uint32_t sK = sDO + TileDO::kBytes;
  const uint32_t sV = sK + TileK::kBytes;

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
    load_tile_async<kBlockM, kDimQK, kThreads>(sQ, q_rows, p.q, [&](int r, int c) {
      return static_cast<const void*>(q + r * p.q_row_stride + c * 8);
    }, tid);
    const T* d_o = static_cast<const T*>(p.grad_out) + (seq.begin + m0) * p.do_row_stride + h * p.do_head_stride;
    load_tile_async<kBlockM, kDimV, kThreads>(sDO, q_rows, p.grad_out, [&](int r, int c) {
      return static_cast<const void*>(d_o + r * p.do_row_stride + c * 8);
    }, tid);
  }
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_m0 + g + 8 * i;
    const int64_t idx = h * p.tokens + seq.begin + m0 + r;
    row_lse[i] = r < q_rows ? load_global(&p.lse_log2[idx]) : 0.f;
    row_delta[i] = r < q_rows ? load_global(&p.delta[idx]) : 0.f;
  }

  float acc_dq[kDimQK / 8][4] = {};
  for (int n_block = 0; n_block < num_n_blocks; ++n_block) {
    const int n0 = n_block * kBlockN;
    const int k_rows = min(kBlockN, len - n0);
    load_k_tile<T, kBlockN, kDimQK, kThreads>(p, sK, seq.begin + n0, k_rows, h, tid);
    load_v_tile<T, kBlockN, kDimV, kThreads>(p, sV, seq.begin + n0, k_rows, h, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    float s[kBlockN / 8][4] = {};
    warp_gemm_ss<T, kBlockN / 8, kDimQK / 16, false, false, TileQ::kStride, TileK::kStride>(
        s, sQ, warp_m0, sK, 0, lane);
    float dp[kBlockN / 8][4] = {};
    warp_gemm_ss<T, kBlockN / 8, kDimV / 16, false, false, TileDO::kStride, TileV::kStride>(
        dp, sDO, warp_m0, sV, 0, lane);
    const bool need_mask = tile_needs_mask(m0, q_rows, n0, kBlockN, len, p.causal);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q_pos = m0 + warp_m0 + g + (e >> 1) * 8;
        const int k_pos = n0 + j * 8 + 2 * t + (e & 1);
        const bool visible =
            !need_mask || (q_pos < len && k_pos < len && !is_masked(q_pos, k_pos, p.causal));
        const float prob = visible ? exp2f(s[j][e] * p.scale_log2 - row_lse[e >> 1]) : 0.f;
        dp[j][e] = prob * (dp[j][e] - row_delta[e >> 1]);
      }
    }
    uint32_t ds_frag[kBlockN / 16][4];
    to_a_fragments<T, kBlockN / 16>(ds_frag, dp);
    warp_gemm_rs<T, kDimQK / 8, kBlockN / 16, TileK::kStride>(acc_dq, ds_frag, sK, 0, lane);
    __syncthreads();  // K and V free for the next block
  }

  // dQ·scale staged in this warp's own rows of sQ, then 16-byte stores into dq (T, H, Dn+Dr).
  const float scale[2] = {p.softmax_scale, p.softmax_scale};
  store_c_to_smem<T, kDimQK / 8, TileQ::kStride>(acc_dq, scale, sQ_ptr, warp_m0, 0, lane);
  __syncwarp();
  const int warp_rows = min(16, q_rows - warp_m0);
  T* dq = static_cast<T*>(p.dq) + ((seq.begin + m0 + warp_m0) * p.heads + h) * kDimQK;
  warp_copy_rows_to_global<T, kDimQK, TileQ::kStride>(
      sQ_ptr + warp_m0 * TileQ::kStride, warp_rows,
      [&](int r) { return dq + static_cast<int64_t>(r) * p.heads * kDimQK; }, lane);
}

template <typename T>
void run_mla_backward_preprocess(const MlaParams& params, int dim_v, cudaStream_t stream) {
  constexpr int kWarpsPerBlock = 8;
  const int64_t blocks = ceil_div(params.tokens * params.heads, kWarpsPerBlock);
  launch_kernel<mla_backward_preprocess_kernel<T>>(blocks, kWarpsPerBlock * kWarpSize, 0, stream, params, dim_v);
}

template <typename T, int kDimQK, int kDimV>
void run_mla_backward(const MlaParams& params, bool deterministic, cudaStream_t stream) {
  using Traits = BackwardTraits<kDimQK, kDimV>;
  MlaParams p = params;
  // Deterministic: one CTA sums dk_rope over all heads in a fixed order; otherwise one head per
  // CTA for parallelism, dk_rope and dQ added atomically.
  p.heads_per_cta = deterministic ? p.heads : 1;
  const int64_t groups = ceil_div(p.heads, p.heads_per_cta);
  const int64_t blocks = ceil_div(p.max_seqlen, Traits::kBlockN) * p.batch * groups;
  if (deterministic) {
    launch_kernel<mla_backward_kernel<T, Traits, false>>(blocks, Traits::kThreads, Traits::kSmemBytes, stream, p);
    using DqT = DqTraits<kDimQK, kDimV>;
    const int64_t dq_blocks = ceil_div(p.max_seqlen, DqT::kBlockM) * p.batch * p.heads;
    launch_kernel<mla_backward_dq_kernel<T, DqT>>(dq_blocks, DqT::kThreads, DqT::kSmemBytes, stream, p);
  } else {
    launch_kernel<mla_backward_kernel<T, Traits, true>>(blocks, Traits::kThreads, Traits::kSmemBytes, stream, p);
  }
}


// The tiles' shared memory is the formula the selection rule reads (mla_kernel_smem.h, included by
// mla_params.h). Here, after the kernels, so that their code and PTX do not move.
static_assert(BackwardTraits<192, 128>::kSmemBytes == backward_smem_bytes(192, 128), "mla_kernel_smem.h disagrees");
static_assert(BackwardTraits<96, 64>::kSmemBytes == backward_smem_bytes(96, 64), "mla_kernel_smem.h disagrees");
static_assert(DqTraits<192, 128>::kSmemBytes == backward_dq_smem_bytes(192, 128), "mla_kernel_smem.h disagrees");
static_assert(DqTraits<96, 64>::kSmemBytes == backward_dq_smem_bytes(96, 64), "mla_kernel_smem.h disagrees");

}  // namespace torch_mla::cuda
