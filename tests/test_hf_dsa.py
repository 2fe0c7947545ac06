"""patch_model on DeepSeek Sparse Attention models (docs/design.md §19): tiny DeepseekV32ForCausalLM
and GlmMoeDsaForCausalLM (fp32, sequences longer than index_topk so the selection is sparse, 16
indexer heads so exact-zero ties are rare). Against HF's unpatched eager model (indexer frozen on
both sides): logits at real positions and every parameter grad ≤ 1e-5 relative, on whole rows,
left and right padding and packed sequences, with the indexer op and the sparse op counted;
IndexShare (GLM "shared" layers reuse the "full" layer's selection, returned in HF's coordinates);
the KV cache (prefill through torch_mla, decode by HF, generation token-identical); the modes and
the refusals."""
import pytest
import torch

import torch_mla
from torch_mla.integrations.hf import indexer_losses
from support import HAVE_TRANSFORMERS, OpCounter, clone_model, max_rel_err, peak_live_bytes

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

VOCAB, HIDDEN, TOPK = 96, 64, 6
TOL = 1e-5
DSA_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=16,
                  num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                  index_n_heads=16, index_head_dim=16, index_topk=TOPK, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, use_cache=False, initializer_range=HIDDEN ** -0.5, max_position_embeddings=256)
# Every MLP dense (MoE routing by top-k could switch experts on rounding and hide what is measured).
# GLM: layer 1 shares layer 0's selection, layer 2 runs its own indexer.
FAMILIES = {
    "v32": ("DeepseekV32Config", dict(num_hidden_layers=2, first_k_dense_replace=2), "DeepseekV32Attention"),
    "glm": ("GlmMoeDsaConfig", dict(num_hidden_layers=3, mlp_layer_types=["dense"] * 3,
                                    indexer_types=["full", "shared", "full"]), "GlmMoeDsaAttention"),
}
FULL_LAYERS = {"v32": 2, "glm": 2}


