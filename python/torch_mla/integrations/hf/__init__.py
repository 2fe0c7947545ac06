"""One line for Hugging Face transformers' MLA models: ``torch_mla.patch_model(model)``.

Each MLA attention (DeepSeek-V2/V3, Sarvam, MiniCPM3, GLM-4.7-Flash, LongCat-Flash, Kimi Linear's
MLA layers) keeps its parameters (same tensors, so optimizer state and checkpoints stay valid) and
gets a forward that runs torch_mla's op on its latents; what differs between the families is read
from the config into an :class:`~torch_mla.nn.glue.MlaGlue` (docs/design.md §15). transformers
itself is never imported here: the classes are looked up among the modules the model was built
from. PEFT LoRA adapters on the projections the op takes as weights are
handled in :mod:`torch_mla.integrations.hf.peft`; the block itself runs in the one glue,
:func:`torch_mla.nn.glue.latent_attention`.
"""
import sys
import types
import warnings
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ...nn.attention import MultiHeadLatentAttention, check_head_chunks, resolve_save
from ...nn.glue import REFUSED_MODEL_TYPES, MlaGlue, latent_attention
from ...nn.indexer import INDEXER_ROPE_LAYOUTS, DsaRun, check_dsa_mode
from ...nn.rope import apply_rope
from .peft import check_adapters, projections_for

# The attention classes patch_model serves (Sarvam's models are built from DeepSeek-V3's).
_ATTENTION_CLASSES = (
    ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Attention"),
    ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Attention"),
    ("transformers.models.minicpm3.modeling_minicpm3", "MiniCPM3Attention"),
    ("transformers.models.glm4_moe_lite.modeling_glm4_moe_lite", "Glm4MoeLiteAttention"),
    ("transformers.models.longcat_flash.modeling_longcat_flash", "LongcatFlashMLA"),
    ("transformers.models.kimi_linear.modeling_kimi_linear", "KimiLinearAttention"),
    ("transformers.models.deepseek_v32.modeling_deepseek_v32", "DeepseekV32Attention"),
    ("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa", "GlmMoeDsaAttention"),
)

_MASK_HELP = ("torch_mla supports causal attention over whole rows, packed sequences (a "
              "block-causal mask, or cu_seq_lens_q) and padding (a 2-D attention_mask, or HF's "
              "4-D mask made from one), each combined with the others")


def _attention_classes() -> Tuple[type, ...]:
    classes = []
    for module_name, class_name in _ATTENTION_CLASSES:
        module = sys.modules.get(module_name)
        if module is not None:
            classes.append(getattr(module, class_name))
    return tuple(classes)


