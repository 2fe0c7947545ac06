"""torch_mla.patch_model on Hugging Face's own DeepseekV3ForCausalLM / DeepseekV2ForCausalLM:
same logits and parameter grads as the unpatched model (docs/design.md §8 rules, against the float64
unpatched model), under torch.compile too, same training trajectory, the masks it honours and the
ones it refuses."""
import pytest
import torch

import torch_mla
from support import (HAVE_TRANSFORMERS, OpCounter, assert_ran_the_op, attention_modules, clone_model, make_model,
                     max_abs_err, max_rel_err)
from support import HF_CASES as CASES

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

VOCAB = 96
LAYERS = 2  # support.HF_COMMON's num_hidden_layers


def token_ids(batch=2, seqlen=33, seed=1):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, ids, autocast=False, op_layers=0, **kwargs):
    """Logits and every parameter's grad for a fixed nonlinear loss, in float64; with autocast,
    the forward runs under torch.autocast(bfloat16) and the backward outside it, as PyTorch
    recommends. op_layers: the layers whose attention must run torch_mla's op (0: unpatched;
    None: not counted, for compiled models)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpCounter() as forward:
        logits = model(ids, **kwargs).logits
    with OpCounter() as backward:
        logits.double().sin().sum().backward()
    if op_layers is not None:
        assert_ran_the_op(op_layers, forward, backward)
    grads = {name.replace("_orig_mod.", ""): p.grad.double() for name, p in model.named_parameters()}
    return logits.detach().double(), grads


def patched_copy(model, dtype=None, **patch_kwargs):
    copy = clone_model(model, dtype)
    assert torch_mla.patch_model(copy, **patch_kwargs) == model.config.num_hidden_layers
    return copy


def assert_fp32_matches(results, ref, tol=1e-5):
    logits, grads = results
    ref_logits, ref_grads = ref
    err = max_rel_err(logits, ref_logits)
    assert err <= tol, f"logits: max relative error {err:.3g}"
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        err = max_rel_err(grads[name], ref_grads[name])
        assert err <= tol, f"{name}.grad: max relative error {err:.3g}"


@pytest.mark.parametrize("save", ["q_latent", "q", "latent"])
@pytest.mark.parametrize("case", list(CASES))
def test_patched_matches_unpatched_fp32(case, save):
    model = make_model(case)
    ids = token_ids()
    ref = logits_and_grads(clone_model(model, torch.float64), ids)
    ours = logits_and_grads(patched_copy(model, save=save), ids, op_layers=LAYERS)
    unpatched = logits_and_grads(model, ids)
    assert_fp32_matches(ours, ref)
    assert_fp32_matches(unpatched, ref)  # the yardstick holds for HF itself
    print(f"\n{case}: fp32 logits max abs diff to unpatched {max_abs_err(ours[0], unpatched[0]):.2e}, "
          f"max rel to fp64 {max_rel_err(ours[0], ref[0]):.2e}; worst grad rel to fp64 "
          f"{max(max_rel_err(ours[1][n], ref[1][n]) for n in ref[1]):.2e}")


@pytest.mark.parametrize("head_chunks", [1, 2])
def test_head_chunks_reach_the_latent_only_block(head_chunks):
    """patch_model(save="latent", head_chunks=n) sets every attention's head groups
    (docs/design.md §13.6); the model stays the unpatched one to fp32 rounding."""
    model = make_model("v3")
    ids = token_ids()
    patched = patched_copy(model, save="latent", head_chunks=head_chunks)
    assert [m.head_chunks for m in attention_modules(patched)] == [head_chunks] * model.config.num_hidden_layers
    assert_fp32_matches(logits_and_grads(patched, ids, op_layers=LAYERS),
                        logits_and_grads(clone_model(model, torch.float64), ids))
    with pytest.raises(ValueError, match="head_chunks must be >= 1 or None, got 0"):
        torch_mla.patch_model(clone_model(model), save="latent", head_chunks=0)


@pytest.mark.parametrize("case", ["v3", "v3-yarn-bias", "v2-lite"])
def test_patched_matches_unpatched_bf16(case):
    """FlashAttention's rule: |ours − fp64| ≤ 2× (logits) / 3× (grads) |HF bf16 − fp64|."""
    model = make_model(case)
    ids = token_ids()
    ref_logits, ref_grads = logits_and_grads(clone_model(model, torch.float64), ids)
    naive_logits, naive_grads = logits_and_grads(clone_model(model, torch.bfloat16), ids)
    logits, grads = logits_and_grads(patched_copy(model, torch.bfloat16), ids, op_layers=LAYERS)
    err, naive = max_abs_err(logits, ref_logits), max_abs_err(naive_logits, ref_logits)
    assert err <= 2 * naive, f"logits: {err:.3g} > 2 × HF bf16 {naive:.3g}"
    for name in ref_grads:
        err, naive = max_abs_err(grads[name], ref_grads[name]), max_abs_err(naive_grads[name], ref_grads[name])
        assert err <= 3 * naive, f"{name}.grad: {err:.3g} > 3 × HF bf16 {naive:.3g}"


