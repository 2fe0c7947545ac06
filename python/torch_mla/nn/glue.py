"""The one latent attention block glue (hidden states → split → norm → RoPE → q → op → o_proj), run
by :class:`~torch_mla.nn.MultiHeadLatentAttention`, :func:`torch_mla.patch_model` (with or without
PEFT adapters) and the torchtitan integration.

What differs between them is where the projections' weights come from, so the glue takes a
*weight provider*, a :class:`Projections`: the attention's submodules (Hugging Face's DeepSeek
names) and how the op gets their effective weights — the plain ``nn.Linear`` weights
(:class:`Projections`), this rank's shards of DTensor weights under tensor parallelism
(:class:`ShardedProjections`), or weights widened by LoRA adapters
(:class:`torch_mla.integrations.hf.peft.LoraProjections`).

What differs between the model families is described by an :class:`MlaGlue` (RoPE layout, latent
scales, head dims, softmax scale), read from a config by :meth:`MlaGlue.from_config`
(docs/design.md §15).
"""
import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

import torch
from torch import nn

from ..distributed import tensor_parallel_input, tensor_parallel_output
from ..ops import mla_attention, mla_attention_block, mla_attention_q_latent, mla_sparse_attention
from .rope import apply_rope, softmax_scale

if TYPE_CHECKING:
    from .indexer import DsaRun

#: How q_rope and k_rope are rotated: adjacent pairs (DeepSeek), the two halves (``rotate_half``),
#: or not at all (NoPE MLA: Kimi Linear's MLA layers keep k_rope unrotated).
ROPE_LAYOUTS = ("interleaved", "half_split", "none")

#: model_type → the config's RoPE layout rule; families not listed are refused by from_config.
_FAMILIES = {
    "deepseek_v2": "interleaved",  # complex rotary over adjacent pairs; no rope_interleave option
    "deepseek_v3": "rope_interleave",
    "sarvam_mla": "rope_interleave",
    "glm4_moe_lite": "rope_interleave",
    "minicpm3": "half_split",
    "longcat_flash": "interleaved",
    "kimi_linear": "none",
    "deepseek_v32": "interleaved",  # DeepSeek Sparse Attention; its indexer: torch_mla.nn.indexer
    "glm_moe_dsa": "interleaved",
}

#: model_types whose attention has a kv_b_proj but is not the dense MLA the op computes.
REFUSED_MODEL_TYPES = {
    "glm5_next": "compressed sparse attention (DSA over compressed keys)",
}


