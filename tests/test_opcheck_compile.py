"""The operator under PyTorch's tooling: torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import torch_mla
from support import BF16, FP32, SMALL, TENSOR_ARGS, labelled, make_inputs, run_with_grads


def op_args(inputs, cu, case, core, causal=True):
    dims = case.head_dims()
    return (*[inputs[k] for k in TENSOR_ARGS], (dims.nope + dims.rope) ** -0.5, causal, cu, 0 if cu is None else 9,
            core)


def one_case_per_layout(core, requires_grad=True):
    """(case, inputs, cu) of one served case per layout: opcheck's checks hold for any dtype and dims."""
    for case in core.one_per_layout():
        shape = dict(seqlens=[4, 0, 9, 1]) if case.packed else dict(batch=2, seqlen=7)
        yield (case, *core.inputs(case, requires_grad=requires_grad, **shape))


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"))
def test_opcheck_forward(core):
    for case, inputs, cu in one_case_per_layout(core):
        for causal in (True, False):
            with labelled(case, "causal" if causal else "full"):
                torch.library.opcheck(torch.ops.torch_mla.mla_attention.default,
                                      op_args(inputs, cu, case, core.name, causal))


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"))
def test_opcheck_backward(core):
    for case, inputs, cu in one_case_per_layout(core, requires_grad=False):
        args = op_args(inputs, cu, case, core.name)
        out, lse, _ = torch.ops.torch_mla.mla_attention(*args)
        grad_out = torch.randn_like(out)
        with labelled(case):
            torch.library.opcheck(torch.ops.torch_mla.mla_attention_backward.default,
                                  (grad_out, *args[:4], out, lse, *args[4:]))


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
