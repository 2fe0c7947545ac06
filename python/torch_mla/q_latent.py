"""The functional API of the q-latent op (docs/design.md §5.2): q is expanded and rotated inside from
its latent, and the latent, not q, is saved for backward."""
from typing import Optional

import torch

from .backends import current_backend
from .functional import select_outputs


def mla_attention_q_latent(
    q_latent: torch.Tensor,
    wq_b: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    *,
    num_heads: int,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    rope_interleave: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """:func:`torch_mla.mla_attention` on ``q = rope(q_latent @ wq_b.T)``, saving q_latent instead of q.

    q per head is ``[q_nope | q_rope]`` (wq_b is Hugging Face's ``q_b_proj.weight``, or
    ``q_proj.weight`` with the hidden states as q_latent); q_rope's pairs are rotated by cos/sin as
    :func:`torch_mla.rope.apply_rope` does. k_rope is passed already rotated.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        q_latent:   (B, S, Lq)    | (T, Lq)
        wq_b:       (H*(Dn+Dr), Lq)
        cos, sin:   (B, S, Dr/2)  | (T, Dr/2), any float dtype (float32 recommended)
        kv_latent, k_rope, wkv_b, cu_seqlens, max_seqlen: as :func:`torch_mla.mla_attention`
        returns out (B, S, H, Dv) | (T, H, Dv), and with ``return_lse`` also lse, with
        ``return_max_logits`` also (last) max_logits (H,), as :func:`torch_mla.mla_attention`

    ``softmax_scale=None`` means ``(Dn+Dr) ** -0.5``.
    """
    if softmax_scale is None:
        softmax_scale = (wq_b.shape[0] // num_heads) ** -0.5
    out, lse, max_logits = torch.ops.torch_mla.mla_attention_q_latent(
        q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, int(num_heads), float(softmax_scale),
        bool(causal), bool(rope_interleave), cu_seqlens, 0 if max_seqlen is None else max_seqlen,
        current_backend(), bool(return_max_logits),
    )
    return select_outputs(out, lse, max_logits, return_lse, return_max_logits)
