#pragma once
// The attention-core interface (docs/design.md §10.1). A core computes attention on per-head
// tensors of one call; it knows nothing of latents, autograd or the caller's layout:
//   q      (T, H, Dn+Dr), per head [q_nope | q_rope], last dimension contiguous
//   kv     (T, H, Dn+Dv), per head [k_nope | v]: the latent layer's transient expansion
//   k_rope (T, Dr), shared by all heads, contiguous
//   out    (T, H, Dv) in q's dtype, lse (T, H) in lse_dtype(q's dtype), natural log
// and in backward grad_q (T, H, Dn+Dr), grad_kv (T, H, Dn+Dv), grad_k_rope (T, Dr) summed over
// heads or (T, H, Dr) per head (the latent layer sums), any floating dtype. Cores are only called
// with T > 0; sequences may have length 0. When CoreProblem::max_logits is set, a core that sees
// its scores' row maxima also returns max_logits (H,) in lse's dtype; one that returns none gets
// them from the shared fallback (max_logits.h, docs/design.md §12).
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "torch_mla/layer/sequences.h"

namespace torch_mla {

// Everything about one call a core needs besides its tensors.
struct CoreProblem {
  const Sequences& seqs;
  int64_t heads, dim_nope, dim_rope, dim_v;
  double softmax_scale;
  bool causal;
  bool deterministic;  // torch.are_deterministic_algorithms_enabled() at the call
  bool max_logits;     // the caller asks for the per-head maximum logit (docs/design.md §12)
};

struct CoreOutputs {
  at::Tensor out, lse;
  // (H,): per head the maximum of softmax_scale·q·k over the visible pairs; undefined when not
  // asked for or when the core cannot see its scores.
  at::Tensor max_logits;
};

struct CoreGrads {
  at::Tensor grad_q, grad_kv, grad_k_rope;
};

// A core's implementation; which calls it can serve is decided by cores/table.h, in one place.
struct AttentionCore {
  std::string name;
  CoreOutputs (*forward)(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                         const at::Tensor& k_rope);
  CoreGrads (*backward)(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                        const at::Tensor& lse);
};

// Registers a core at load time; `core` must outlive the program (a static object).
struct CoreRegistration {
  explicit CoreRegistration(const AttentionCore& core);
};

// The registered core named `name`, or nullptr (not compiled into this build).
const AttentionCore* find_core(const std::string& name);

}  // namespace torch_mla
