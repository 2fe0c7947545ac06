#pragma once
// The latent-only attention block's math (docs/design.md §13), below the dispatcher: checks, the
// forward and the backward over one BlockArgs. The ops (ops/mla_attention_block.h) and their
// composite, autograd and autocast kernels only pack their arguments into it.
//   c_q       = rms_norm(q_a, q_norm_weight)       (q_a itself when q_norm_weight is None)
//   q         = rope(c_q · wq_bᵀ per head)          as mla_attention_q_latent (docs/design.md §5.2)
//   kv_latent = rms_norm(kv_a[..., :Dc], kv_norm_weight),  k_rope = rope(kv_a[..., Dc:])
//   out       = mla_attention(q, kv_latent, k_rope, wkv_b)
//   y         = out.flatten(-2) · woᵀ + bo          (o_proj)
// Shapes: ops/mla_attention_block.h. The heads run in `head_chunks` groups, forward and backward
// (docs/design.md §13.6): only one group's q, out and attention transients exist at a time. With
// topk_indices the attention is mla_sparse_attention on them (the DSA block, docs/design.md §13.7).
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

namespace torch_mla {

// One call's arguments, in the schema's order.
struct BlockArgs {
  at::Tensor q_a;
  std::optional<at::Tensor> q_norm_weight;
  at::Tensor wq_b, kv_a, kv_norm_weight, wkv_b, wo;
  std::optional<at::Tensor> bo;
  at::Tensor cos, sin;
  int64_t num_heads = 0;
  double softmax_scale = 0, q_norm_eps = 0, kv_norm_eps = 0;
  bool causal = true, rope_interleave = true;
  std::optional<at::Tensor> cu_seqlens;
  c10::SymInt max_seqlen;
  std::string core;
  int64_t head_chunks = 1;
  std::optional<at::Tensor> topk_indices;  // given: sparse attention (§13.7)
};

// Positions of the differentiable tensor inputs in the schema (and in block_backward's result);
// topk_indices, last in the schema, has no grad.
enum BlockInput { kQA, kQNorm, kWqB, kKvA, kKvNorm, kWkvB, kWo, kBo, kCos, kSin, kNumBlockTensors };

// Checks the block's own arguments (the rest: check_q_latent_inputs, mla_attention).
void check_block_inputs(const BlockArgs& a);

// (Dn, Dr, Dv) of a block call, from the weights' shapes.
struct BlockDims {
  c10::SymInt nope, rope, v;
};
BlockDims block_dims(const BlockArgs& a);

struct BlockForward {
  at::Tensor y, q_rstd, kv_rstd;  // q_rstd: (0,) without q_norm_weight
};

// The block's forward (after check_block_inputs), attention through a.core.
BlockForward block_forward(const BlockArgs& a);

// The grads of the tensor inputs (indexed by BlockInput; undefined where `need` is false) for
// grad_y, recomputing from the inputs and the forward's rstd; attention through a.core, which
// should be the core the forward ran.
std::array<at::Tensor, kNumBlockTensors> block_backward(const BlockArgs& a, const at::Tensor& q_rstd,
                                                        const at::Tensor& kv_rstd, at::Tensor grad_y,
                                                        const std::array<bool, kNumBlockTensors>& need);

}  // namespace torch_mla
