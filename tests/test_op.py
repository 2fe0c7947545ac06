"""mla_attention against the float64 reference on every (device, core) pair: forward, the four
grads and lse (docs/design.md §8). One body per property; the `backend` fixture (conftest.py)
runs it on each core, skipping what a core cannot serve."""
import pytest
import torch

import torch_mla
from torch_mla.reference import mla_attention_reference
from mla_testing import (DSV3, MINICPM3, SMALL, TENSOR_ARGS, HeadDims, assert_matches_reference,
                         make_inputs, max_abs_err, max_rel_err, run_with_grads)

# Tile edges: the CPU kernel's tiles are 64 queries × 128 keys, the CUDA kernels' 128 × 64 and 64 × 64.
SEQLENS = [1, 63, 64, 65, 127, 128, 129]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("dims", [SMALL, DSV3, MINICPM3], ids=["small", "dsv3", "minicpm3"])
def test_padded_matches_reference(backend, dims, seqlen, causal, dtype):
    inputs, _ = backend.inputs(dims, batch=2, seqlen=seqlen, dtype=dtype)
    assert_matches_reference(torch_mla.mla_attention, inputs, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dims", [SMALL, DSV3, MINICPM3], ids=["small", "dsv3", "minicpm3"])
def test_varlen_matches_reference(backend, dims, causal, dtype):
    inputs, cu_seqlens = backend.inputs(dims, seqlens=[1, 0, 65, 3, 129, 64, 0], dtype=dtype)
    assert_matches_reference(torch_mla.mla_attention, inputs, causal=causal, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("heads", [1, 3])
def test_head_counts_match_reference(backend, heads):
    dims = HeadDims(heads=heads, nope=DSV3.nope, rope=DSV3.rope, v=DSV3.v, latent=DSV3.latent)
    inputs, cu_seqlens = backend.inputs(dims, seqlens=[70, 1, 129], dtype=torch.bfloat16)
    assert_matches_reference(torch_mla.mla_attention, inputs, cu_seqlens=cu_seqlens)


def test_float64_matches_reference_exactly(backend):
    inputs, _ = backend.inputs(SMALL, batch=3, seqlen=77, dtype=torch.float64)
    assert_matches_reference(torch_mla.mla_attention, inputs, causal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_matches_reference(backend, causal, dtype):
    dims = SMALL if dtype != torch.bfloat16 else DSV3
    inputs, cu_seqlens = backend.inputs(dims, seqlens=[5, 1, 130], dtype=dtype, requires_grad=False)
    _, lse = torch_mla.mla_attention(**inputs, causal=causal, cu_seqlens=cu_seqlens, return_lse=True)
    ref64 = {k: v.double() for k, v in inputs.items()}
    _, ref_lse = mla_attention_reference(**ref64, causal=causal, cu_seqlens=cu_seqlens, return_lse=True)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (136, dims.heads)
    if dtype == torch.bfloat16:
        _, naive_lse = mla_attention_reference(**inputs, causal=causal, cu_seqlens=cu_seqlens, return_lse=True)
        assert max_abs_err(lse, ref_lse) <= 2 * max_abs_err(naive_lse, ref_lse)
    else:
        assert max_rel_err(lse, ref_lse) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_explicit_softmax_scale(backend):
    inputs, _ = backend.inputs(SMALL, batch=1, seqlen=70, dtype=torch.float32)
    assert_matches_reference(torch_mla.mla_attention, inputs, softmax_scale=0.37)


def test_padded_equals_packed_uniform_lengths(backend):
    inputs, _ = backend.inputs(SMALL, batch=3, seqlen=70, dtype=torch.float32)
    packed = {k: (v if k == "wkv_b" else v.detach().flatten(0, 1)) for k, v in inputs.items()}
    cu_seqlens = torch.arange(0, 211, 70, dtype=torch.int32, device=backend.device)
    backend.skip_unless_served(packed, cu_seqlens)
    out_padded, grads_padded = run_with_grads(torch_mla.mla_attention, inputs)
    out_packed, grads_packed = run_with_grads(torch_mla.mla_attention, packed, cu_seqlens=cu_seqlens,
                                              max_seqlen=70)
    torch.testing.assert_close(out_packed, out_padded.flatten(0, 1), rtol=1e-6, atol=1e-6)
    for k in TENSOR_ARGS:
        expected = grads_padded[k] if k == "wkv_b" else grads_padded[k].flatten(0, 1)
        torch.testing.assert_close(grads_packed[k], expected, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs(backend):
    """q as a (B, H, S, D) → (B, S, H, D) transpose view; kv_latent and k_rope as the two halves
    of kv_a_proj_with_mqa's output and wkv_b as a column slice: the views a model hands over."""
    dims = SMALL
    gen = torch.Generator().manual_seed(3)
    backend.skip_unless_served(make_inputs(dims, batch=1, seqlen=1, dtype=torch.float64, device=backend.device)[0])

    def leaf(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(backend.device).requires_grad_(True)

    bases = [leaf(2, dims.heads, 70, dims.nope + dims.rope), leaf(2, 70, dims.latent + dims.rope),
             leaf(dims.heads * (dims.nope + dims.v), dims.latent + 3, scale=dims.latent ** -0.5)]

    def views():
        q_bhsd, kv_a, w = bases
        return dict(q=q_bhsd.transpose(1, 2), kv_latent=kv_a[..., :dims.latent],
                    k_rope=kv_a[..., dims.latent:], wkv_b=w[:, :dims.latent])

    assert not any(v.is_contiguous() for v in views().values())
    out = torch_mla.mla_attention(**views())
    ref = mla_attention_reference(**views())
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(backend.device)
    grads = torch.autograd.grad(out, bases, grad_out)
    ref_grads = torch.autograd.grad(ref, bases, grad_out)
    assert max_rel_err(out, ref) <= 1e-12
    for g, r in zip(grads, ref_grads):
        assert max_rel_err(g, r) <= 1e-12


@pytest.mark.parametrize("dims", [SMALL, DSV3], ids=["small", "dsv3"])
@pytest.mark.parametrize("case", ["batch0", "seqlen0", "tokens0", "all_sequences_empty"])
def test_empty_inputs_give_empty_outputs_and_zero_grads(backend, case, dims):
    dtype = torch.float32 if dims == SMALL else torch.bfloat16
    shape = {"batch0": dict(batch=0, seqlen=9), "seqlen0": dict(batch=3, seqlen=0),
             "tokens0": dict(seqlens=[]), "all_sequences_empty": dict(seqlens=[0, 0, 0])}[case]
    inputs, cu = backend.inputs(dims, dtype=dtype, **shape)
    out, lse = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_lse=True)
    lead = inputs["q"].shape[:-1]
    assert out.shape == (*lead, dims.v) and lse.shape == lead
    out.float().sum().backward()
    for k in TENSOR_ARGS:
        g = inputs[k].grad
        assert g is not None and g.shape == inputs[k].shape
        assert torch.count_nonzero(g) == 0


def test_packed_zero_length_sequences_do_not_disturb_neighbours(backend):
    inputs, cu = backend.inputs(SMALL, seqlens=[0, 7, 0, 0, 9, 0], dtype=torch.float32)
    assert_matches_reference(torch_mla.mla_attention, inputs, cu_seqlens=cu)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_float64(backend, causal, packed):
    dims = HeadDims(heads=2, nope=4, rope=2, v=3, latent=5)
    if packed:
        inputs, cu = backend.inputs(dims, seqlens=[2, 0, 3, 1], dtype=torch.float64)
    else:
        inputs, cu = backend.inputs(dims, batch=2, seqlen=3, dtype=torch.float64)

    def fn(q, kv_latent, k_rope, wkv_b):
        return torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b, causal=causal, cu_seqlens=cu)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in TENSOR_ARGS))


def test_double_backward_is_a_clear_error():
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=5, dtype=torch.float64)
    out = torch_mla.mla_attention(**inputs)
    (grad_q,) = torch.autograd.grad(out.sum(), inputs["q"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


def test_backward_when_only_lse_is_used():
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=5, dtype=torch.float64)
    out, lse = torch_mla.mla_attention(**inputs, return_lse=True)
    assert not lse.requires_grad and out.requires_grad


def test_autocast_runs_in_the_autocast_dtype():
    """Under torch.autocast (float32 inputs, as RMSNorm outputs and parameters are) the op runs
    in bfloat16, forward and backward inside the context, and matches the bf16 op."""
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=70, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_with_grads(torch_mla.mla_attention, inputs)
    bf16_inputs = {k: v.detach().bfloat16() for k, v in inputs.items()}
    expected_out, expected_grads = run_with_grads(torch_mla.mla_attention, bf16_inputs)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected_out)
    for k in TENSOR_ARGS:
        assert grads[k].dtype == torch.float32
        assert torch.equal(grads[k], expected_grads[k].float())
