#pragma once
// The sparse attention-core interface (docs/design.md §16.4). A sparse core computes the absorbed
// (MQA) form of MLA over each query's selected key rows; like a dense core it knows nothing of
// autograd or the caller's layout, but it takes the latents themselves, not an expansion:
//   q          (T, H, Dn+Dr), per head [q_nope | q_rope], last dimension contiguous
//   kv_latent  (T, Dc): key row [c | k_rope] and value row c of every token
//   k_rope     (T, Dr)
//   w_k        (H, Dn, Dc), w_v (H, Dv, Dc): views of wkv_b's per-head rows
//   rows       (T, k) int64: the selected key rows of each query in the packed (T, …) layout, −1
//              for none; the layer has already dropped entries past the query (causal) and those
//              of padding, so a core attends to exactly the rows ≥ 0 (their order is free)
//   out        (T, H, Dv) in q's dtype, lse (T, H) in lse_dtype(q's dtype); a query with no row:
//              out 0, lse −inf
// and in backward grad_q (T, H, Dn+Dr), grad_kv_latent (T, Dc), grad_k_rope (T, Dr), grad_w_k
// (H, Dn, Dc), grad_w_v (H, Dv, Dc), each in its input's dtype. Cores are only called with T > 0.
// Room for later cores without a new interface: sinks would be one more optional per-head tensor
// of SparseProblem, sliding windows more rows per query (the layer merges them), and 512-wide
// K = V records a core that reads its key and value from the same kv_latent row, as every core here
// already does.
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "torch_mla/cores/table.h"
#include "torch_mla/layer/sequences.h"

namespace torch_mla {

struct SparseProblem {
  int64_t heads, dim_nope, dim_rope, dim_v, dim_latent, topk;
  double softmax_scale;
  bool deterministic;  // torch.are_deterministic_algorithms_enabled() at the call
  bool max_logits;     // return the per-head maximum logit over the selected pairs (§12)
};

struct SparseOutputs {
  at::Tensor out, lse;
  at::Tensor max_logits;  // (H,) in lse's dtype when asked for, else undefined
};

struct SparseGrads {
  at::Tensor grad_q, grad_kv_latent, grad_k_rope, grad_w_k, grad_w_v;
};

struct SparseCore {
  std::string name;
  SparseOutputs (*forward)(const SparseProblem& p, const at::Tensor& q, const at::Tensor& kv_latent,
                           const at::Tensor& k_rope, const at::Tensor& w_k, const at::Tensor& w_v,
                           const at::Tensor& rows);
  SparseGrads (*backward)(const SparseProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                          const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& w_k,
                          const at::Tensor& w_v, const at::Tensor& rows, const at::Tensor& out,
                          const at::Tensor& lse);
};

// Registers a sparse core at load time; `core` must outlive the program (a static object), and its
// row of the core table (cores/table.cpp) must give it a sparse form.
struct SparseCoreRegistration {
  explicit SparseCoreRegistration(const SparseCore& core);
};

// The registered sparse core named `name`, or nullptr.
const SparseCore* find_sparse_core(const std::string& name);

// The names a sparse call accepts besides "auto": the cores of the table with a sparse form, in its
// order.
std::vector<std::string> sparse_core_names();

// The core name a sparse call records for its backward: a core with a sparse form named (directly
// or by TORCH_MLA_CORE for "auto") is kept; "auto" otherwise stays "auto", which the device kernel
// resolves (§16.5): the dense shortcut where it applies (dense_shortcut_declines), else the table's
// rule over the sparse forms, choose_core(query, "auto", /*sparse=*/true). Any other name is a
// ValueError listing the sparse cores.
std::string resolve_sparse_core(const std::string& requested);

// Why the dense shortcut (§16.5) does not run a sparse call, or nullptr where it does: only for
// "auto", on CPU indices whose every row selects its whole causal prefix. CPU indices are checked
// (check_topk_values_on_host, a ValueError naming a bad row) whatever the answer. `seqs` must have
// its spans when the indices are on the CPU. A static string: nothing is built for a call served.
const char* dense_shortcut_declines(const at::Tensor& topk_indices, const Sequences& seqs, const std::string& core);

}  // namespace torch_mla
