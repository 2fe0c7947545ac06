#pragma once
// Warp-level building blocks of the attention kernels: asynchronous global→shared copies, shared
// memory tiles, ldmatrix fragment loads and the m16n8k16 tensor-core MMA (mma.sync, sm_80+). The
// primitives themselves (cp.async, ldmatrix, mma, atomics; inline PTX or emulated) are in
// mla_target.cuh; everything here is plain code over them.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), which every helper below assumes:
//   A (16×16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16×8, k × n):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16×8, float):      c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// A warp's C tile is kept as float acc[N/8][4] (one entry per 8-column n-tile).
#include <cstdint>
#include <cstring>

#include "torch_mla/cores/cuda/mla_target.cuh"

namespace torch_mla::cuda {

constexpr int kWarpSize = 32;

// Two floats rounded to T and packed as one 32-bit register (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u);

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  __nv_bfloat162 v;
  memcpy(&v, &u, sizeof(u));
  return __bfloat1622float2(v);
}

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  __half2 v;
  memcpy(&v, &u, sizeof(u));
  return __half22float2(v);
}

// A kRows × kCols tile of 16-bit elements in shared memory, rows padded by 16 bytes: a row is then
// an odd number of 16-byte units long, so the 8 row addresses of each ldmatrix phase fall into
// distinct bank groups, and fragment stores (4 bytes per lane) are conflict-free.
template <int kRows, int kCols>
struct SmemTile {
  static_assert(kCols % 16 == 0, "tile columns must be a multiple of 16");
  static constexpr int kStride = kCols + 8;  // elements
  static constexpr int kBytes = kRows * kStride * 2;

  // Byte offset of element (row, col) from the tile's shared-memory address.
  __device__ __forceinline__ static uint32_t offset(int row, int col) {
    return static_cast<uint32_t>((row * kStride + col) * 2);
  }
};

// Copies a kRows × kCols tile, 16 bytes per thread per step, into shared memory at `dst`. Row r,
// 8-element chunk c comes from src(r, c); rows r >= valid_rows are zero-filled and not read.
template <int kRows, int kCols, int kThreads, typename Src>
__device__ __forceinline__ void load_tile_async(uint32_t dst, int valid_rows, const void* any_valid_ptr,
                                                Src src, int tid) {
  using Tile = SmemTile<kRows, kCols>;
  constexpr int kChunks = kCols / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "tile copy must divide evenly among the threads");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const bool valid = r < valid_rows;
    cp_async_16(dst + Tile::offset(r, c * 8), valid ? src(r, c) : any_valid_ptr, valid);
  }
}

// A fragment of A (16×16) at (m0, k0) of a row-major [m][k] tile.
template <int kStride>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t base, int m0, int k0, int lane) {
  const int row = m0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = k0 + (lane >> 4) * 8;
  ldmatrix_x4(a, base + (row * kStride + col) * 2);
}

// A fragment of A = Xᵀ (16×16) at (m0, k0), X a row-major [k][m] tile.
template <int kStride>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], uint32_t base, int m0, int k0, int lane) {
  const int mat = lane >> 3;
  const int row = k0 + (lane & 7) + (mat >> 1) * 8;
  const int col = m0 + (mat & 1) * 8;
  ldmatrix_x4_trans(a, base + (row * kStride + col) * 2);
}

// B fragments of two n-tiles (k16 × n16 at (k0, n0)) with B = Xᵀ, X a row-major [n][k] tile
// (K for S = Q·Kᵀ). b[0..1]: n-tile n0, b[2..3]: n-tile n0+8.
template <int kStride>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], uint32_t base, int n0, int k0, int lane) {
  const int mat = lane >> 3;
  const int row = n0 + (lane & 7) + (mat >> 1) * 8;
  const int col = k0 + (mat & 1) * 8;
  ldmatrix_x4(b, base + (row * kStride + col) * 2);
}

// B fragments of two n-tiles with B = X, X a row-major [k][n] tile (V for O = P·V).
template <int kStride>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], uint32_t base, int n0, int k0, int lane) {
  const int mat = lane >> 3;
  const int row = k0 + (lane & 7) + (mat & 1) * 8;
  const int col = n0 + (mat >> 1) * 8;
  ldmatrix_x4_trans(b, base + (row * kStride + col) * 2);
}

// acc (16 × 8·kNT) += A (16 × 16·kKT) · B, both operands from shared memory.
// A: rows [a_m0, a_m0+16) of a row-major [m][k] tile, or of Xᵀ for a row-major [k][m] tile X
// (kATrans). B: columns [b_n0, b_n0 + 8·kNT) of Xᵀ for a row-major [n][k] tile X, or of a
// row-major [k][n] tile (kBKn). k runs over [0, 16·kKT) in both.
template <typename T, int kNT, int kKT, bool kATrans, bool kBKn, int kStrideA, int kStrideB>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[kNT][4], uint32_t a_base, int a_m0,
                                             uint32_t b_base, int b_n0, int lane) {
  static_assert(kNT % 2 == 0, "n-tiles are loaded in pairs");
#pragma unroll
  for (int kk = 0; kk < kKT; ++kk) {
    uint32_t a[4];
    if constexpr (kATrans) {
      load_a_trans<kStrideA>(a, a_base, a_m0, kk * 16, lane);
    } else {
      load_a<kStrideA>(a, a_base, a_m0, kk * 16, lane);
    }
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      if constexpr (kBKn) {
        load_b_kn<kStrideB>(b, b_base, b_n0 + np * 16, kk * 16, lane);
      } else {
        load_b_nk<kStrideB>(b, b_base, b_n0 + np * 16, kk * 16, lane);
      }
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 × 8·kNT) += A · B with A (16 × 16·kKT) in registers (see to_a_fragments) and B the
// columns [b_n0, …) of a row-major [k][n] shared tile, k over [0, 16·kKT).
template <typename T, int kNT, int kKT, int kStrideB>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[kNT][4], const uint32_t (&a)[kKT][4],
                                             uint32_t b_base, int b_n0, int lane) {
  static_assert(kNT % 2 == 0, "n-tiles are loaded in pairs");
#pragma unroll
  for (int kk = 0; kk < kKT; ++kk) {
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      load_b_kn<kStrideB>(b, b_base, b_n0 + np * 16, kk * 16, lane);
      mma_16816<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// A C tile (16 × 16·kKT, float) rounded to T as the A operand of the next MMA: the C layout of
// n-tiles 2kk and 2kk+1 is the A layout of k-slice kk.
template <typename T, int kKT>
__device__ __forceinline__ void to_a_fragments(uint32_t (&a)[kKT][4], const float (&c)[2 * kKT][4]) {
#pragma unroll
  for (int kk = 0; kk < kKT; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// Stores a warp's C tile (16 × 8·kNT), row i's values times row_scale[i] (i = 0 for rows g,
// 1 for rows g+8), as T into rows [m0, m0+16), columns [n0, …) of a shared tile.
template <typename T, int kNT, int kStride>
__device__ __forceinline__ void store_c_to_smem(const float (&acc)[kNT][4], const float (&row_scale)[2],
                                                T* tile, int m0, int n0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t v = pack2<T>(acc[j][2 * i] * row_scale[i], acc[j][2 * i + 1] * row_scale[i]);
      store_shared(reinterpret_cast<uint32_t*>(tile + (m0 + g + 8 * i) * kStride + n0 + j * 8 + 2 * t), v);
    }
  }
}

// Max and sum over the 4 lanes of a quad (the lanes holding one row of a C tile).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace torch_mla::cuda
