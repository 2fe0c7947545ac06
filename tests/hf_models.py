"""Tiny Hugging Face DeepSeek-V2/V3 models for the patch tests: random weights, built in code.

Every layer is dense (first_k_dense_replace = num_hidden_layers): MoE routing picks experts by
top-k, so rounding differences could switch experts and hide what the tests measure.
initializer_range = hidden_size^-0.5 gives unit-scale activations, so the attention's share of
the logits is not lost in rounding.
"""
import torch

transformers = None
try:
    import transformers  # noqa: F811
except ImportError:
    pass

HIDDEN = 64
COMMON = dict(vocab_size=96, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=2, max_position_embeddings=256,
              initializer_range=HIDDEN ** -0.5, rms_norm_eps=1e-5, use_cache=False)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
            mscale=0.707, mscale_all_dim=0.8, beta_fast=32, beta_slow=1)

# name -> (model family, config overrides): the shapes docs/design.md §2 asks to cover.
CASES = {
    "v3": ("v3", dict(q_lora_rank=24)),
    "v3-half-rotate": ("v3", dict(q_lora_rank=24, rope_interleave=False)),
    "v3-yarn-bias": ("v3", dict(q_lora_rank=24, rope_parameters=dict(YARN), attention_bias=True)),
    "v2-lite": ("v2", dict(q_lora_rank=None)),
    "v2-yarn": ("v2", dict(q_lora_rank=24, rope_parameters=dict(YARN))),
}


def make_config(case: str, attn_implementation: str = "sdpa", **overrides):
    family, extra = CASES[case]
    cls = transformers.DeepseekV3Config if family == "v3" else transformers.DeepseekV2Config
    kwargs = {**COMMON, **extra, **overrides}
    if family == "v2":
        kwargs.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    config = cls(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def make_model(case: str, dtype=torch.float32, seed: int = 0, **config_overrides):
    config = make_config(case, **config_overrides)
    cls = transformers.DeepseekV3ForCausalLM if CASES[case][0] == "v3" else transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    return cls(config).to(dtype)


def clone_model(model, dtype=None, attn_implementation=None):
    """A copy of `model` (same weights), optionally cast and with another attention backend."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config._attn_implementation = attn_implementation or model.config._attn_implementation
    copy = model.__class__(config).to(dtype or next(model.parameters()).dtype)
    copy.load_state_dict({k: v.to(copy.dtype) for k, v in model.state_dict().items()})
    return copy


def attention_modules(model):
    names = ("DeepseekV2Attention", "DeepseekV3Attention")
    return [m for m in model.modules() if type(m).__name__ in names]
