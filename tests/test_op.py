"""mla_attention against the float64 reference on every (device, core) pair: forward, the four
grads and lse (docs/design.md §8). One body per property; the `core` fixture (conftest.py) runs it
once per pair, and the body loops over the cases of that core's served list (support.py) that its
`cases` markers ask for, asserting first that the core serves each."""
import pytest
import torch

import torch_mla
from torch_mla.reference import mla_attention_reference
from support import (BF16, FP16, FP32, FP64, SMALL, TENSOR_ARGS, assert_matches_reference, check_lowp_against_reference,
                     cu_seqlens_of, labelled, make_inputs, max_abs_err, max_rel_err, out_and_grads, reference_results,
                     run_with_grads)

# Tile edges: the CPU kernel's tiles are 64 queries × 128 keys, the CUDA kernels' 128 × 64 and 64 × 64.
SEQLENS = [1, 63, 64, 65, 127, 128, 129]
ACCURACY = dict(dtypes=(FP32, BF16, FP16), dims=("small", "dsv3", "minicpm3"))


@pytest.mark.cases(**ACCURACY, packed=False)
def test_padded_matches_reference(core):
    for case in core.cases:
        for seqlen in SEQLENS:
            inputs, _ = core.inputs(case, batch=2, seqlen=seqlen)
            for causal in (True, False):
                with labelled(case, f"S={seqlen}", "causal" if causal else "full"):
                    assert_matches_reference(torch_mla.mla_attention, inputs, causal=causal)


@pytest.mark.cases(**ACCURACY, packed=True)
def test_varlen_matches_reference(core):
    for case in core.cases:
        inputs, cu_seqlens = core.inputs(case, seqlens=[1, 0, 65, 3, 129, 64, 0])
        for causal in (True, False):
            with labelled(case, "causal" if causal else "full"):
                assert_matches_reference(torch_mla.mla_attention, inputs, causal=causal, cu_seqlens=cu_seqlens)


@pytest.mark.cases(dtypes=(BF16,), dims=("dsv3",), packed=True)
def test_head_counts_match_reference(core):
    for case in core.cases:
        for heads in (1, 3):
            inputs, cu_seqlens = core.inputs(case, heads=heads, seqlens=[70, 1, 129])
            with labelled(case, f"H={heads}"):
                assert_matches_reference(torch_mla.mla_attention, inputs, cu_seqlens=cu_seqlens)


@pytest.mark.cases(dtypes=(FP64,), dims=("small",), packed=False)
def test_float64_matches_reference_exactly(core):
    for case in core.cases:
        inputs, _ = core.inputs(case, batch=3, seqlen=77)
        assert_matches_reference(torch_mla.mla_attention, inputs, causal=True)


# float64/float32 to 1e-12/1e-5 relative; bf16 (at DeepSeek's head dims, where the rule compares
# errors over many values) by the 2× rule.
@pytest.mark.cases(dtypes=(FP64, FP32), dims=("small",), packed=True)
@pytest.mark.cases(dtypes=(BF16,), dims=("dsv3",), packed=True)
def test_lse_matches_reference(core):
    for case in core.cases:
        inputs, cu_seqlens = core.inputs(case, seqlens=[5, 1, 130], requires_grad=False)
        ref64 = {k: v.double() for k, v in inputs.items()}
        for causal in (True, False):
            with labelled(case, "causal" if causal else "full"):
                _, lse = torch_mla.mla_attention(**inputs, causal=causal, cu_seqlens=cu_seqlens, return_lse=True)
                _, ref_lse = mla_attention_reference(**ref64, causal=causal, cu_seqlens=cu_seqlens, return_lse=True)
                assert lse.dtype == (FP64 if case.dtype == FP64 else FP32)
                assert lse.shape == (136, 2)
                if case.dtype == BF16:
                    _, naive_lse = mla_attention_reference(**inputs, causal=causal, cu_seqlens=cu_seqlens,
                                                           return_lse=True)
                    assert max_abs_err(lse, ref_lse) <= 2 * max_abs_err(naive_lse, ref_lse)
                else:
                    assert max_rel_err(lse, ref_lse) <= (1e-12 if case.dtype == FP64 else 1e-5)


@pytest.mark.cases(dtypes=(FP32,), dims=("small",), packed=False)
def test_explicit_softmax_scale(core):
    for case in core.cases:
        inputs, _ = core.inputs(case, batch=1, seqlen=70)
        assert_matches_reference(torch_mla.mla_attention, inputs, softmax_scale=0.37)


