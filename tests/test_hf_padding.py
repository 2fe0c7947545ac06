"""patch_model on padded batches (a 2-D attention_mask, right or left padding): the real tokens
run through the op as packed sequences, padded positions get zeros. Logits at real positions and
every parameter grad (loss over real tokens) match HF's eager attention, training matches,
left-padded generation is token-identical, and the attention saves no more than the same tokens
packed."""
import pytest
import torch

import torch_mla
from support import (HAVE_TRANSFORMERS, OpCounter, assert_ran_the_op, attention_saved_bytes, clone_model, make_model,
                     max_abs_err, max_rel_err)

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

VOCAB = 96
LAYERS = 2  # support.HF_COMMON's num_hidden_layers
LENGTHS = (21, 9, 1, 16)  # real tokens per row; the longest row (21) sets S


def padded_batch(side, lengths=LENGTHS, seed=1):
    """ids (B, S) with pad id 0 at padded positions, and the (B, S) attention_mask."""
    seqlen = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), seqlen), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seqlen - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def patched_copy(model, dtype=None, attn_implementation=None):
    copy = clone_model(model, dtype, attn_implementation)
    assert torch_mla.patch_model(copy) == model.config.num_hidden_layers
    return copy


def real_logits_and_grads(model, ids, mask, autocast=False, op_layers=0):
    """Logits at real positions and every parameter's grad of a loss over real tokens, float64;
    op_layers: the layers whose attention must run torch_mla's op (0: unpatched)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpCounter() as forward:
        logits = model(ids, attention_mask=mask).logits
    real = mask.bool()
    logits = logits[real]
    with OpCounter() as backward:
        logits.double().sin().sum().backward()
    assert_ran_the_op(op_layers, forward, backward)
    grads = {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().double(), grads


def reference(model):
    """The float64 model the others are measured against. HF's eager attention in float64 is no
    yardstick for left padding: its softmax runs in float32, where the float64 mask minimum is
    -inf, so fully masked (padded) query rows are NaN and spread to every row (0 · NaN) in the
    next layer. Its sdpa attention is the float64 reference; HF eager in float32 is checked
    against it too."""
    return clone_model(model, torch.float64, attn_implementation="sdpa")


def assert_close(results, ref, tol=1e-5):
    (logits, grads), (ref_logits, ref_grads) = results, ref
    err = max_rel_err(logits, ref_logits)
    assert err <= tol, f"logits: max relative error {err:.3g}"
    assert grads.keys() == ref_grads.keys()
    worst = max(max_rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst <= tol, f"worst grad: max relative error {worst:.3g}"
    return err, worst


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", ["v3", "v2-lite"])  # with and without q's latent (q_lora_rank)
def test_padded_matches_hf_eager_fp32(case, side, attn_implementation):
    model = make_model(case, attn_implementation="eager")
    ids, mask = padded_batch(side)
    ref = real_logits_and_grads(reference(model), ids, mask)
    unpatched = real_logits_and_grads(model, ids, mask)
    ours = real_logits_and_grads(patched_copy(model, attn_implementation=attn_implementation), ids, mask,
                                 op_layers=LAYERS)
    err, worst = assert_close(ours, ref)
    assert_close(unpatched, ref)  # the yardstick holds for HF itself
    print(f"\n{case} {side}-padded ({attn_implementation} mask): logits max abs diff to HF eager "
          f"{max_abs_err(ours[0], unpatched[0]):.2e}, rel to fp64 {err:.2e}; worst grad rel {worst:.2e}")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", ["v3", "v2-lite"])
def test_padded_matches_hf_eager_bf16(case, side):
    """|ours − fp64| ≤ 2× (logits) / 3× (grads) |HF eager bf16 − fp64| at real positions."""
    model = make_model(case, attn_implementation="eager")
    ids, mask = padded_batch(side)
    ref_logits, ref_grads = real_logits_and_grads(reference(model), ids, mask)
    naive_logits, naive_grads = real_logits_and_grads(clone_model(model, torch.bfloat16), ids, mask)
    logits, grads = real_logits_and_grads(patched_copy(model, torch.bfloat16, "sdpa"), ids, mask, op_layers=LAYERS)
    err, naive = max_abs_err(logits, ref_logits), max_abs_err(naive_logits, ref_logits)
    assert err <= 2 * naive, f"logits: {err:.3g} > 2 × HF bf16 {naive:.3g}"
    assert grads.keys() == ref_grads.keys()
    ratios = []
    for name in ref_grads:
        err_g, naive_g = max_abs_err(grads[name], ref_grads[name]), max_abs_err(naive_grads[name], ref_grads[name])
        assert err_g <= 3 * naive_g, f"{name}.grad: {err_g:.3g} > 3 × HF bf16 {naive_g:.3g}"
        ratios.append(err_g / naive_g)
    print(f"\n{case} {side}-padded bf16: logits error {err:.3g} vs HF eager bf16 {naive:.3g}; "
          f"worst grad error ratio to HF bf16 {max(ratios):.2f}")


def test_padded_and_packed_rows():
    """Padding and packing together (position_ids restarting inside a right-padded row): HF's
    4-D mask is block-causal over the real tokens."""
    model = make_model("v3", attn_implementation="eager")
    ids, mask = padded_batch("right", lengths=(20, 12))
    position_ids = torch.stack([torch.cat([torch.arange(7), torch.arange(13)]),
                                torch.cat([torch.arange(12), torch.arange(8)])])

    def run(m, op_layers):
        m.zero_grad(set_to_none=True)
        with OpCounter() as forward:
            logits = m(ids, attention_mask=mask, position_ids=position_ids).logits[mask.bool()]
        with OpCounter() as backward:
            logits.double().sin().sum().backward()
        assert_ran_the_op(op_layers, forward, backward)
        return logits.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()}

    assert_close(run(patched_copy(model, attn_implementation="sdpa"), LAYERS), run(reference(model), 0))


def test_padded_training_20_steps():
    """AdamW on right- and left-padded batches (loss over real tokens): equal losses."""
    model = make_model("v3", attn_implementation="eager")
    patched = patched_copy(model, attn_implementation="sdpa")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, patched)]
    model.train()
    patched.train()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(20):
        lengths = torch.randint(4, 25, (4,), generator=gen).tolist()
        start = torch.randint(1, VOCAB, (4, 1), generator=gen)
        stride = torch.randint(1, 4, (4, 1), generator=gen)
        ids, mask = padded_batch("left" if step % 2 else "right", lengths)
        ids = torch.where(mask.bool(), 1 + (start + stride * mask.cumsum(-1)) % (VOCAB - 1), 0)
        # Loss over real tokens predicted from real tokens: under left padding the first real
        # token's label would be predicted from a padded position, whose output no
        # implementation defines (HF eager, sdpa and torch_mla each give another).
        predicted_from_real = torch.cat((torch.zeros_like(mask[:, :1]), mask[:, :-1]), dim=1)
        labels = ids.masked_fill((mask * predicted_from_real) == 0, -100)
        row = []
        for m, opt in zip((model, patched), optimizers):
            opt.zero_grad()
            loss = m(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            row.append(loss.item())
        losses.append(row)
    worst = max(abs(ours - ref) / abs(ref) for ref, ours in losses)
    print(f"\npadded training: loss {losses[0][0]:.4f} -> {losses[-1][0]:.4f}, "
          f"worst step relative diff {worst:.2e}")
    assert losses[-1][0] < 0.7 * losses[0][0]  # it trained
    assert worst <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["v3", "v2-lite"])
def test_generate_left_padded(case, attn_implementation):
    model = make_model(case, attn_implementation=attn_implementation, use_cache=True, pad_token_id=0)
    patched = patched_copy(model)
    ids, mask = padded_batch("left", lengths=(11, 5, 8))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        ours = patched.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    for step_logits, ref_logits in zip(ours.logits, ref.logits):
        assert max_rel_err(step_logits, ref_logits) <= 1e-5


def test_padded_saves_what_packed_saves():
    """A padded batch keeps, inside the attention, no more than its real tokens packed + 1%."""
    lengths = (40, 7, 26, 1)
    model = patched_copy(make_model("v3"))
    ids, mask = padded_batch("left", lengths)
    padded = attention_saved_bytes(model, ids, attention_mask=mask)
    packed_ids = ids[mask.bool()][None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = attention_saved_bytes(model, packed_ids, position_ids=position_ids)
    unpadded_total = attention_saved_bytes(model, ids)  # every position real, for scale
    print(f"\nattention saved bytes: padded {padded}, packed {packed} (ratio {padded / packed:.4f}), "
          f"all {ids.numel()} positions {unpadded_total}")
    assert padded <= 1.01 * packed
