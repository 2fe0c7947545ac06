// The emulated warp primitives against direct computation: mma.m16n8k16 (bf16, f16) with the
// fragment layouts written out from the PTX ISA, ldmatrix.x4 (.trans) against direct indexing,
// shfl.xor, and mla_mma.cuh's warp_gemm_ss (ldmatrix + mma) in all four operand layouts against a
// plain matmul; each in every lane order.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "test_util.h"
#include "torch_mla/cores/cuda/mla_mma.cuh"

namespace {

using namespace torch_mla::cuda;
using simt_test::kOrders;
using simt_test::make_stream;
using simt_test::random_tile;

template <typename H>
uint32_t pack_bits(H lo, H hi) {
  return static_cast<uint32_t>(lo.bits) | (static_cast<uint32_t>(hi.bits) << 16);
}

// One warp: D = A·B + C with A 16×16 row-major, B 16×8 (k × n) row-major, C and D 16×8 float.
// Fragments per the PTX ISA (mma.m16n8k16, .bf16/.f16), g = lane / 4, t = lane % 4:
//   A: a0,a1 (g, 2t+i)  a2,a3 (g+8, 2t+i)  a4,a5 (g, 2t+8+i)  a6,a7 (g+8, 2t+8+i); register j holds a2j, a2j+1
//   B: b0,b1 (k 2t+i, n g)  b2,b3 (k 2t+8+i, n g)
//   C, D: c0,c1 (g, 2t+i)  c2,c3 (g+8, 2t+i)
template <typename H>
__global__ void mma_kernel(const H* A, const H* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto a = [&](int r, int c) { return load_global(&A[r * 16 + c]); };
  auto b = [&](int k, int n) { return load_global(&B[k * 8 + n]); };
  const uint32_t fa[4] = {pack_bits(a(g, 2 * t), a(g, 2 * t + 1)), pack_bits(a(g + 8, 2 * t), a(g + 8, 2 * t + 1)),
                          pack_bits(a(g, 2 * t + 8), a(g, 2 * t + 9)),
                          pack_bits(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9))};
  const uint32_t fb0 = pack_bits(b(2 * t, g), b(2 * t + 1, g));
  const uint32_t fb1 = pack_bits(b(2 * t + 8, g), b(2 * t + 9, g));
  float d[4] = {load_global(&C[g * 8 + 2 * t]), load_global(&C[g * 8 + 2 * t + 1]),
                load_global(&C[(g + 8) * 8 + 2 * t]), load_global(&C[(g + 8) * 8 + 2 * t + 1])};
  mma_16816<H>(d, fa, fb0, fb1);
  global_ref(&D[g * 8 + 2 * t]) = d[0];
  global_ref(&D[g * 8 + 2 * t + 1]) = d[1];
  global_ref(&D[(g + 8) * 8 + 2 * t]) = d[2];
  global_ref(&D[(g + 8) * 8 + 2 * t + 1]) = d[3];
}

template <typename H>
void check_mma(uint64_t seed) {
  const auto A = random_tile<H>(16 * 16, seed);
  const auto B = random_tile<H>(16 * 8, seed + 1);
  std::vector<float> C(16 * 8);
  const auto Ch = random_tile<H>(16 * 8, seed + 2, 4.f);
  for (int i = 0; i < 16 * 8; ++i) C[i] = static_cast<float>(Ch[i]);
  for (simt::Order order : kOrders) {
    std::vector<float> D(16 * 8, NAN);
    simt::Stream s = make_stream(order, seed);
    s.register_memory(A.data(), A.size() * 2, "A");
    s.register_memory(B.data(), B.size() * 2, "B");
    s.register_memory(C.data(), C.size() * 4, "C");
    s.register_memory(D.data(), D.size() * 4, "D");
    simt::launch<mma_kernel<H>>(&s, 1, 32, 0, A.data(), B.data(), C.data(), D.data());
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        double ref = C[i * 8 + j];
        for (int k = 0; k < 16; ++k) ref += static_cast<double>(static_cast<float>(A[i * 16 + k])) *
                                            static_cast<float>(B[k * 8 + j]);
        // Exact products, one rounding to fp32 at the end.
        REQUIRE(D[i * 8 + j] == static_cast<float>(ref));
      }
    }
  }
}

TEST_CASE("mma m16n8k16 bf16 matches a direct matmul", "[simt][mma]") {
  for (uint64_t seed = 1; seed <= 8; ++seed) check_mma<simt::bf16>(seed);
}

TEST_CASE("mma m16n8k16 f16 matches a direct matmul", "[simt][mma]") {
  for (uint64_t seed = 11; seed <= 18; ++seed) check_mma<simt::f16>(seed);
}