def patch_model(model: nn.Module, *, save_q_latent: bool = True, save: Optional[str] = None,
                head_chunks: Optional[int] = None, dsa_mode: str = "sparse", train_indexer: bool = False) -> int:
    """Routes every MLA attention of a transformers model through torch_mla: DeepSeek-V2/V3 and
    Sarvam, MiniCPM3, GLM-4.7-Flash, LongCat-Flash, and Kimi Linear's MLA layers (its linear
    attention layers are left alone). Each family's glue (RoPE layout, latent scales, softmax
    scale) is read from the config by :meth:`torch_mla.nn.glue.MlaGlue.from_config`.

    ValueError, before anything is patched, when the model has no MLA attention, or an attention
    with a ``kv_b_proj`` that patch_model cannot serve (another class, DeepSeek Sparse Attention,
    a sliding window, a bias on a projection the op takes as a weight), naming the class and the
    setting.

    The attention modules keep their parameters; only their forward changes. Supported inputs:
    causal attention (``attention_mask`` None, all ones, or HF's causal mask), packed sequences
    (HF's block-causal mask from restarting ``position_ids``, or ``cu_seq_lens_q`` /
    ``max_length_q`` keyword arguments as flash-attention collators pass them), and padded
    batches (a 2-D padding ``attention_mask``, left or right, or the 4-D mask HF derives from
    one): the real tokens run as packed sequences and padded positions get zeros. Other masks
    (custom 4-D masks, additive biases, sliding windows) and attention dropout in training raise
    ValueError at forward.

    The model's own attention (``config._attn_implementation``) runs instead, for that call only,
    where the op cannot serve it: ``output_attentions=True`` (with a one-time warning), and
    queries attending to keys of a KV cache (decode steps, static caches); a prefill through
    torch_mla writes the cache in HF's layout.

    PEFT LoRA adapters on ``q_b_proj`` / ``q_proj`` / ``kv_b_proj`` (the projections the op takes
    as weights) are honoured, patched before or after ``peft.get_peft_model``: the adapter's
    low-rank activations join the latent the op saves. Adapter kinds it cannot honour (DoRA,
    LoRA variants, lora_bias, other tuners) raise ValueError here or at forward.

    save_q_latent, save: what is kept for backward, as MultiHeadLatentAttention's (``save`` one of
    ``"q"``, ``"q_latent"``, ``"latent"``; None: from ``save_q_latent``). With ``"latent"`` a call
    that writes a KV cache runs as ``"q_latent"`` (the cache takes the latents, which the block op
    does not return), and no PEFT adapter on q_b_proj/q_proj, kv_b_proj or o_proj is honoured.
    head_chunks: with ``"latent"``, the block's number of head groups, as MultiHeadLatentAttention's.

    DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5 and its IndexShare; docs/design.md §19): the
    indexer's top k through :func:`torch_mla.dsa_indexer_topk` (streamed) and the attention through
    :func:`torch_mla.mla_sparse_attention`. dsa_mode, train_indexer: as MultiHeadLatentAttention's
    (``save="q_latent"`` runs as "q"; ``save="latent"`` runs the DSA block with a frozen indexer and
    refuses the indexer loss); the attention
    modules get the attributes ``dsa_mode``, ``train_indexer`` (settable later), ``topk_indices``
    and ``indexer_loss`` (:func:`indexer_losses` collects the latter). A GLM "full" layer returns
    its selection as HF does (in HF's coordinates, -1 where a row has fewer keys than k); a
    "shared" layer attends the ``prev_topk_indices`` it is given. A prefill writes the indexer's
    keys into the KV cache as HF's does; decode steps run HF's forward, as for every family.
    Returns the number of attention modules patched by this call (already patched ones are
    skipped: a second call returns 0).
    """
    save = resolve_save(save, save_q_latent)
    head_chunks = check_head_chunks(head_chunks)
    check_dsa_mode(dsa_mode)
    served = _served_modules(model)
    for module, _ in served:
        if _is_dsa(module) and save == "latent" and (dsa_mode == "dense_warmup" or
                                                     (dsa_mode == "sparse" and train_indexer)):
            raise ValueError(f"torch_mla.patch_model: {type(module).__name__} (DeepSeek Sparse Attention, "
                             f"dsa_mode={dsa_mode!r}, train_indexer={train_indexer}) cannot run save='latent': "
                             "the latent-only block returns no lse for the indexer loss's teacher; use save='q', "
                             "or a frozen indexer with dsa_mode='sparse'")
    for module, _ in served:
        if not getattr(module, "_torch_mla_patched", False):
            check_adapters(module, save)
    count = 0
    for module, glue in served:
        if getattr(module, "_torch_mla_patched", False):
            continue
        config = module.config
        module._torch_mla_glue = glue
        module._torch_mla_patched = True
        module._torch_mla_save = save
        module.head_chunks = head_chunks
        module.forward = types.MethodType(_forward, module)
        if _is_dsa(module):
            module.dsa_mode, module.train_indexer = dsa_mode, train_indexer
            module.topk_indices = module.indexer_loss = None
        count += 1
        implementation = getattr(config, "_attn_implementation", None)
        _warn_once(f"implementation {implementation}", (
            "torch_mla.patch_model: the patched attention runs torch_mla's op whatever "
            f"config._attn_implementation says ({implementation!r}); that implementation still "
            "makes the mask torch_mla reads and runs the calls the op cannot serve "
            "(output_attentions=True, queries attending to a KV cache)"))
    return count


def _is_dsa(module: nn.Module) -> bool:
    """Whether a served attention is DeepSeek Sparse Attention (an indexer, or GLM's shared layer)."""
    return getattr(module.config, "model_type", None) in INDEXER_ROPE_LAYOUTS


def indexer_losses(model: nn.Module) -> List[torch.Tensor]:
    """The per-row indexer KL losses ((T,) float32 over the real tokens) that the patched DSA
    attentions of `model` recorded in the last forward, in module order: reduce, scale and add them
    to the loss (docs/design.md §19)."""
    return [m.indexer_loss for m in model.modules()
            if getattr(m, "_torch_mla_patched", False) and getattr(m, "indexer_loss", None) is not None]


