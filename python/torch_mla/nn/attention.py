"""A drop-in Multi-Head Latent Attention block with Hugging Face's DeepSeek-V2/V3 parameter names.

The weights of a ``DeepseekV2Attention`` / ``DeepseekV3Attention`` load into
:class:`MultiHeadLatentAttention` with ``load_state_dict(strict=True)`` and give the same numbers;
what autograd keeps for backward shrinks to the latents (docs/design.md §1).
"""
import functools
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from ..distributed import context_parallel_mla_attention, shard_positions
from ..ops import mla_attention, rms_norm
from .glue import ROPE_LAYOUTS, MlaGlue, latent_attention
from .indexer import INDEXER_ROPE_LAYOUTS, DsaIndexer, DsaRun, check_dsa_mode
from .rope import rope_cos_sin, rope_frequencies, rope_type, softmax_scale


#: What MultiHeadLatentAttention keeps for backward (docs/design.md §13.3): "q" — q, the latents,
#: out, lse (mla_attention); "q_latent" — q's latent instead of q (mla_attention_q_latent);
#: "latent" — only the block's input, the pre-norm latents and the norms' statistics
#: (mla_attention_block: q, out and o_proj's input recomputed in backward).
SAVE_CHOICES = ("q", "q_latent", "latent")


def resolve_save(save: Optional[str], save_q_latent: bool) -> str:
    """`save` checked, or from the older flag `save_q_latent` when None."""
    if save is None:
        return "q_latent" if save_q_latent else "q"
    if save not in SAVE_CHOICES:
        raise ValueError(f"save must be one of {SAVE_CHOICES} (or None), got {save!r}")
    return save


def check_head_chunks(head_chunks: Optional[int]) -> Optional[int]:
    """`head_chunks` checked: None (the op's default) or at least 1."""
    if head_chunks is not None and head_chunks < 1:
        raise ValueError(f"head_chunks must be >= 1 or None, got {head_chunks}")
    return head_chunks


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed as Hugging Face's DeepSeek RMSNorm (statistics in float32,
    the weight applied in the input dtype) by the op ``torch_mla::rms_norm``, which saves only its
    input and the per-row rstd for backward (docs/design.md §13.2)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _context_parallel_core(q, kv_latent, k_rope, wkv_b, *, softmax_scale, group, cu_seqlens=None,
                           max_seqlen=None, return_max_logits=False):
    return context_parallel_mla_attention(q, kv_latent, k_rope, wkv_b, group=group,
                                          softmax_scale=softmax_scale, return_max_logits=return_max_logits)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """(T,) position of every packed token within its sequence."""
    cu = cu_seqlens.long()
    index = torch.arange(tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], index, right=True)
    return index - cu[seq]


