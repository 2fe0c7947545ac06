"""patch_model on every dense MLA family of transformers besides DeepSeek-V2/V3 (those are in
test_hf_patch.py): Sarvam, MiniCPM3, GLM-4.7-Flash (both rope_interleave values), LongCat-Flash
(latent scales) and Kimi Linear (MLA without RoPE between linear-attention layers). Per family,
on a tiny random fp32 model: logits and every parameter grad of the patched model against the
float64 unpatched model (docs/design.md §8), the op counted as having run, a padded batch, packed
sequences; PEFT LoRA and torch.compile(fullgraph=True) on one family each; the glue read from each
config against HF's own module; and the refusals (docs/design.md §15)."""
import contextlib
import copy
import dataclasses

import pytest
import torch
from torch import nn

import torch_mla
from torch_mla.nn import MultiHeadLatentAttention
from torch_mla.nn.glue import MlaGlue
from support import (FAMILY_CASES, HAVE_TRANSFORMERS, OpCounter, assert_ran_the_op, clone_model,
                     family_attention_layers, make_family_config, make_family_model, max_abs_err, max_rel_err)

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

VOCAB = 96
TOL = 1e-5  # fp32 against the float64 model, as test_hf_patch.py
EXPECTED_LAYOUT = {"sarvam": "interleaved", "minicpm3": "half_split", "minicpm3-yarn": "half_split",
                   "glm4-moe-lite": "interleaved", "glm4-moe-lite-half-rotate": "half_split",
                   "longcat-flash": "interleaved", "kimi-linear": "none"}


