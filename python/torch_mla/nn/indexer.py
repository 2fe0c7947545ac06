"""DeepSeek Sparse Attention (DSA) around the latent attention block: the lightning indexer with
Hugging Face's parameter names (:class:`DsaIndexer`) and one forward's selection, sparse attention
and indexer loss (:class:`DsaRun`), run by :class:`~torch_mla.nn.MultiHeadLatentAttention` and
:func:`torch_mla.patch_model` through the one glue (docs/design.md §19).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from .rope import apply_rope

#: What a DSA layer computes: "off" — dense causal attention, the indexer unused; "dense_warmup" —
#: dense causal attention, and the indexer's KL loss against it over all visible keys;
#: "sparse" — the indexer's top k, then sparse attention over them (docs/design.md §19.1).
DSA_MODES = ("off", "dense_warmup", "sparse")

#: model_type → the RoPE layout of its indexer: DeepSeek-V3.2 rotates halves (DeepSeek's
#: 2025-11 fix), GLM-5 adjacent pairs; both rotate the first qk_rope_head_dim dims of its head.
INDEXER_ROPE_LAYOUTS = {"deepseek_v32": "half_split", "glm_moe_dsa": "interleaved"}


def check_dsa_mode(dsa_mode: str) -> str:
    if dsa_mode not in DSA_MODES:
        raise ValueError(f"dsa_mode must be one of {DSA_MODES}, got {dsa_mode!r}")
    return dsa_mode


class DsaIndexer(nn.Module):
    """DSA's lightning indexer, parameters named as Hugging Face's ``DeepseekV32Indexer`` /
    ``GlmMoeDsaIndexer`` (``wq_b``, ``wk``, ``k_norm`` (LayerNorm, eps 1e-6), ``weights_proj``),
    so their state dicts load with ``strict=True``.

    Args:
        hidden_size, q_lora_rank: the model width and the width of q's latent (the indexer's
            queries are projected from the attention's normed q latent).
        index_n_heads, index_head_dim: H_I, D_I.
        qk_rope_head_dim: Dr; the first Dr dims of each indexer head and key are rotated.
        index_topk: k, the keys kept per query.
        rope_layout: "half_split" (DeepSeek-V3.2) or "interleaved" (GLM-5).
    """

    def __init__(self, *, hidden_size: int, q_lora_rank: int, index_n_heads: int, index_head_dim: int,
                 qk_rope_head_dim: int, index_topk: int, rope_layout: str = "half_split", device=None,
                 dtype=None):
        super().__init__()
        if rope_layout not in ("half_split", "interleaved"):
            raise ValueError(f"indexer rope_layout must be 'half_split' or 'interleaved', got {rope_layout!r}")
        if not 0 <= qk_rope_head_dim <= index_head_dim:
            raise ValueError(f"index_head_dim ({index_head_dim}) must hold qk_rope_head_dim ({qk_rope_head_dim})")
        if index_topk < 1:
            raise ValueError(f"index_topk must be >= 1, got {index_topk}")
        factory = dict(device=device, dtype=dtype)
        self.n_heads, self.head_dim = index_n_heads, index_head_dim
        self.qk_rope_head_dim, self.index_topk, self.rope_layout = qk_rope_head_dim, index_topk, rope_layout
        self.wq_b = nn.Linear(q_lora_rank, index_n_heads * index_head_dim, bias=False, **factory)
        self.wk = nn.Linear(hidden_size, index_head_dim, bias=False, **factory)
        self.k_norm = nn.LayerNorm(index_head_dim, eps=1e-6, **factory)
        self.weights_proj = nn.Linear(hidden_size, index_n_heads, bias=False, **factory)

    def forward(self, hidden_states: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index_q, index_k, weights) of :func:`indexer_inputs`."""
        return indexer_inputs(self, hidden_states, q_latent, cos, sin,
                              rope_interleave=self.rope_layout == "interleaved")

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, index_topk={self.index_topk}, "
                f"rope_layout={self.rope_layout!r}")