// Four 8×8 matrices of 16-bit elements in a 16×(16+8) shared tile (rows padded like SmemTile):
// matrix m at rows 8·(m & 1), columns 8·(m >> 1). Element (r, c) holds the bits r·64 + c.
constexpr int kLdStride = 24;

__global__ void ldmatrix_kernel(bool trans, uint32_t* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  auto* tile = reinterpret_cast<uint16_t*>(smem);
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * kLdStride; i += 32) store_shared(&tile[i], static_cast<uint16_t>((i / kLdStride) * 64 + i % kLdStride));
  __syncwarp();
  const int mat = lane >> 3, row = lane & 7;
  const uint32_t addr = smem_addr(smem) + ((8 * (mat & 1) + row) * kLdStride + 8 * (mat >> 1)) * 2;
  uint32_t r[4];
  if (trans) {
    ldmatrix_x4_trans(r, addr);
  } else {
    ldmatrix_x4(r, addr);
  }
  for (int m = 0; m < 4; ++m) global_ref(&out[lane * 4 + m]) = r[m];
}

TEST_CASE("ldmatrix x4 and x4.trans match direct indexing", "[simt][ldmatrix]") {
  for (bool trans : {false, true}) {
    for (simt::Order order : kOrders) {
      std::vector<uint32_t> out(32 * 4, 0);
      simt::Stream s = make_stream(order);
      s.register_memory(out.data(), out.size() * 4, "out");
      simt::launch<ldmatrix_kernel>(&s, 1, 32, 16 * kLdStride * 2, trans, out.data());
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int m = 0; m < 4; ++m) {
          // Element (i, j) of matrix m sits at tile (8·(m & 1) + i, 8·(m >> 1) + j).
          auto elem = [&](int i, int j) -> uint32_t { return (8 * (m & 1) + i) * 64 + 8 * (m >> 1) + j; };
          const uint32_t lo = trans ? elem(2 * t, g) : elem(g, 2 * t);
          const uint32_t hi = trans ? elem(2 * t + 1, g) : elem(g, 2 * t + 1);
          INFO("trans " << trans << " lane " << lane << " matrix " << m);
          REQUIRE(out[lane * 4 + m] == (lo | (hi << 16)));
        }
      }
    }
  }
}

__global__ void shfl_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  const float v = static_cast<float>(threadIdx.x) * 10.f;
  for (int k = 0; k < 5; ++k) global_ref(&out[threadIdx.x * 7 + k]) = __shfl_xor_sync(0xffffffffu, v, 1 << k);
  global_ref(&out[threadIdx.x * 7 + 5]) = quad_sum(static_cast<float>(lane));
  global_ref(&out[threadIdx.x * 7 + 6]) = quad_max(static_cast<float>(lane));
}

TEST_CASE("shfl.xor exchanges within each warp and quad_sum and quad_max reduce quads", "[simt][shfl]") {
  for (simt::Order order : kOrders) {
    std::vector<float> out(64 * 7, NAN);
    simt::Stream s = make_stream(order);
    s.register_memory(out.data(), out.size() * 4, "out");
    simt::launch<shfl_kernel>(&s, 1, 64, 0, out.data());
    for (int tid = 0; tid < 64; ++tid) {
      const int lane = tid % 32, warp0 = tid - lane;
      for (int k = 0; k < 5; ++k) REQUIRE(out[tid * 7 + k] == static_cast<float>((warp0 + (lane ^ (1 << k))) * 10));
      const int q = lane & ~3;
      REQUIRE(out[tid * 7 + 5] == static_cast<float>(4 * q + 6));
      REQUIRE(out[tid * 7 + 6] == static_cast<float>(q + 3));
    }
  }
}

