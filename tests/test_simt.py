"""The `simt` core: our CUDA kernels (csrc/torch_mla/cuda) run on CPU tensors by the SIMT emulator
(csrc/simt), so that CI without a GPU tests their indexing, masking and synchronisation.

Beyond the shared bodies of test_op.py & co. (which run on ("cpu", "simt") for the cases of its
served list, support.served_cases): both tuned head shapes ((192, 128) with H ∈ {1, 2, 3}; (96, 64)), bf16 and fp16, padded
and packed batches (lengths 0 and 1 included), causal and not, sequence lengths 1, 63, 64, 65, 127,
128, 129, the atomic and the deterministic backward (the deterministic one bitwise equal across
two runs and two lane orders), non-contiguous inputs, NaN-poisoned memory past each tensor's
logical end, both grid orders (cores/cuda/grid_order.h). Forward and all four grads against the
float64 reference by FlashAttention's rule (docs/design.md §8). The emulator also fails a launch
that touches memory outside the tensors' logical extents, races on shared memory or misuses a
collective.
"""


import pytest
import torch

import torch_mla
from support import (BF16, FP16, TENSOR_ARGS, Core, check_lowp_against_reference, check_results, labelled,
                     make_inputs, nan_padded, run_with_grads, served_cases)

# The simt core's served list (support.served_cases): bf16/fp16 at the two tuned head shapes.
SIMT = Core("cpu", "simt", served_cases("cpu", "simt"))
# Head counts per shape (192x128 with one, two and three heads); small latents: the core never
# sees them, and the float64 reference is cheaper.
HEADS = {"dsv3": (1, 2, 3), "minicpm3": (2,)}
LATENT = 64
SEQLENS = [1, 63, 64, 65, 127, 128, 129]
# Every length above in one packed call, with empty and one-token sequences between them.
PACKED = [1, 63, 0, 64, 65, 127, 0, 128, 129, 1]


@pytest.fixture(autouse=True)
def simt(monkeypatch):
    """Every test forces the simt core, in the emulator's default (forward) lane order."""
    monkeypatch.delenv("TORCH_MLA_SIMT_ORDER", raising=False)
    with torch_mla.use_core("simt"):
        yield


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


def case(dtype, dims, packed):
    """A case of SIMT's list (an error if it is not listed)."""
    return next(c for c in SIMT.cases if (c.dtype, c.dims, c.packed) == (dtype, dims, packed))


def simt_inputs(c, heads=2, **kwargs):
    return SIMT.inputs(c, heads=heads, latent=LATENT, **kwargs)


def run_and_check(inputs, **kwargs):
    results = run_with_grads(torch_mla.mla_attention, inputs, **kwargs)
    check_results(results, inputs, **kwargs)
    return results


def test_packed_matches_reference(deterministic):
    for c in SIMT.cases:
        if not c.packed:
            continue
        for heads in HEADS[c.dims]:
            inputs, cu = simt_inputs(c, heads, seqlens=PACKED)
            for causal in (True, False):
                with labelled(c, f"H={heads}", "causal" if causal else "full"):
                    run_and_check(inputs, causal=causal, cu_seqlens=cu)


def test_padded_matches_reference(deterministic):
    """Each length padded, in both shapes; dtype and masking alternate over the lengths."""
    for dims in ("dsv3", "minicpm3"):
        for i, seqlen in enumerate(SEQLENS):
            c, causal = case((BF16, FP16)[i % 2], dims, False), i % 3 != 2
            inputs, _ = simt_inputs(c, batch=2, seqlen=seqlen)
            with labelled(c, f"S={seqlen}", "causal" if causal else "full"):
                run_and_check(inputs, causal=causal)


def run_in_order(monkeypatch, order, inputs, cu):
    monkeypatch.setenv("TORCH_MLA_SIMT_ORDER", order)
    return run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dims,heads", [("dsv3", 3), ("minicpm3", 2)], ids=["192x128-h3", "96x64-h2"])
def test_deterministic_backward_is_bitwise_equal_across_runs_and_lane_orders(monkeypatch, dims, heads, dtype):
    inputs, cu = simt_inputs(case(dtype, dims, True), heads, seqlens=[65, 1, 0, 129])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_in_order(monkeypatch, "forward", inputs, cu)
        check_results(first, inputs, cu_seqlens=cu)
        for order in ("forward", "reverse", "random:7"):
            out, grads = run_in_order(monkeypatch, order, inputs, cu)
            assert torch.equal(out, first[0]), order
            for k in TENSOR_ARGS:
                assert torch.equal(grads[k], first[1][k]), (order, k)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_atomic_backward_matches_reference_in_every_lane_order(monkeypatch):
    inputs, cu = simt_inputs(case(BF16, "dsv3", True), seqlens=[65, 1, 0, 129])
    for order in ("reverse", "random:3"):
        check_results(run_in_order(monkeypatch, order, inputs, cu), inputs, cu_seqlens=cu)