def indexer_inputs(indexer: nn.Module, hidden_states: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, *, rope_interleave: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of :func:`torch_mla.dsa_indexer_topk` and the indexer loss, computed as Hugging
    Face's indexer computes its scores, from a module with its submodules and sizes (``wq_b, wk,
    k_norm, weights_proj``, ``n_heads, head_dim, qk_rope_head_dim``: a :class:`DsaIndexer` or
    HF's own).

    hidden_states (..., hidden), q_latent (..., Lq) (HF's ``q_resid``), cos, sin (..., Dr/2) float32,
    where ``...`` is (B, S) or packed (T,). Returns index_q (..., H_I, D_I), index_k (..., D_I) and
    weights (..., H_I), float32 as HF scores them, each head and key rotated on its first Dr dims;
    HF's scales ``H_I^-½`` (on the weights) and ``D_I^-½`` (on q·k) both folded into weights
    (a positive factor passes through the ReLU, docs/design.md §17).
    """
    rope_dim, heads, dim = indexer.qk_rope_head_dim, indexer.n_heads, indexer.head_dim
    index_q = indexer.wq_b(q_latent).unflatten(-1, (heads, dim))
    index_k = indexer.k_norm(indexer.wk(hidden_states))
    if rope_dim:
        q_rot, q_pass = index_q.split([rope_dim, dim - rope_dim], dim=-1)
        k_rot, k_pass = index_k.split([rope_dim, dim - rope_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos.unsqueeze(-2), sin.unsqueeze(-2), rope_interleave)
        k_rot = apply_rope(k_rot, cos, sin, rope_interleave)
        index_q, index_k = torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float()
    return index_q.float(), index_k.float(), weights * (heads ** -0.5 * dim ** -0.5)


class DsaRun:
    """One forward's DSA for the glue (:func:`torch_mla.nn.glue.latent_attention`): the selection
    before the attention, the indexer loss after it, both recorded on `owner` (``topk_indices``,
    ``indexer_loss``; docs/design.md §19).

    owner: the attention module (holds the results); indexer: its indexer (a :class:`DsaIndexer` or
    HF's), None for a layer without one (GLM's "shared" layers); mode: one of :data:`DSA_MODES`;
    train_indexer: the indexer's tensors carry gradients (else it runs under no_grad, as HF's);
    rope_interleave: the indexer's RoPE layout; topk: k; topk_indices: a selection given by the
    caller (replay, IndexShare) in the op's coordinates, used instead of the indexer's.
    """

    def __init__(self, owner: nn.Module, indexer: Optional[nn.Module], *, mode: str, train_indexer: bool,
                 rope_interleave: bool, topk: int, topk_indices: Optional[torch.Tensor] = None):
        self.owner, self.indexer, self.mode = owner, indexer, check_dsa_mode(mode)
        self.train_indexer, self.rope_interleave, self.topk = train_indexer, rope_interleave, topk
        self.given = topk_indices
        if topk_indices is not None and mode != "sparse":
            raise ValueError(f"topk_indices (a selection to replay or share) needs dsa_mode='sparse', "
                             f"not {mode!r}, which attends densely")
        #: The indexer loss is recorded in warm-up, and in sparse training when the indexer trains.
        self.wants_loss = indexer is not None and (mode == "dense_warmup" or (mode == "sparse" and train_indexer))
        self._indexer_tensors = None
        owner.topk_indices = None
        owner.indexer_loss = None

    @property
    def sparse(self) -> bool:
        return self.mode == "sparse"

    def select(self, hidden_states: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int]) -> Optional[torch.Tensor]:
        """topk_indices (B, S, k) | (T, k) int32 for the sparse op (None: dense attention); kept on
        the owner. The indexer reads hidden_states and q_latent detached: the attention's loss never
        reaches it (the selection is discrete), its own loss never reaches the backbone."""
        if self.mode == "off":
            return None
        if self.wants_loss or (self.sparse and self.given is None):
            if self.indexer is None:
                raise ValueError(f"{type(self.owner).__name__} has no indexer (an IndexShare 'shared' layer): "
                                 "pass topk_indices, the selection of the layer it shares")
            with torch.set_grad_enabled(self.train_indexer and torch.is_grad_enabled()):
                tensors = indexer_inputs(self.indexer, hidden_states.detach(), q_latent.detach(), cos, sin,
                                         rope_interleave=self.rope_interleave)
            if self.wants_loss:
                self._indexer_tensors = tensors
        if not self.sparse:
            return None
        topk_indices = self.given
        if topk_indices is None:
            tokens = hidden_states.shape[-2] if cu_seqlens is None else (max_seqlen or hidden_states.shape[0])
            topk_indices, _ = ops.dsa_indexer_topk(*tensors, max(1, min(self.topk, tokens)),
                                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        self.owner.topk_indices = topk_indices
        return topk_indices

    def record_loss(self, q: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor, wkv_b: torch.Tensor,
                    lse: torch.Tensor, topk_indices: Optional[torch.Tensor], *, softmax_scale: float,
                    cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int]) -> None:
        """The indexer's per-row KL against the attention just run (its inputs and lse: the teacher,
        detached), kept on the owner as ``indexer_loss`` (B, S) | (T,) float32 for the caller to
        reduce, scale and add to its loss."""
        index_q, index_k, weights = self._indexer_tensors
        self._indexer_tensors = None
        self.owner.indexer_loss = ops.dsa_indexer_loss(
            index_q, index_k, weights, q.detach(), kv_latent.detach(), k_rope.detach(), wkv_b.detach(),
            lse.detach(), softmax_scale=softmax_scale, topk_indices=topk_indices, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen)
