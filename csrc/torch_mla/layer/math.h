#pragma once
// Tile and sequence bookkeeping shared by the CPU kernels and the CUDA kernels, so that the CPU
// tests exercise the same masking code the GPU runs.
#include <cstdint>

#if defined(__CUDACC__)
#define TORCH_MLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCH_MLA_HOST_DEVICE inline
#endif

namespace torch_mla {

TORCH_MLA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Keys [0, key_end) of a sequence of length `seqlen` are visible to the query rows [q_begin, q_end)
// (positions relative to the sequence start; q and kv lengths are equal in training).
TORCH_MLA_HOST_DEVICE int64_t visible_key_end(int64_t q_end, int64_t seqlen, bool causal) {
  return causal ? (q_end < seqlen ? q_end : seqlen) : seqlen;
}

// First query row that sees any key of the block starting at `k_begin`.
TORCH_MLA_HOST_DEVICE int64_t first_query_seeing(int64_t k_begin, bool causal) {
  return causal ? k_begin : 0;
}

TORCH_MLA_HOST_DEVICE bool is_masked(int64_t q_pos, int64_t k_pos, bool causal) {
  return causal && k_pos > q_pos;
}

// Token range [begin, begin + len) of sequence b in the packed (T, ...) layout: from cu_seqlens when
// given, else b·seqlen (a padded batch is packed sequences of equal length).
struct SeqSpan {
  int64_t begin;
  int64_t len;
};

TORCH_MLA_HOST_DEVICE SeqSpan sequence_span(const int32_t* cu_seqlens, int64_t b, int64_t seqlen) {
  if (cu_seqlens != nullptr) return {cu_seqlens[b], cu_seqlens[b + 1] - cu_seqlens[b]};
  return {b * seqlen, seqlen};
}

// Whether the score tile of query rows [q_begin, q_begin + rows) × keys [k_begin, k_begin + cols)
// of a sequence of length `seqlen` holds an entry that is masked or past the sequence end, so that
// a kernel must mask it entry by entry (tiles inside the visible triangle skip that work).
TORCH_MLA_HOST_DEVICE bool tile_needs_mask(int64_t q_begin, int64_t rows, int64_t k_begin, int64_t cols,
                                           int64_t seqlen, bool causal) {
  return q_begin + rows > seqlen || k_begin + cols > seqlen ||
         (causal && k_begin + cols - 1 > q_begin);
}

}  // namespace torch_mla
