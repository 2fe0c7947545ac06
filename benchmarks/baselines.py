"""What people train MLA with today, as attention cores with mla_attention's signature, for the
demo and the benchmarks: each expands K and V per head (HF-style) before attending.

    expanded_eager            HF "eager": full score matrix and softmax (= reference.py)
    expanded_sdpa             HF "sdpa": torch's scaled_dot_product_attention on expanded K/V
    expanded_sdpa_recompute   Megatron-style up-projection recompute: expansion + SDPA under
                              torch.utils.checkpoint, so K/V are rebuilt in backward
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .functional import default_softmax_scale, mla_attention
from .reference import expand_kv, mla_attention_reference


def _sdpa_padded(q, kv_latent, k_rope, wkv_b, softmax_scale, causal):
    heads, dim_rope = q.shape[-2], k_rope.shape[-1]
    k_nope, v = expand_kv(kv_latent, wkv_b, heads, q.shape[-1] - dim_rope)
    k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], dim_rope)], dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def expanded_sdpa(q, kv_latent, k_rope, wkv_b, *, softmax_scale: Optional[float] = None,
                  causal: bool = True, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None):
    """Same arguments and result as :func:`torch_mla.mla_attention`, through SDPA
    (max_seqlen is accepted for the signature and not needed)."""
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q)
    if cu_seqlens is None:
        return _sdpa_padded(q, kv_latent, k_rope, wkv_b, softmax_scale, causal)
    bounds = cu_seqlens.tolist()
    return torch.cat([
        _sdpa_padded(q[None, s:e], kv_latent[None, s:e], k_rope[None, s:e], wkv_b, softmax_scale,
                     causal)[0]
        for s, e in zip(bounds[:-1], bounds[1:])])


def expanded_sdpa_recompute(q, kv_latent, k_rope, wkv_b, **kwargs):
    """expanded_sdpa under activation checkpointing: saves its inputs, recomputes K/V and SDPA."""
    return checkpoint(lambda *a: expanded_sdpa(*a, **kwargs), q, kv_latent, k_rope, wkv_b,
                      use_reentrant=False)


def expanded_eager(q, kv_latent, k_rope, wkv_b, *, max_seqlen: Optional[int] = None, **kwargs):
    """HF's eager attention on expanded K/V: the reference itself."""
    return mla_attention_reference(q, kv_latent, k_rope, wkv_b, **kwargs)


ATTENTION_CORES = {
    "torch_mla": mla_attention,
    "eager": expanded_eager,
    "sdpa": expanded_sdpa,
    "sdpa_recompute": expanded_sdpa_recompute,
}
