// Raw-pointer GEMM, vectorised softmax pieces and scratch of the `cpu` core (cpu_blas.h).
#include "torch_mla/cores/cpu/cpu_blas.h"

#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

// The Fortran BLAS and MKL's thread control that libtorch_cpu exports (MKL is linked into the x86
// wheels). Weak: a torch without them leaves these null, and gemm falls back to ATen's kernel.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define TORCH_MLA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TORCH_MLA_VECTOR_CLONES
#endif
// The tile bodies are inlined into each clone, so that each is compiled for the clone's ISA.
#if defined(__GNUC__) || defined(__clang__)
#define TORCH_MLA_INLINE inline __attribute__((always_inline))
#else
#define TORCH_MLA_INLINE inline
#endif

namespace torch_mla {
namespace cpu {
namespace {

// C = beta·C for an m×n row-major C (a GEMM with k = 0).
template <typename T>
void scale_only(int64_t m, int64_t n, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* row = c + i * ldc;
    if (beta == T(0)) {
      std::fill(row, row + n, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

// The fallback where torch exports no BLAS: plain loops, row-major, accumulating in T.
template <typename T>
void naive_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  scale_only(m, n, beta, c, ldc);
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t p = 0; p < k; ++p) {
      const T aip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) ci[j] += aip * b[j * ldb + p];
      } else {
        const T* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
      }
    }
  }
}

// Row-major C = alpha·op(A)·op(B) + beta·C is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B first, A second,
// the transpose flags unchanged, m and n swapped.
template <typename T, typename Blas>
void gemm_impl(Blas blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
               T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_only(m, n, beta, c, ldc);
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  lda = std::max<int64_t>(lda, 1);
  ldb = std::max<int64_t>(ldb, 1);
  ldc = std::max<int64_t>(ldc, 1);
  if (blas != nullptr) {
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    blas(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  naive_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// exp(x) for float, branch-free so that loops over it vectorise: Cody-Waite reduction to
// r ∈ [−ln2/2, ln2/2], Cephes' degree-6 polynomial, 2^n through the exponent bits. Inputs are
// clamped to [−87, 88] (exp(−87) ≈ 1.6e−38 stands in for smaller values; callers set masked
// entries to 0 themselves).
TORCH_MLA_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  float fn = x * 1.44269504088896341f + kRound;
  int32_t n;
  std::memcpy(&n, &fn, sizeof(n));
  n -= 0x4B400000;  // the bits of kRound
  fn -= kRound;
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

TORCH_MLA_INLINE float exp_of(float x) { return exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

TORCH_MLA_INLINE int64_t visible_columns(int64_t r, int64_t cols, int64_t diag, bool causal) {
  return causal ? std::clamp<int64_t>(diag + r + 1, 0, cols) : cols;
}

// Lane-parallel partial reductions (16 lanes: one AVX-512 register of floats), written so that
// the compiler vectorises them without reassociating floating-point sums across lanes itself.
constexpr int kLanes = 16;

template <typename T>
TORCH_MLA_INLINE void forward_tile(T* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal, T scale,
                  T* row_max, T* row_sum, T* acc, int64_t ld_acc, int64_t dv) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * ld;
    const int64_t v = visible_columns(r, cols, diag, causal);
    std::fill(x + v, x + cols, T(0));
    if (v == 0) continue;
    T lane_max[kLanes];
    std::fill(lane_max, lane_max + kLanes, kNegInf);
    int64_t c = 0;
    for (; c + kLanes <= v; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const T y = x[c + j] * scale;
        x[c + j] = y;
        lane_max[j] = y > lane_max[j] ? y : lane_max[j];
      }
    }
    T block_max = kNegInf;
    for (; c < v; ++c) {
      x[c] *= scale;
      block_max = std::max(block_max, x[c]);
    }
    for (int j = 0; j < kLanes; ++j) block_max = std::max(block_max, lane_max[j]);

    const T old_max = row_max[r];
    const T new_max = std::max(old_max, block_max);
    const T factor = old_max == kNegInf ? T(0) : exp_of(old_max - new_max);
    T lane_sum[kLanes] = {};
    c = 0;
    for (; c + kLanes <= v; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const T e = exp_of(x[c + j] - new_max);
        x[c + j] = e;
        lane_sum[j] += e;
      }
    }
    T sum = 0;
    for (; c < v; ++c) {
      x[c] = exp_of(x[c] - new_max);
      sum += x[c];
    }
    for (int j = 0; j < kLanes; ++j) sum += lane_sum[j];
    row_max[r] = new_max;
    row_sum[r] = row_sum[r] * factor + sum;
    if (factor != T(1)) {
      T* a = acc + r * ld_acc;
      for (int64_t j = 0; j < dv; ++j) a[j] *= factor;
    }
  }
}

template <typename T>
TORCH_MLA_INLINE void backward_probs(T* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal, T scale,
                    const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * ld;
    const int64_t v = visible_columns(r, cols, diag, causal);
    const T l = lse[r];
    for (int64_t c = 0; c < v; ++c) x[c] = exp_of(x[c] * scale - l);
    std::fill(x + v, x + cols, T(0));
  }
}