// warp_gemm_ss of mla_mma.cuh on tiles copied in with cp.async: acc (16 × 16) = A (16 × 32) · B.
// A is the [m][k] tile or (kATrans) the transpose of a [k][m] tile; B is the transpose of a [n][k]
// tile or (kBKn) a [k][n] tile.
template <typename H, bool kATrans, bool kBKn>
__global__ void gemm_kernel(const H* a_src, const H* b_src, float* out) {
  constexpr int kM = 16, kN = 16, kK = 32;
  using TileA = std::conditional_t<kATrans, SmemTile<kK, kM>, SmemTile<kM, kK>>;
  using TileB = std::conditional_t<kBKn, SmemTile<kK, kN>, SmemTile<kN, kK>>;
  constexpr int kAcols = kATrans ? kM : kK, kBcols = kBKn ? kN : kK;
  TORCH_MLA_DYNAMIC_SMEM(smem);
  const uint32_t sa = smem_addr(smem), sb = sa + TileA::kBytes;
  const int lane = threadIdx.x;
  load_tile_async<(kATrans ? kK : kM), kAcols, 32>(sa, kATrans ? kK : kM, a_src, [&](int r, int c) {
    return static_cast<const void*>(a_src + r * kAcols + c * 8);
  }, lane);
  load_tile_async<(kBKn ? kK : kN), kBcols, 32>(sb, kBKn ? kK : kN, b_src, [&](int r, int c) {
    return static_cast<const void*>(b_src + r * kBcols + c * 8);
  }, lane);
  cp_async_commit();
  cp_async_wait<0>();
  __syncwarp();
  float acc[kN / 8][4] = {};
  warp_gemm_ss<H, kN / 8, kK / 16, kATrans, kBKn, TileA::kStride, TileB::kStride>(acc, sa, 0, sb, 0, lane);
  const int g = lane >> 2, t = lane & 3;
  for (int j = 0; j < kN / 8; ++j) {
    for (int e = 0; e < 4; ++e) global_ref(&out[(g + 8 * (e >> 1)) * kN + j * 8 + 2 * t + (e & 1)]) = acc[j][e];
  }
}

template <typename H, bool kATrans, bool kBKn>
void check_gemm() {
  constexpr int kM = 16, kN = 16, kK = 32;
  const auto a = random_tile<H>(kM * kK, 100 + kATrans);
  const auto b = random_tile<H>(kN * kK, 200 + kBKn);
  auto A = [&](int m, int k) { return static_cast<double>(static_cast<float>(kATrans ? a[k * kM + m] : a[m * kK + k])); };
  auto B = [&](int k, int n) { return static_cast<double>(static_cast<float>(kBKn ? b[k * kN + n] : b[n * kK + k])); };
  using TileA = std::conditional_t<kATrans, SmemTile<kK, kM>, SmemTile<kM, kK>>;
  using TileB = std::conditional_t<kBKn, SmemTile<kK, kN>, SmemTile<kN, kK>>;
  std::vector<float> first;
  for (simt::Order order : kOrders) {
    std::vector<float> out(kM * kN, NAN);
    simt::Stream s = make_stream(order, 7);
    s.register_memory(a.data(), a.size() * 2, "a");
    s.register_memory(b.data(), b.size() * 2, "b");
    s.register_memory(out.data(), out.size() * 4, "out");
    simt::launch<gemm_kernel<H, kATrans, kBKn>>(&s, 1, 32, TileA::kBytes + TileB::kBytes, a.data(), b.data(), out.data());
    for (int m = 0; m < kM; ++m) {
      for (int n = 0; n < kN; ++n) {
        double ref = 0;
        for (int k = 0; k < kK; ++k) ref += A(m, k) * B(k, n);
        // Two k-slices: two roundings to fp32.
        REQUIRE(std::abs(out[m * kN + n] - ref) <= 2e-6 * (1 + std::abs(ref)));
      }
    }
    if (first.empty()) first = out;
    REQUIRE(out == first);  // bitwise the same in every lane order
  }
}

TEST_CASE("warp_gemm_ss matches a matmul in all four operand layouts", "[simt][mma][ldmatrix]") {
  check_gemm<simt::bf16, false, false>();
  check_gemm<simt::bf16, true, false>();
  check_gemm<simt::bf16, false, true>();
  check_gemm<simt::bf16, true, true>();
  check_gemm<simt::f16, false, false>();
  check_gemm<simt::f16, true, true>();
}

// A correct kernel with cross-warp traffic through shared memory gives bitwise the same result in
// every lane order: per-warp partial sums in shared memory, a barrier, thread 0 adds them up.
__global__ void reduce_kernel(const float* in, float* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float v = load_global(&in[blockIdx.x * blockDim.x + tid]);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) store_shared(&part[warp], v);
  __syncthreads();
  if (tid == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) s += load_shared(&part[w]);
    global_ref(&out[blockIdx.x]) = s;
  }
}

TEST_CASE("lane orders forward and reverse and random agree on a correct kernel", "[simt][order]") {
  const int blocks = 6, threads = 256;
  std::vector<float> in(blocks * threads);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (auto& x : in) x = dist(rng);
  std::vector<float> first;
  for (simt::Order order : kOrders) {
    for (uint64_t seed : {1u, 2u}) {
      std::vector<float> out(blocks, NAN);
      simt::Stream s = make_stream(order, seed);
      s.register_memory(in.data(), in.size() * 4, "in");
      s.register_memory(out.data(), out.size() * 4, "out");
      simt::launch<reduce_kernel>(&s, blocks, threads, 8 * 4, in.data(), out.data());
      if (first.empty()) first = out;
      REQUIRE(out == first);
    }
  }
}

}  // namespace
