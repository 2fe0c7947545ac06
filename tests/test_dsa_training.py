"""DSA training through the module and patch_model (docs/design.md §19.2) with the indexer loss
(torch_mla.dsa_indexer_loss, §18): the dense warm-up with the backbone frozen changes only the
indexer and lowers the KL; sparse training updates the backbone by the LM loss and the indexer by
the KL, disjointly; a frozen indexer in warm-up records the loss without gradients; a patched
model's losses cover its real tokens and its full layers."""
import copy

import pytest
import torch

import torch_mla
from torch_mla.integrations.hf import indexer_losses
from support import HAVE_TRANSFORMERS, OpCounter, max_rel_err
from test_dsa_module import SEQLEN, hf_attention, hf_selection, hidden, modeling, ours_from, run_hf
from test_hf_dsa import make_dsa_model, padded, patched

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")


def indexer_and_backbone(module):
    params = dict(module.named_parameters())
    indexer = {n: p for n, p in params.items() if n.startswith("indexer.")}
    return indexer, {n: p for n, p in params.items() if n not in indexer}


def hf_kl(hf, x, sparse):
    """The recipe's KL per query in float64 from HF's own modules: the teacher is HF's eager
    attention probabilities (over its index mask when sparse, else over every visible key: its
    indexer made to select all) summed over heads and L1-normalised; the student the softmax of
    HF's indexer scores (its code up to the top-k) over the same keys."""
    hf = copy.deepcopy(hf).double()
    x = x.double()
    batch, seqlen = x.shape[:2]
    inputs = []
    hf.indexer.register_forward_pre_hook(lambda m, args: inputs.append(args))
    selection = None if sparse else torch.arange(seqlen, dtype=torch.int32).expand(batch, seqlen, -1)
    if selection is not None:
        hf.indexer.forward = lambda *args, **kwargs: inputs.append(args) or selection
    else:
        selection = hf_selection(hf, x)
    with torch.no_grad():
        probs = run_hf(hf, x)[1]
        hidden_states, q_resid, (cos, sin) = inputs[-1][:3]
        ix = hf.indexer
        rope, rest = ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim
        q = ix.wq_b(q_resid).view(batch, seqlen, ix.n_heads, ix.head_dim)
        k = ix.k_norm(ix.wk(hidden_states)).unsqueeze(2)
        (q_rot, q_pass), (k_rot, k_pass) = q.split([rope, rest], -1), k.split([rope, rest], -1)
        family = "glm" if hf.config.model_type == "glm_moe_dsa" else "v32"
        rotate = modeling(family).apply_rotary_pos_emb_interleave if family == "glm" else modeling(family).apply_rotary_pos_emb
        q_rot, k_rot = rotate(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q, k = torch.cat([q_rot, q_pass], -1), torch.cat([k_rot, k_pass], -1).squeeze(2)
        scores = torch.relu(torch.einsum("bthd,bsd->bths", q, k) * ix.softmax_scale)
        scores = torch.einsum("bth,bths->bts", ix.weights_proj(hidden_states) * ix.n_heads ** -0.5, scores)
    keys = torch.zeros(batch, seqlen, seqlen, dtype=torch.bool).scatter(-1, selection.long(), True)
    keys &= torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    teacher = probs.sum(1).masked_fill(~keys, 0)
    teacher = teacher / teacher.sum(-1, keepdim=True)
    student = scores.masked_fill(~keys, float("-inf")).log_softmax(-1)
    terms = torch.where(teacher > 0, teacher * (teacher.log() - student), torch.zeros_like(teacher))
    return terms.sum(-1)


@pytest.mark.parametrize("family", ["v32", "glm"])
@pytest.mark.parametrize("mode", ["dense_warmup", "sparse"])
def test_recorded_loss_is_the_recipes_kl_of_hf(family, mode):
    """The module's indexer_loss (fp32) is, within 1e-5 relative, the KL computed in float64 from
    HF's attention probabilities and HF's indexer scores: the teacher is the attention the module
    ran (its q, latents, scale and lse), over all visible keys or over the selected ones."""
    hf = hf_attention(family)
    module = ours_from(hf, dsa_mode=mode, train_indexer=True)
    x = hidden()
    module(x)
    expected = hf_kl(hf, x, sparse=mode == "sparse")
    err = max_rel_err(module.indexer_loss.double(), expected)
    assert err <= 1e-5, f"indexer_loss max relative error {err:.3g}"
    assert float(expected.min()) >= 0 and float(expected.max()) > 1e-3  # a real, non-trivial KL


def test_dense_warmup_trains_only_the_indexer():
    """Backbone frozen, dense attention, the KL over all visible keys: 20 Adam steps change the
    indexer's parameters only and lower the KL; the attention output stays the dense one."""
    module = ours_from(hf_attention("v32"), dsa_mode="dense_warmup", train_indexer=True)
    dense = ours_from(hf_attention("v32"), dsa_mode="off")
    indexer, backbone = indexer_and_backbone(module)
    for p in backbone.values():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.Adam(indexer.values(), lr=1e-2)
    x = hidden()
    kls = []
    for step in range(20):
        with OpCounter() as forward:
            out = module(x)
        assert forward.counts["dsa_indexer_loss"] == 1 and forward.counts["dsa_indexer_topk"] == 0
        kl = module.indexer_loss
        assert kl.shape == (2, SEQLEN) and kl.dtype == torch.float32 and bool((kl >= -1e-6).all())
        kls.append(float(kl.detach().sum()))
        optimizer.zero_grad()
        (out.sum() * 0 + kl.sum()).backward()
        optimizer.step()
    assert kls[-1] < 0.9 * kls[0], kls
    for name, p in module.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == name.startswith("indexer."), name
    with torch.no_grad():
        assert torch.allclose(module(x), dense(x), rtol=1e-6, atol=1e-7)


def test_sparse_training_updates_disjoint_parameters():
    """train_indexer in "sparse": the LM loss's grads are zero on the indexer, the KL's (on the
    selected set) zero on the backbone; the KL reaches every indexer parameter."""
    module = ours_from(hf_attention("glm"), train_indexer=True)
    indexer, backbone = indexer_and_backbone(module)
    x = hidden().requires_grad_()
    with OpCounter() as forward:
        out = module(x)
    assert forward.counts["dsa_indexer_topk"] == forward.counts["dsa_indexer_loss"] == 1
    assert forward.counts["mla_sparse_attention"] == 1
    lm, kl = out.sin().sum(), module.indexer_loss.sum()
    params = list(indexer.values()) + list(backbone.values())
    lm_grads = torch.autograd.grad(lm, params + [x], retain_graph=True, allow_unused=True)
    kl_grads = torch.autograd.grad(kl, params + [x], allow_unused=True)
    count = len(indexer)
    assert all(g is None for g in lm_grads[:count])  # the selection is discrete
    assert all(g is not None and bool(g.abs().sum() > 0) for g in lm_grads[count:-1])
    assert all(g is not None and bool(g.abs().sum() > 0) for g in kl_grads[:count])
    assert all(g is None for g in kl_grads[count:])  # detached inputs and teacher: nothing to x either


def test_frozen_warmup_records_the_loss_without_gradients():
    module = ours_from(hf_attention("v32"), dsa_mode="dense_warmup")
    module(hidden()).sum().backward()
    assert module.indexer_loss is not None and not module.indexer_loss.requires_grad
    assert all(p.grad is None for n, p in module.named_parameters() if n.startswith("indexer."))


@pytest.mark.parametrize("mode", ["dense_warmup", "sparse"])
def test_patched_model_indexer_losses(mode):
    """A padded GLM batch: one (T,) loss per full layer (the shared layer has no indexer), over the
    real tokens; gradients to the indexers only from them."""
    model = patched("glm", make_dsa_model("glm"), dsa_mode=mode, train_indexer=True)
    ids, mask = padded("left")
    out = model(ids, attention_mask=mask).logits
    losses = indexer_losses(model)
    assert len(losses) == 2 and all(kl.shape == (int(mask.sum()),) for kl in losses)
    out[mask.bool()].sin().sum().backward(retain_graph=True)
    assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)
    sum(kl.sum() for kl in losses).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".indexer." in n)