template <typename T>
TORCH_MLA_INLINE void backward_ds(const T* p, T* dp, int64_t ld, int64_t rows, int64_t cols, const T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* pr = p + r * ld;
    T* d = dp + r * ld;
    const T dr = delta[r];
    for (int64_t c = 0; c < cols; ++c) d[c] = pr[c] * (d[c] - dr);
  }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl<float>(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_impl<double>(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

SingleThreadedBlas::SingleThreadedBlas()
    : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
}

TORCH_MLA_VECTOR_CLONES
void softmax_forward_tile(float* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                          float scale, float* row_max, float* row_sum, float* acc, int64_t ld_acc,
                          int64_t dv) {
  forward_tile<float>(s, ld, rows, cols, diag, causal, scale, row_max, row_sum, acc, ld_acc, dv);
}

void softmax_forward_tile(double* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                          double scale, double* row_max, double* row_sum, double* acc, int64_t ld_acc,
                          int64_t dv) {
  forward_tile<double>(s, ld, rows, cols, diag, causal, scale, row_max, row_sum, acc, ld_acc, dv);
}

TORCH_MLA_VECTOR_CLONES
void softmax_backward_probs(float* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                            float scale, const float* lse) {
  backward_probs<float>(s, ld, rows, cols, diag, causal, scale, lse);
}

void softmax_backward_probs(double* s, int64_t ld, int64_t rows, int64_t cols, int64_t diag, bool causal,
                            double scale, const double* lse) {
  backward_probs<double>(s, ld, rows, cols, diag, causal, scale, lse);
}

TORCH_MLA_VECTOR_CLONES
void softmax_backward_ds(const float* p, float* dp, int64_t ld, int64_t rows, int64_t cols, const float* delta) {
  backward_ds<float>(p, dp, ld, rows, cols, delta);
}

void softmax_backward_ds(const double* p, double* dp, int64_t ld, int64_t rows, int64_t cols,
                         const double* delta) {
  backward_ds<double>(p, dp, ld, rows, cols, delta);
}

Scratch::Scratch(size_t bytes) : data_(static_cast<char*>(c10::alloc_cpu(std::max<size_t>(bytes, 64)))), size_(bytes) {}

Scratch::~Scratch() {
  if (data_ != nullptr) c10::free_cpu(data_);
}

void* Scratch::take_bytes(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  TORCH_INTERNAL_ASSERT(used_ + rounded <= size_, "torch_mla cpu core: scratch overrun");
  void* p = data_ + used_;
  used_ += rounded;
  return p;
}

}  // namespace cpu
}  // namespace torch_mla
