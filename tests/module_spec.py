"""Float64 specifications for the q-latent op and the attention block, written independently of
torch_mla's code: RoPE as Hugging Face's rotate-half, the norms and projections as plain algebra,
attention by torch_mla.reference."""
import math

import torch

from torch_mla.reference import mla_attention_reference


def rope_spec(x, cos, sin, interleave):
    """x·cos + rotate_half(x)·sin with cos/sin (…, Dr/2) repeated to full width; adjacent pairs
    (interleave) are gathered into halves first and scattered back after."""
    if interleave:
        halves = torch.cat((x[..., 0::2], x[..., 1::2]), -1)
        rotated = rope_spec(halves, cos, sin, interleave=False)
        return torch.stack(rotated.chunk(2, -1), -1).flatten(-2)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = x.chunk(2, -1)
    return x * cos2 + torch.cat((-x2, x1), -1) * sin2


def yarn_scale_spec(qk_head_dim, rope_scaling):
    """DeepSeek's softmax scale: (Dn+Dr)^-0.5 · (0.1·mscale_all_dim·ln(factor) + 1)²."""
    scale = qk_head_dim ** -0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim") and rope_scaling["factor"] > 1:
        scale *= (0.1 * rope_scaling["mscale_all_dim"] * math.log(rope_scaling["factor"]) + 1) ** 2
    return scale


def block_spec(module, params, hidden_states, position_ids, cu_seqlens=None, return_max_logits=False):
    """The MultiHeadLatentAttention block on `params` (name → tensor, e.g. float64 leaves); with
    return_max_logits also the attention's per-head maximum logit."""
    m = module

    def linear(name, x):
        out = x @ params[f"{name}.weight"].t()
        bias = params.get(f"{name}.bias")
        return out if bias is None else out + bias

    def rms_norm(name, x):
        eps = getattr(m, name).variance_epsilon
        return params[f"{name}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    dn, dr, dc = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    if m.q_lora_rank is None:
        q = linear("q_proj", hidden_states)
    else:
        q = linear("q_b_proj", rms_norm("q_a_layernorm", linear("q_a_proj", hidden_states)))
    q = q.unflatten(-1, (m.num_heads, dn + dr))
    kv = linear("kv_a_proj_with_mqa", hidden_states)
    kv_latent, k_rope = rms_norm("kv_a_layernorm", kv[..., :dc]), kv[..., dc:]

    # Angles in at least float32 (a bf16 position would be off by whole radians), cos/sin then
    # in the block's dtype: the naive low-precision spec of docs/design.md §8.
    angle_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    angles = position_ids[..., None].to(angle_dtype) * m.inv_freq.to(angle_dtype)
    cos = (angles.cos() * m.attention_factor).to(hidden_states.dtype)
    sin = (angles.sin() * m.attention_factor).to(hidden_states.dtype)
    cos, sin = cos.expand(*k_rope.shape[:-1], dr // 2), sin.expand(*k_rope.shape[:-1], dr // 2)
    q = torch.cat((q[..., :dn], rope_spec(q[..., dn:], cos.unsqueeze(-2), sin.unsqueeze(-2),
                                          m.rope_interleave)), -1)
    k_rope = rope_spec(k_rope, cos, sin, m.rope_interleave)
    out = mla_attention_reference(q, kv_latent, k_rope, params["kv_b_proj.weight"],
                                  softmax_scale=yarn_scale_spec(dn + dr, m.rope_scaling),
                                  cu_seqlens=cu_seqlens, return_max_logits=return_max_logits)
    if return_max_logits:
        out, max_logits = out
        return linear("o_proj", out.flatten(-2)), max_logits
    return linear("o_proj", out.flatten(-2))
