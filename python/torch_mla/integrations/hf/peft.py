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

from ...nn.glue import Projections, projections_of


def _consumed(attn: nn.Module, save: str) -> List[str]:
    """Names of the attention's projections the op takes as weights (not called as modules);
    `save` as MultiHeadLatentAttention's."""
    names = ["kv_b_proj"]
    if save != "q":
        names.append("q_proj" if attn.q_lora_rank is None else "q_b_proj")
    if save == "latent":
        names.append("o_proj")
    return names


def _refuse_latent(attn: nn.Module, save: str) -> None:
    """The latent-only block op takes no adapters' activations: ValueError if one is there."""
    if save != "latent":
        return
    for name in _consumed(attn, save):
        if hasattr(getattr(attn, name, None), "base_layer"):
            raise ValueError(f"torch_mla.patch_model: save='latent' takes {name}'s weight into one block "
                             "op, which cannot apply a PEFT adapter on it; use save='q_latent'")


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


def check_adapters(attn: nn.Module, save: str) -> None:
    """At patch time: ValueError if a consumed projection carries an adapter kind the op cannot
    honour (checked again at every forward, for adapters added after patching)."""
    _refuse_latent(attn, save)
    for name in _consumed(attn, save):
        _check_module(name, getattr(attn, name, None))


class _LowRankLatent(torch.autograd.Function):
    """``[x | s₁·d₁·A₁ᵀ | s₂·d₂·A₂ᵀ …]`` with ``d = x``, or ``x ⊙ keep / (1−p)`` under dropout:
    the adapters' low-rank activations joined to the latent. It saves only its result, whose
    first columns are x itself (the op saves the same tensor: one storage), the A weights and
    the dropout masks as bool, so LoRA adds r values per token, not a second copy of x."""

    @staticmethod
    def forward(ctx, x, scalings, keep_scales, *tensors):
        count = len(scalings)
        weights, keeps = tensors[:count], tensors[count:]
        parts = [x]
        for a, s, keep, keep_scale in zip(weights, scalings, keeps, keep_scales):
            d = x if keep is None else x * keep * keep_scale
            parts.append(((d.to(a.dtype) @ a.t()) * s).to(x.dtype))
        wide = torch.cat(parts, dim=-1)
        ctx.scalings, ctx.keep_scales = scalings, keep_scales
        ctx.save_for_backward(wide, *weights, *keeps)
        return wide

    @staticmethod
    def backward(ctx, grad):
        wide, *rest = ctx.saved_tensors
        count = len(ctx.scalings)
        weights, keeps = rest[:count], rest[count:]
        width = wide.shape[-1] - sum(a.shape[0] for a in weights)
        x = wide[..., :width]
        grad_x = grad[..., :width]
        grad_weights = []
        offset = width
        for i, (a, s, keep, keep_scale) in enumerate(zip(weights, ctx.scalings, keeps, ctx.keep_scales)):
            rank = a.shape[0]
            du = grad[..., offset:offset + rank].to(a.dtype) * s
            offset += rank
            if ctx.needs_input_grad[0]:
                gd = (du @ a).to(x.dtype)
                grad_x = grad_x + (gd if keep is None else gd * keep * keep_scale)
            grad_a = None
            if ctx.needs_input_grad[3 + i]:
                d = x if keep is None else x * keep * keep_scale
                grad_a = du.reshape(-1, rank).t() @ d.reshape(-1, width).to(a.dtype)
            grad_weights.append(grad_a)
        return (grad_x, None, None, *grad_weights, *([None] * count))


def _widen(name: str, module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The latent and weight the op takes for `module` applied to x: (x, W) without active
    unmerged LoRA adapters, else ``([x | u₁ …], [W | B₁ …])`` with u = s·A·dropout(x), as peft's
    ``lora.Linear.forward`` applies them (same order, same dropout draws)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return x, module.weight
    if module.disable_adapters:
        if module.merged:
            module.unmerge()  # as peft's forward does
        return x, base.weight
    if module.merged:
        return x, base.weight
    _check_module(name, module, module.active_adapters)
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if not adapters:
        return x, base.weight
    weight = torch.cat([base.weight] + [module.lora_B[a].weight.to(base.weight.dtype) for a in adapters], dim=1)
    scalings, keep_scales, weights, keeps = [], [], [], []
    for adapter in adapters:
        dropout = module.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            # The same draws as dropout(x) (one Bernoulli per element); kept as bool.
            keep = dropout(torch.ones_like(x)) != 0
            keep_scale = 1.0 / (1.0 - dropout.p) if dropout.p < 1 else 0.0
        elif isinstance(dropout, (nn.Dropout, nn.Identity)):
            keep, keep_scale = None, 1.0
        else:  # a dropout module of another kind: applied as peft applies it
            return _widen_by_cat(module, adapters, x, weight)
        scalings.append(float(module.scaling[adapter]))
        keep_scales.append(keep_scale)
        weights.append(module.lora_A[adapter].weight)
        keeps.append(keep)
    return _LowRankLatent.apply(x, tuple(scalings), tuple(keep_scales), *weights, *keeps), weight


def _widen_by_cat(module, adapters, x, weight):
    us = []
    for adapter in adapters:
        lora_a = module.lora_A[adapter]
        cast = getattr(module, "_cast_input_dtype", None)  # peft >= 0.15; x.to(...) before
        xa = cast(x, lora_a.weight.dtype) if cast is not None else x.to(lora_a.weight.dtype)
        us.append((lora_a(module.lora_dropout[adapter](xa)) * module.scaling[adapter]).to(x.dtype))
    return torch.cat([x] + us, dim=-1), weight


class LoraProjections(Projections):
    """The weight provider of :func:`torch_mla.nn.glue.latent_attention` for an attention whose
    consumed projections carry PEFT LoRA layers: the op takes each one's latent and weight widened
    by its active adapters (:func:`_widen`)."""

    def latent(self, name: str, module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _widen(name, module, x)


def projections_for(attn: nn.Module, save: str) -> Projections:
    """The weight provider of a patched attention at forward: LoRA widening when a projection the
    op takes as a weight carries a PEFT layer, else the plain (or tensor-parallel) weights.
    ValueError for adapters that `save` cannot honour."""
    _refuse_latent(attn, save)
    if any(hasattr(getattr(attn, n), "base_layer") for n in _consumed(attn, save)):
        return LoraProjections.of(attn)
    return projections_of(attn)