@pytest.mark.parametrize("save", ["q_latent", "q", "latent"])
def test_patched_under_autocast_bf16(save):
    """fp32 weights under torch.autocast(bfloat16), the usual mixed-precision training set-up:
    the 2×/3× rule against the fp64 model, HF under the same autocast being the naive run."""
    model = make_model("v3-yarn-bias")
    ids = token_ids()
    ref_logits, ref_grads = logits_and_grads(clone_model(model, torch.float64), ids)
    patched = patched_copy(model, save=save)
    naive_logits, naive_grads = logits_and_grads(model, ids, autocast=True)
    logits, grads = logits_and_grads(patched, ids, autocast=True, op_layers=LAYERS)
    err, naive = max_abs_err(logits, ref_logits), max_abs_err(naive_logits, ref_logits)
    assert err <= 2 * naive, f"logits: {err:.3g} > 2 × HF autocast {naive:.3g}"
    for name in ref_grads:
        err, naive = max_abs_err(grads[name], ref_grads[name]), max_abs_err(naive_grads[name], ref_grads[name])
        assert err <= 3 * naive, f"{name}.grad: {err:.3g} > 3 × HF autocast {naive:.3g}"


@pytest.mark.parametrize("case,backend", [("v3", "aot_eager"), ("v2-lite", "inductor")])
def test_patched_under_torch_compile(case, backend):
    torch._dynamo.reset()
    model = make_model(case)
    ids = token_ids()
    ref = logits_and_grads(clone_model(model, torch.float64), ids)
    compiled = torch.compile(patched_copy(model), backend=backend, fullgraph=False)
    assert_fp32_matches(logits_and_grads(compiled, ids, op_layers=LAYERS), ref)


def test_patch_shares_parameters_and_state_dict():
    model = make_model("v3")
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert torch_mla.patch_model(model) == 2
    assert torch_mla.patch_model(model) == 0  # already patched
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert len(attention_modules(model)) == 2


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_sequences_from_position_ids(attn_implementation):
    """position_ids restarting at 0 make HF build a block-causal mask: patched runs the packed op
    (rows packed differently, including one not packed at all)."""
    model = make_model("v3", attn_implementation=attn_implementation)
    ids = token_ids(batch=3, seqlen=40)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in seqlens])
                                for seqlens in ((13, 1, 20, 6), (40,), (1, 39))])
    ref = logits_and_grads(clone_model(model, torch.float64), ids, position_ids=position_ids)
    assert_fp32_matches(logits_and_grads(patched_copy(model), ids, position_ids=position_ids, op_layers=LAYERS), ref)


