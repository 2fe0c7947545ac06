"""What a patched model cannot run through the op runs the model's own attention for that call,
never silently: output_attentions=True (with a one-time warning), decode steps and static caches
(read from shapes only, so torch.compile(fullgraph=True) traces a decoding step)."""
import warnings

import pytest
import torch

import torch_mla
import torch_mla.integrations.hf
from support import HAVE_TRANSFORMERS, OpCounter, clone_model, make_model, max_rel_err

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

VOCAB = 96


def token_ids(batch=2, seqlen=12, seed=1):
    return torch.randint(1, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def patched_copy(model):
    copy = clone_model(model)
    assert torch_mla.patch_model(copy) == model.config.num_hidden_layers
    return copy


@pytest.mark.parametrize("via", ["kwarg", "config"])
def test_output_attentions_falls_back_with_a_warning(via):
    model = make_model("v3", attn_implementation="eager")
    patched = patched_copy(model)
    ids = token_ids()
    kwargs = {"output_attentions": True} if via == "kwarg" else {}
    if via == "config":
        for m in (model, patched):
            m.config.output_attentions = True
    torch_mla.integrations.hf._warned.clear()
    with pytest.warns(UserWarning, match=r"output_attentions=True .* model's own attention \('eager'\)"), \
            OpCounter() as calls:
        ours = patched(ids, **kwargs)
    assert calls.attention_calls() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        patched(ids, **kwargs)
    ref = model(ids, **kwargs)
    assert len(ours.attentions) == len(ref.attentions) == 2
    for a, b in zip(ours.attentions, ref.attentions):
        assert a.shape == (2, 4, 12, 12)
        assert max_rel_err(a, b) <= 1e-6
    assert max_rel_err(ours.logits, ref.logits) <= 1e-6
    # Attention grads can be retained, as with the unpatched model.
    ours.attentions[0].retain_grad()
    ours.logits.sum().backward()
    assert ours.attentions[0].grad is not None


def test_without_output_attentions_the_op_runs():
    model = patched_copy(make_model("v3", attn_implementation="eager"))
    ids = token_ids()
    with OpCounter() as calls:
        out = model(ids, output_attentions=False)
    assert out.attentions is None or out.attentions == ()
    assert calls.attention_calls() == 2


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generate(padded):
    """A static cache: prefill and decode steps attend to the cache's fixed key length, which the
    op does not cover, so they run HF's attention (no refusal); tokens equal the unpatched."""
    model = make_model("v3", use_cache=True, pad_token_id=0)
    patched = patched_copy(model)
    ids = token_ids(batch=3, seqlen=9)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0
        ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        with OpCounter() as calls:
            ours = patched.generate(ids, **kwargs)
    assert torch.equal(ours, ref)
    assert calls.attention_calls() == 0


def test_compiled_decoding_step_fullgraph():
    """torch.compile(fullgraph=True) of the decoding forward with a static cache: the patched
    forward decides from shapes, so it traces without a graph break and matches eager HF."""
    from transformers import StaticCache
    torch._dynamo.reset()
    model = make_model("v3", use_cache=True)
    patched = patched_copy(model)
    prompt = token_ids(batch=2, seqlen=7)
    results = []
    for m, compile_step in ((model, False), (patched, True)):
        cache = StaticCache(config=m.config, max_cache_len=16)
        step = torch.compile(m.forward, fullgraph=True, backend="eager") if compile_step else m.forward
        logits = []
        with torch.no_grad():
            out = m(prompt, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for i in range(4):
                position_ids = torch.full((2, 1), prompt.shape[1] + i)
                out = step(token, cache=cache, use_cache=True, position_ids=position_ids)
                logits.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
        results.append(torch.cat(logits, 1))
    assert max_rel_err(results[1], results[0]) <= 1e-5


def test_dynamic_cache_prefill_runs_the_op_and_decode_falls_back():
    model = make_model("v2-lite", use_cache=True)
    patched = patched_copy(model)
    prompt = token_ids(seqlen=6)
    with torch.no_grad():
        with OpCounter() as prefill:
            out = patched(prompt, use_cache=True)
        with OpCounter() as decode:
            patched(prompt[:, :1], cache=out.cache, use_cache=True)
    assert prefill.attention_calls() == 2 and decode.attention_calls() == 0  # two layers


def test_mask_messages_name_what_was_seen():
    model = patched_copy(make_model("v3", attn_implementation="eager"))
    ids = token_ids(seqlen=6)
    bidirectional = torch.zeros(2, 1, 6, 6)
    with pytest.raises(ValueError, match="in row 0, query 0 attends key 1"):
        model(ids, attention_mask=bidirectional)
    wider = torch.zeros(2, 1, 6, 10)
    with pytest.raises(ValueError, match="10 keys for 6 queries"):
        model(ids, attention_mask=wider)
    dropout = patched_copy(make_model("v3", attention_dropout=0.1)).train()
    with pytest.raises(ValueError, match="attention dropout"):
        dropout(ids, attention_mask=torch.ones_like(ids))