@dataclasses.dataclass(frozen=True)
class MlaGlue:
    """What differs between MLA families around the attention op (docs/design.md §15).

    qk_nope_head_dim, qk_rope_head_dim, v_head_dim: Dn, Dr (0: no k_rope), Dv.
    rope_layout: one of :data:`ROPE_LAYOUTS`.
    q_scale, kv_scale: factors on q (all of it) and on the normed kv_latent before attention
        (LongCat-Flash's ``(hidden / rank) ** 0.5``; 1 elsewhere). k_rope is not scaled.
    softmax_scale: the model's own softmax scale (YaRN mscale² included where the family applies
        it), q_scale not included.
    rope_cache_deinterleaved: Hugging Face writes rotated adjacent pairs into its KV cache as
        ``[evens | odds]`` (its ``apply_rotary_pos_emb_interleave``); only with "interleaved".
    """
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_layout: str
    softmax_scale: float
    q_scale: float = 1.0
    kv_scale: float = 1.0
    rope_cache_deinterleaved: bool = False

    def __post_init__(self):
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even and >= 0 (RoPE rotates pairs), got "
                             f"{self.qk_rope_head_dim}")
        if self.rope_cache_deinterleaved and self.rope_layout != "interleaved":
            raise ValueError("rope_cache_deinterleaved needs rope_layout='interleaved'")

    @property
    def rope_interleave(self) -> bool:
        """The ops' ``rope_interleave`` flag (with "none" the ops rotate by the identity)."""
        return self.rope_layout == "interleaved"

    @property
    def op_scale(self) -> float:
        """The op's softmax_scale: q_scale scales every logit q·k, so it folds in exactly."""
        return self.softmax_scale * self.q_scale

    @classmethod
    def from_config(cls, config: Any, owner: str = "config") -> "MlaGlue":
        """The glue of a transformers MLA config (DeepSeek-V2/V3, Sarvam, MiniCPM3,
        GLM-4.7-Flash, LongCat-Flash, Kimi Linear; DeepSeek-V3.2 and GLM-5, whose indexer is
        read by :mod:`torch_mla.nn.indexer`), by ``config.model_type``. ValueError naming
        `owner` (the attention class) and the setting for families or settings it cannot serve."""
        model_type = getattr(config, "model_type", None)
        if model_type in REFUSED_MODEL_TYPES:
            raise ValueError(f"torch_mla: {owner} (model_type {model_type!r}) is not served: "
                             f"{REFUSED_MODEL_TYPES[model_type]}, which torch_mla's ops do not compute")
        if model_type not in _FAMILIES:
            raise ValueError(f"torch_mla: {owner} has model_type {model_type!r}, not an MLA family "
                             f"torch_mla serves ({', '.join(sorted(_FAMILIES))})")
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk_head_dim = getattr(config, "qk_head_dim", nope + rope)
        if qk_head_dim != nope + rope:
            raise ValueError(f"torch_mla: {owner} has qk_head_dim {qk_head_dim} != qk_nope_head_dim "
                             f"+ qk_rope_head_dim ({nope} + {rope}), which the op cannot split")
        rule = _FAMILIES[model_type]
        layout = rule if rule != "rope_interleave" else (
            "interleaved" if getattr(config, "rope_interleave", True) else "half_split")
        if layout == "none":  # no rotary embedding: HF's scale is plain, whatever rope_parameters say
            scale = softmax_scale(nope + rope)
        else:
            scale = softmax_scale(nope + rope, _rope_parameters(config))
        q_scale = kv_scale = 1.0
        if model_type == "longcat_flash":
            q_scale = (config.hidden_size / config.q_lora_rank) ** 0.5
            kv_scale = (config.hidden_size / config.kv_lora_rank) ** 0.5
        return cls(qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, rope_layout=layout,
                   softmax_scale=scale, q_scale=q_scale, kv_scale=kv_scale,
                   rope_cache_deinterleaved=layout == "interleaved" and model_type != "deepseek_v2")