class MultiHeadLatentAttention(nn.Module):
    """Multi-Head Latent Attention (causal) of DeepSeek-V2/V3 and the other MLA families
    (:meth:`from_config`), with torch_mla's op inside.

    Parameters are named as Hugging Face's ``DeepseekV2Attention`` / ``DeepseekV3Attention``
    (``q_a_proj, q_a_layernorm, q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj, o_proj``), so their state dicts load with ``strict=True``. RoPE (default or YaRN),
    the norms and the softmax scale (YaRN mscale² included) are computed as HF computes them.

    Args:
        hidden_size, num_heads: model width and H.
        q_lora_rank: Lq, the width of q's latent, or None for a single ``q_proj`` (V2-Lite).
        kv_lora_rank: Dc, the width of ``kv_latent``.
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: Dn, Dr, Dv.
        rope_theta, rope_scaling: RoPE base and HF's scaling dict (``rope_type``/``type``
            ``"yarn"`` with ``factor``, ``original_max_position_embeddings``, ``mscale``,
            ``mscale_all_dim``, ``beta_fast``, ``beta_slow``...), None for plain RoPE.
        rope_interleave: rotate adjacent pairs (DeepSeek's layout) rather than halves.
        rope_layout: one of :data:`torch_mla.nn.glue.ROPE_LAYOUTS` ("interleaved", "half_split",
            "none": no rotation, Kimi Linear's MLA); None: from rope_interleave.
        q_scale, kv_scale: factors on q and on the normed kv_latent (LongCat-Flash's
            ``(hidden / rank) ** 0.5``), as :class:`torch_mla.nn.glue.MlaGlue`'s.
        rms_norm_eps: eps of ``q_a_layernorm`` and ``kv_a_layernorm``.
        attention_bias: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (as HF).
        save_q_latent: save q's latent (Lq values per token; the hidden states when q_lora_rank
            is None) for backward instead of q (H·(Dn+Dr)), recomputing q in backward.
        record_max_logits: after every forward, ``self.max_logits`` holds the (H,) float32 per-head
            maximum of ``softmax_scale * q·k`` over the visible pairs (docs/design.md §12), for a
            QK-Clip step; not differentiable, computed by the forward itself. Under context
            parallelism it is the maximum over the group's ranks; under tensor parallelism each
            rank holds its own heads' values, the heads of its weight shards. Off: no cost.

        save: what the block keeps for backward, one of :data:`SAVE_CHOICES` — ``"q"``,
            ``"q_latent"`` (what ``save_q_latent`` True/False select; None: take it from
            ``save_q_latent``) or ``"latent"``: the whole block after q_a_proj and
            kv_a_proj_with_mqa in one op (:func:`torch_mla.mla_attention_block`) that keeps
            only the hidden states, the pre-norm latents and the norms' statistics, and
            recomputes q, the attention's out and o_proj's input in backward (docs/design.md §13).
            Not with context parallelism (ValueError at forward).
        head_chunks: with ``save="latent"``, the number of head groups the block runs in, one
            group's q, out and attention transients at a time (docs/design.md §13.6); None: the
            op's default, 4. More groups: less transient memory, smaller GEMMs.

    DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5; docs/design.md §19), on when index_topk is given:
        index_n_heads, index_head_dim, index_topk: H_I, D_I and k of the lightning indexer, an
            ``indexer`` submodule (:class:`torch_mla.nn.indexer.DsaIndexer`, HF's parameter names).
        indexer_rope_layout: "half_split" (DeepSeek-V3.2) or "interleaved" (GLM-5).
        has_indexer: False for a layer that reuses another layer's selection (GLM's IndexShare
            "shared" layers: no ``indexer``; its forward takes ``topk_indices``).
        dsa_mode: one of :data:`torch_mla.nn.indexer.DSA_MODES`; None: "sparse" (the indexer's top k,
            then :func:`torch_mla.mla_sparse_attention`). "dense_warmup": dense attention and the
            indexer's KL loss over all visible keys. "off": dense attention, the indexer unused.
        train_indexer: the indexer's tensors carry gradients (from the indexer loss only: its inputs
            are detached). False (default): it runs under no_grad, as HF's does. The indexer loss is
            recorded in "dense_warmup", and in "sparse" when train_indexer.
        After every forward, ``self.topk_indices`` holds the selection the attention used (None when
        dense), in the op's coordinates, for a layer that shares it (IndexShare), and
        ``self.indexer_loss`` the per-row KL (B, S) | (T,) float32 when recorded, else None, for the
        caller to reduce, scale and add to its loss. With DSA on, ``save="q_latent"`` runs as "q"
        (no q-latent sparse op); ``save="latent"`` runs the DSA block (mla_attention_block with the
        selection, docs/design.md §13.7) with a frozen indexer, and raises ValueError where the
        indexer loss is recorded (the block returns no lse for its teacher).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: Optional[int],
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope_theta: float = 10000.0,
        rope_scaling: Optional[Mapping[str, Any]] = None,
        rope_interleave: bool = True,
        rope_layout: Optional[str] = None,
        q_scale: float = 1.0,
        kv_scale: float = 1.0,
        rms_norm_eps: float = 1e-6,
        attention_bias: bool = False,
        save_q_latent: bool = True,
        record_max_logits: bool = False,
        save: Optional[str] = None,
        head_chunks: Optional[int] = None,
        index_n_heads: Optional[int] = None,
        index_head_dim: Optional[int] = None,
        index_topk: Optional[int] = None,
        indexer_rope_layout: str = "half_split",
        has_indexer: bool = True,
        dsa_mode: Optional[str] = None,
        train_indexer: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rope_layout is None:
            rope_layout = "interleaved" if rope_interleave else "half_split"
        elif rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS} or None, got {rope_layout!r}")
        factory = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.rope_layout = rope_layout
        self.rope_interleave = rope_layout == "interleaved"
        #: A process group to split the sequence over (torch_mla.distributed): hidden_states
        #: then hold this rank's share as laid out by ``shard_sequence``.
        self.context_parallel_group = None
        self.record_max_logits = record_max_logits
        #: The last forward's (H,) maximum logit per head when record_max_logits, else None.
        self.max_logits: Optional[torch.Tensor] = None
        self.save = resolve_save(save, save_q_latent)
        self.head_chunks = check_head_chunks(head_chunks)
        self.scaling = softmax_scale(self.qk_head_dim, self.rope_scaling if rope_layout != "none" else None)
        #: The family description the one glue runs (docs/design.md §15); checks the head dims.
        self.glue = MlaGlue(qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                            v_head_dim=v_head_dim, rope_layout=rope_layout, softmax_scale=self.scaling,
                            q_scale=q_scale, kv_scale=kv_scale)

        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False, **factory)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias, **factory)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=rms_norm_eps, **factory)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False, **factory)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim,
                                            bias=attention_bias, **factory)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=rms_norm_eps, **factory)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim),
                                   bias=False, **factory)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias, **factory)

        # A plain attribute, not a buffer: module.to(torch.bfloat16) must not round the
        # frequencies, and HF's attention state dict has no entry for them either.
        self.inv_freq, self.attention_factor = rope_frequencies(qk_rope_head_dim, rope_theta, self.rope_scaling)

        self.index_topk = index_topk
        self.train_indexer = train_indexer
        #: The last forward's selection (DSA, sparse) and per-row indexer loss, else None.
        self.topk_indices: Optional[torch.Tensor] = None
        self.indexer_loss: Optional[torch.Tensor] = None
        self.indexer = None
        if index_topk is None:
            if dsa_mode not in (None, "off"):
                raise ValueError(f"dsa_mode={dsa_mode!r} needs DeepSeek Sparse Attention (index_topk and the "
                                 "indexer's sizes)")
            self.dsa_mode = "off"
            return
        self.dsa_mode = check_dsa_mode("sparse" if dsa_mode is None else dsa_mode)
        if has_indexer:
            if q_lora_rank is None or index_n_heads is None or index_head_dim is None:
                raise ValueError("DeepSeek Sparse Attention's indexer needs q_lora_rank (it reads q's latent), "
                                 f"index_n_heads and index_head_dim; got {q_lora_rank}, {index_n_heads}, "
                                 f"{index_head_dim}")
            self.indexer = DsaIndexer(hidden_size=hidden_size, q_lora_rank=q_lora_rank, index_n_heads=index_n_heads,
                                      index_head_dim=index_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                                      index_topk=index_topk, rope_layout=indexer_rope_layout, **factory)
        self.indexer_rope_layout = indexer_rope_layout

    @property
    def save_q_latent(self) -> bool:
        """Whether q's latent is kept instead of q (``save`` "q_latent" or "latent")."""
        return self.save != "q"

    @save_q_latent.setter
    def save_q_latent(self, value: bool) -> None:
        self.save = "q_latent" if value else "q"

    @classmethod
    def from_config(cls, config, *, layer_idx: Optional[int] = None, **overrides) -> "MultiHeadLatentAttention":
        """From a transformers MLA config — DeepSeek-V2/V3, Sarvam, MiniCPM3, GLM-4.7-Flash,
        LongCat-Flash, Kimi Linear, and DeepSeek Sparse Attention's DeepSeek-V3.2 and GLM-5 — its
        family read by :meth:`MlaGlue.from_config` (RoPE layout, latent scales; ValueError for other
        model types); keyword arguments override.

        layer_idx: the layer, for GLM-5's ``config.indexer_types`` ("full": an indexer, "shared":
        none, the selection comes from the caller); needed when any layer is "shared".

        The norms get eps 1e-6, as HF's attentions build them (they do not use
        ``config.rms_norm_eps``, which is the decoder layers' eps).
        """
        glue = MlaGlue.from_config(config, owner=type(config).__name__)
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(config, "rope_theta", 10000.0)
        scaling = rope if rope_type(rope) != "default" else None
        if scaling is not None:
            scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
            if scaling.get("factor") is None:
                scaling["factor"] = config.max_position_embeddings / scaling["original_max_position_embeddings"]
        kwargs = dict(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            rope_layout=glue.rope_layout,
            q_scale=glue.q_scale,
            kv_scale=glue.kv_scale,
            rms_norm_eps=1e-6,
            attention_bias=getattr(config, "attention_bias", False),
        )
        if config.model_type in INDEXER_ROPE_LAYOUTS:
            indexer_types = getattr(config, "indexer_types", None) or ()
            if layer_idx is None and "shared" in indexer_types:
                raise ValueError(f"MultiHeadLatentAttention.from_config: {type(config).__name__} has IndexShare "
                                 "layers (indexer_types 'shared'): pass layer_idx=")
            kwargs.update(index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
                          index_topk=config.index_topk, indexer_rope_layout=INDEXER_ROPE_LAYOUTS[config.model_type],
                          has_indexer=layer_idx is None or not indexer_types or indexer_types[layer_idx] != "shared")
        if "rope_interleave" in overrides and "rope_layout" not in overrides:
            kwargs["rope_layout"] = None  # the caller's rope_interleave decides the layout
        kwargs.update(overrides)
        return cls(**kwargs)

    def rope(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., Dr/2) float32 of position_ids (...)."""
        return rope_cos_sin(position_ids, self.inv_freq, self.attention_factor)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        topk_indices: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Causal MLA over hidden_states.

        Padded: hidden_states (B, S, hidden), position_ids (B, S) or (1, S) or (S,), default
        ``arange(S)``. Packed: hidden_states (T, hidden) with cu_seqlens (B+1,) int32, position_ids
        (T,), default each token's position in its sequence; max_seqlen optional.
        topk_indices (DSA, dsa_mode "sparse"): (B, S, k) | (T, k) int32 positions within each
        query's sequence (-1: none), as :func:`torch_mla.mla_sparse_attention` takes them — a
        selection to attend instead of the indexer's (RL replay, or IndexShare: another layer's
        ``topk_indices``); the indexer loss, when recorded, is then taken on it.
        Returns a tensor shaped like hidden_states.
        """
        save, attention = self.save, mla_attention
        dsa = None
        if self.index_topk is not None:
            dsa = DsaRun(self, self.indexer, mode=self.dsa_mode, train_indexer=self.train_indexer,
                         rope_interleave=self.indexer_rope_layout == "interleaved", topk=self.index_topk,
                         topk_indices=topk_indices)
        elif topk_indices is not None:
            raise ValueError("topk_indices needs DeepSeek Sparse Attention (a module built with index_topk)")
        if self.context_parallel_group is not None:
            if dsa is not None and dsa.mode != "off":
                raise ValueError("MultiHeadLatentAttention: DeepSeek Sparse Attention (dsa_mode "
                                 f"{dsa.mode!r}) does not support context parallelism yet; use dsa_mode='off'")
            if save == "latent":
                raise ValueError("MultiHeadLatentAttention: save='latent' does not support context "
                                 "parallelism (context_parallel_group is set): the attention there runs "
                                 "on (query chunk, key chunk) pairs outside the block op; use save='q'")
            if cu_seqlens is not None:
                raise ValueError("MultiHeadLatentAttention: context parallelism takes padded batches "
                                 "(B, S_local, hidden), not cu_seqlens")
            if position_ids is None:
                position_ids = shard_positions(hidden_states.shape[-2], self.context_parallel_group,
                                               device=hidden_states.device)
            # q is split with the sequence, so it is materialised: no q latent here.
            save = "q"
            attention = functools.partial(_context_parallel_core, group=self.context_parallel_group)
        cos, sin = self.rotation(hidden_states, position_ids, cu_seqlens)
        out, _, _ = latent_attention(
            self, hidden_states, cos, sin, glue=self.glue, save=save,
            attention=attention, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dsa=dsa)
        return out

    def rotation(self, hidden_states: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, S, Dr/2) | (T, Dr/2) float32 for every token of hidden_states (B, S, hidden) |
        packed (T, hidden): at position_ids (as :meth:`forward` takes them), by default ``arange(S)``
        or each packed token's position in its sequence."""
        lead = hidden_states.shape[:-1]
        if position_ids is None:
            if cu_seqlens is None:
                position_ids = torch.arange(lead[-1], device=hidden_states.device)
            else:
                position_ids = positions_from_cu_seqlens(cu_seqlens, lead[0])
        cos, sin = self.rope(position_ids)
        half = self.qk_rope_head_dim // 2
        return cos.expand(*lead, half), sin.expand(*lead, half)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, "
                f"kv_lora_rank={self.kv_lora_rank}, head_dims=(nope {self.qk_nope_head_dim}, "
                f"rope {self.qk_rope_head_dim}, v {self.v_head_dim}), rope_layout={self.rope_layout!r}, "
                f"save={self.save!r}" + (f", index_topk={self.index_topk}, dsa_mode={self.dsa_mode!r}"
                                         if self.index_topk is not None else ""))