def token_ids(batch=2, seqlen=19, seed=1):
    return torch.randint(1, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, ids, op_layers=0, select=None, **kwargs):
    """Logits (at `select`, a bool mask, when given) and every parameter's grad of a fixed
    nonlinear loss, in float64; op_layers: attention layers that must run torch_mla's op (0:
    unpatched; None: not counted, for compiled models)."""
    model.zero_grad(set_to_none=True)
    # A dispatch mode cannot be active under torch.compile(fullgraph=True).
    counter = OpCounter if op_layers is not None else contextlib.nullcontext
    with counter() as forward:
        logits = model(ids, **kwargs).logits
    if select is not None:
        logits = logits[select]
    with counter() as backward:
        logits.double().sin().sum().backward()
    if op_layers is not None:
        assert_ran_the_op(op_layers, forward, backward)
    grads = {n.replace("_orig_mod.", "").replace("base_model.model.", ""): p.grad.double()
             for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().double(), grads


def worst_errors(results, ref):
    """(logits max relative error, worst parameter grad max relative error, its name)."""
    (logits, grads), (ref_logits, ref_grads) = results, ref
    assert grads.keys() == ref_grads.keys()
    worst = max(ref_grads, key=lambda n: max_rel_err(grads[n], ref_grads[n]))
    return max_rel_err(logits, ref_logits), max_rel_err(grads[worst], ref_grads[worst]), worst


def assert_matches(results, ref, what):
    logits_err, grad_err, name = worst_errors(results, ref)
    assert logits_err <= TOL, f"{what}: logits max relative error {logits_err:.3g}"
    assert grad_err <= TOL, f"{what}: {name}.grad max relative error {grad_err:.3g}"
    return logits_err, grad_err


def patched_copy(case, model, **patch_kwargs):
    copy = clone_model(model)
    assert torch_mla.patch_model(copy, **patch_kwargs) == len(family_attention_layers(case, model))
    return copy


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_glue_from_config_is_hf_modules(case):
    """MlaGlue.from_config reads what HF's module computes: its softmax scale (YaRN mscale²
    included), LongCat's latent scales, the head dims; and the RoPE layout of the family."""
    model = make_family_model(case)
    for attn in family_attention_layers(case, model):
        glue = MlaGlue.from_config(attn.config)
        assert glue.softmax_scale == pytest.approx(attn.scaling, rel=1e-15)
        assert (glue.q_scale, glue.kv_scale) == (getattr(attn, "mla_scale_q_lora", 1.0),
                                                 getattr(attn, "mla_scale_kv_lora", 1.0))
        assert (glue.qk_nope_head_dim, glue.qk_rope_head_dim, glue.v_head_dim) == (
            attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim)
        assert glue.rope_layout == EXPECTED_LAYOUT[case]


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_patched_matches_unpatched_fp32(case):
    """Every save= path of the patched model, and HF's unpatched eager model, against the float64
    unpatched model: logits and every parameter grad within 1e-5 relative; the op ran."""
    model = make_family_model(case, attn_implementation="eager")
    layers = len(family_attention_layers(case, model))
    ids = token_ids()
    ref = logits_and_grads(clone_model(model, torch.float64, attn_implementation="sdpa"), ids)
    unpatched = logits_and_grads(model, ids)
    assert_matches(unpatched, ref, "unpatched")  # the yardstick holds for HF itself
    for save in ("q_latent", "q", "latent"):
        ours = logits_and_grads(patched_copy(case, model, save=save), ids, op_layers=layers)
        logits_err, grad_err = assert_matches(ours, ref, f"save={save}")
        print(f"\n{case} save={save}: logits max rel to fp64 {logits_err:.1e}, worst grad {grad_err:.1e}; "
              f"logits max abs diff to unpatched eager {max_abs_err(ours[0], unpatched[0]):.1e}")


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_padded_batch(case):
    """A left-padded batch (2-D attention_mask): logits at real positions and the grads of a loss
    over them match the float64 unpatched model; the op ran on the real tokens."""
    model = make_family_model(case)
    lengths = (13, 6, 1)
    ids = token_ids(batch=len(lengths), seqlen=max(lengths))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, max(lengths) - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    run = dict(select=mask.bool(), attention_mask=mask)
    ref = logits_and_grads(clone_model(model, torch.float64), ids, **run)
    layers = len(family_attention_layers(case, model))
    assert_matches(logits_and_grads(patched_copy(case, model), ids, op_layers=layers, **run), ref, "padded")


@pytest.mark.parametrize("case", [c for c in FAMILY_CASES if c != "kimi-linear"])
def test_packed_sequences_from_flash_attention_kwargs(case):
    """Packed sequences as flash-attention collators pass them (cu_seq_lens_q, max_length_q,
    restarting position_ids): the same as each sequence run alone through the float64 model.
    (Kimi Linear's linear-attention layers do not take packed sequences.)"""
    model = make_family_model(case)
    lengths = (7, 12)
    ids = token_ids(batch=1, seqlen=sum(lengths))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    layers = len(family_attention_layers(case, model))
    ours = logits_and_grads(patched_copy(case, model), ids, op_layers=layers, position_ids=positions,
                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    ref_model = clone_model(model, torch.float64)
    ref_model.zero_grad(set_to_none=True)
    parts = [ref_model(ids[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    ref_logits = torch.cat(parts, dim=1)
    ref_logits.sin().sum().backward()
    ref = ref_logits.detach(), {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert_matches(ours, ref, "packed")


@pytest.mark.parametrize("case", ["minicpm3", "glm4-moe-lite", "longcat-flash", "kimi-linear"])
def test_generation_with_cache_matches(case):
    """A prefill through torch_mla writes HF's KV cache as HF does (LongCat's scaled kv_latent,
    Kimi's unrotated k_rope, de-interleaved pairs), so HF's decode steps that read it give the
    unpatched model's tokens and logits; the op ran on the prefill only."""
    model = make_family_model(case, use_cache=True)
    patched = patched_copy(case, model)
    prompt = token_ids(seqlen=11)
    run = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(prompt, **run)
        with OpCounter() as ops:
            ours = patched.generate(prompt, **run)
    assert ops.attention_calls() == len(family_attention_layers(case, model))
    assert torch.equal(ours.sequences, ref.sequences)
    for step_logits, ref_logits in zip(ours.logits, ref.logits):
        assert max_rel_err(step_logits, ref_logits) <= TOL


def test_peft_lora_on_longcat_flash():
    """PEFT LoRA on every projection of LongCat-Flash's attention (q_b_proj and kv_b_proj, the
    op's weights, widened by their adapters; the latents scaled): logits and every trainable
    grad match the unpatched PEFT model in float64, whether patched before or after
    get_peft_model."""
    peft = pytest.importorskip("peft")
    case = "longcat-flash"
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]

    def lora(model):
        torch.manual_seed(3)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        for name, p in wrapped.named_parameters():  # B = 0 at init would hide the adapters
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
        return wrapped

    model = make_family_model(case)
    ids = token_ids()
    adapted = lora(clone_model(model))
    ref = logits_and_grads(copy.deepcopy(adapted).double(), ids)
    after = copy.deepcopy(adapted)
    assert torch_mla.patch_model(after) == 2
    assert_matches(logits_and_grads(after, ids, op_layers=2), ref, "patched after get_peft_model")
    before = clone_model(model)
    assert torch_mla.patch_model(before, save="q") == 2
    before = lora(before)
    before.load_state_dict(adapted.state_dict())
    assert_matches(logits_and_grads(before, ids, op_layers=2), ref, "patched before get_peft_model")


def test_compiled_fullgraph_minicpm3():
    """Each patched attention of a MiniCPM3 (half-split RoPE) under torch.compile(fullgraph=True):
    one graph per layer holding the op, the same numbers as the float64 unpatched model. (The
    whole model does not trace as one graph: under compile HF materialises the causal mask,
    which patch_model reads on the host.)"""
    torch._dynamo.reset()
    case = "minicpm3"
    model = make_family_model(case)
    ids = token_ids()
    ref = logits_and_grads(clone_model(model, torch.float64), ids)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    patched = patched_copy(case, model)
    for attn in family_attention_layers(case, patched):
        attn.compile(backend=backend, fullgraph=True)
    assert_matches(logits_and_grads(patched, ids, op_layers=None), ref, "compiled")
    assert graphs
    for gm in graphs:
        ops = [n for n in gm.graph.nodes if n.op == "call_function" and "torch_mla" in str(n.target)]
        assert len(ops) == 1, [str(n.target) for n in ops]


@pytest.mark.parametrize("case", ["minicpm3-yarn", "longcat-flash", "glm4-moe-lite-half-rotate", "kimi-linear"])
def test_module_from_config_loads_hf_attention(case):
    """MultiHeadLatentAttention.from_config(family config) loads the HF attention's state dict
    (strict) and gives its output and input grad (fp32 against HF's float64 module)."""
    model = make_family_model(case, torch.float64)
    attn = family_attention_layers(case, model)[0]
    ours = MultiHeadLatentAttention.from_config(model.config)
    ours.load_state_dict({k: v.float() for k, v in attn.state_dict().items()}, strict=True)
    # The HF cache layout is patch_model's concern, not the module's.
    assert ours.glue == dataclasses.replace(MlaGlue.from_config(model.config), rope_cache_deinterleaved=False)
    x = torch.randn(2, 17, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    position_ids = torch.arange(17)[None]
    kwargs = dict(attention_mask=None)
    if case != "kimi-linear":
        kwargs["position_embeddings"] = model.model.rotary_emb(x.double(), position_ids)
    xd = x.double().requires_grad_()
    ref = attn(xd, **kwargs)[0]
    ref.sin().sum().backward()
    xf = x.clone().requires_grad_()
    out = ours(xf, position_ids=position_ids)
    out.double().sin().sum().backward()
    assert max_rel_err(out.double(), ref) <= TOL
    assert max_rel_err(xf.grad.double(), xd.grad) <= TOL


# ---- refusals: never a silent no-op ----------------------------------------------------------------

def test_model_without_mla_attention_is_refused():
    import transformers
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MLA attention to patch"):
        torch_mla.patch_model(transformers.LlamaForCausalLM(config))


def test_already_patched_model_returns_zero():
    model = make_family_model("minicpm3")
    assert torch_mla.patch_model(model) == 2
    assert torch_mla.patch_model(model) == 0


def test_unknown_mla_class_is_refused_and_nothing_is_patched():
    """A kv_b_proj-style attention of a class patch_model does not serve, beside served ones:
    ValueError naming the class; the served ones stay unpatched."""
    class CustomMLA(nn.Module):
        def __init__(self):
            super().__init__()
            self.kv_b_proj = nn.Linear(8, 8)

    model = make_family_model("minicpm3")
    model.model.custom = CustomMLA()
    with pytest.raises(ValueError, match="CustomMLA has an MLA kv_b_proj that patch_model cannot serve"):
        torch_mla.patch_model(model)
    assert not any(getattr(m, "_torch_mla_patched", False) for m in model.modules())


def test_longcat_qk_head_dim_mismatch_is_refused():
    config = make_family_config("longcat-flash", qk_head_dim=32)  # != 16 + 8
    with pytest.raises(ValueError, match=r"LongcatFlashMLA has qk_head_dim 32 != qk_nope_head_dim"):
        MlaGlue.from_config(config, owner="LongcatFlashMLA")


def test_unknown_model_type_is_refused_by_from_config():
    import transformers
    with pytest.raises(ValueError, match="LlamaConfig has model_type 'llama', not an MLA family"):
        MultiHeadLatentAttention.from_config(transformers.LlamaConfig())


def test_module_from_config_overrides_win():
    """Keyword overrides of from_config win over the family's glue: rope_interleave (the older
    flag) and rope_layout alike."""
    config = make_family_config("longcat-flash")
    assert MultiHeadLatentAttention.from_config(config).rope_layout == "interleaved"
    assert MultiHeadLatentAttention.from_config(config, rope_interleave=False).rope_layout == "half_split"
    assert MultiHeadLatentAttention.from_config(config, rope_layout="none").glue.rope_layout == "none"
    assert MultiHeadLatentAttention.from_config(config).glue.q_scale == (64 / 24) ** 0.5