def _served_modules(model: nn.Module):
    """[(attention, its MlaGlue)] of every MLA attention in `model`; ValueError naming the class
    and the setting for an MLA-looking one (it has a ``kv_b_proj``) that cannot be served, or
    when there is none at all."""
    classes = _attention_classes()
    served = []
    for module in model.modules():
        name = type(module).__name__
        if type(module) in classes:
            # An exact class: a subclass may change what its forward computes.
            served.append((module, _glue_of(module, name)))
        elif hasattr(module, "kv_b_proj") and not isinstance(module, MultiHeadLatentAttention):
            model_type = getattr(getattr(module, "config", None), "model_type", None)
            why = REFUSED_MODEL_TYPES.get(model_type) or (
                f"its class (model_type {model_type!r}) is not one of those it serves: "
                f"{', '.join(c for _, c in _ATTENTION_CLASSES)}")
            raise ValueError(f"torch_mla.patch_model: {name} has an MLA kv_b_proj that patch_model "
                             f"cannot serve: {why}")
    if not served:
        raise ValueError(f"torch_mla.patch_model: {type(model).__name__} has no MLA attention to patch "
                         f"(served: {', '.join(c for _, c in _ATTENTION_CLASSES)}); nothing would run "
                         "through torch_mla")
    return served


def _glue_of(module: nn.Module, name: str) -> MlaGlue:
    """The glue of a served attention, its settings checked; ValueError naming class and setting."""
    config = module.config
    glue = MlaGlue.from_config(config, owner=name)
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        raise ValueError(f"torch_mla.patch_model: {name}: sliding-window attention "
                         f"(config.sliding_window = {getattr(config, 'sliding_window', None)}) is not supported")
    for proj in ("q_proj", "q_b_proj", "kv_b_proj"):  # weights the op takes without a bias
        linear = getattr(module, proj, None)
        bias = getattr(getattr(linear, "base_layer", linear), "bias", None)
        if bias is not None:
            raise ValueError(f"torch_mla.patch_model: {name}: {proj} has a bias, which the op does not take")
    return glue


_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _fallback_reason(attn, seqlen: int, cache, kwargs) -> Optional[str]:
    """Why this call cannot run through the op (None: it can). Shapes and flags only: nothing here
    reads tensor data, so a compiled decoding step traces without a graph break."""
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(attn.config, "output_attentions", False)
    if output_attentions:
        return "output_attentions"
    if cache is not None:
        get_mask_sizes = getattr(cache, "get_mask_sizes", None)
        if get_mask_sizes is not None:
            kv_length = get_mask_sizes(seqlen, attn.layer_idx)[0]
        else:
            kv_length = cache.get_seq_length(attn.layer_idx) + seqlen
        if torch.is_tensor(kv_length) or kv_length != seqlen:
            # Keys of earlier tokens (a decode step), or a static cache's fixed key length: the
            # op attends queries to keys of the same tokens.
            return "cache"
    return None


