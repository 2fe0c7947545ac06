"""One line for Hugging Face transformers' DeepSeek-V2/V3 models: ``torch_mla.patch_model(model)``.

Each ``DeepseekV2Attention`` / ``DeepseekV3Attention`` keeps its parameters (same tensors, so
optimizer state and checkpoints stay valid) and gets a forward that runs torch_mla's op on its
latents. transformers itself is never imported here: the classes are looked up among the modules
the model was built from.
"""
import sys
import types
import weakref
from typing import Optional, Tuple

import torch
from torch import nn

from .modules import latent_attention

_ATTENTION_CLASSES = (
    ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Attention"),
    ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Attention"),
)

_MASK_HELP = ("torch_mla supports causal attention, over whole rows or over packed sequences "
              "(a block-causal mask, or cu_seq_lens_q); pack sequences instead of padding them")


def _attention_classes() -> Tuple[type, ...]:
    classes = []
    for module_name, class_name in _ATTENTION_CLASSES:
        module = sys.modules.get(module_name)
        if module is not None:
            classes.append(getattr(module, class_name))
    return tuple(classes)


def patch_model(model: nn.Module, *, save_q_latent: bool = True) -> int:
    """Routes every DeepSeek-V2/V3 attention of a transformers model through torch_mla.

    The attention modules keep their parameters; only their forward changes. Supported inputs:
    causal attention (``attention_mask`` None, all ones, or HF's causal mask), packed sequences
    (HF's block-causal mask from restarting ``position_ids``, or ``cu_seq_lens_q`` /
    ``max_length_q`` keyword arguments as flash-attention collators pass them). Other masks
    (padding, custom 4-D masks, sliding windows) raise ValueError at forward. Decoding with a
    filled KV cache (queries shorter than keys) runs the original HF forward; a prefill through
    torch_mla writes the cache in HF's layout.

    save_q_latent: keep q's latent rather than q for backward (see MultiHeadLatentAttention).
    Returns the number of attention modules patched by this call (already patched ones are skipped).
    """
    classes = _attention_classes()
    count = 0
    for module in model.modules() if classes else ():
        if not isinstance(module, classes) or getattr(module, "_torch_mla_patched", False):
            continue
        config = module.config
        if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
            raise ValueError("torch_mla.patch_model: sliding-window attention is not supported")
        for name in ("q_proj", "q_b_proj", "kv_b_proj"):  # weights the op takes without a bias
            linear = getattr(module, name, None)
            if linear is not None and linear.bias is not None:
                raise ValueError(f"torch_mla.patch_model: {name} has a bias, which the op does not take")
        module._torch_mla_patched = True
        module._torch_mla_save_q_latent = save_q_latent
        module.forward = types.MethodType(_forward, module)
        count += 1
    return count