def make_dsa_model(family, seed=0, **overrides):
    import transformers
    name, extra, _ = FAMILIES[family]
    config = getattr(transformers, name)(**{**DSA_COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def attentions(family, model):
    return [m for m in model.modules() if type(m).__name__ == FAMILIES[family][2]]


def patched(family, model, **kwargs):
    copy = clone_model(model)
    assert torch_mla.patch_model(copy, **kwargs) == model.config.num_hidden_layers
    return copy


def token_ids(batch=2, seqlen=30, seed=1):
    return torch.randint(3, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def padded(side, lengths=(30, 17, 1, 24), seed=1):
    seqlen = max(lengths)
    ids = token_ids(len(lengths), seqlen, seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seqlen - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def logits_and_grads(model, ids, real=None, counts=None, **kwargs):
    """Logits at real positions and every parameter grad of a fixed loss over them; counts: a dict
    that receives the torch_mla ops of the forward and of the backward."""
    model.zero_grad(set_to_none=True)
    with OpCounter() as forward:
        logits = model(ids, **kwargs).logits
    logits = logits[real] if real is not None else logits
    with OpCounter() as backward:
        logits.double().sin().sum().backward()
    if counts is not None:
        counts.update(forward=forward.counts, backward=backward.counts)
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_matches(ours, theirs, what):
    (logits, grads), (ref_logits, ref_grads) = ours, theirs
    err = max_rel_err(logits.double(), ref_logits.double())
    assert err <= TOL, f"{what}: logits max relative error {err:.3g}"
    assert grads.keys() == ref_grads.keys(), f"{what}: grads of {sorted(set(grads) ^ set(ref_grads))}"
    worst = max(ref_grads, key=lambda n: max_rel_err(grads[n].double(), ref_grads[n].double()))
    grad_err = max_rel_err(grads[worst].double(), ref_grads[worst].double())
    assert grad_err <= TOL, f"{what}: {worst}.grad max relative error {grad_err:.3g}"
    assert not any(".indexer." in n for n in grads)  # frozen on both sides
    return err, grad_err


def assert_ran_sparse(family, counts, layers):
    forward, backward = counts["forward"], counts["backward"]
    assert forward["dsa_indexer_topk"] == FULL_LAYERS[family], dict(forward)
    assert forward["mla_sparse_attention"] == layers and forward["mla_attention"] == 0, dict(forward)
    assert backward["mla_sparse_attention_backward"] == layers, dict(backward)


def batch_of(layout):
    """(ids, HF call kwargs, the real-token selection) for a layout."""
    if layout == "rows":
        return token_ids(), {}, None
    if layout == "packed":  # position_ids restarting at 0: HF's block-causal mask
        ids = token_ids(3, 30)
        position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                                    for lengths in ((13, 1, 10, 6), (30,), (1, 29))])
        return ids, dict(position_ids=position_ids), None
    ids, mask = padded(layout)
    return ids, dict(attention_mask=mask), mask.bool()


@pytest.mark.parametrize("layout", ["rows", "left", "right", "packed"])
@pytest.mark.parametrize("family", ["v32", "glm"])
def test_patched_matches_hf_eager(family, layout):
    model = make_dsa_model(family)
    ids, kwargs, real = batch_of(layout)
    theirs = logits_and_grads(model, ids, real, **kwargs)
    counts = {}
    ours = logits_and_grads(patched(family, model), ids, real, counts, **kwargs)
    err, grad_err = assert_matches(ours, theirs, f"{family} {layout}")
    assert_ran_sparse(family, counts, model.config.num_hidden_layers)
    print(f"\n{family} {layout}: logits max rel {err:.1e}, worst grad max rel {grad_err:.1e}")


def test_packed_from_flash_attention_kwargs():
    """cu_seq_lens_q (flash-attention collators) defines the sequences: as HF on the block-causal
    mask of the same packing."""
    model = make_dsa_model("v32")
    lengths = (7, 25, 1, 7)
    ids = token_ids(1, sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 32, 33, 40], dtype=torch.int32)
    theirs = logits_and_grads(model, ids, position_ids=position_ids)
    counts = {}
    ours = logits_and_grads(patched("v32", model), ids, None, counts, position_ids=position_ids,
                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=25, max_length_k=25)
    assert_matches(ours, theirs, "cu_seq_lens_q")
    assert_ran_sparse("v32", counts, 2)


def captured_selections(family, model, ids, **kwargs):
    """What each GLM attention returned as its third output (the selection passed on), by layer."""
    returned = {}
    handles = [m.register_forward_hook(lambda m, args, out, i=i: returned.__setitem__(i, out[2]))
               for i, m in enumerate(attentions(family, model))]
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return returned


def visible_sets(selection, allowed):
    """Per query row, the sorted selected keys it may attend (allowed (B, S, S) bool)."""
    batch, seqlen, _ = selection.shape
    return [[sorted(k for k in selection[b, t].tolist() if 0 <= k < seqlen and bool(allowed[b, t, k]))
             for t in range(seqlen)] for b in range(batch)]


@pytest.mark.parametrize("layout", ["rows", "left", "packed"])
def test_index_share_reuses_the_full_layers_selection(layout):
    """GLM: the "shared" layer runs no indexer and attends the "full" layer's selection (equal on the
    modules, in the op's coordinates); every layer returns its selection in HF's coordinates, the
    same keys as HF's own at every real query."""
    model = make_dsa_model("glm")
    ours = patched("glm", model)
    ids, kwargs, real = batch_of(layout)
    theirs = captured_selections("glm", model, ids, **kwargs)
    with OpCounter() as forward:
        mine = captured_selections("glm", ours, ids, **kwargs)
    assert forward.counts["dsa_indexer_topk"] == 2  # the two "full" layers
    full, shared, third = attentions("glm", ours)
    assert shared.indexer is None and torch.equal(shared.topk_indices, full.topk_indices)
    assert mine[1] is mine[0]  # HF passes the selection through the shared layer
    batch, seqlen = ids.shape
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    if layout == "packed":
        starts = kwargs["position_ids"] == 0
        seq = starts.cumsum(-1)
        allowed = causal & (seq[:, :, None] == seq[:, None, :])
    else:
        allowed = causal.expand(batch, -1, -1)
    if real is not None:
        allowed = allowed & real[:, None, :] & real[:, :, None]
    for layer in (0, 2):
        ours_sets, hf_sets = visible_sets(mine[layer], allowed), visible_sets(theirs[layer], allowed)
        for b in range(batch):
            for t in range(seqlen):
                if real is None or bool(real[b, t]):
                    assert ours_sets[b][t] == hf_sets[b][t], f"layer {layer} row {b} query {t}"
                    assert len(ours_sets[b][t]) == min(TOPK, int(allowed[b, t].sum()))


@pytest.mark.parametrize("family", ["v32", "glm"])
def test_prefill_writes_the_cache_and_generation_is_hfs(family):
    """use_cache: the prefill runs torch_mla (indexer and sparse op) and writes latents and indexer
    keys as HF does; decode steps run HF's forward. Greedy generation is token-identical, and the
    cached indexer keys equal HF's."""
    model = make_dsa_model(family, use_cache=True).eval()
    ours = patched(family, model).eval()
    ids = token_ids(2, 20)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
        with OpCounter() as calls:
            got = ours.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert calls.counts["mla_sparse_attention"] == model.config.num_hidden_layers  # the prefill only
    with torch.no_grad():
        theirs_cache = model(ids, use_cache=True).past_key_values
        ours_cache = ours(ids, use_cache=True).past_key_values
    for layer, attn in enumerate(attentions(family, model)):
        if attn.indexer is not None:
            assert max_rel_err(ours_cache.layers[layer].indexer_keys.double(),
                               theirs_cache.layers[layer].indexer_keys.double()) <= TOL


def test_patched_never_holds_the_indexer_scores():
    """One layer, S = 2048, k = 64: HF's step (forward and backward) holds the indexer's (B, S, H_I, S)
    float32 scores (the measure sees them); the patched step stays under a quarter of that tensor:
    the indexer is streamed and the attention sparse (docs/design.md §16.4, §17)."""
    seqlen = 2048
    model = make_dsa_model("v32", num_hidden_layers=1, first_k_dense_replace=1, index_topk=64)
    ids = token_ids(1, seqlen)
    scores_bytes = seqlen * DSA_COMMON["index_n_heads"] * seqlen * 4

    def step(m):
        m(ids).logits.sum().backward()

    ours = patched("v32", model)
    assert peak_live_bytes(lambda: step(ours)) < scores_bytes / 4
    assert peak_live_bytes(lambda: step(model)) > scores_bytes


# ---- modes, losses, refusals -----------------------------------------------------------------------

def test_off_mode_is_dense_and_equals_hf_with_k_past_the_sequence():
    """dsa_mode="off": dense causal attention (mla_attention), no indexer: HF computes the same when
    index_topk covers every key."""
    model = make_dsa_model("v32", index_topk=64)
    ids = token_ids()
    theirs = logits_and_grads(model, ids)
    counts = {}
    ours = logits_and_grads(patched("v32", model, dsa_mode="off"), ids, None, counts)
    assert_matches(ours, theirs, "off")
    forward = counts["forward"]
    assert forward["mla_attention_q_latent"] == 2  # patch_model's default save="q_latent", dense
    assert forward["dsa_indexer_topk"] == forward["mla_sparse_attention"] == 0


def test_frozen_indexer_records_no_loss():
    model = patched("v32", make_dsa_model("v32"))
    model(token_ids()).logits.sum().backward()
    assert indexer_losses(model) == []
    assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)