def _forward(self, hidden_states, *, position_embeddings=None, attention_mask=None, cache=None,
             **kwargs):
    """The patched forward of a served attention (same call, same returns: (output, None) —
    attention weights are never materialised; a call that asks for them runs the original
    forward)."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    batch, seqlen = hidden_states.shape[:2]
    reason = _fallback_reason(self, seqlen, cache, kwargs)
    if reason is not None:
        implementation = getattr(self.config, "_attn_implementation", None)
        if reason == "output_attentions":
            _warn_once(reason, "torch_mla.patch_model: output_attentions=True asks for the "
                       "attention weights, which torch_mla never materialises: such calls run the "
                       f"model's own attention ({implementation!r}), without torch_mla's memory saving")
        elif torch.is_grad_enabled() and self.training:
            _warn_once(reason, "torch_mla.patch_model: queries attend to keys held in a KV cache "
                       "(a decode step or a static cache), which the op does not cover: such calls "
                       f"run the model's own attention ({implementation!r}), without torch_mla's "
                       "memory saving; train without a cache (use_cache=False)")
        if position_embeddings is not None:  # Kimi Linear's MLA forward takes none
            kwargs["position_embeddings"] = position_embeddings
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, cache=cache, **kwargs)
    if self.training and self.attention_dropout > 0:
        raise ValueError("torch_mla.patch_model: attention dropout is not supported "
                         f"(config.attention_dropout = {self.attention_dropout})")

    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    layout = _Layout(None, None, None)
    if cu_seqlens is not None:
        max_seqlen = int(max_seqlen) if max_seqlen is not None else None
        layout = _Layout(None, cu_seqlens.to(torch.int32), max_seqlen)
    elif attention_mask is not None:
        layout = _sequences_from_mask(attention_mask, batch, seqlen)

    glue = self._torch_mla_glue
    cos, sin = _rotation(glue, position_embeddings, batch, seqlen)
    cos_rows, sin_rows = cos, sin  # (B, S, Dr/2), before unpadding
    save = self._torch_mla_save
    if save == "latent" and cache is not None:
        save = "q_latent"  # the cache takes kv_latent and k_rope, which the block op does not return
    prev_topk_indices = kwargs.pop("prev_topk_indices", None)
    dsa = None
    if _is_dsa(self):
        given = None
        if self.indexer is None and prev_topk_indices is not None and self.dsa_mode == "sparse":
            given = _op_indices(prev_topk_indices, layout, batch, seqlen)
        dsa = DsaRun(self, self.indexer, mode=self.dsa_mode, train_indexer=self.train_indexer,
                     rope_interleave=INDEXER_ROPE_LAYOUTS[self.config.model_type] == "interleaved",
                     topk=self.config.index_topk, topk_indices=given)
        if self.dsa_mode != "off" and save != "latent":
            save = "q"  # as the glue runs it: the sparse op and the indexer loss take q
    run = dict(glue=glue, save=save, projections=projections_for(self, save), dsa=dsa)
    tokens = batch * seqlen
    if layout.cu_seqlens is None:
        out, kv_latent, k_rope = latent_attention(self, hidden_states, cos, sin, **run)
    else:
        x, cos, sin = (_real_tokens(t, layout, tokens) for t in (hidden_states, cos, sin))
        out, kv_latent, k_rope = latent_attention(
            self, x, cos, sin, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen, **run)
        if layout.indices is not None:  # pad back, zeros at padded positions
            out = _PadBack.apply(out, layout.indices, tokens)
            if cache is not None:
                kv_latent, k_rope = (_PadBack.apply(t, layout.indices, tokens) for t in (kv_latent, k_rope))
        out = out.view(batch, seqlen, -1)

    if cache is not None:
        if glue.rope_cache_deinterleaved:
            # HF's decode steps read k_rope from the cache in the layout its rotary writes.
            k_rope = torch.cat((k_rope[..., 0::2], k_rope[..., 1::2]), dim=-1)
        cache.update(kv_latent.reshape(batch, 1, seqlen, -1), k_rope.reshape(batch, 1, seqlen, -1),
                     self.layer_idx, kwargs=kwargs)
        if _is_dsa(self) and self.indexer is not None:
            cache.update_indexer(_indexer_cache_keys(self, hidden_states, cos_rows, sin_rows), self.layer_idx)
    if self.config.model_type != "glm_moe_dsa":
        return out, None
    # GLM-5: the decoder layer passes the selection on to the next ("shared") layer, in HF's form.
    if self.indexer is None:
        return out, None, prev_topk_indices
    topk = self.topk_indices
    return out, None, None if topk is None else _hf_indices(topk, layout, batch, seqlen)


def _indexer_cache_keys(attn, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The indexer's keys (B, S, D_I) as HF's indexer writes them into the cache: in the model's
    dtype, GLM's interleaved rotation written as ``[evens | odds]`` (its apply_rotary_pos_emb_interleave)."""
    indexer = attn.indexer
    interleave = INDEXER_ROPE_LAYOUTS[attn.config.model_type] == "interleaved"
    with torch.no_grad():
        index_k = indexer.k_norm(indexer.wk(hidden_states))
        rot, rest = index_k.split([indexer.qk_rope_head_dim, indexer.head_dim - indexer.qk_rope_head_dim], dim=-1)
        rot = apply_rope(rot, cos, sin, interleave)
        if interleave:
            rot = torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)
        return torch.cat((rot, rest), dim=-1)