def _forward(self, hidden_states, *, position_embeddings=None, attention_mask=None, cache=None,
             **kwargs):
    """The patched forward of a DeepseekV2Attention / DeepseekV3Attention (same call, same
    returns: (output, None) — attention weights are never materialised)."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
        # Decoding: queries attend to cached keys, which the op (q and kv of one length) does not
        # cover; inference saves nothing for backward anyway.
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    if self.training and self.attention_dropout > 0:
        raise ValueError("torch_mla.patch_model: attention dropout is not supported "
                         f"(config.attention_dropout = {self.attention_dropout})")

    batch, seqlen = hidden_states.shape[:2]
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
        max_seqlen = int(max_seqlen) if max_seqlen is not None else None
    elif attention_mask is not None:
        cu_seqlens, max_seqlen = _sequences_from_mask(attention_mask, batch, seqlen)

    cos, sin, interleave, hf_deinterleaves = _rotation(self, position_embeddings)
    half = self.qk_rope_head_dim // 2
    cos, sin = cos.expand(batch, seqlen, half), sin.expand(batch, seqlen, half)
    run = dict(scale=self.scaling, rope_interleave=interleave,
               save_q_latent=self._torch_mla_save_q_latent)
    if cu_seqlens is None:
        out, kv_latent, k_rope = latent_attention(self, hidden_states, cos, sin, **run)
    else:
        tokens = batch * seqlen
        out, kv_latent, k_rope = latent_attention(
            self, hidden_states.reshape(tokens, -1), cos.reshape(tokens, half),
            sin.reshape(tokens, half), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **run)
        out = out.view(batch, seqlen, -1)

    if cache is not None:
        if hf_deinterleaves:
            # HF's decode steps read k_rope from the cache in the layout its rotary writes.
            k_rope = torch.cat((k_rope[..., 0::2], k_rope[..., 1::2]), dim=-1)
        cache.update(kv_latent.reshape(batch, 1, seqlen, -1), k_rope.reshape(batch, 1, seqlen, -1),
                     self.layer_idx, kwargs=kwargs)
    return out, None


def _rotation(attn, position_embeddings) -> Tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """From the model's own rotary embedding: cos, sin (B or 1, S, Dr/2), whether pairs are
    adjacent, and whether HF writes the rotated adjacent pairs de-interleaved
    (``[evens | odds]``, DeepSeek-V3's ``rope_interleave``). DeepSeek-V3 passes (cos, sin) of
    width Dr (two equal halves), DeepSeek-V2 a complex ``freqs_cis`` of width Dr/2."""
    if torch.is_tensor(position_embeddings) and torch.is_complex(position_embeddings):
        return position_embeddings.real, position_embeddings.imag, True, False
    cos, sin = position_embeddings
    half = attn.qk_rope_head_dim // 2
    interleave = bool(attn.config.rope_interleave)
    return cos[..., :half], sin[..., :half], interleave, interleave


_last_mask: list = [None, None, None]  # weakref to the mask, its _version, the result


@torch.compiler.disable
def _sequences_from_mask(mask, batch: int, seqlen: int) -> Tuple[Optional[torch.Tensor], Optional[int]]:
    """Reads HF's attention mask: (None, None) for causal attention over whole rows, or
    (cu_seqlens, max_seqlen) over the B·S tokens for block-causal (packed) rows; ValueError for
    anything else. Every layer gets the same mask object, so the last answer is kept."""
    ref, version, result = _last_mask
    if ref is not None and ref() is mask and version == mask._version:
        return result
    result = _read_mask(mask, batch, seqlen)
    _last_mask[:] = [weakref.ref(mask), mask._version, result]
    return result


def _read_mask(mask, batch: int, seqlen: int) -> Tuple[Optional[torch.Tensor], Optional[int]]:
    if not torch.is_tensor(mask):
        raise ValueError(f"torch_mla.patch_model: attention masks of type {type(mask).__name__} "
                         f"(flex attention) are not supported; {_MASK_HELP}")
    if mask.dim() == 2:  # flash-attention style (B, S) padding mask
        if bool(mask.bool().all()):
            return None, None
        raise ValueError(f"torch_mla.patch_model: padding masks are not supported; {_MASK_HELP}")
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (seqlen, seqlen):
        raise ValueError(f"torch_mla.patch_model: expected a 4-D mask (B, 1, {seqlen}, {seqlen}), "
                         f"got shape {tuple(mask.shape)}; {_MASK_HELP}")
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        # HF's additive masks: 0 where attended, the dtype's minimum (or -inf) elsewhere.
        allowed = mask == 0
        if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError("torch_mla.patch_model: additive attention biases are not supported; "
                             + _MASK_HELP)
    allowed = allowed.expand(batch, -1, -1, -1)
    if not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(f"torch_mla.patch_model: per-head masks are not supported; {_MASK_HELP}")
    allowed = allowed[:, 0]

    # A sequence starts at token 0 and wherever a token may not see the one just before it.
    index = torch.arange(seqlen, device=mask.device)
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~allowed[:, index[1:], index[:-1]]
    seq = starts.cumsum(-1)
    block_causal = (index[:, None] >= index[None, :]) & (seq[:, :, None] == seq[:, None, :])
    if not torch.equal(allowed, block_causal):
        raise ValueError("torch_mla.patch_model: the attention mask is neither causal nor "
                         f"block-causal (padding, a custom mask or a sliding window); {_MASK_HELP}")
    if not bool(starts[:, 1:].any()):
        return None, None
    first = starts.reshape(-1).nonzero().flatten()
    cu_seqlens = torch.cat((first, first.new_tensor([batch * seqlen]))).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())
