"""Rotary position embedding and softmax scale of DeepSeek-V2/V3, computed as Hugging Face's
transformers computes them (``modeling_rope_utils`` default and YaRN, ``yarn_apply_mscale``), so
that a model's numbers do not change when its attention is swapped for torch_mla's.

RoPE rotates pairs of dimensions of q_rope and k_rope: adjacent pairs ``(2i, 2i+1)`` with
``interleave=True`` (DeepSeek's checkpoints, HF's ``rope_interleave=True`` and DeepSeek-V2's
complex rotary), else ``(i, i + Dr/2)`` (half-rotate). Each rotated pair stays in place; HF's
DeepSeek-V3 interleaved path writes the pairs de-interleaved instead, which permutes q_rope and
k_rope alike and leaves every score unchanged.
"""
import math
from typing import Any, Mapping, Optional, Tuple

import torch

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def rope_type(rope_scaling: Optional[Mapping[str, Any]]) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1·mscale·ln(factor) + 1`` (1 for factor ≤ 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_head_dim: int, rope_scaling: Optional[Mapping[str, Any]] = None) -> float:
    """``(Dn+Dr)^-0.5``, times ``mscale(factor, mscale_all_dim)²`` for scaled RoPE (docs/design.md §2)."""
    scale = qk_head_dim ** -0.5
    if rope_type(rope_scaling) != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = yarn_mscale(rope_scaling["factor"], mscale_all_dim)
            scale = scale * mscale * mscale
    return scale


def rope_frequencies(dim: int, rope_theta: float, rope_scaling: Optional[Mapping[str, Any]] = None
                     ) -> Tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,) float32, attention_factor): the angle of pair i at position p is
    ``p·inv_freq[i]``, and cos/sin are multiplied by attention_factor (YaRN's mscale ratio)."""
    kind = rope_type(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"torch_mla: rope type {kind!r} is not supported by MultiHeadLatentAttention "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); patch_model supports every type "
            "because it takes cos/sin from the model")
    pos_freqs = rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if kind == "default":
        return 1.0 / pos_freqs, 1.0

    factor = rope_scaling.get("factor")
    original_max = rope_scaling.get("original_max_position_embeddings")
    if factor is None or original_max is None:
        raise ValueError("torch_mla: YaRN rope_scaling needs 'factor' and "
                         "'original_max_position_embeddings'")
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # Pairs above the ramp keep their frequency (extrapolation), pairs below are slowed by
    # `factor` (interpolation); the two expressions below keep HF's rounding.
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """position_ids (...) → cos, sin (..., Dr/2) in float32, attention_factor included."""
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
               ) -> torch.Tensor:
    """Rotates the pairs of x (..., Dr) by cos/sin (broadcastable to (..., Dr/2)), in place of each
    pair; computed in float32 for bf16/fp16 (as the q-latent op does), returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc, c, s = x.to(compute), cos.to(compute), sin.to(compute)
    x1, x2 = (xc[..., 0::2], xc[..., 1::2]) if interleave else xc.chunk(2, dim=-1)
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleave else torch.cat((o1, o2), dim=-1)
    return out.to(x.dtype)