def _packed_tokens(layout: "_Layout", batch: int, seqlen: int):
    """(flat, seq, start) of the T packed tokens: each one's index among the B·S, its sequence,
    and its sequence's first packed index."""
    cu = layout.cu_seqlens.long()
    tokens = int(cu[-1])
    flat = layout.indices if layout.indices is not None else torch.arange(batch * seqlen, device=cu.device)
    seq = torch.searchsorted(cu[1:], torch.arange(tokens, device=cu.device), right=True)
    return flat, seq, cu[seq]


def _hf_indices(topk_indices: torch.Tensor, layout: "_Layout", batch: int, seqlen: int) -> torch.Tensor:
    """The op's selection ((B, S, k), or (T, k) positions within each packed sequence) in HF's
    coordinates: (B, S, k) int32 positions in the query's row; -1 for none and at padded queries."""
    if layout.cu_seqlens is None:
        return topk_indices
    flat, _, start = _packed_tokens(layout, batch, seqlen)
    keys = (start[:, None] + topk_indices.long()).clamp(0, max(flat.numel() - 1, 0))
    rows = torch.where(topk_indices >= 0, flat[keys] % seqlen, -1) if flat.numel() else topk_indices.long()
    return (rows.new_full((batch * seqlen, rows.shape[-1]), -1).index_copy_(0, flat, rows)
            .view(batch, seqlen, -1).to(torch.int32))


