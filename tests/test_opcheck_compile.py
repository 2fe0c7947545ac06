"""The operator under PyTorch's tooling: torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import torch_mla
from mla_testing import SMALL, TENSOR_ARGS, make_inputs, run_with_grads


def op_args(inputs, cu, core, causal=True):
    return (*[inputs[k] for k in TENSOR_ARGS], SMALL.nope ** -0.5, causal, cu, 0 if cu is None else 9, core)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck_forward(backend, packed, causal):
    if packed:
        inputs, cu = backend.inputs(SMALL, seqlens=[4, 0, 9, 1])
    else:
        inputs, cu = backend.inputs(SMALL, batch=2, seqlen=7)
    torch.library.opcheck(torch.ops.torch_mla.mla_attention.default, op_args(inputs, cu, backend.core, causal))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck_backward(backend, packed):
    if packed:
        inputs, cu = backend.inputs(SMALL, seqlens=[4, 0, 9, 1], requires_grad=False)
    else:
        inputs, cu = backend.inputs(SMALL, batch=2, seqlen=7, requires_grad=False)
    out, lse, _ = torch.ops.torch_mla.mla_attention(*op_args(inputs, cu, backend.core))
    grad_out = torch.randn_like(out)
    args = (grad_out, *[inputs[k] for k in TENSOR_ARGS], out, lse, *op_args(inputs, cu, backend.core)[4:])
    torch.library.opcheck(torch.ops.torch_mla.mla_attention_backward.default, args)


def loss_fn(q, kv_latent, k_rope, wkv_b, cu_seqlens=None):
    out = torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b, cu_seqlens=cu_seqlens)
    return out.float().square().sum()


def assert_compiled_equals_eager(compiled, inputs, cu=None):
    eager_loss, eager_grads = run_with_grads(lambda **kw: loss_fn(**kw, cu_seqlens=cu), inputs)
    loss, grads = run_with_grads(lambda **kw: compiled(**kw, cu_seqlens=cu), inputs)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for k in TENSOR_ARGS:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_dynamic_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for seqlen in (37, 70):
        inputs, _ = make_inputs(SMALL, batch=2, seqlen=seqlen, seed=seqlen)
        assert_compiled_equals_eager(compiled, inputs)


def test_compile_fullgraph_packed_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for seqlens in ([5, 0, 17], [1, 30, 2, 9]):
        inputs, cu = make_inputs(SMALL, seqlens=seqlens)
        assert_compiled_equals_eager(compiled, inputs, cu)
