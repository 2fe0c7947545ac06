"""What people train MLA with today, for the benchmarks: attention cores with
mla_attention's signature that each expand K and V per head (HF-style) before attending, and
:class:`ExpandedAttention`, MultiHeadLatentAttention's block (same parameters, same glue) with
one of them in place of torch_mla's op.

    expanded_eager            HF "eager": full score matrix and softmax (= reference.py)
    expanded_sdpa             HF "sdpa": torch's scaled_dot_product_attention on expanded K/V
    expanded_sdpa_recompute   Megatron-style up-projection recompute: expansion + SDPA under
                              torch.utils.checkpoint, so K/V are rebuilt in backward
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torch_mla import MultiHeadLatentAttention
from torch_mla.nn.glue import latent_attention
from torch_mla.ops import default_softmax_scale, mla_attention
from torch_mla.reference import expand_kv, mla_attention_reference


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


class ExpandedAttention(MultiHeadLatentAttention):
    """MultiHeadLatentAttention's parameters, RoPE and projections with the attention of `core`
    (a key of ATTENTION_CORES) on q itself: the block people train MLA with, for comparisons.
    Takes MultiHeadLatentAttention's arguments, ``save`` and ``save_q_latent`` excepted; the
    max-logit record and context parallelism are torch_mla's alone."""

    def __init__(self, core: str, **kwargs):
        if core not in ATTENTION_CORES:
            raise ValueError(f"core must be one of {sorted(ATTENTION_CORES)}, got {core!r}")
        if kwargs.get("record_max_logits"):
            raise ValueError(f"record_max_logits needs torch_mla's op, not the {core!r} baseline")
        super().__init__(save="q", **kwargs)
        self.core = core

    def forward(self, hidden_states: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
        """As MultiHeadLatentAttention's forward."""
        if self.context_parallel_group is not None:
            raise ValueError(f"ExpandedAttention ({self.core!r}): context parallelism is torch_mla's alone")
        cos, sin = self.rotation(hidden_states, position_ids, cu_seqlens)
        out, _, _ = latent_attention(self, hidden_states, cos, sin, glue=self.glue, save="q",
                                     attention=ATTENTION_CORES[self.core], cu_seqlens=cu_seqlens,
                                     max_seqlen=max_seqlen)
        return out

    def extra_repr(self) -> str:
        return f"core={self.core!r}, " + super().extra_repr()


def attention_block(core: str, **kwargs) -> MultiHeadLatentAttention:
    """MultiHeadLatentAttention(**kwargs) for ``core="torch_mla"``, else ExpandedAttention(core)
    (``save`` dropped: a baseline keeps what its attention keeps)."""
    if core == "torch_mla":
        return MultiHeadLatentAttention(**kwargs)
    kwargs.pop("save", None)
    return ExpandedAttention(core, **kwargs)
