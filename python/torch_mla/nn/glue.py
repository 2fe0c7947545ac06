"""The one latent attention block glue (hidden states → split → norm → RoPE → q → op → o_proj), run
by :class:`~torch_mla.nn.MultiHeadLatentAttention`, :func:`torch_mla.patch_model` (with or without
PEFT adapters) and the torchtitan integration.

What differs between them is where the projections' weights come from, so the glue takes a
*weight provider*, a :class:`Projections`: the attention's submodules (Hugging Face's DeepSeek
names) and how the op gets their effective weights — the plain ``nn.Linear`` weights
(:class:`Projections`), this rank's shards of DTensor weights under tensor parallelism
(:class:`ShardedProjections`), or weights widened by LoRA adapters
(:class:`torch_mla.integrations.hf.peft.LoraProjections`).
"""
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..distributed import tensor_parallel_input, tensor_parallel_output
from ..ops import mla_attention, mla_attention_block, mla_attention_q_latent
from .rope import apply_rope


class Projections:
    """The projections of an MLA attention block, and the weights the op takes from them: here the
    plain ``nn.Linear`` weights.

    q_a_proj, q_norm: q's down-projection and its norm (None, None: q is projected from the hidden
    states); q_proj: q's up-projection (HF's ``q_b_proj``, or ``q_proj`` without a q latent), named
    ``q_name``; kv_a_proj (HF's ``kv_a_proj_with_mqa``), kv_norm, kv_b_proj, o_proj. The norms
    have ``weight`` and ``variance_epsilon``.
    """

    def __init__(self, *, q_a_proj: Optional[nn.Module], q_norm: Optional[nn.Module], q_proj: nn.Module,
                 q_name: str, kv_a_proj: nn.Module, kv_norm: nn.Module, kv_b_proj: nn.Module, o_proj: nn.Module):
        self.q_a_proj, self.q_norm, self.q_proj, self.q_name = q_a_proj, q_norm, q_proj, q_name
        self.kv_a_proj, self.kv_norm, self.kv_b_proj, self.o_proj = kv_a_proj, kv_norm, kv_b_proj, o_proj

    @classmethod
    def of(cls, attn: nn.Module) -> "Projections":
        """The projections of a module with Hugging Face's DeepSeek attention submodules."""
        if attn.q_lora_rank is None:
            q = dict(q_a_proj=None, q_norm=None, q_proj=attn.q_proj, q_name="q_proj")
        else:
            q = dict(q_a_proj=attn.q_a_proj, q_norm=attn.q_a_layernorm, q_proj=attn.q_b_proj, q_name="q_b_proj")
        return cls(**q, kv_a_proj=attn.kv_a_proj_with_mqa, kv_norm=attn.kv_a_layernorm, kv_b_proj=attn.kv_b_proj,
                   o_proj=attn.o_proj)

    def local(self, weight: torch.Tensor) -> torch.Tensor:
        """The tensor the op takes for a parameter."""
        return weight

    def replicated(self, x: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
        """x as the input of a computation on `sharded_weight`'s heads."""
        return x

    def reduced(self, partial: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
        """The output of a row-parallel product on `sharded_weight`."""
        return partial

    def latent(self, name: str, module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(latent, weight) the op takes for `module` (named `name`) applied to x."""
        return self.replicated(x, module.weight), self.local(module.weight)


class ShardedProjections(Projections):
    """Tensor parallelism (q_proj and kv_b_proj sharded by rows, o_proj by columns, as DTensors):
    the op runs this rank's heads on the local shards, its replicated inputs' gradients summed over
    the mesh, and o_proj's partial sums reduced (as RowwiseParallel does)."""

    def local(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to_local() if hasattr(weight, "to_local") else weight

    def replicated(self, x: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
        return tensor_parallel_input(x, sharded_weight)

    def reduced(self, partial: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
        return tensor_parallel_output(partial, sharded_weight)


def projections_of(attn: nn.Module) -> Projections:
    """The weight provider of a module with HF's DeepSeek attention submodules: sharded when a
    parameter is a DTensor (tensor parallelism), else plain."""
    sharded = any(getattr(p, "device_mesh", None) is not None for p in attn.parameters())
    return (ShardedProjections if sharded else Projections).of(attn)


def latent_attention(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    scale: float,
    rope_interleave: bool,
    save: str,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    projections: Optional[Projections] = None,
    attention: Callable[..., torch.Tensor] = mla_attention,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The attention block of `attn` through torch_mla: `attn` gives the sizes (``qk_nope_head_dim``,
    ``qk_rope_head_dim``, ``v_head_dim``, ``kv_lora_rank``) and settings (``record_max_logits``,
    ``head_chunks``, both optional), `projections` the submodules and their weights (default
    :func:`projections_of` `attn`).

    hidden_states (B, S, hidden) | packed (T, hidden) with cu_seqlens; cos, sin (B, S, Dr/2) |
    (T, Dr/2). Returns (output like hidden_states, kv_latent (..., Dc), k_rope (..., Dr) rotated);
    with ``save="latent"`` the block runs as one op (mla_attention_block) and the latents are not
    returned (None, None). `save`: one of :data:`torch_mla.nn.attention.SAVE_CHOICES`.
    `attention` (mla_attention's signature) serves ``save="q"``.
    Under tensor parallelism each rank attends with its own heads, those of its weight shards.
    When ``attn.record_max_logits`` is true, the call's per-head maximum logit (its local heads
    under tensor parallelism) is stored in ``attn.max_logits`` (docs/design.md §12).
    """
    proj = projections_of(attn) if projections is None else projections
    if save == "latent":
        if getattr(attn, "record_max_logits", False):
            raise ValueError("record_max_logits needs save='q' or save='q_latent': the latent-only block "
                             "(save='latent') does not return max logits")
        return _latent_only_block(attn, proj, hidden_states, cos, sin, scale=scale, rope_interleave=rope_interleave,
                                  cu_seqlens=cu_seqlens, max_seqlen=max_seqlen), None, None
    dim_nope, dim_rope = attn.qk_nope_head_dim, attn.qk_rope_head_dim
    # q first, as HF's forward: LoRA dropout masks are drawn in the same order.
    q_input = hidden_states if proj.q_a_proj is None else proj.q_norm(proj.q_a_proj(hidden_states))
    if save == "q_latent":
        # Without a q latent, the hidden states are q's latent: already kept for
        # kv_a_proj_with_mqa's backward, so q costs nothing extra.
        q_latent, wq_b = proj.latent(proj.q_name, proj.q_proj, q_input)
    else:
        q = proj.q_proj(q_input)

    kv_latent, k_rope = proj.kv_a_proj(hidden_states).split([attn.kv_lora_rank, dim_rope], dim=-1)
    kv_latent = proj.kv_norm(kv_latent)
    k_rope = proj.replicated(apply_rope(k_rope, cos, sin, rope_interleave), proj.kv_b_proj.weight)
    op_latent, wkv_b = proj.latent("kv_b_proj", proj.kv_b_proj, kv_latent)
    num_heads = wkv_b.shape[0] // (dim_nope + attn.v_head_dim)
    extra = dict(return_max_logits=True) if getattr(attn, "record_max_logits", False) else {}

    if save == "q_latent":
        out = mla_attention_q_latent(
            q_latent, wq_b, cos, sin, op_latent, k_rope, wkv_b, num_heads=num_heads,
            softmax_scale=scale, rope_interleave=rope_interleave, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, **extra)
    else:
        q_nope, q_rope = q.unflatten(-1, (num_heads, -1)).split([dim_nope, dim_rope], dim=-1)
        q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), rope_interleave)
        out = attention(torch.cat((q_nope, q_rope), dim=-1), op_latent, k_rope, wkv_b,
                        softmax_scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **extra)
    if extra:
        out, attn.max_logits = out
    # out (..., H, Dv) is contiguous: o_proj's input is a view of it, so the tensor the op saves
    # and the one o_proj saves share one storage.
    return proj.o_proj(out.flatten(-2)), kv_latent, k_rope


def _latent_only_block(attn: nn.Module, proj: Projections, hidden_states: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, *, scale: float, rope_interleave: bool, cu_seqlens: Optional[torch.Tensor],
                       max_seqlen: Optional[int]) -> torch.Tensor:
    """latent_attention with ``save="latent"``: q_a_proj and kv_a_proj_with_mqa as modules (they
    keep the hidden states for their weights' grads), everything after them in mla_attention_block.

    Under tensor parallelism each rank runs its heads on the local weight shards: q_a, kv_a and the
    norm weights are replicated inputs of the head-sharded op (their grads summed over the mesh),
    and o_proj's product on the rank's heads is a partial sum, reduced before o_proj's bias is added
    (as RowwiseParallel does).
    """
    q_a = hidden_states if proj.q_a_proj is None else proj.q_a_proj(hidden_states)
    q_norm, kv_norm = proj.q_norm, proj.kv_norm
    wq_b_param, wkv_b_param, wo_param = proj.q_proj.weight, proj.kv_b_proj.weight, proj.o_proj.weight
    wkv_b = proj.local(wkv_b_param)
    sharded = getattr(wo_param, "device_mesh", None) is not None
    bias = proj.o_proj.bias
    y = mla_attention_block(
        proj.replicated(q_a, wq_b_param),
        None if q_norm is None else proj.replicated(proj.local(q_norm.weight), wq_b_param),
        proj.local(wq_b_param),
        proj.replicated(proj.kv_a_proj(hidden_states), wkv_b_param),
        proj.replicated(proj.local(kv_norm.weight), wkv_b_param),
        wkv_b, proj.local(wo_param), None if sharded or bias is None else bias, cos, sin,
        num_heads=wkv_b.shape[0] // (attn.qk_nope_head_dim + attn.v_head_dim), softmax_scale=scale,
        q_norm_eps=q_norm.variance_epsilon if q_norm is not None else 1e-6,  # unused without the norm
        kv_norm_eps=kv_norm.variance_epsilon,
        rope_interleave=rope_interleave, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        head_chunks=getattr(attn, "head_chunks", None))
    y = proj.reduced(y, wo_param)
    return y + proj.local(bias) if sharded and bias is not None else y
