"""The q-latent op (docs/design.md §5.2): mla_attention on q = rope(c_q · wq_bᵀ), saving c_q instead of q.

Checked against an independent float64 spec (q expanded with a rotate-half RoPE, then the
mla_attention reference), with gradcheck, opcheck and torch.compile, and by counting
what it saves."""
import pytest
import torch

import torch_mla
from support import (Q_SMALL, Q_TENSORS, Q_TINY, cu_seqlens_of, max_abs_err, max_rel_err, q_latent_inputs,
                     q_latent_op, q_latent_spec, rope_spec)


def out_and_grads(fn, inputs, dtype, **kwargs):
    leaves = {k: v.detach().to(dtype if k not in ("cos", "sin") else v.dtype).requires_grad_()
              for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, [leaves[k] for k in Q_TENSORS], grad_out.to(out.dtype))
    return {"out": out.detach(), **dict(zip(Q_TENSORS, grads))}


CONFIGS = {
    "padded": dict(lead=(2, 37)),
    "packed": dict(lead=(45,), seqlens=[1, 17, 0, 27]),
}


@pytest.mark.parametrize("interleave", [True, False], ids=["interleave", "half"])
@pytest.mark.parametrize("layout", list(CONFIGS))
def test_fp32_matches_float64_spec(layout, interleave):
    cfg = CONFIGS[layout]
    inputs = q_latent_inputs(cfg["lead"], rope_scale=1.2)
    cu = cu_seqlens_of(cfg["seqlens"]) if "seqlens" in cfg else None
    kwargs = dict(rope_interleave=interleave, cu_seqlens=cu, softmax_scale=0.3)
    ours = out_and_grads(q_latent_op, inputs, torch.float32, **kwargs)
    ref = out_and_grads(q_latent_spec, {k: v.double() for k, v in inputs.items()}, torch.float64, **kwargs)
    for name in ref:
        assert max_rel_err(ours[name], ref[name]) <= 1e-5, name


def test_bf16_within_twice_naive_error():
    inputs = q_latent_inputs((2, 40))
    kwargs = dict(rope_interleave=True)
    ref = out_and_grads(q_latent_spec, {k: v.double() for k, v in inputs.items()}, torch.float64, **kwargs)
    naive = out_and_grads(q_latent_spec, inputs, torch.bfloat16, **kwargs)
    ours = out_and_grads(q_latent_op, inputs, torch.bfloat16, **kwargs)
    assert ours["out"].dtype == torch.bfloat16
    for name in ref:
        factor = 2 if name == "out" else 3
        err, naive_err = max_abs_err(ours[name], ref[name]), max_abs_err(naive[name], ref[name])
        assert err <= factor * naive_err, f"{name}: {err:.3g} > {factor} × {naive_err:.3g}"


def test_same_as_mla_attention_on_expanded_q():
    """The op is mla_attention on the q it expands: identical forward values in float64."""
    inputs = {k: v.double() for k, v in q_latent_inputs((2, 9)).items()}
    d = Q_SMALL
    q = (inputs["q_latent"] @ inputs["wq_b"].t()).unflatten(-1, (d.heads, d.nope + d.rope))
    q = torch.cat((q[..., :d.nope], rope_spec(q[..., d.nope:], inputs["cos"].unsqueeze(-2).double(),
                                              inputs["sin"].unsqueeze(-2).double(), True)), -1)
    expected = torch_mla.mla_attention(q, inputs["kv_latent"], inputs["k_rope"], inputs["wkv_b"])
    torch.testing.assert_close(q_latent_op(**inputs, rope_interleave=True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleave", [True, False], ids=["interleave", "half"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck_float64(layout, interleave):
    lead, cu = ((2, 5), None) if layout == "padded" else ((9,), cu_seqlens_of([4, 0, 1, 4]))
    inputs = {k: v.double().requires_grad_() for k, v in q_latent_inputs(lead, Q_TINY, rope_scale=1.3).items()}

    def fn(*tensors):
        return q_latent_op(*tensors, rope_interleave=interleave, cu_seqlens=cu, softmax_scale=0.4)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in Q_TENSORS))


def op_args(inputs, cu, interleave=True):
    return (*[inputs[k] for k in Q_TENSORS], Q_SMALL.heads, 0.3, True, interleave, cu, 0 if cu is None else 9)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_opcheck(layout):
    lead, cu = ((2, 7), None) if layout == "padded" else ((14,), cu_seqlens_of([4, 0, 9, 1]))
    inputs = {k: v.requires_grad_() for k, v in q_latent_inputs(lead).items()}
    torch.library.opcheck(torch.ops.torch_mla.mla_attention_q_latent.default, op_args(inputs, cu))


