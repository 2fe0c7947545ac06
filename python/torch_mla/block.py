"""The functional API of the latent-only attention block (docs/design.md §13): the norms, q's
expansion, RoPE, the attention and o_proj in one op that saves only its inputs and the norms'
statistics, recomputing the rest in backward."""
from typing import Optional

import torch

from .backends import current_backend


def mla_attention_block(
    q_a: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor],
    wq_b: torch.Tensor,
    kv_a: torch.Tensor,
    kv_norm_weight: torch.Tensor,
    wkv_b: torch.Tensor,
    wo: torch.Tensor,
    bo: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    softmax_scale: Optional[float] = None,
    q_norm_eps: float = 1e-6,
    kv_norm_eps: float = 1e-6,
    causal: bool = True,
    rope_interleave: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    head_chunks: Optional[int] = None,
) -> torch.Tensor:
    """The attention block from q_a_proj's and kv_a_proj_with_mqa's outputs to o_proj's:
    ``o_proj(mla_attention(rope(rms_norm(q_a) @ wq_b.T), rms_norm(kv_a[..., :Dc]), rope(kv_a[..., Dc:])))``.

    Saved for backward: q_a, kv_a, cos, sin, the weights and the norms' per-row rstd (float32) —
    not q, its latent, the normalised kv latent, k_rope, out or lse.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        q_a:            (B, S, Lq)     | (T, Lq)  q_a_proj's output (the hidden states, and
                        q_norm_weight None, without a q latent)
        q_norm_weight:  (Lq,) or None  q_a_layernorm.weight
        wq_b:           (H*(Dn+Dr), Lq) q_b_proj.weight (or q_proj.weight)
        kv_a:           (B, S, Dc+Dr)  | (T, Dc+Dr)  kv_a_proj_with_mqa's output, k_rope not rotated
        kv_norm_weight: (Dc,)          kv_a_layernorm.weight
        wkv_b:          (H*(Dn+Dv), Dc) kv_b_proj.weight
        wo, bo:         (hidden, H*Dv), (hidden,) or None  o_proj's weight and bias
        cos, sin:       (B, S, Dr/2)   | (T, Dr/2)
        returns         (B, S, hidden) | (T, hidden)

    ``softmax_scale=None`` means ``(Dn+Dr) ** -0.5``. ``head_chunks``: the heads run in this many
    groups of ``ceil(H / head_chunks)``, forward and backward, so that only one group's q, out
    and attention transients exist at a time (docs/design.md §13.6); None: the op's default, 4.
    """
    if softmax_scale is None:
        softmax_scale = (wq_b.shape[0] // num_heads) ** -0.5
    chunks = {} if head_chunks is None else dict(head_chunks=int(head_chunks))
    return torch.ops.torch_mla.mla_attention_block(
        q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, int(num_heads),
        float(softmax_scale), float(q_norm_eps), float(kv_norm_eps), bool(causal), bool(rope_interleave),
        cu_seqlens, 0 if max_seqlen is None else max_seqlen, current_backend(), **chunks)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's DeepSeek RMSNorm, ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``
    (float64 statistics for float64 x); saves only x and the per-row rstd for backward."""
    return torch.ops.torch_mla.rms_norm(x, weight, float(eps))
