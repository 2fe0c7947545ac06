"""The functional API over the ``torch.ops.torch_mla`` operators."""
from typing import Optional

import torch

from .backends import current_backend


def default_softmax_scale(q: torch.Tensor) -> float:
    """``(Dn + Dr) ** -0.5``: q's last dimension is Dn + Dr."""
    return q.shape[-1] ** -0.5


def mla_attention(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """Multi-Head Latent Attention from the latents; saves only the latents for backward.

    K and V are expanded inside (``kv_latent @ wkv_b.T``, per head ``[k_nope | v]``), used, and
    freed; the backward recomputes them. ``k_rope`` is shared by all heads.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        q:          (B, S, H, Dn+Dr) | (T, H, Dn+Dr), per head ``[q_nope | q_rope]``
        kv_latent:  (B, S, Dc)       | (T, Dc)
        k_rope:     (B, S, Dr)       | (T, Dr)
        wkv_b:      (H*(Dn+Dv), Dc), Hugging Face's ``kv_b_proj.weight`` (rows interleaved per head)
        cu_seqlens: (B+1,) int32 sequence starts in the packed layout, 0 first and T last
        max_seqlen: a bound on every sequence's length, checked (0 or None: not given)
        returns out (B, S, H, Dv) | (T, H, Dv), and with ``return_lse`` also
        lse (B, S, H) | (T, H) in float32 (float64 for float64 inputs), and with
        ``return_max_logits`` also (last) max_logits (H,) in lse's dtype: per head the maximum of
        ``softmax_scale * q·k`` over the visible (query, key) pairs of the call, -inf for a head
        with none; not differentiable (docs/design.md §12, for QK-Clip)

    ``softmax_scale=None`` means ``(Dn+Dr) ** -0.5``; ``causal`` masks within each sequence. The
    attention core is chosen per call (:func:`torch_mla.use_backend`, :func:`torch_mla.explain`).
    """
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q)
    out, lse, max_logits = torch.ops.torch_mla.mla_attention(
        q, kv_latent, k_rope, wkv_b, float(softmax_scale), bool(causal), cu_seqlens,
        0 if max_seqlen is None else max_seqlen, current_backend(), bool(return_max_logits),
    )
    return select_outputs(out, lse, max_logits, return_lse, return_max_logits)


def select_outputs(out, lse, max_logits, return_lse: bool, return_max_logits: bool):
    """out, then lse and max_logits as asked for: a tensor alone, else a tuple."""
    extra = ((lse,) if return_lse else ()) + ((max_logits,) if return_max_logits else ())
    return (out, *extra) if extra else out