def test_saves_q_latent_not_q():
    inputs = {k: v.requires_grad_() for k, v in q_latent_inputs((2, 11)).items()}
    with torch_mla.SavedTensors() as saved:
        out, lse = torch_mla.mla_attention_q_latent(**inputs, num_heads=Q_SMALL.heads, return_lse=True)
    kept = [*inputs.values(), out, lse]
    assert all(saved.holds(t) for t in kept)
    assert saved.nbytes == sum(t.untyped_storage().nbytes() for t in kept)


def loss_fn(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, cu_seqlens=None):
    out = torch_mla.mla_attention_q_latent(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b,
                                           num_heads=Q_SMALL.heads, cu_seqlens=cu_seqlens)
    return out.float().square().sum()


def assert_compiled_equals_eager(compiled, inputs, cu=None):
    def run(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        loss = fn(**leaves, cu_seqlens=cu)
        return loss, torch.autograd.grad(loss, [leaves[k] for k in Q_TENSORS])

    eager_loss, eager_grads = run(loss_fn)
    loss, grads = run(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, g, ref in zip(Q_TENSORS, grads, eager_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_fullgraph_dynamic_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for seqlen in (19, 40):
        assert_compiled_equals_eager(compiled, q_latent_inputs((2, seqlen), seed=seqlen))


def test_compile_fullgraph_packed_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for seqlens in ([5, 0, 17], [1, 30, 2, 9]):
        assert_compiled_equals_eager(compiled, q_latent_inputs((sum(seqlens),)), cu_seqlens_of(seqlens))


def test_autocast_runs_in_autocast_dtype():
    """Under torch.autocast(bfloat16), float32 inputs are cast as F.linear's are; cos/sin stay."""
    inputs = q_latent_inputs((2, 13))
    expected = out_and_grads(q_latent_op, inputs, torch.bfloat16, rope_interleave=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = out_and_grads(q_latent_op, inputs, torch.float32, rope_interleave=True)
    assert ours["out"].dtype == torch.bfloat16
    torch.testing.assert_close(ours["out"], expected["out"], rtol=0, atol=0)
    for name in Q_TENSORS:  # grads arrive in each input's own dtype
        torch.testing.assert_close(ours[name].to(expected[name].dtype), expected[name], rtol=0, atol=0)


def test_argument_errors():
    inputs = q_latent_inputs((2, 5))
    bad_cos = dict(inputs, cos=inputs["cos"][..., :-1])
    with pytest.raises(ValueError, match="cos must have shape"):
        q_latent_op(**bad_cos, rope_interleave=True)
    bad_wq = dict(inputs, wq_b=inputs["wq_b"][:-1])
    with pytest.raises(ValueError, match="wq_b must have shape"):
        q_latent_op(**bad_wq, rope_interleave=True)
    with pytest.raises(ValueError, match="q_latent must have shape"):
        q_latent_op(**inputs, rope_interleave=True, cu_seqlens=cu_seqlens_of([5, 5]))
    bad_dtype = dict(inputs, wq_b=inputs["wq_b"].double())
    with pytest.raises(ValueError, match="wq_b must have q_latent's dtype"):
        q_latent_op(**bad_dtype, rope_interleave=True)


def test_double_backward_is_refused():
    inputs = {k: v.double().requires_grad_() for k, v in q_latent_inputs((1, 4), Q_TINY).items()}
    out = q_latent_op(**inputs, rope_interleave=True)
    (grad_q_latent,) = torch.autograd.grad(out.sum(), inputs["q_latent"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q_latent.sum().backward()


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_errors_of_the_inner_attention_name_the_q_latent_op(requires_grad):
    """The attention's own checks (here data-dependent ones of cu_seqlens) name the op called."""
    inputs = {k: v.requires_grad_(requires_grad) for k, v in q_latent_inputs((9,)).items()}
    with pytest.raises(ValueError, match="^torch_mla.mla_attention_q_latent: cu_seqlens must end at T = 9"):
        torch_mla.mla_attention_q_latent(**inputs, num_heads=Q_SMALL.heads,
                                         cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="^torch_mla.mla_attention_q_latent: wkv_b must have shape .* \\(kv_latent's last dimension\\)"):
        torch_mla.mla_attention_q_latent(**dict(inputs, kv_latent=inputs["kv_latent"][:, :-1]),
                                         num_heads=Q_SMALL.heads, cu_seqlens=cu_seqlens_of([4, 5]))
