"""torch_mla.MultiHeadLatentAttention: the block against an independent float64 spec, the
packed layout, Hugging Face's parameter names and RoPE, torch.compile, and what it saves for
backward compared with Hugging Face's attention at DeepSeek-V3 head dims."""
import pytest
import torch

import torch_mla
from torch_mla import MultiHeadLatentAttention
from support import YARN, block_spec, hidden, make_module, max_rel_err, yarn_scale_spec
from support import MODULE_SIZES as SIZES

try:
    import transformers
except ImportError:
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")
CASES = ["q-lora", "no-q-lora", "half-rotate", "yarn-bias"]  # of support.MODULE_CASES


def out_and_grads(fn, params, x):
    """fn(params, x) and the grads of x and every parameter, for a fixed random grad_out."""
    x = x.detach().clone().requires_grad_()
    out = fn(params, x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, *params.values()], grad_out.to(out.dtype))
    return {"out": out.detach(), "x": grads[0], **dict(zip(params, grads[1:]))}


def assert_close_rel(results, ref, tol):
    for name in ref:
        err = max_rel_err(results[name], ref[name])
        assert err <= tol, f"{name}: max relative error {err:.3g} > {tol:g}"


def module_fn(module, **kwargs):
    def fn(params, x):
        return torch.func.functional_call(module, params, (x,), kwargs)
    return fn


@pytest.mark.parametrize("save_q_latent", [True, False], ids=["q-latent", "q-saved"])
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_float64_spec(case, save_q_latent):
    module = make_module(case, save_q_latent=save_q_latent)
    position_ids = torch.arange(5, 5 + 37)  # an offset, as in a continued sequence
    params = dict(module.named_parameters())
    ours = out_and_grads(module_fn(module, position_ids=position_ids), params, hidden((2, 37)))
    params64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ref = out_and_grads(lambda p, x: block_spec(module, p, x, position_ids), params64,
                        hidden((2, 37), dtype=torch.float64))
    assert_close_rel(ours, ref, 1e-5)


@pytest.mark.parametrize("case", ["q-lora", "no-q-lora"])
def test_q_latent_mode_equals_saving_q(case):
    module = make_module(case).double()
    params = dict(module.named_parameters())
    x = hidden((2, 21), dtype=torch.float64)
    with_latent = out_and_grads(module_fn(module), params, x)
    module.save_q_latent = False
    saving_q = out_and_grads(module_fn(module), params, x)
    assert_close_rel(with_latent, saving_q, 1e-12)


