#pragma once
// The per-head maximum attention logit for cores that cannot see their scores' row maxima (the
// stock cudnn and efficient kernels; docs/design.md §12.2), written once for every such core.
#include <ATen/core/Tensor.h>

#include "torch_mla/cores/core.h"

namespace torch_mla {

// (H,) in lse's dtype: per head the maximum of softmax_scale·q·k over the visible (query, key) pairs
// of p's sequences, recomputed from q (T, H, Dn+Dr), kv (T, H, Dn+Dv), k_rope (T, Dr) and the
// forward's lse (T, H). Only rows whose lse can still reach the head's maximum are recomputed:
// a row's maximum m satisfies lse − log(visible keys) ≤ m ≤ lse. One (T,) device-to-host copy.
at::Tensor max_logits_from_scores(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                                  const at::Tensor& k_rope, const at::Tensor& lse);

}  // namespace torch_mla
