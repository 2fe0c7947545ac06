"""PEFT LoRA adapters on the projections torch_mla's op takes as weights (``kv_b_proj``, and
``q_b_proj`` / ``q_proj`` when q is kept as a latent), for :func:`torch_mla.patch_model`.

A LoRA adapter adds ``s · B · A · dropout(x)`` to ``W · x``. With ``u = s · A · dropout(x)``
(r values per token), ``W·x + B·u = [W | B] · [x | u]``: the op gets the latent widened to
``[x | u₁ | u₂ …]`` and the weight to ``[W | B₁ | B₂ …]``, expands K/V (or q) inside as before,
and saves ``(T, Dc + Σr)`` latents; autograd routes the gradients back through the
concatenations into x, u (so A and the dropout) and W, B. Merged adapters are in W already.
Nothing here imports peft: its layers are recognised by their attributes.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from .functional import mla_attention
from .modules import latent_attention
from .q_latent import mla_attention_q_latent
from .rope import apply_rope


def _consumed(attn: nn.Module, save_q_latent: bool) -> List[str]:
    """Names of the attention's projections the op takes as weights (not called as modules)."""
    names = ["kv_b_proj"]
    if save_q_latent:
        names.append("q_proj" if attn.q_lora_rank is None else "q_b_proj")
    return names


def _is_lora_linear(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Linear" and cls.__module__.startswith("peft.tuners.lora")
            and hasattr(module, "lora_A") and hasattr(module, "lora_B"))


def _refuse(name: str, module: nn.Module, what: str):
    raise ValueError(f"torch_mla.patch_model: {name} is {what}, which torch_mla cannot apply: the op "
                     f"takes {name}'s weight, not the module (honoured: plain LoRA from peft's "
                     f"LoraConfig, any number of adapters, dropout, merged or not)")


def _check_adapter(name: str, module: nn.Module, adapter: str) -> None:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        label = "DoRA" if "Dora" in type(variant).__name__ else type(variant).__name__
        _refuse(name, module, f"a LoRA adapter {adapter!r} with the variant {label}")
    if getattr(module, "use_dora", {}).get(adapter, False):
        _refuse(name, module, f"a DoRA adapter ({adapter!r})")
    if getattr(module, "lora_bias", {}).get(adapter, False):
        _refuse(name, module, f"a LoRA adapter with lora_bias ({adapter!r})")
    if getattr(module, "fan_in_fan_out", False):
        _refuse(name, module, "a LoRA adapter with fan_in_fan_out")
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
        _refuse(name, module, f"a LoRA adapter ({adapter!r}) whose A/B are not linear layers")


def _check_module(name: str, module: Optional[nn.Module], adapters=None) -> None:
    base = getattr(module, "base_layer", None)
    if base is None:
        return
    if not _is_lora_linear(module):
        _refuse(name, module, f"wrapped by {type(module).__module__}.{type(module).__name__} "
                "(a PEFT tuner other than LoRA on nn.Linear)")
    if type(base) is not nn.Linear or not base.weight.is_floating_point():
        _refuse(name, module, f"a LoRA layer over {type(base).__name__} (quantised or not a "
                "plain nn.Linear)")
    if base.bias is not None:
        raise ValueError(f"torch_mla.patch_model: {name} has a bias, which the op does not take")
    for adapter in (module.lora_A.keys() if adapters is None else adapters):
        if adapter in module.lora_A:
            _check_adapter(name, module, adapter)


def check_adapters(attn: nn.Module, save_q_latent: bool) -> None:
    """At patch time: ValueError if a consumed projection carries an adapter kind the op cannot
    honour (checked again at every forward, for adapters added after patching)."""
    for name in _consumed(attn, save_q_latent):
        _check_module(name, getattr(attn, name, None))


def _low_rank(name: str, module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """The weight W of `module` and, per active unmerged LoRA adapter, u = s·A·dropout(x) and
    B's weight, as peft's ``lora.Linear.forward`` applies them (same order, same dropout draws)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, [], []
    if module.disable_adapters:
        if module.merged:
            module.unmerge()  # as peft's forward does
        return base.weight, [], []
    if module.merged:
        return base.weight, [], []
    _check_module(name, module, module.active_adapters)
    us, bs = [], []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        cast = getattr(module, "_cast_input_dtype", None)  # peft >= 0.15; x.to(...) before
        x = cast(x, lora_a.weight.dtype) if cast is not None else x.to(lora_a.weight.dtype)
        us.append(lora_a(module.lora_dropout[adapter](x)) * module.scaling[adapter])
        bs.append(lora_b.weight)
    return base.weight, us, bs


def _widen(latent: torch.Tensor, weight: torch.Tensor, us, bs) -> Tuple[torch.Tensor, torch.Tensor]:
    if not us:
        return latent, weight
    latent = torch.cat([latent] + [u.to(latent.dtype) for u in us], dim=-1)
    weight = torch.cat([weight] + [b.to(weight.dtype) for b in bs], dim=1)
    return latent, weight


def peft_latent_attention(attn: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, *, scale: float, rope_interleave: bool,
                          save_q_latent: bool, cu_seqlens: Optional[torch.Tensor] = None,
                          max_seqlen: Optional[int] = None):
    """:func:`torch_mla.modules.latent_attention` (same arguments and returns: output, the
    kv latent c and the rotated k_rope, unwidened, for the cache), honouring PEFT LoRA layers
    on the consumed projections. Without any PEFT layer there, latent_attention itself runs."""
    names = _consumed(attn, save_q_latent)
    if not any(hasattr(getattr(attn, n), "base_layer") for n in names):
        return latent_attention(attn, hidden_states, cos, sin, scale=scale,
                                rope_interleave=rope_interleave, save_q_latent=save_q_latent,
                                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    dim_nope, dim_rope = attn.qk_nope_head_dim, attn.qk_rope_head_dim
    # q first, as HF's forward: LoRA dropout masks are drawn in the same order.
    q_name = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
    q_module = getattr(attn, q_name)
    q_input = hidden_states if attn.q_lora_rank is None else attn.q_a_layernorm(attn.q_a_proj(hidden_states))
    if save_q_latent:
        wq, us, bs = _low_rank(q_name, q_module, q_input)
        q_latent, wq_b = _widen(q_input, wq, us, bs)
    else:
        q = q_module(q_input)

    latent_and_rope = attn.kv_a_proj_with_mqa(hidden_states)
    kv_latent, k_rope = latent_and_rope.split([attn.kv_lora_rank, dim_rope], dim=-1)
    kv_latent = attn.kv_a_layernorm(kv_latent)
    k_rope = apply_rope(k_rope, cos, sin, rope_interleave)
    wkv, us, bs = _low_rank("kv_b_proj", attn.kv_b_proj, kv_latent)
    wide_latent, wkv_b = _widen(kv_latent, wkv, us, bs)
    num_heads = wkv.shape[0] // (dim_nope + attn.v_head_dim)

    if save_q_latent:
        out = mla_attention_q_latent(
            q_latent, wq_b, cos, sin, wide_latent, k_rope, wkv_b, num_heads=num_heads,
            softmax_scale=scale, rope_interleave=rope_interleave, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen)
    else:
        q_nope, q_rope = q.unflatten(-1, (num_heads, -1)).split([dim_nope, dim_rope], dim=-1)
        q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), rope_interleave)
        out = mla_attention(torch.cat((q_nope, q_rope), dim=-1), wide_latent, k_rope, wkv_b,
                            softmax_scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return attn.o_proj(out.flatten(-2)), kv_latent, k_rope