def test_bad_lane_order_is_an_error(monkeypatch):
    inputs, cu = simt_inputs(case(BF16, "minicpm3", True), seqlens=[3], requires_grad=False)
    monkeypatch.setenv("TORCH_MLA_SIMT_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="TORCH_MLA_SIMT_ORDER"):
        torch_mla.mla_attention(**inputs, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dims", ["dsv3", "minicpm3"], ids=["192x128-h2", "96x64-h2"])
def test_non_contiguous_inputs_with_nan_past_their_ends(deterministic, dims, dtype):
    """q and grad_out are views whose neighbouring rows and columns are NaN, kv_latent and k_rope
    the two halves of one NaN-padded kv_a_proj_with_mqa output, wkv_b a view with NaN columns: none is
    contiguous, and a read past any tensor's logical end would bring NaN in (the emulator also
    refuses any access outside the extents the core registers)."""
    seqlens = [65, 1, 0, 130]
    T = sum(seqlens)
    c = case(dtype, dims, True)
    inputs, cu = simt_inputs(c, seqlens=seqlens, requires_grad=False)
    dims = c.head_dims(latent=LATENT)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(T, dims.heads, dims.v, generator=gen).to(dtype)

    q_buf, _ = nan_padded(inputs["q"], 64, 8)
    kv_a_buf, _ = nan_padded(torch.cat([inputs["kv_latent"], inputs["k_rope"]], dim=-1), 64, 8)
    _, grad_out_view = nan_padded(grad_out, 64, 8)
    _, wkv_b_t = nan_padded(inputs["wkv_b"], 0, 8)
    q_buf.requires_grad_(True)
    kv_a_buf.requires_grad_(True)
    wkv_b_t.requires_grad_(True)
    views = dict(q=q_buf[:T, :, : dims.nope + dims.rope], kv_latent=kv_a_buf[:T, : dims.latent],
                 k_rope=kv_a_buf[:T, dims.latent: dims.latent + dims.rope], wkv_b=wkv_b_t)
    for name, v in views.items():
        assert not v.is_contiguous(), name

    out = torch_mla.mla_attention(**views, cu_seqlens=cu)
    grads = dict(zip(TENSOR_ARGS, torch.autograd.grad(out, [views[k] for k in TENSOR_ARGS], grad_out_view)))
    check_lowp_against_reference({"out": out.detach(), **grads}, inputs, grad_out, cu_seqlens=cu)


def test_set_grid_order_returns_the_previous_and_refuses_other_names():
    set_order = torch.ops.torch_mla._set_grid_order
    assert set_order("head_fastest") == "query_fastest"  # the default
    try:
        assert set_order("head_fastest") == "head_fastest"
        with pytest.raises(ValueError, match='"query_fastest" or "head_fastest", got "sideways"'):
            set_order("sideways")
    finally:
        assert set_order("query_fastest") == "head_fastest"  # unchanged by the refused name


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_both_grid_orders_match_reference_and_each_other(deterministic, layout):
    """FlashAttention's order (query blocks fastest; key blocks in the dK/dV pass) and the old one
    (heads fastest): every CTA computes the same tile either way, so out, and with the
    deterministic backward every grad, are bitwise equal between the orders; the atomic backward
    adds dQ and dk_rope in whatever order the emulator's workers reach the CTAs: each order
    against the reference. Three heads and several query / key blocks per sequence, so that the
    orders differ in every index."""
    c = case(BF16, "dsv3", layout == "packed")
    shape = dict(seqlens=[130, 1, 0, 65]) if layout == "packed" else dict(batch=2, seqlen=129)
    inputs, cu = simt_inputs(c, 3, **shape)
    for causal in (True, False):
        results = {}
        for order in ("query_fastest", "head_fastest"):
            with torch_mla.cores.grid_order(order), labelled(c, order, "causal" if causal else "full"):
                results[order] = run_and_check(inputs, causal=causal, cu_seqlens=cu)
        (out_q, grads_q), (out_h, grads_h) = results["query_fastest"], results["head_fastest"]
        assert torch.equal(out_q, out_h), causal
        if deterministic:
            for k in TENSOR_ARGS:
                assert torch.equal(grads_q[k], grads_h[k]), (causal, k)


def test_auto_never_takes_simt():
    inputs, cu = make_inputs(case(BF16, "minicpm3", True).head_dims(), dtype=BF16, seqlens=[3, 5],
                             requires_grad=False)
    with torch_mla.use_core("auto"):
        choice = torch_mla.explain(*(inputs[k] for k in TENSOR_ARGS), cu_seqlens=cu)
    assert choice.core != "simt" and choice.reasons["simt"] is None