def test_packed_sequences_from_flash_attention_kwargs():
    """cu_seq_lens_q (DataCollatorWithFlattening's flash-attention kwargs) defines the sequences."""
    model = make_model("v2-lite")
    seqlens = (7, 25, 1, 7)
    ids = token_ids(batch=1, seqlen=sum(seqlens))
    position_ids = torch.cat([torch.arange(n) for n in seqlens])[None]
    cu = torch.tensor([0, 7, 32, 33, 40], dtype=torch.int32)
    ref = logits_and_grads(clone_model(model, torch.float64), ids, position_ids=position_ids)
    ours = logits_and_grads(patched_copy(model), ids, position_ids=position_ids, op_layers=LAYERS, use_cache=True,
                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=25, max_length_k=25)
    assert_fp32_matches(ours, ref)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_all_ones_attention_mask_is_causal(attn_implementation):
    model = make_model("v3-half-rotate", attn_implementation=attn_implementation)
    ids = token_ids()
    mask = torch.ones_like(ids)
    ref = logits_and_grads(clone_model(model, torch.float64), ids, attention_mask=mask)
    assert_fp32_matches(logits_and_grads(patched_copy(model), ids, attention_mask=mask, op_layers=LAYERS), ref)


def test_custom_4d_masks_are_refused():
    model = patched_copy(make_model("v2-yarn", attn_implementation="eager"))
    ids = token_ids(seqlen=9)
    full = torch.zeros(2, 1, 9, 9)  # bidirectional
    with pytest.raises(ValueError, match="not causal within sequences"):
        model(ids, attention_mask=full)
    window = torch.ones(9, 9, dtype=torch.bool).tril().triu(-3)[None, None].expand(2, 1, 9, 9)
    with pytest.raises(ValueError, match="not causal within sequences"):
        model(ids, attention_mask=window)
    bias = torch.zeros(2, 1, 9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    bias[..., 0] = -0.5
    with pytest.raises(ValueError, match="additive attention biases"):
        model(ids, attention_mask=bias)


def test_attention_dropout_is_refused_in_training():
    model = patched_copy(make_model("v3", attention_dropout=0.1)).eval()
    model(token_ids(seqlen=5))  # no dropout in eval mode
    model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(token_ids(seqlen=5))


@pytest.mark.parametrize("case", ["v3", "v3-half-rotate", "v2-lite"])
def test_generation_with_cache_matches(case):
    """Prefill through torch_mla writes the KV cache in HF's layout; decode steps read it."""
    model = make_model(case, use_cache=True)
    patched = patched_copy(model)
    prompt = token_ids(seqlen=11)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        ours = patched.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    assert torch.equal(ours.sequences, ref.sequences)
    for step_logits, ref_logits in zip(ours.logits, ref.logits):
        assert max_rel_err(step_logits, ref_logits) <= 1e-5


def test_gradient_checkpointing():
    model = make_model("v2-yarn")
    ids = token_ids()
    ref = logits_and_grads(clone_model(model, torch.float64), ids)
    patched = patched_copy(model)
    patched.activation_checkpointing_enable()
    assert_fp32_matches(logits_and_grads(patched, ids, op_layers=LAYERS), ref)


@pytest.mark.parametrize("case", ["v3", "v2-lite"])
def test_training_equivalence_30_adamw_steps(case):
    """Liger-style convergence check: one seed, 30 AdamW steps on a learnable task."""
    model = make_model(case)
    patched = patched_copy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, patched)]
    model.train()
    patched.train()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        start = torch.randint(0, VOCAB, (4, 1), generator=gen)
        stride = torch.randint(1, 4, (4, 1), generator=gen)
        ids = (start + stride * torch.arange(32)) % VOCAB  # arithmetic sequences: learnable
        step = []
        for m, opt in zip((model, patched), optimizers):
            opt.zero_grad()
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    worst = max(abs(ours - ref) / abs(ref) for ref, ours in losses)
    print(f"\n{case}: loss {losses[0][0]:.4f} -> {losses[-1][0]:.4f}, worst step relative diff {worst:.2e}")
    assert losses[-1][0] < 0.6 * losses[0][0]  # it trained
    assert worst <= 1e-5
    for p_ref, p_ours, p_init in zip(model.parameters(), patched.parameters(), initial):
        moved = (p_ref.detach() - p_init).abs().max()
        assert (p_ours.detach() - p_ref.detach()).abs().max() <= 0.01 * moved
