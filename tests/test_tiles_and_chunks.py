"""What the accuracy bodies of test_op.py do not reach: the cpu core's online-softmax rescale across
key tiles (its forward tiles are 64 queries × 256 keys, so S ≤ 256 never rescales), its invariance
to the number of intra-op threads, and the chunking of the composed core and of the max-logit
fallback (docs/design.md §12.2), driven through the test hook torch.ops.torch_mla._set_chunk_elements
with a budget small enough that one call takes several chunks."""
import contextlib

import pytest
import torch

import torch_mla
from torch_mla.reference import mla_attention_reference
from support import (FP32, FP64, SMALL, HeadDims, assert_matches_reference, check_results, labelled, make_inputs,
                     max_rel_err, run_with_grads)

DEFAULT_CHUNK_ELEMENTS = 1 << 25
# The S that straddle one and two key tiles of 256, and one spanning three.
TILE_SEQLENS = [255, 256, 257, 600]


@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
def test_cpu_core_across_key_tiles_matches_reference(dtype):
    """fp64 to 1e-10, fp32 to 1e-5 relative: a missed or doubled rescale of the running sum and
    output when a later key tile raises a row's maximum is far above either."""
    with torch_mla.use_core("cpu"):
        for seqlen in TILE_SEQLENS:
            inputs, _ = make_inputs(SMALL, batch=1, seqlen=seqlen, dtype=dtype)
            for causal in (True, False):
                with labelled(f"S={seqlen}", "causal" if causal else "full"):
                    assert_matches_reference(torch_mla.mla_attention, inputs, causal=causal)
        inputs, cu = make_inputs(SMALL, seqlens=[*TILE_SEQLENS, 1], dtype=dtype)
        with labelled("packed", TILE_SEQLENS):
            assert_matches_reference(torch_mla.mla_attention, inputs, cu_seqlens=cu)


@contextlib.contextmanager
def num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_core_is_bitwise_the_same_on_one_and_two_threads(dtype):
    """What the core computes (out, and the grads of q, kv_latent and k_rope) bit for bit: the
    work is split over threads, never the order of a sum. Several query tiles per sequence,
    several sequences and heads, so that two threads share each pass. grad wkv_b = dKVᵀ·kv_latent
    is one GEMM over all T tokens in the latent layer, where MKL's blocking of the sum follows
    the thread count: it is held to the float64 reference at each thread count instead."""
    dims = HeadDims(heads=4, nope=SMALL.nope, rope=SMALL.rope, v=SMALL.v, latent=SMALL.latent)
    inputs, cu = make_inputs(dims, seqlens=[600, 1, 257, 130], dtype=dtype)
    results = {}
    with torch_mla.use_core("cpu"):
        for threads in (1, 2):
            with num_threads(threads):
                results[threads] = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu)
            with labelled(f"{threads} threads"):
                check_results(results[threads], inputs, cu_seqlens=cu)
    (out1, grads1), (out2, grads2) = results[1], results[2]
    assert torch.equal(out1, out2)
    for k in ("q", "kv_latent", "k_rope"):
        assert torch.equal(grads1[k], grads2[k]), k


@contextlib.contextmanager
def chunk_elements(n):
    """The composed core's and the max-logit fallback's score-chunk budget set to n elements
    (the contract: the hook returns the previous budget; 0 restores the default)."""
    previous = torch.ops.torch_mla._set_chunk_elements(n)
    assert previous == DEFAULT_CHUNK_ELEMENTS
    try:
        yield
    finally:
        assert torch.ops.torch_mla._set_chunk_elements(0) == n


# 5 heads. With a budget of 700 scores the composed core takes min(700 // L, L) query rows and
# then as many heads as fit: L = 12 → all 12 rows, heads 4 + 1 (uneven head chunks); L = 70 → 10
# rows (7 row chunks) of one head (5 head chunks); L = 33 → 21 + 12 rows; L = 1 → all heads. The
# max-logit fallback takes 700 // (H·L) rows per chunk: 2 for L = 70, 1 for L = 33.
CHUNK_DIMS = HeadDims(heads=5, nope=SMALL.nope, rope=SMALL.rope, v=SMALL.v, latent=SMALL.latent)
CHUNK_BUDGET = 700
CHUNK_LAYOUTS = {"packed": dict(seqlens=[12, 0, 70, 1, 33]), "padded": dict(batch=2, seqlen=40)}


@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
def test_composed_core_in_many_chunks_matches_reference(dtype):
    """out, every grad and max_logits (taken from the chunks' scores) against the float64 reference."""
    with torch_mla.use_core("composed"), chunk_elements(CHUNK_BUDGET):
        for layout, shape in CHUNK_LAYOUTS.items():
            inputs, cu = make_inputs(CHUNK_DIMS, dtype=dtype, **shape)
            for causal in (True, False):
                with labelled(layout, "causal" if causal else "full"):
                    assert_matches_reference(torch_mla.mla_attention, inputs, causal=causal, cu_seqlens=cu)
                    assert_max_logits_match(inputs, causal, cu)


def assert_max_logits_match(inputs, causal, cu):
    _, max_logits = torch_mla.mla_attention(**inputs, causal=causal, cu_seqlens=cu, return_max_logits=True)
    ref64 = {k: v.detach().double() for k, v in inputs.items()}
    _, ref = mla_attention_reference(**ref64, causal=causal, cu_seqlens=cu, return_max_logits=True)
    tol = 1e-12 if inputs["q"].dtype == FP64 else 1e-5
    assert max_rel_err(max_logits, ref) <= tol


@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
def test_max_logit_fallback_in_many_chunks_matches_reference(dtype, mla_env):
    """The shared fallback forced on the cpu core (TORCH_MLA_MAX_LOGITS=recompute). Unit-scale
    random inputs leave most rows' lse near the top, so most rows are recomputed, in chunks."""
    mla_env.setenv("TORCH_MLA_MAX_LOGITS", "recompute")
    with torch_mla.use_core("cpu"), chunk_elements(CHUNK_BUDGET):
        for layout, shape in CHUNK_LAYOUTS.items():
            inputs, cu = make_inputs(CHUNK_DIMS, dtype=dtype, requires_grad=False, **shape)
            for causal in (True, False):
                with labelled(layout, "causal" if causal else "full"):
                    assert_max_logits_match(inputs, causal, cu)
