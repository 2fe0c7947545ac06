// CUDA kernels of mla_attention: the host side (DESIGN.md §5, strategy "recompute").
//
// Forward: KV = kv_latent · wkv_bᵀ (one cuBLAS GEMM through ATen) into a transient (T, H, Dn+Dv)
// buffer, then the fused attention kernel reading q, k_nope / v from that buffer and k_rope from
// its own tensor. Backward: recompute KV, delta = rowsum(dO ⊙ O), the fused backward kernel(s)
// writing dKV in the same layout and dk_rope summed over heads, then dkv_latent = dKV · wkv_b and
// dwkv_b = dKVᵀ · kv_latent. Shapes and dtypes without a tuned kernel take mla_fallback.cu.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "torch_mla/cuda/mla_fallback.h"
#include "torch_mla/cuda/mla_params.h"
#include "torch_mla/mla_shapes.h"

namespace torch_mla {
namespace {

using cuda::MlaParams;

constexpr double kLog2e = 1.4426950408889634;

// (Dn+Dr, Dv) pairs with tuned kernels: DeepSeek-V2/V3 and Kimi K2; MiniCPM3.
bool has_tuned_kernel(const MlaDims& d, at::ScalarType dtype) {
  const int64_t dim_qk = (d.dim_nope + d.dim_rope).expect_int(), dim_v = d.dim_v.expect_int();
  const bool shape_ok = (dim_qk == 192 && dim_v == 128) || (dim_qk == 96 && dim_v == 64);
  // 16-byte chunks of a K row come either from the KV buffer or from k_rope, never both.
  const bool split_ok = d.dim_nope.expect_int() % 8 == 0 && d.dim_rope.expect_int() % 8 == 0;
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && shape_ok && split_ok;
}

void warn_fallback(const MlaDims& d, at::ScalarType dtype) {
  TORCH_WARN_ONCE(
      "torch_mla.mla_attention: no tuned CUDA kernel for dtype ", dtype, " with (Dn+Dr, Dv) = (",
      d.dim_nope + d.dim_rope, ", ", d.dim_v,
      "); using a slower composed-ATen CUDA path (the tuned kernels take bfloat16/float16 with "
      "(192, 128) or (96, 64), Dn and Dr multiples of 8). This warning is shown once.");
}

// The kernels copy rows in 16-byte chunks: the pointer and every stride but the last (of a
// dimension longer than 1) must be multiples of 16 bytes. Returns `t` when they are, else a copy.
at::Tensor with_aligned_rows(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    aligned = aligned && (t.size(i) <= 1 || (t.stride(i) * t.element_size()) % 16 == 0);
  }
  if (aligned) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();
}

// The longest sequence. Padded: S. Packed: max_seqlen when the caller gives it (no device sync;
// the kernels assert that every sequence fits), else read and validated from cu_seqlens.
int64_t longest_sequence(const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  if (!d.varlen) return d.seqlen.expect_int();
  if (max_seqlen > 0) return max_seqlen;
  return check_cu_seqlens_values(*cu_seqlens, d.tokens.expect_int(), 0);
}

// Parameters shared by the forward and the backward: sizes, sequences, q, KV and k_rope.
MlaParams make_params(const MlaDims& d, int64_t longest, const std::optional<at::Tensor>& cu_seqlens,
                      double softmax_scale, bool causal, const at::Tensor& q3, const at::Tensor& kv,
                      const at::Tensor& kr2) {
  MlaParams p;
  p.tokens = d.tokens.expect_int();
  p.batch = static_cast<int>(d.batch.expect_int());
  p.seqlen = d.varlen ? 0 : static_cast<int>(d.seqlen.expect_int());
  p.max_seqlen = static_cast<int>(longest);
  p.heads = static_cast<int>(d.heads.expect_int());
  p.dim_nope = static_cast<int>(d.dim_nope.expect_int());
  p.dim_rope = static_cast<int>(d.dim_rope.expect_int());
  p.cu_seqlens = d.varlen ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal;
  p.q = q3.data_ptr();
  p.q_row_stride = q3.stride(0);
  p.q_head_stride = q3.stride(1);
  p.kv = kv.data_ptr();
  p.kv_row_stride = kv.stride(0);
  p.kv_head_stride = kv.stride(1);
  p.k_rope = kr2.data_ptr();
  p.k_rope_row_stride = kr2.stride(0);
  return p;
}

// Grid sizes are products of blocks per sequence, batch and heads; they must fit a 1-D grid.
void check_grid(const MlaDims& d, int64_t longest) {
  const int64_t blocks = (longest + 63) / 64 * d.batch.expect_int() * d.heads.expect_int();
  TORCH_CHECK(blocks < (int64_t{1} << 31) && longest < (int64_t{1} << 30),
              "torch_mla.mla_attention: problem too large for one CUDA launch (", blocks, " blocks)");
}

template <typename T>
void forward_tuned(const MlaParams& p, int64_t dim_qk, cudaStream_t stream) {
  if (dim_qk == 192) {
    cuda::run_mla_forward<T, 192, 128>(p, stream);
  } else {
    cuda::run_mla_forward<T, 96, 64>(p, stream);
  }
}

template <typename T>
void backward_tuned(const MlaParams& p, int64_t dim_qk, int64_t dim_v, bool deterministic, cudaStream_t stream) {
  cuda::run_mla_backward_preprocess<T>(p, static_cast<int>(dim_v), stream);
  if (dim_qk == 192) {
    cuda::run_mla_backward<T, 192, 128>(p, deterministic, stream);
  } else {
    cuda::run_mla_backward<T, 96, 64>(p, deterministic, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> mla_attention_cuda(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen) {
  const KernelDtypeGuard no_autocast;
  const MlaDims d = check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
  const c10::cuda::CUDAGuard guard(q.device());
  if (!has_tuned_kernel(d, q.scalar_type())) {
    warn_fallback(d, q.scalar_type());
    return cuda::mla_attention_fallback(d, q, kv_latent, k_rope, wkv_b, softmax_scale, causal, cu_seqlens);
  }
  const int64_t T = d.tokens.expect_int(), H = d.heads.expect_int();
  const int64_t Dqk = (d.dim_nope + d.dim_rope).expect_int(), Dv = d.dim_v.expect_int();
  at::Tensor out = at::empty({T, H, Dv}, q.options());
  at::Tensor lse = at::empty({T, H}, q.options().dtype(at::kFloat));
  if (T > 0) {
    const int64_t longest = longest_sequence(d, cu_seqlens, max_seqlen);
    check_grid(d, longest);
    const std::optional<at::Tensor> cu =
        d.varlen ? std::optional<at::Tensor>(cu_seqlens->contiguous()) : std::nullopt;
    const at::Tensor q3 = with_aligned_rows(q.reshape({T, H, Dqk}));
    const at::Tensor kr2 = with_aligned_rows(k_rope.reshape({T, d.dim_rope.expect_int()}));
    const at::Tensor kv = at::mm(kv_latent.reshape({T, d.dim_latent.expect_int()}), wkv_b.t()).view({T, H, -1});
    MlaParams p = make_params(d, longest, cu, softmax_scale, causal, q3, kv, kr2);
    p.out = out.data_ptr();
    p.out_row_stride = out.stride(0);
    p.out_head_stride = out.stride(1);
    p.lse = lse.data_ptr<float>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (q.scalar_type() == at::kBFloat16) {
      forward_tuned<__nv_bfloat16>(p, Dqk, stream);
    } else {
      forward_tuned<__half>(p, Dqk, stream);
    }
  }
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = Dv;
  return {out.view(out_shape), lse.view(q.sizes().slice(0, q.dim() - 1))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen) {
  const KernelDtypeGuard no_autocast;
  const MlaDims d = check_mla_backward_inputs(grad_out, q, kv_latent, k_rope, wkv_b, out, lse, cu_seqlens);
  const c10::cuda::CUDAGuard guard(q.device());
  if (!has_tuned_kernel(d, q.scalar_type())) {
    warn_fallback(d, q.scalar_type());
    return cuda::mla_attention_backward_fallback(d, grad_out, q, kv_latent, k_rope, wkv_b, out, lse,
                                                 softmax_scale, causal, cu_seqlens);
  }
  const int64_t T = d.tokens.expect_int(), H = d.heads.expect_int(), Dn = d.dim_nope.expect_int();
  const int64_t Dr = d.dim_rope.expect_int(), Dv = d.dim_v.expect_int(), Dc = d.dim_latent.expect_int();
  const int64_t Dqk = Dn + Dr;
  const at::Tensor c2 = kv_latent.reshape({T, Dc});
  if (T == 0) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(kv_latent, at::MemoryFormat::Contiguous),
            at::zeros_like(k_rope, at::MemoryFormat::Contiguous),
            at::zeros_like(wkv_b, at::MemoryFormat::Contiguous)};
  }
  const int64_t longest = longest_sequence(d, cu_seqlens, max_seqlen);
  check_grid(d, longest);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const std::optional<at::Tensor> cu =
      d.varlen ? std::optional<at::Tensor>(cu_seqlens->contiguous()) : std::nullopt;
  const auto f32 = q.options().dtype(at::kFloat);

  const at::Tensor q3 = with_aligned_rows(q.reshape({T, H, Dqk}));
  const at::Tensor kr2 = with_aligned_rows(k_rope.reshape({T, Dr}));
  const at::Tensor out3 = with_aligned_rows(out.reshape({T, H, Dv}));
  const at::Tensor do3 = with_aligned_rows(grad_out.reshape({T, H, Dv}));
  const at::Tensor lse2 = lse.reshape({T, H}).contiguous();
  at::Tensor kv = at::mm(c2, wkv_b.t()).view({T, H, Dn + Dv});
  const at::Tensor row_stats = at::empty({2, H, T}, f32);  // lse·log2(e) and delta, per head
  at::Tensor dq_accum = deterministic ? at::Tensor() : at::zeros({T, H, Dqk}, f32);
  at::Tensor grad_q = deterministic ? at::empty({T, H, Dqk}, q.options()) : at::Tensor();
  const at::Tensor dk_rope_accum = at::zeros({T, Dr}, f32);
  const at::Tensor dkv = at::empty({T, H, Dn + Dv}, q.options());

  MlaParams p = make_params(d, longest, cu, softmax_scale, causal, q3, kv, kr2);
  p.out = out3.data_ptr();
  p.out_row_stride = out3.stride(0);
  p.out_head_stride = out3.stride(1);
  p.lse = lse2.data_ptr<float>();
  p.grad_out = do3.data_ptr();
  p.do_row_stride = do3.stride(0);
  p.do_head_stride = do3.stride(1);
  p.lse_log2 = row_stats[0].data_ptr<float>();
  p.delta = row_stats[1].data_ptr<float>();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.dq = deterministic ? grad_q.data_ptr() : nullptr;
  p.dkv = dkv.data_ptr();
  p.dk_rope_accum = dk_rope_accum.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    backward_tuned<__nv_bfloat16>(p, Dqk, Dv, deterministic, stream);
  } else {
    backward_tuned<__half>(p, Dqk, Dv, deterministic, stream);
  }
  kv = at::Tensor();  // the expanded KV is no longer needed: let the GEMMs below reuse it
  if (!deterministic) {
    grad_q = dq_accum.to(q.scalar_type());
    dq_accum = at::Tensor();
  }
  const at::Tensor dkv2 = dkv.view({T, H * (Dn + Dv)});
  return {grad_q.view(q.sizes()), at::mm(dkv2, wkv_b).view(kv_latent.sizes()),
          dk_rope_accum.to(q.scalar_type()).view(k_rope.sizes()), at::mm(dkv2.t(), c2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CUDA, m) {
  m.impl("mla_attention", TORCH_FN(mla_attention_cuda));
  m.impl("mla_attention_backward", TORCH_FN(mla_attention_backward_cuda));
}

}  // namespace torch_mla