def _op_indices(hf_indices: torch.Tensor, layout: "_Layout", batch: int, seqlen: int) -> torch.Tensor:
    """HF's selection (B, S, k), positions in each query's row, in the op's coordinates: as is for
    whole rows, else (T, k) positions within each packed token's own sequence, -1 for a key outside
    it (a padded key, another packed sequence's, or none)."""
    if layout.cu_seqlens is None:
        return hf_indices.to(torch.int32)
    flat, seq, start = _packed_tokens(layout, batch, seqlen)
    rows = hf_indices.reshape(batch * seqlen, -1).index_select(0, flat).long()
    packed_of = torch.full((batch * seqlen,), -1, dtype=torch.long, device=flat.device)
    packed_of[flat] = torch.arange(flat.numel(), device=flat.device)
    in_row = (rows >= 0) & (rows < seqlen)
    keys = packed_of[((flat // seqlen)[:, None] * seqlen + rows.clamp(0, seqlen - 1))]
    same = in_row & (keys >= 0) & (seq[keys.clamp(min=0)] == seq[:, None])
    return torch.where(same, keys - start[:, None], -1).to(torch.int32)


class _PadBack(torch.autograd.Function):
    """x (T, ...) placed at rows `indices` of zeros (tokens, ...); saves only the indices
    (index_copy's backward would keep x too)."""

    @staticmethod
    def forward(ctx, x, indices, tokens):
        ctx.save_for_backward(indices)
        return x.new_zeros((tokens,) + tuple(x.shape[1:])).index_copy_(0, indices, x)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad.index_select(0, indices), None, None


def _rotation(glue: MlaGlue, position_embeddings, batch: int, seqlen: int
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """cos, sin (B, S, Dr/2) from the model's own rotary embedding; (None, None) without RoPE
    (Kimi Linear's MLA gets no position embeddings; the glue rotates by the identity).
    DeepSeek-V2 passes a complex ``freqs_cis`` of width Dr/2, the others (cos, sin) of width Dr
    (two equal halves)."""
    if glue.rope_layout == "none":
        return None, None
    if torch.is_tensor(position_embeddings) and torch.is_complex(position_embeddings):
        cos, sin = position_embeddings.real, position_embeddings.imag
    else:
        cos, sin = (t[..., :glue.qk_rope_head_dim // 2] for t in position_embeddings)
    return cos.expand(batch, seqlen, -1), sin.expand(batch, seqlen, -1)


def _real_tokens(t: Optional[torch.Tensor], layout: "_Layout", tokens: int) -> Optional[torch.Tensor]:
    """t (B, S, ...) as (T, ...): the B·S tokens, unpadded to the real ones when layout has
    indices; None stays None."""
    if t is None:
        return None
    t = t.reshape(tokens, t.shape[-1])
    return t if layout.indices is None else t.index_select(0, layout.indices)


class _Layout(NamedTuple):
    """How the B·S tokens of a call are attended: indices (T,) of the real tokens among the
    B·S (None: all are real), and the sequences of those T tokens, cu_seqlens (N+1,) int32 and
    max_seqlen (None, None: one causal sequence per row, nothing padded)."""
    indices: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    max_seqlen: Optional[int]


_last_mask: list = [None, None, None]  # weakref to the mask, its _version, the result


@torch.compiler.disable
def _sequences_from_mask(mask, batch: int, seqlen: int) -> _Layout:
    """Reads HF's attention mask into a _Layout; ValueError for anything but causal attention
    within sequences (rows, or packed block-causal rows) over the real tokens (key padding).
    Every layer gets the same mask object, so the last answer is kept."""
    ref, version, result = _last_mask
    if ref is not None and ref() is mask and version == mask._version:
        return result
    result = _read_mask(mask, batch, seqlen)
    _last_mask[:] = [weakref.ref(mask), mask._version, result]
    return result


def _read_mask(mask, batch: int, seqlen: int) -> _Layout:
    if not torch.is_tensor(mask):
        raise ValueError(f"torch_mla.patch_model: attention masks of type {type(mask).__name__} "
                         f"(flex attention) are not supported; {_MASK_HELP}")
    if mask.dim() == 2:  # flash-attention style (B, S) padding mask: one sequence per row
        if tuple(mask.shape) != (batch, seqlen):
            raise ValueError(f"torch_mla.patch_model: a 2-D attention mask of shape "
                             f"{tuple(mask.shape)} for {batch}×{seqlen} queries; expected "
                             f"({batch}, {seqlen})")
        real = mask.bool()
        if bool(real.all()):
            return _Layout(None, None, None)
        lengths = real.sum(-1)
        cu_seqlens = torch.cat((lengths.new_zeros(1), lengths.cumsum(0))).to(torch.int32)
        return _Layout(real.reshape(-1).nonzero().flatten(), cu_seqlens, int(lengths.max()))
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (seqlen, seqlen):
        keys = f"{mask.shape[-1]} keys for {seqlen} queries (keys of a KV cache?), " if mask.dim() == 4 else ""
        raise ValueError(f"torch_mla.patch_model: expected a 4-D mask (B, 1, {seqlen}, {seqlen}), "
                         f"got shape {tuple(mask.shape)}: {keys}which the op does not attend; {_MASK_HELP}")
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        # HF's additive masks: 0 where attended, the dtype's minimum (or -inf) elsewhere.
        allowed = mask == 0
        if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError("torch_mla.patch_model: additive attention biases (values other "
                             "than 0 and the dtype's minimum) are not supported; " + _MASK_HELP)
    allowed = allowed.expand(batch, -1, -1, -1)
    if not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(f"torch_mla.patch_model: per-head masks are not supported; {_MASK_HELP}")
    allowed = allowed[:, 0]

    # A token is real (not padding) where it sees itself. Among the real tokens of a row, a
    # sequence starts at the first and wherever a token may not see the real one before it.
    index = torch.arange(seqlen, device=mask.device)
    real = allowed[:, index, index]
    previous = torch.where(real, index, -1).cummax(-1).values
    previous = torch.cat((previous.new_full((batch, 1), -1), previous[:, :-1]), dim=1)
    sees_previous = allowed.gather(2, previous.clamp(min=0)[..., None])[..., 0] & (previous >= 0)
    starts = real & ~sees_previous
    seq = starts.cumsum(-1)
    expected = ((index[:, None] >= index[None, :]) & (seq[:, :, None] == seq[:, None, :])
                & real[:, :, None] & real[:, None, :])
    seen = allowed & real[:, :, None]  # what a padded query sees does not matter (zeroed)
    if not torch.equal(seen, expected):
        b, i, j = (seen != expected).nonzero()[0].tolist()
        what = "attends" if bool(seen[b, i, j]) else "does not attend"
        raise ValueError(
            "torch_mla.patch_model: the attention mask is not causal within sequences over the "
            f"real tokens (padding, packing): in row {b}, query {i} {what} key {j} (a custom "
            f"mask, a sliding window or bidirectional attention?); {_MASK_HELP}")
    padded = not bool(real.all())
    if not padded and int(starts.sum()) == batch:
        return _Layout(None, None, None)
    indices = real.reshape(-1).nonzero().flatten() if padded else None
    starts = starts.reshape(-1)
    if indices is not None:
        starts = starts[indices]
    first = starts.nonzero().flatten()
    cu_seqlens = torch.cat((first, first.new_tensor([starts.numel()]))).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else None
    return _Layout(indices, cu_seqlens, max_seqlen)
