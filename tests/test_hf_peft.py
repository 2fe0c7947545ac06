"""PEFT LoRA adapters on a patch_model'ed DeepSeek model: the adapters on q_b_proj / q_proj and
kv_b_proj (projections the op takes as weights) are honoured exactly as the unpatched model
does — losses, adapter grads, dropout, several adapters, merge/unmerge/disable, patched before
or after get_peft_model — and adapter kinds the op cannot honour are refused."""
import copy

import pytest
import torch

import torch_mla
from support import HAVE_TRANSFORMERS, OpCounter, assert_ran_the_op, attention_saved_bytes, make_model, max_rel_err

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
peft = pytest.importorskip("peft")

VOCAB = 96
LAYERS = 2  # support.HF_COMMON's num_hidden_layers
TARGETS = ["q_b_proj", "q_proj", "kv_b_proj", "o_proj"]  # q_proj: the V2-Lite case


def token_ids(batch=2, seqlen=24, seed=1):
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def lora_config(targets=TARGETS, **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    return peft.LoraConfig(target_modules=list(targets), init_lora_weights=False, **kwargs)


def lora_models(case, order="after", targets=TARGETS, **config_kwargs):
    """(unpatched, patched) PEFT models with the same base and adapter weights; `order` says
    whether patch_model runs before or after get_peft_model."""
    torch.manual_seed(1)
    ref = peft.get_peft_model(make_model(case), lora_config(targets, **config_kwargs))
    base = make_model(case)
    if order == "before":
        assert torch_mla.patch_model(base) == 2
    torch.manual_seed(1)
    ours = peft.get_peft_model(base, lora_config(targets, **config_kwargs))
    if order == "after":
        assert torch_mla.patch_model(ours) == 2
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def loss_and_adapter_grads(model, ids, seed=0, op_layers=0, **kwargs):
    """The loss and every trainable parameter's grad, float64; op_layers: the layers whose
    attention must run torch_mla's op (0: unpatched)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every model
    with OpCounter() as forward:
        loss = model(ids, labels=ids, **kwargs).loss
    with OpCounter() as backward:
        loss.backward()
    assert_ran_the_op(op_layers, forward, backward)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    return loss.detach().double(), {n: g.double() for n, g in grads.items()}


def assert_same(results, ref, tol=1e-5):
    (loss, grads), (ref_loss, ref_grads) = results, ref
    err = max_rel_err(loss, ref_loss)
    assert err <= tol, f"loss {loss.item():.6f} vs {ref_loss.item():.6f}"
    assert grads.keys() == ref_grads.keys()
    worst = max(max_rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst <= tol, f"worst adapter grad: max relative error {worst:.3g}"
    return err, worst


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("case", ["v3", "v2-lite"])
def test_lora_matches_unpatched(case, order):
    ref, ours = lora_models(case, order)
    assert any("kv_b_proj.lora_A" in n for n, _ in ours.named_parameters())
    ids = token_ids()
    ref64 = loss_and_adapter_grads(copy.deepcopy(ref).double(), ids)
    unpatched = loss_and_adapter_grads(ref, ids)
    result = loss_and_adapter_grads(ours, ids, op_layers=LAYERS)
    err, worst = assert_same(result, ref64)
    assert_same(unpatched, ref64)
    print(f"\n{case} LoRA patched {order} get_peft_model: loss {result[0].item():.6f} vs unpatched "
          f"{unpatched[0].item():.6f} (rel to fp64 {err:.1e}); worst adapter grad rel {worst:.1e}")


@pytest.mark.parametrize("save_q_latent", [True, False], ids=["q-latent", "q-saved"])
def test_lora_only_on_consumed_projections(save_q_latent):
    """The issue's failing case: adapters only on q_b_proj / kv_b_proj (backward had nothing to
    differentiate)."""
    torch.manual_seed(1)
    ref = peft.get_peft_model(make_model("v3"), lora_config(["q_b_proj", "kv_b_proj"]))
    ours = copy.deepcopy(ref)
    assert torch_mla.patch_model(ours, save_q_latent=save_q_latent) == 2
    ids = token_ids()
    assert_same(loss_and_adapter_grads(ours, ids, op_layers=LAYERS),
                loss_and_adapter_grads(copy.deepcopy(ref).double(), ids))


@pytest.mark.parametrize("target", ["q_b_proj", "kv_b_proj", "o_proj"])
def test_latent_only_block_refuses_adapters_it_would_skip(target):
    """save="latent" takes q_b_proj's, kv_b_proj's and o_proj's weights into one op: an adapter on
    any of them is refused at patch time, and at forward when added after patching."""
    torch.manual_seed(1)
    with pytest.raises(ValueError, match=f"save='latent' takes {target}'s weight"):
        torch_mla.patch_model(peft.get_peft_model(make_model("v3"), lora_config([target])), save="latent")
    model = make_model("v3")
    torch_mla.patch_model(model, save="latent")
    late = peft.get_peft_model(model, lora_config([target]))
    with pytest.raises(ValueError, match=f"save='latent' takes {target}'s weight"):
        late(token_ids())


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("case", ["v3", "v2-lite"])
def test_lora_dropout_training(case, order):
    """lora_dropout > 0 in training: the same dropout draws as peft's own forward, so 10 AdamW
    steps give equal losses and adapter grads."""
    ref, ours = lora_models(case, order, lora_dropout=0.2)
    ref.train()
    ours.train()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (ref, ours)]
    losses = []
    for step in range(10):
        ids = token_ids(seed=step)
        results = [loss_and_adapter_grads(m, ids, seed=100 + step, op_layers=layers)
                   for m, layers in ((ref, 0), (ours, LAYERS))]
        assert_same(results[1], results[0])
        losses.append([r[0].item() for r in results])
        for opt in optimizers:
            opt.step()
    print(f"\n{case} LoRA dropout 0.2, patched {order}: losses {losses[0][0]:.5f} -> {losses[-1][0]:.5f}, "
          f"worst step diff {max(abs(a - b) for a, b in losses):.1e}")
    assert losses[-1][0] < losses[0][0]


def test_lora_padded_batch():
    ref, ours = lora_models("v3")
    ids = token_ids(batch=3, seqlen=20)
    mask = torch.ones_like(ids)
    mask[0, 13:] = 0
    mask[2, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run(model, op_layers):
        model.zero_grad(set_to_none=True)
        with OpCounter() as forward:
            loss = model(ids, attention_mask=mask, labels=labels).loss
        with OpCounter() as backward:
            loss.backward()
        assert_ran_the_op(op_layers, forward, backward)
        return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}

    assert_same(run(ours, LAYERS), run(copy.deepcopy(ref).double(), 0))


def test_several_adapters_merge_unmerge_disable():
    ref, ours = lora_models("v3")
    for m in (ref, ours):
        torch.manual_seed(2)
        m.add_adapter("second", lora_config(r=2, lora_alpha=3))
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        m.base_model.set_adapter(["default", "second"])
    ids = token_ids()
    both = loss_and_adapter_grads(ours, ids, op_layers=LAYERS)
    assert_same(both, loss_and_adapter_grads(copy.deepcopy(ref).double(), ids))
    assert any(".second" in n for n in both[1])

    with torch.no_grad():
        unmerged = ours(ids).logits
        ours.base_model.merge_adapter()
        assert ours.base_model.model.model.layers[0].self_attn.kv_b_proj.merged
        merged = ours(ids).logits
        ours.base_model.unmerge_adapter()
        again = ours(ids).logits
        with ours.disable_adapter():
            disabled = ours(ids).logits
        with ref.disable_adapter():
            ref_disabled = ref(ids).logits
    assert max_rel_err(merged, unmerged) <= 1e-5
    assert max_rel_err(again, unmerged) <= 1e-5
    assert max_rel_err(disabled, ref_disabled) <= 1e-5
    assert max_rel_err(disabled, unmerged) > 1e-3  # the adapters do change the model


def test_dora_is_refused():
    torch.manual_seed(1)
    dora = peft.get_peft_model(make_model("v3"), lora_config(["kv_b_proj"], use_dora=True))
    with pytest.raises(ValueError, match="kv_b_proj is a DoRA adapter|kv_b_proj is a LoRA adapter .* DoRA"):
        torch_mla.patch_model(dora)
    # Patched first, adapted later: refused at forward.
    base = make_model("v3")
    torch_mla.patch_model(base)
    dora = peft.get_peft_model(base, lora_config(["q_b_proj"], use_dora=True))
    with pytest.raises(ValueError, match="q_b_proj is .*DoRA"):
        dora(token_ids())


def test_other_tuners_are_refused():
    ia3 = peft.get_peft_model(make_model("v3"), peft.IA3Config(target_modules=["kv_b_proj"],
                                                               feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"kv_b_proj is wrapped by peft\.tuners\.ia3\..*other than LoRA"):
        torch_mla.patch_model(ia3)


def test_lora_keeps_the_latent_saving():
    """LoRA on q_b_proj and kv_b_proj adds, inside the attention, exactly the adapters' r values
    per token (u, joined to the latents the op saves: no second copy of c) and the widened
    weights [W | B] the op keeps (weight-sized, per layer)."""
    ids = token_ids(seqlen=64)
    saved = []
    for targets in (["o_proj"], ["q_b_proj", "kv_b_proj", "o_proj"]):
        torch.manual_seed(1)
        model = peft.get_peft_model(make_model("v3"), lora_config(targets, r=4))
        for p in model.parameters():
            p.requires_grad_(True)  # everything trains, so every saved tensor is needed
        assert torch_mla.patch_model(model) == 2
        saved.append(attention_saved_bytes(model, ids))
    tokens, r, layers, f32 = ids.numel(), 4, 2, 4
    config = make_model("v3").config
    heads = config.num_attention_heads
    wide_weights = (heads * (config.qk_nope_head_dim + config.v_head_dim) * (config.kv_lora_rank + r)
                    + heads * (config.qk_nope_head_dim + config.qk_rope_head_dim) * (config.q_lora_rank + r))
    expected = layers * (tokens * 2 * r + wide_weights) * f32
    print(f"\nLoRA r=4 on q_b_proj, kv_b_proj: attention saves {saved[1]} B vs {saved[0]} B without, "
          f"+{saved[1] - saved[0]} B (u per token {layers * tokens * 2 * r * f32} B, widened weights "
          f"{layers * wide_weights * f32} B)")
    assert saved[1] - saved[0] == expected
