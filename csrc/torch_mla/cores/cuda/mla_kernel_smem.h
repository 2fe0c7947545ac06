#pragma once
// Dynamic shared memory of our CUDA kernels, in bytes, as host code can compute it without CUDA
// headers: the selection rule checks it against each arch's per-block limit (docs/design.md §10.2),
// and the kernels' tile traits (mla_forward.cuh, mla_backward.cuh) assert they agree with it.
#include <cstdint>

namespace torch_mla::cuda {

// A rows × cols tile of 16-bit elements with 8 elements of padding per row (bank conflicts).
constexpr int64_t tile_bytes(int64_t rows, int64_t cols) { return rows * (cols + 8) * 2; }

// Forward: 128 queries × 64 keys: Q, K and V tiles.
constexpr int64_t forward_smem_bytes(int64_t dim_qk, int64_t dim_v) {
  return tile_bytes(128, dim_qk) + tile_bytes(64, dim_qk) + tile_bytes(64, dim_v);
}

// Backward, one CTA per 64 keys: K, V, double-buffered Q and dO, P and dS, two row statistics.
constexpr int64_t backward_smem_bytes(int64_t dim_qk, int64_t dim_v) {
  return tile_bytes(64, dim_qk) + tile_bytes(64, dim_v) + 2 * (tile_bytes(64, dim_qk) + tile_bytes(64, dim_v)) +
         2 * tile_bytes(64, 64) + 2 * 2 * 64 * 4;
}

// The deterministic backward's dQ pass: 64 queries × 32 keys.
constexpr int64_t backward_dq_smem_bytes(int64_t dim_qk, int64_t dim_v) {
  return tile_bytes(64, dim_qk) + tile_bytes(64, dim_v) + tile_bytes(32, dim_qk) + tile_bytes(32, dim_v);
}

// The most dynamic shared memory one CTA may opt in to, by compute capability (10·major + minor);
// 0 for archs our kernels are not built for.
constexpr int64_t max_smem_per_block(int capability) {
  switch (capability) {
    case 80: case 87: return 163 * 1024;
    case 86: case 89: return 99 * 1024;
    case 90: return 227 * 1024;
    default: return 0;
  }
}

}  // namespace torch_mla::cuda
