#pragma once
// Raw-pointer helpers of the `cpu` core (docs/design.md §10.2): a row-major GEMM on the BLAS torch
// links, a vectorised exp, and per-thread scratch. Nothing here creates an at::Tensor, so the
// kernels can call it inside their tile loops.
#include <cstddef>
#include <cstdint>

namespace torch_mla {
namespace cpu {

// Row-major C (m×n) = alpha · op(A) · op(B) + beta · C, op(X) = X or Xᵀ; lda/ldb/ldc are the row
// strides of A, B, C as stored (A is m×k, or k×m when trans_a). Calls the BLAS torch links (MKL in
// the x86 wheels) single-threaded; where torch exports none, plain loops.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// Keeps the BLAS on the calling thread while alive (MKL would otherwise start its own team for
// a GEMM called outside a parallel region); restores the thread's previous setting.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// Softmax pieces on float score tiles (row stride ld), vectorised for AVX-512/AVX2 where the CPU
// has them (function clones picked at load time), exp to ~2 ulp.
//
// Columns [0, visible(r)) of row r are visible: visible(r) = clamp(diag + r + 1, 0, cols) when
// causal (diag = first query − first key of the tile), else cols; the rest become 0.
//
// Forward: scales the tile, updates the rows' running max and sum (online softmax), replaces the
// tile by exp(scale·s − max) and rescales the output accumulator rows (row stride ld_acc, dv wide).
void softmax_forward_tile(float* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                          float scale, float* row_max, float* row_sum, float* acc, int64_t ld_acc,
                          int64_t dv);
void softmax_forward_tile(double* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                          double scale, double* row_max, double* row_sum, double* acc, int64_t ld_acc,
                          int64_t dv);
// Backward: P = exp(scale·s − lse[r]) on the visible columns, 0 elsewhere, in place.
void softmax_backward_probs(float* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                            float scale, const float* lse);
void softmax_backward_probs(double* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                            double scale, const double* lse);
// Backward: dS = P ⊙ (dP − delta[r]), written over dP.
void softmax_backward_ds(const float* p, float* dp, int64_t ld, int64_t rows, int64_t cols, const float* delta);
void softmax_backward_ds(const double* p, double* dp, int64_t ld, int64_t rows, int64_t cols,
                         const double* delta);

// One thread's scratch: 64-byte aligned, allocated once per call, never shrinks.
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // The next `count` elements of type T (64-byte aligned).
  template <typename T>
  T* take(size_t count) {
    return static_cast<T*>(take_bytes(count * sizeof(T)));
  }

 private:
  void* take_bytes(size_t bytes);
  char* data_ = nullptr;
  size_t size_ = 0, used_ = 0;
};

// Bytes Scratch::take needs for `count` elements of T (its 64-byte rounding included).
template <typename T>
constexpr size_t scratch_bytes(size_t count) {
  return (count * sizeof(T) + 63) / 64 * 64;
}

}  // namespace cpu
}  // namespace torch_mla