@pytest.mark.parametrize("case", ["q-lora", "half-rotate"])
def test_packed_equals_each_sequence_alone(case):
    """Packed tokens with cu_seqlens: positions restart per sequence, attention stays inside it."""
    module = make_module(case).double()
    seqlens = [1, 17, 0, 30]
    x = hidden((sum(seqlens),), dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    packed = module(x, cu_seqlens=cu)
    alone = torch.cat([module(seq[None])[0] for seq in x.split(seqlens) if len(seq)])
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    # The spec's RoPE angles are float64, the module's float32 (as HF's): hence 1e-6.
    positions = torch.cat([torch.arange(n) for n in seqlens])
    spec = block_spec(module, dict(module.named_parameters()), x, positions, cu)
    torch.testing.assert_close(packed, spec, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    module = make_module("yarn-bias")
    params = dict(module.named_parameters())
    x = hidden((2, 19))
    eager = out_and_grads(module_fn(module), params, x)
    compiled = torch.compile(module_fn(module), fullgraph=True, backend="aot_eager")
    assert_close_rel(out_and_grads(compiled, params, x), eager, 1e-6)


def test_constructor_errors():
    with pytest.raises(ValueError, match="even"):
        MultiHeadLatentAttention(**{**SIZES, "qk_rope_head_dim": 7}, q_lora_rank=None)
    with pytest.raises(NotImplementedError, match="rope type 'linear'"):
        MultiHeadLatentAttention(**SIZES, q_lora_rank=None, rope_scaling=dict(rope_type="linear", factor=2.0))


def test_state_dict_names_are_hugging_faces():
    with_lora = MultiHeadLatentAttention(**SIZES, q_lora_rank=24, attention_bias=True)
    assert set(with_lora.state_dict()) == {
        "q_a_proj.weight", "q_a_proj.bias", "q_a_layernorm.weight", "q_b_proj.weight",
        "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias", "kv_a_layernorm.weight",
        "kv_b_proj.weight", "o_proj.weight", "o_proj.bias"}
    without = MultiHeadLatentAttention(**SIZES, q_lora_rank=None)
    assert set(without.state_dict()) == {"q_proj.weight", "kv_a_proj_with_mqa.weight",
                                         "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}


# ---- against Hugging Face transformers ---------------------------------------------------------

def hf_attention(config, dtype=torch.float64):
    """A transformers DeepseekV2/V3Attention, its rotary embedding, unit-scale random weights."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    family = v3 if config.model_type == "deepseek_v3" else v2
    prefix = "DeepseekV3" if family is v3 else "DeepseekV2"
    torch.manual_seed(0)
    attn = getattr(family, f"{prefix}Attention")(config, layer_idx=0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("layernorm.weight")
                    else torch.randn_like(p) * (p.shape[1] ** -0.5 if p.dim() == 2 else 0.5))
    return attn.to(dtype), getattr(family, f"{prefix}RotaryEmbedding")(config)


HF_CASES = {
    "v3": ("v3", dict(q_lora_rank=24)),
    "v3-half-rotate-yarn": ("v3", dict(q_lora_rank=24, rope_interleave=False, rope_parameters=dict(YARN))),
    "v2-lite": ("v2", dict(q_lora_rank=None)),
    "v2-yarn-bias": ("v2", dict(q_lora_rank=24, rope_parameters=dict(YARN), attention_bias=True)),
}


def hf_config(case):
    family, extra = HF_CASES[case]
    cls = transformers.DeepseekV3Config if family == "v3" else transformers.DeepseekV2Config
    config = cls(hidden_size=SIZES["hidden_size"], num_attention_heads=SIZES["num_heads"],
                 num_key_value_heads=SIZES["num_heads"], kv_lora_rank=SIZES["kv_lora_rank"],
                 qk_nope_head_dim=SIZES["qk_nope_head_dim"], qk_rope_head_dim=SIZES["qk_rope_head_dim"],
                 v_head_dim=SIZES["v_head_dim"], max_position_embeddings=256, rms_norm_eps=1e-5, **extra)
    config._attn_implementation = "sdpa"
    return config


@needs_transformers
@pytest.mark.parametrize("case", list(HF_CASES))
def test_loads_hf_attention_and_matches_it(case):
    config = hf_config(case)
    attn, rotary = hf_attention(config)
    ours = MultiHeadLatentAttention.from_config(config)
    ours.load_state_dict({k: v.float() for k, v in attn.state_dict().items()}, strict=True)
    back = hf_attention(config)[0]
    back.load_state_dict({k: v.double() for k, v in ours.state_dict().items()}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), attn.state_dict().values()))
    assert ours.scaling == pytest.approx(attn.scaling, rel=1e-15)
    assert ours.kv_a_layernorm.variance_epsilon == attn.kv_a_layernorm.variance_epsilon

    position_ids = torch.arange(3, 3 + 29)[None]

    def hf_fn(params, x):
        embeddings = rotary(x, position_ids)
        return torch.func.functional_call(attn, params, (x,), dict(
            position_embeddings=embeddings, attention_mask=None))[0]

    x = hidden((2, 29))
    ref = out_and_grads(hf_fn, dict(attn.named_parameters()), x.double())
    mine = out_and_grads(module_fn(ours, position_ids=position_ids[0]), dict(ours.named_parameters()), x)
    assert_close_rel(mine, ref, 1e-5)


@needs_transformers
@pytest.mark.parametrize("scaling", [
    None,
    dict(YARN),
    dict(YARN, factor=40.0, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096),
    dict(YARN, factor=4.0, mscale=None, mscale_all_dim=None, truncate=False),
    dict(YARN, attention_factor=0.9, beta_fast=16, beta_slow=2),
], ids=["default", "yarn", "yarn-dsv3", "yarn-no-mscale-no-truncate", "yarn-attention-factor"])
def test_rope_frequencies_equal_hf(scaling):
    """inv_freq bit for bit and the attention factor, as transformers' rope init computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    params = {k: v for k, v in (scaling or {}).items() if v is not None}
    config = transformers.DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840,
                                           rope_parameters=params or None)
    if scaling is None:
        inv_freq, factor = DeepseekV3RotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours = MultiHeadLatentAttention.from_config(config)
    assert torch.equal(ours.inv_freq, inv_freq)
    assert ours.attention_factor == pytest.approx(factor, rel=1e-15)
    assert ours.scaling == pytest.approx(yarn_scale_spec(192, ours.rope_scaling), rel=1e-15)


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_saved_bytes_per_token_vs_hf_at_dsv3_head_dims(dtype):
    """One attention block (H = 128, DeepSeek-V3 head dims, hidden 256), every tensor autograd
    keeps for backward, parameters excluded, the block's input included."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    config = transformers.DeepseekV3Config(
        hidden_size=256, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    batch, seqlen = 1, 32
    tokens = batch * seqlen
    hf = v3.DeepseekV3Attention(config, layer_idx=0).to(dtype)
    rotary = v3.DeepseekV3RotaryEmbedding(config)
    x = torch.randn(batch, seqlen, 256, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(seqlen)[None]

    def saved(module, call):
        with torch_mla.SavedTensors() as s:
            out = call()
        return s, s.nbytes_excluding(*module.parameters()) / tokens, out

    results = {}
    for impl in ("eager", "sdpa"):
        config._attn_implementation = impl
        mask = torch.full((seqlen, seqlen), float("-inf"), dtype=dtype).triu(1)[None, None]
        results[f"HF {impl}"] = saved(hf, lambda: hf(x, position_embeddings=rotary(x, position_ids),
                                                     attention_mask=mask if impl == "eager" else None)[0])[1]
    out_bytes = tokens * 128 * 128 * x.element_size()
    q_bytes = tokens * 128 * 192 * x.element_size()
    for save_q_latent in (True, False):
        ours = MultiHeadLatentAttention.from_config(config, save_q_latent=save_q_latent).to(dtype)
        ours.load_state_dict(hf.state_dict())
        s, per_token, _ = saved(ours, lambda: ours(x, position_ids=position_ids[0]))
        results[f"torch_mla q-latent {'on' if save_q_latent else 'off'}"] = per_token
        activations = [n for key, n in s.storages.items()
                       if all(key != s._key(p) for p in ours.parameters())]
        # out is kept once (o_proj's input is a view of it); q only without the q latent.
        assert activations.count(out_bytes) == 1
        assert max(activations) == (out_bytes if save_q_latent else q_bytes)
    print(f"\nsaved bytes/token, one attention block, H=128 Dn=128 Dr=64 Dv=128 Lq=1536 Dc=512, "
          f"hidden 256, S={seqlen}, {dtype}:")
    for name, value in results.items():
        print(f"  {name:24s} {value:10,.0f}   HF sdpa / this = {results['HF sdpa'] / value:.2f}")
    assert results["torch_mla q-latent on"] <= results["HF sdpa"] / 4
    assert results["torch_mla q-latent on"] <= results["HF eager"] / 4
    assert results["torch_mla q-latent on"] < results["torch_mla q-latent off"] < results["HF sdpa"]