def _rope_parameters(config: Any) -> Optional[dict]:
    """HF's rope parameters (``rope_parameters``, or the older ``rope_scaling``), None if absent."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return dict(rope) if rope else None


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
    glue: MlaGlue,
    save: str,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    projections: Optional[Projections] = None,
    attention: Callable[..., torch.Tensor] = mla_attention,
    dsa: Optional["DsaRun"] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The attention block of `attn` through torch_mla: `glue` describes the family (head dims, RoPE
    layout, latent scales, softmax scale), `attn` gives ``kv_lora_rank`` and settings
    (``record_max_logits``, ``head_chunks``, both optional), `projections` the submodules and their
    weights (default :func:`projections_of` `attn`).

    hidden_states (B, S, hidden) | packed (T, hidden) with cu_seqlens; cos, sin (B, S, Dr/2) |
    (T, Dr/2), ignored (may be None) with ``glue.rope_layout == "none"``. Returns (output like hidden_states, kv_latent (..., Dc), k_rope (..., Dr) rotated);
    with ``save="latent"`` the block runs as one op (mla_attention_block) and the latents are not
    returned (None, None). `save`: one of :data:`torch_mla.nn.attention.SAVE_CHOICES`.
    `attention` (mla_attention's signature) serves ``save="q"``.
    Under tensor parallelism each rank attends with its own heads, those of its weight shards.
    When ``attn.record_max_logits`` is true, the call's per-head maximum logit (its local heads
    under tensor parallelism) is stored in ``attn.max_logits`` (docs/design.md §12).
    `dsa` (a :class:`torch_mla.nn.indexer.DsaRun`): DeepSeek Sparse Attention — the indexer reads
    the hidden states and q's latent, the attention runs over its selection
    (:func:`torch_mla.mla_sparse_attention`) or densely, and the indexer loss is recorded after it
    (docs/design.md §19); q is then materialised (``save="q_latent"`` runs as ``"q"``).
    ``save="latent"`` serves a frozen indexer (the block op with the selection, §13.7) and refuses
    the indexer loss (the block returns no lse for its teacher).
    """
    proj = projections_of(attn) if projections is None else projections
    if dsa is not None and dsa.mode != "off":
        if save == "latent" and dsa.wants_loss:
            raise ValueError(f"save='latent' does not serve the indexer loss (dsa_mode={dsa.mode!r}, train_indexer="
                             f"{dsa.train_indexer}): the latent-only block returns no lse for the loss's teacher; "
                             "use save='q', or a frozen indexer (train_indexer=False) with dsa_mode='sparse'")
        if save != "latent":
            save = "q"  # the sparse op and the indexer loss take q itself: there is no q-latent sparse op
    if glue.rope_layout == "none":
        # The ops that rotate inside (q-latent, block) rotate by the identity: exact.
        cos = hidden_states.new_ones(hidden_states.shape[:-1] + (glue.qk_rope_head_dim // 2,), dtype=torch.float32)
        sin = torch.zeros_like(cos)
    if save == "latent":
        if getattr(attn, "record_max_logits", False):
            raise ValueError("record_max_logits needs save='q' or save='q_latent': the latent-only block "
                             "(save='latent') does not return max logits")
        q_a = hidden_states if proj.q_a_proj is None else proj.q_a_proj(hidden_states)
        topk_indices = None
        if dsa is not None and dsa.mode == "sparse":
            q_input = None
            if dsa.given is None:
                with torch.no_grad():  # the indexer reads q's latent detached: nothing to keep for it
                    q_input = q_a if proj.q_a_proj is None else proj.q_norm(q_a)
            topk_indices = dsa.select(hidden_states, q_input, cos, sin, cu_seqlens, max_seqlen)
        return _latent_only_block(attn, proj, hidden_states, q_a, cos, sin, glue=glue, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, topk_indices=topk_indices), None, None
    dim_nope, dim_rope = glue.qk_nope_head_dim, glue.qk_rope_head_dim
    rotates = glue.rope_layout != "none" and dim_rope > 0
    # q first, as HF's forward: LoRA dropout masks are drawn in the same order.
    q_input = hidden_states if proj.q_a_proj is None else proj.q_norm(proj.q_a_proj(hidden_states))
    topk_indices = None if dsa is None else dsa.select(hidden_states, q_input, cos, sin, cu_seqlens, max_seqlen)
    if save == "q_latent":
        # Without a q latent, the hidden states are q's latent: already kept for
        # kv_a_proj_with_mqa's backward, so q costs nothing extra.
        q_latent, wq_b = proj.latent(proj.q_name, proj.q_proj, q_input)
    else:
        q = proj.q_proj(q_input)

    kv_latent, k_rope = proj.kv_a_proj(hidden_states).split([attn.kv_lora_rank, dim_rope], dim=-1)
    kv_latent = proj.kv_norm(kv_latent)
    if glue.kv_scale != 1.0:
        kv_latent = kv_latent * glue.kv_scale  # the latent HF caches and kv_b_proj (and LoRA) read
    if rotates:
        k_rope = apply_rope(k_rope, cos, sin, glue.rope_interleave)
    k_rope = proj.replicated(k_rope, proj.kv_b_proj.weight)
    op_latent, wkv_b = proj.latent("kv_b_proj", proj.kv_b_proj, kv_latent)
    num_heads = wkv_b.shape[0] // (dim_nope + glue.v_head_dim)
    record_max_logits = getattr(attn, "record_max_logits", False)
    extra = dict(return_max_logits=True) if record_max_logits else {}
    wants_lse = dsa is not None and dsa.wants_loss

    if save == "q_latent":
        out = mla_attention_q_latent(
            q_latent, wq_b, cos, sin, op_latent, k_rope, wkv_b, num_heads=num_heads,
            softmax_scale=glue.op_scale, rope_interleave=glue.rope_interleave, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, **extra)
    else:
        q = q.unflatten(-1, (num_heads, -1))
        if rotates:
            q_nope, q_rope = q.split([dim_nope, dim_rope], dim=-1)
            q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), glue.rope_interleave)
            q = torch.cat((q_nope, q_rope), dim=-1)
        if topk_indices is not None:
            attention = functools.partial(mla_sparse_attention, topk_indices=topk_indices)
        if wants_lse:  # the indexer loss's teacher
            extra["return_lse"] = True
        out = attention(q, op_latent, k_rope, wkv_b, softmax_scale=glue.op_scale, cu_seqlens=cu_seqlens,
                        max_seqlen=max_seqlen, **extra)
    if wants_lse:
        out, lse, *max_logits = out
        dsa.record_loss(q, op_latent, k_rope, wkv_b, lse, topk_indices, softmax_scale=glue.op_scale,
                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if record_max_logits:
            attn.max_logits = max_logits[0]
    elif record_max_logits:
        out, attn.max_logits = out
    # out (..., H, Dv) is contiguous: o_proj's input is a view of it, so the tensor the op saves
    # and the one o_proj saves share one storage.
    return proj.o_proj(out.flatten(-2)), kv_latent, k_rope


def _latent_only_block(attn: nn.Module, proj: Projections, hidden_states: torch.Tensor, q_a: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, *, glue: MlaGlue, cu_seqlens: Optional[torch.Tensor],
                       max_seqlen: Optional[int], topk_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """latent_attention with ``save="latent"``: q_a_proj and kv_a_proj_with_mqa as modules (they
    keep the hidden states for their weights' grads), everything after them in mla_attention_block.
    q_a: q_a_proj(hidden_states) (the hidden states without a q latent), computed by the caller,
    which also hands it, normed, to a DSA indexer.

    Under tensor parallelism each rank runs its heads on the local weight shards: q_a, kv_a and the
    norm weights are replicated inputs of the head-sharded op (their grads summed over the mesh),
    and o_proj's product on the rank's heads is a partial sum, reduced before o_proj's bias is added
    (as RowwiseParallel does). The block normalises kv_latent inside, so glue.kv_scale is folded
    into kv_a_layernorm's weight as the op takes it (the parameter itself is unchanged).
    """
    q_norm, kv_norm = proj.q_norm, proj.kv_norm
    wq_b_param, wkv_b_param, wo_param = proj.q_proj.weight, proj.kv_b_proj.weight, proj.o_proj.weight
    wkv_b = proj.local(wkv_b_param)
    sharded = getattr(wo_param, "device_mesh", None) is not None
    bias = proj.o_proj.bias
    kv_norm_weight = proj.local(kv_norm.weight)
    if glue.kv_scale != 1.0:
        kv_norm_weight = kv_norm_weight * glue.kv_scale
    y = mla_attention_block(
        proj.replicated(q_a, wq_b_param),
        None if q_norm is None else proj.replicated(proj.local(q_norm.weight), wq_b_param),
        proj.local(wq_b_param),
        proj.replicated(proj.kv_a_proj(hidden_states), wkv_b_param),
        proj.replicated(kv_norm_weight, wkv_b_param),
        wkv_b, proj.local(wo_param), None if sharded or bias is None else bias, cos, sin,
        num_heads=wkv_b.shape[0] // (glue.qk_nope_head_dim + glue.v_head_dim), softmax_scale=glue.op_scale,
        q_norm_eps=q_norm.variance_epsilon if q_norm is not None else 1e-6,  # unused without the norm
        kv_norm_eps=kv_norm.variance_epsilon,
        rope_interleave=glue.rope_interleave, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        head_chunks=getattr(attn, "head_chunks", None), topk_indices=topk_indices)
    y = proj.reduced(y, wo_param)
    return y + proj.local(bias) if sharded and bias is not None else y