def test_save_latent_runs_the_dsa_block_and_refuses_the_indexer_loss():
    model = make_dsa_model("glm")
    ids = token_ids()
    theirs = logits_and_grads(model, ids)
    counts = {}
    ours = logits_and_grads(patched("glm", model, save="latent"), ids, None, counts)
    assert_matches(ours, theirs, "glm save='latent'")
    layers = model.config.num_hidden_layers
    assert counts["forward"]["_mla_attention_block_with_rstd"] == layers and counts["forward"]["mla_attention"] == 0
    assert counts["forward"]["dsa_indexer_topk"] == FULL_LAYERS["glm"]
    assert counts["backward"]["mla_sparse_attention_backward"] >= layers
    with pytest.raises(ValueError, match="GlmMoeDsaAttention .*save='latent'"):
        torch_mla.patch_model(model, save="latent", train_indexer=True)
    with pytest.raises(ValueError, match="GlmMoeDsaAttention .*save='latent'"):
        torch_mla.patch_model(model, save="latent", dsa_mode="dense_warmup")
    assert not any(getattr(m, "_torch_mla_patched", False) for m in model.modules())
    with pytest.raises(ValueError, match="dsa_mode must be one of"):
        torch_mla.patch_model(make_dsa_model("v32"), dsa_mode="dense")


def test_lora_adapters_on_a_dsa_model():
    """PEFT LoRA on q_b_proj, kv_b_proj and o_proj of a patched DeepSeek-V3.2 (the sparse path runs
    "q": q_b_proj's adapter applies as a module, kv_b_proj's widens the latent the op takes): loss
    and every adapter grad as the unpatched PEFT model."""
    peft = pytest.importorskip("peft")

    def lora_model():
        model = make_dsa_model("v32")
        torch.manual_seed(1)
        config = peft.LoraConfig(target_modules=["q_b_proj", "kv_b_proj", "o_proj"], r=4, lora_alpha=8,
                                 init_lora_weights=False)
        return peft.get_peft_model(model, config)

    ref, ours = lora_model(), lora_model()
    assert torch_mla.patch_model(ours) == 2
    ours.load_state_dict(ref.state_dict())
    ids = token_ids()
    results = []
    for model in (ref, ours):
        with OpCounter() as forward:
            loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                        forward.counts))
    (loss, grads, counts), (ref_loss, ref_grads, _) = results[1], results[0]
    assert counts["mla_sparse_attention"] == 2 and counts["dsa_indexer_topk"] == 2
    assert max_rel_err(loss.double(), ref_loss.double()) <= TOL
    assert grads.keys() == ref_grads.keys() and any("kv_b_proj.lora_B" in n for n in grads)
    for name in ref_grads:
        assert max_rel_err(grads[name].double(), ref_grads[name].double()) <= TOL, name