@pytest.mark.cases(dtypes=(FP32,), dims=("small",), packed=False)
def test_padded_equals_packed_uniform_lengths(core):
    for case in core.cases:
        inputs, _ = core.inputs(case, batch=3, seqlen=70)
        packed = {k: (v if k == "wkv_b" else v.detach().flatten(0, 1)) for k, v in inputs.items()}
        cu_seqlens = cu_seqlens_of([70, 70, 70], core.device)
        core.assert_serves(packed, cu_seqlens)
        out_padded, grads_padded = run_with_grads(torch_mla.mla_attention, inputs)
        out_packed, grads_packed = run_with_grads(torch_mla.mla_attention, packed, cu_seqlens=cu_seqlens,
                                                  max_seqlen=70)
        torch.testing.assert_close(out_packed, out_padded.flatten(0, 1), rtol=1e-6, atol=1e-6)
        for k in TENSOR_ARGS:
            expected = grads_padded[k] if k == "wkv_b" else grads_padded[k].flatten(0, 1)
            torch.testing.assert_close(grads_packed[k], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cases(dtypes=(FP64,), dims=("small",), packed=False)
def test_non_contiguous_inputs(core):
    """q as a (B, H, S, D) → (B, S, H, D) transpose view; kv_latent and k_rope as the two halves
    of kv_a_proj_with_mqa's output and wkv_b as a column slice: the views a model hands over."""
    for case in core.cases:
        dims = case.head_dims()
        gen = torch.Generator().manual_seed(3)

        def leaf(*shape, scale=1.0):
            t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
            return t.to(core.device).requires_grad_(True)

        bases = [leaf(2, dims.heads, 70, dims.nope + dims.rope), leaf(2, 70, dims.latent + dims.rope),
                 leaf(dims.heads * (dims.nope + dims.v), dims.latent + 3, scale=dims.latent ** -0.5)]

        def views():
            q_bhsd, kv_a, w = bases
            return dict(q=q_bhsd.transpose(1, 2), kv_latent=kv_a[..., :dims.latent],
                        k_rope=kv_a[..., dims.latent:], wkv_b=w[:, :dims.latent])

        assert not any(v.is_contiguous() for v in views().values())
        core.assert_serves(views())
        out = torch_mla.mla_attention(**views())
        ref = mla_attention_reference(**views())
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(core.device)
        grads = torch.autograd.grad(out, bases, grad_out)
        ref_grads = torch.autograd.grad(ref, bases, grad_out)
        assert max_rel_err(out, ref) <= 1e-12
        for g, r in zip(grads, ref_grads):
            assert max_rel_err(g, r) <= 1e-12


EMPTY_SHAPES = {False: {"batch0": dict(batch=0, seqlen=9), "seqlen0": dict(batch=3, seqlen=0)},
                True: {"tokens0": dict(seqlens=[]), "all_sequences_empty": dict(seqlens=[0, 0, 0])}}


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "dsv3"))
def test_empty_inputs_give_empty_outputs_and_zero_grads(core):
    for case in core.cases:
        for name, shape in EMPTY_SHAPES[case.packed].items():
            inputs, cu = core.inputs(case, **shape)
            with labelled(case, name):
                out, lse = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_lse=True)
                lead = inputs["q"].shape[:-1]
                assert out.shape == (*lead, case.head_dims().v) and lse.shape == lead
                out.float().sum().backward()
                for k in TENSOR_ARGS:
                    g = inputs[k].grad
                    assert g is not None and g.shape == inputs[k].shape
                    assert torch.count_nonzero(g) == 0


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"), packed=True)
def test_packed_zero_length_sequences_do_not_disturb_neighbours(core):
    case = core.cases[0]  # any dtype and head dims: the property is about the sequence list
    inputs, cu = core.inputs(case, seqlens=[0, 7, 0, 0, 9, 0])
    assert_matches_reference(torch_mla.mla_attention, inputs, cu_seqlens=cu)


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"))
def test_backward_of_a_sum_takes_an_expanded_grad_out(core):
    """out.sum().backward() hands the backward a grad_out expanded from one element (every stride
    0): its grads are the reference's for a grad_out of ones."""
    for case in core.one_per_layout():
        shape = dict(seqlens=[5, 0, 70]) if case.packed else dict(batch=2, seqlen=37)
        inputs, cu = core.inputs(case, **shape)
        out = torch_mla.mla_attention(**inputs, cu_seqlens=cu)
        grads = torch.autograd.grad(out.sum(), [inputs[k] for k in TENSOR_ARGS])
        ours = {"out": out.detach(), **dict(zip(TENSOR_ARGS, grads))}
        ones = torch.ones(out.shape, dtype=torch.float64, device=core.device)
        with labelled(case):
            if case.dtype == BF16:
                check_lowp_against_reference(ours, inputs, ones, cu_seqlens=cu)
                continue
            ref64 = {k: v.double() for k, v in inputs.items()}
            ref_out, ref_grads = out_and_grads(mla_attention_reference, ref64, ones, cu_seqlens=cu)
            for name, ref in {"out": ref_out, **ref_grads}.items():
                assert max_rel_err(ours[name], ref) <= 1e-5, name


@pytest.mark.cases(dtypes=(FP64,), dims=("tiny",))
def test_gradcheck_float64(core):
    for case in core.cases:
        shape = dict(seqlens=[2, 0, 3, 1]) if case.packed else dict(batch=2, seqlen=3)
        inputs, cu = core.inputs(case, **shape)
        for causal in (True, False):
            def fn(q, kv_latent, k_rope, wkv_b):
                return torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b, causal=causal, cu_seqlens=cu)

            with labelled(case, "causal" if causal else "full"):
                assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in TENSOR_ARGS))


def test_double_backward_is_a_clear_error():
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=5, dtype=torch.float64)
    out = torch_mla.mla_attention(**inputs)
    (grad_q,) = torch.autograd.grad(out.sum(), inputs["q"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


def test_backward_when_lse_is_used():
    """lse is returned but not differentiable (docs/design.md §3): a loss that also uses its value
    backpropagates through out only (the grads are the float64 reference's of out alone), and a
    loss of lse alone has nothing to differentiate."""
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=37, dtype=torch.float64)

    def out_shifted_by_lse(**tensors):
        out, lse = torch_mla.mla_attention(**tensors, return_lse=True)
        assert out.requires_grad and not lse.requires_grad
        return out + lse.unsqueeze(-1)

    _, grads = run_with_grads(out_shifted_by_lse, inputs)
    _, ref_grads = reference_results(inputs, torch.float64)
    for k in TENSOR_ARGS:
        assert max_rel_err(grads[k], ref_grads[k]) <= 1e-10, k
    _, lse = torch_mla.mla_attention(**inputs, return_lse=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


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
