#pragma once
// Argument checks and shape inference for mla_attention, one function shared by the CPU, CUDA and
// Meta kernels. docs/design.md §3 is the contract these checks enforce.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace torch_mla {

// Sizes of one mla_attention call. Padded: q (B, S, H, Dn+Dr); packed: q (T, H, Dn+Dr).
struct MlaDims {
  bool varlen = false;
  c10::SymInt batch;       // B (padded) or cu_seqlens.size(0) - 1 (packed)
  c10::SymInt seqlen;      // S (padded); unused when packed
  c10::SymInt tokens;      // B * S or T
  c10::SymInt heads;       // H
  c10::SymInt dim_nope;    // Dn
  c10::SymInt dim_rope;    // Dr
  c10::SymInt dim_v;       // Dv
  c10::SymInt dim_latent;  // Dc
};

// Checks ranks, sizes, dtypes, devices and strides of the forward arguments; never reads data.
MlaDims check_mla_inputs(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const std::optional<at::Tensor>& cu_seqlens);

// Additionally checks the backward-only arguments against the forward ones.
MlaDims check_mla_backward_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens);

// The values of cu_seqlens, given as a host copy (read_on_host, layer/sequences.h): starts at 0,
// non-decreasing, ends at `tokens`, and no sequence longer than max_seqlen when max_seqlen > 0.
// Returns the longest sequence length.
int64_t check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t tokens, int64_t max_seqlen);

// `message` of an error that mla_attention, its backward or mla_sparse_attention raised
// ("torch_mla.mla_attention: …"), naming `op` ("torch_mla.mla_attention_block: ") instead: the op the user called.
std::string renamed_message(const std::string& message, const char* op);

// f(), a call of mla_attention (or its backward) made by the op named `op`: an error it raises is
// raised again, of the same kind (ValueError stays ValueError), naming `op`.
template <typename F>
decltype(auto) naming_errors_as(const char* op, F&& f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    throw c10::ValueError({__func__, __FILE__, __LINE__}, renamed_message(e.msg(), op));
  } catch (const c10::Error& e) {
    throw c10::Error({__func__, __FILE__, __LINE__}, renamed_message(e.msg(), op));
  }
}

// Kernels compute in their inputs' dtype (accumulating in float32/float64 tiles they make
// themselves): the ATen calls inside them must not be re-cast by an enclosing torch.autocast,
// whose choice the op's Autocast kernel (autocast/) has already applied.
struct KernelDtypeGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// Float32 for every input dtype but float64, which keeps float64.
at::ScalarType lse_dtype(at::ScalarType input_dtype);

}  // namespace torch_mla
