"""mla_sparse_attention (docs/design.md §16) against its float64 specification, the index mask on
mla_attention's reference: accuracy padded and packed, the dense case, the saved set, PyTorch's
tooling and bad input."""
import math

import pytest
import torch

import torch_mla
from torch_mla.reference import mla_attention_reference, mla_sparse_attention_reference
from support import BF16, DSV3, FP32, FP64, SMALL, TENSOR_ARGS, TINY, cu_seqlens_of, make_inputs, max_abs_err, max_rel_err

SPARSE_CORES = ("auto", "composed", "cpu")


def random_topk(lengths, k, seed, padded=False):
    """Per query a random set of at most k distinct positions of its own sequence — some past the
    query (ignored, causal) — padded with -1 and shuffled: (T, k), or (B, S, k) when `padded`."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        for _ in range(length):
            count = int(torch.randint(0, min(k, length) + 1, (), generator=gen))
            chosen = torch.randperm(length, generator=gen)[:count]
            row = torch.cat([chosen, torch.full((k - count,), -1, dtype=torch.long)])
            rows.append(row[torch.randperm(k, generator=gen)])
    topk = torch.stack(rows).int() if rows else torch.empty(0, k, dtype=torch.int32)
    return topk.view(len(lengths), lengths[0], k) if padded else topk


def prefix_topk(lengths, k, seed, padded=False):
    """Per query its whole causal prefix 0..t in a random order, plus positions past it and -1."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        assert length <= k
        for t in range(length):
            row = torch.cat([torch.arange(length), torch.full((k - length,), -1)])
            rows.append(row[torch.randperm(k, generator=gen)])
    topk = torch.stack(rows).int() if rows else torch.empty(0, k, dtype=torch.int32)
    return topk.view(len(lengths), lengths[0], k) if padded else topk


def out_lse_grads(fn, inputs, topk, grad_out_seed=1, **kwargs):
    """out, lse and the four grads of fn on fresh leaves, for a fixed random grad_out."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out, lse = fn(**leaves, topk_indices=topk, return_lse=True, **kwargs)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [leaves[k] for k in TENSOR_ARGS], grad_out)
    return {"out": out.detach(), "lse": lse, **dict(zip(TENSOR_ARGS, grads))}


# (label, layout kwargs for make_inputs, lengths, k): lengths 0, 1, < k and > k.
SHAPES = [
    ("padded S>k", dict(batch=2, seqlen=9), [9, 9], 4),
    ("padded S<k", dict(batch=2, seqlen=3), [3, 3], 4),
    ("packed", dict(seqlens=[3, 0, 1, 9, 6]), [3, 0, 1, 9, 6], 4),
]


def shape_inputs(shape, dtype, seed=0):
    label, layout, lengths, k = shape
    inputs, cu = make_inputs(SMALL, dtype=dtype, seed=seed, requires_grad=False, **layout)
    topk = random_topk(lengths, k, seed, padded=cu is None)
    return inputs, cu, topk


@pytest.mark.parametrize("sparse_core", SPARSE_CORES)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_reference(shape, dtype, sparse_core):
    """fp32 ≤ 1e-5 relative, bf16 by FlashAttention's rule (2× / 3× the naive bf16 error)."""
    inputs, cu, topk = shape_inputs(shape, dtype)
    with torch_mla.use_core(sparse_core):
        ours = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
    ref = out_lse_grads(mla_sparse_attention_reference, {k: v.double() for k, v in inputs.items()}, topk,
                        cu_seqlens=cu)
    naive = out_lse_grads(mla_sparse_attention_reference, inputs, topk, cu_seqlens=cu)
    for name in ("out", *TENSOR_ARGS):
        assert torch.isfinite(ours[name]).all(), name
        assert ours[name].dtype == inputs.get(name, inputs["q"]).dtype
        if dtype == FP32:
            err = max_rel_err(ours[name], ref[name])
            print(f"\n{shape[0]} fp32 {sparse_core} {name}: max relative error {err:.3g}", end="")
            assert err <= 1e-5, f"{name}: {err:.3g}"
        else:
            factor = 2 if name == "out" else 3
            err, naive_err = max_abs_err(ours[name], ref[name]), max_abs_err(naive[name], ref[name])
            print(f"\n{shape[0]} bf16 {sparse_core} {name}: max error {err:.3g} (naive bf16 {naive_err:.3g}, "
                  f"relative {max_rel_err(ours[name], ref[name]):.3g})", end="")
            assert err <= factor * naive_err, f"{name}: {err:.3g} > {factor} × {naive_err:.3g}"
    # lse: -inf exactly where a query selects nothing, else close to the reference.
    none = torch.isinf(ref["lse"])
    assert torch.equal(torch.isinf(ours["lse"]), none)
    assert (ours["lse"][none] < 0).all()
    tol = 1e-5 if dtype == FP32 else 2e-2
    assert max_abs_err(ours["lse"][~none], ref["lse"][~none]) <= tol


def test_several_query_chunks_match_reference():
    """DeepSeek-V3 head dims and k = 64: the composed core's chunk holds 53 queries (2^22 elements,
    cores/composed/sparse_composed_core.cpp), so these 120 queries take three chunks."""
    lengths = [70, 50]
    inputs, cu = make_inputs(DSV3, seqlens=lengths, requires_grad=False)
    topk = random_topk(lengths, 64, seed=7)
    with torch_mla.use_core("composed"):
        ours = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
    ref = out_lse_grads(mla_sparse_attention_reference, {k: v.double() for k, v in inputs.items()}, topk,
                        cu_seqlens=cu)
    for name in ("out", *TENSOR_ARGS):
        assert max_rel_err(ours[name], ref[name]) <= 1e-5, name


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_cpu_core_over_several_blocks_and_threads(dtype):
    """DeepSeek-V3 head dims, k = 64, 120 queries: the cpu sparse core's 8 query blocks of 16, and on
    two threads a backward of two parts whose accumulators are summed (sparse_cpu_core.cpp); against
    the float64 reference (fp32 ≤ 1e-5 relative, bf16 by the 2× / 3× rule)."""
    lengths = [70, 50]
    inputs, cu = make_inputs(DSV3, seqlens=lengths, dtype=dtype, requires_grad=False)
    topk = random_topk(lengths, 64, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_mla.use_core("cpu"):
            ours = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
    finally:
        torch.set_num_threads(threads)
    ref = out_lse_grads(mla_sparse_attention_reference, {k: v.double() for k, v in inputs.items()}, topk,
                        cu_seqlens=cu)
    naive = out_lse_grads(mla_sparse_attention_reference, inputs, topk, cu_seqlens=cu)
    for name in ("out", *TENSOR_ARGS):
        if dtype == FP32:
            assert max_rel_err(ours[name], ref[name]) <= 1e-5, name
        else:
            factor = 2 if name == "out" else 3
            assert max_abs_err(ours[name], ref[name]) <= factor * max_abs_err(naive[name], ref[name]), name


def test_cpu_core_backward_is_bitwise_repeatable_on_two_threads():
    """The dK/dV scatter and dWk/dWv sums of the cpu sparse core are deterministic (per-part
    accumulators added in part order, docs/design.md §16.4): two runs on two threads, the same
    bits. Many queries select the same few keys, so the scatter-adds overlap."""
    lengths = [96, 64]
    inputs, cu = make_inputs(DSV3, seqlens=lengths, requires_grad=False)
    topk = random_topk(lengths, 16, seed=11)
    topk[topk > 8] = -1  # every selection within each sequence's first 9 positions
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_mla.use_core("cpu"):
            runs = [out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("dtype", [FP32, FP64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_cpu_core_equals_composed(shape, dtype):
    """The two absorbed-form cores agree to rounding: out, lse, the four grads and max_logits."""
    inputs, cu, topk = shape_inputs(shape, dtype)
    results = {}
    for core in ("cpu", "composed"):
        with torch_mla.use_core(core):
            results[core] = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
            results[core]["max_logits"] = torch_mla.mla_sparse_attention(
                **inputs, topk_indices=topk, cu_seqlens=cu, return_max_logits=True)[1]
    tol = 1e-5 if dtype == FP32 else 1e-12
    for name, value in results["cpu"].items():
        finite = torch.isfinite(results["composed"][name])
        assert torch.equal(torch.isfinite(value), finite), name
        assert max_rel_err(value[finite], results["composed"][name][finite]) <= tol, name


def test_auto_runs_the_cpu_sparse_core_on_cpu_tensors():
    """auto on CPU tensors (indices that are not every causal prefix) takes the cpu sparse core:
    its results equal, bit for bit, those of the core forced, and differ from the composed core's
    (so the comparison tells the cores apart); explain names it."""
    inputs, cu, topk = shape_inputs(SHAPES[2], FP32)
    runs = {}
    for core in SPARSE_CORES:
        with torch_mla.use_core(core):
            runs[core] = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
    assert all(torch.equal(runs["auto"][k], runs["cpu"][k]) for k in runs["auto"])
    assert not all(torch.equal(runs["auto"][k], runs["composed"][k]) for k in runs["auto"])
    choice = torch_mla.explain(*(inputs[k] for k in TENSOR_ARGS), topk_indices=topk, cu_seqlens=cu)
    assert choice.core == "cpu" and not choice.dense_shortcut


def test_rows_without_a_selection_give_zero_and_minus_inf():
    """−1 everywhere, or only entries past the query: out 0, lse −inf, no gradient through the row."""
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=6, requires_grad=False)
    topk = random_topk([6], 3, seed=5, padded=True)
    topk[0, 2] = -1                       # nothing
    topk[0, 3] = torch.tensor([5, -1, 4])  # only positions past the query
    for core in SPARSE_CORES:
        with torch_mla.use_core(core):
            ours = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk)
        for t in (2, 3):
            assert torch.equal(ours["out"][0, t], torch.zeros_like(ours["out"][0, t]))
            assert torch.equal(ours["lse"][0, t], torch.full_like(ours["lse"][0, t], -math.inf))
            assert torch.equal(ours["q"][0, t], torch.zeros_like(ours["q"][0, t]))


def test_zero_width_selection():
    """k = 0: every query selects nothing."""
    inputs, cu = make_inputs(SMALL, seqlens=[3, 2], requires_grad=False)
    ours = out_lse_grads(torch_mla.mla_sparse_attention, inputs, torch.empty(5, 0, dtype=torch.int32), cu_seqlens=cu)
    assert torch.equal(ours["out"], torch.zeros_like(ours["out"]))
    assert torch.equal(ours["lse"], torch.full_like(ours["lse"], -math.inf))
    assert all(torch.equal(ours[k], torch.zeros_like(ours[k])) for k in TENSOR_ARGS)


@pytest.mark.parametrize("sparse_core", ["composed", "cpu"])
def test_index_order_and_padding_do_not_matter(sparse_core):
    """Permuting a row, or adding −1 and entries past the query, gives the same results."""
    inputs, cu = make_inputs(SMALL, seqlens=[7, 4], requires_grad=False)
    topk = random_topk([7, 4], 5, seed=3)
    wider = torch.cat([topk, torch.full((11, 2), -1, dtype=torch.int32)], 1)
    shuffled = wider[:, torch.randperm(7, generator=torch.Generator().manual_seed(0))]
    with torch_mla.use_core(sparse_core):
        first = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
        second = out_lse_grads(torch_mla.mla_sparse_attention, inputs, shuffled.contiguous(), cu_seqlens=cu)
    for name in first:  # lse is −inf, equal in both, where a query selects nothing
        torch.testing.assert_close(second[name], first[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("sparse_core", ["composed", "cpu"])
def test_gradcheck_float64(sparse_core):
    inputs, cu = make_inputs(TINY, seqlens=[4, 1, 3], dtype=FP64)
    topk = random_topk([4, 1, 3], 3, seed=2)
    with torch_mla.use_core(sparse_core):
        assert torch.autograd.gradcheck(
            lambda q, c, r, w: torch_mla.mla_sparse_attention(q, c, r, w, topk, cu_seqlens=cu),
            tuple(inputs[k] for k in TENSOR_ARGS))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_full_selection_equals_dense_attention(packed):
    """k ≥ every length and every prefix selected: the dense shortcut is mla_attention (causal)
    exactly; the sparse cores, forced, agree to float32 rounding."""
    lengths = [5, 0, 3, 7] if packed else [7, 7]
    layout = dict(seqlens=lengths) if packed else dict(batch=2, seqlen=7)
    inputs, cu = make_inputs(SMALL, requires_grad=False, **layout)
    topk = prefix_topk(lengths, 9, seed=4, padded=not packed)
    dense = out_lse_grads(lambda topk_indices, **kw: torch_mla.mla_attention(**kw), inputs, topk, cu_seqlens=cu)
    shortcut = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
    forced = {}
    for core in ("composed", "cpu"):
        with torch_mla.use_core(core):
            forced[core] = out_lse_grads(torch_mla.mla_sparse_attention, inputs, topk, cu_seqlens=cu)
    for name in dense:
        assert torch.equal(shortcut[name], dense[name]), name
        for core, results in forced.items():
            assert max_rel_err(results[name], dense[name]) <= 1e-5, f"{core} {name}"


def test_max_logits_over_the_selected_pairs():
    inputs, cu, topk = shape_inputs(SHAPES[2], FP32)
    ref = mla_sparse_attention_reference(**{k: v.double() for k, v in inputs.items()}, topk_indices=topk,
                                         cu_seqlens=cu, return_max_logits=True)[1]
    for core in SPARSE_CORES:
        with torch_mla.use_core(core):
            _, max_logits = torch_mla.mla_sparse_attention(**inputs, topk_indices=topk, cu_seqlens=cu,
                                                           return_max_logits=True)
        assert max_logits.shape == (SMALL.heads,) and max_logits.dtype == torch.float32
        assert max_rel_err(max_logits, ref) <= 1e-5


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_empty_calls(packed):
    """No tokens: empty results, zero grads."""
    layout = dict(seqlens=[0, 0]) if packed else dict(batch=0, seqlen=4)
    inputs, cu = make_inputs(SMALL, **layout)
    topk = torch.empty(*(inputs["q"].shape[:-2]), 4, dtype=torch.int32)
    out, lse = torch_mla.mla_sparse_attention(**inputs, topk_indices=topk, cu_seqlens=cu, return_lse=True)
    assert out.shape == (*inputs["q"].shape[:-1], SMALL.v) and lse.shape == inputs["q"].shape[:-1]
    out.sum().backward()
    assert all(torch.equal(inputs[k].grad, torch.zeros_like(inputs[k])) for k in TENSOR_ARGS)


# ---- the saved set -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_core", SPARSE_CORES)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_saves_exactly_seven_tensors(sparse_core, dtype):
    lengths, k = [9, 9], 4
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=9, dtype=dtype)
    topk = random_topk(lengths, k, seed=0, padded=True)
    with torch_mla.use_core(sparse_core), torch_mla.SavedTensors() as saved:
        out, lse = torch_mla.mla_sparse_attention(**inputs, topk_indices=topk, return_lse=True)
    seven = [inputs["q"], inputs["kv_latent"], inputs["k_rope"], inputs["wkv_b"], topk, out, lse]
    assert all(saved.holds(t) for t in seven)
    assert len(saved.storages) == 7
    assert saved.nbytes == sum(t.untyped_storage().nbytes() for t in seven)


def test_saved_bytes_per_token_are_dense_plus_4k():
    batch, seqlen, k = 1, 32, 8
    inputs, _ = make_inputs(SMALL, batch=batch, seqlen=seqlen)
    topk = random_topk([seqlen], k, seed=0, padded=True)

    def per_token(fn, **kw):
        with torch_mla.SavedTensors() as saved:
            fn(**inputs, **kw)
        return saved.nbytes_excluding(inputs["wkv_b"]) / (batch * seqlen)

    dense, sparse = per_token(torch_mla.mla_attention), per_token(torch_mla.mla_sparse_attention, topk_indices=topk)
    print(f"\nsaved bytes/token (fp32, SMALL dims, k={k}): dense {dense:.0f}, sparse {sparse:.0f}")
    assert sparse == dense + 4 * k


# ---- PyTorch's tooling ---------------------------------------------------------------------------


def op_args(inputs, cu, topk, core="composed"):
    return (inputs["q"], inputs["kv_latent"], inputs["k_rope"], inputs["wkv_b"], topk,
            SMALL_SCALE, cu, 0, core, False)


SMALL_SCALE = (SMALL.nope + SMALL.rope) ** -0.5


@pytest.mark.parametrize("sparse_core", ["composed", "cpu"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=["padded", "packed"])
def test_opcheck(shape, sparse_core):
    inputs, cu, topk = shape_inputs(shape, FP32)
    args = op_args(inputs, cu, topk, sparse_core)
    torch.library.opcheck(torch.ops.torch_mla.mla_sparse_attention.default, args)
    out, lse, _ = torch.ops.torch_mla.mla_sparse_attention(*args)
    torch.library.opcheck(torch.ops.torch_mla.mla_sparse_attention_backward.default,
                          (torch.randn_like(out), *args[:5], out, lse, *args[5:9]))


def sparse_loss(q, kv_latent, k_rope, wkv_b, topk_indices, cu_seqlens=None):
    out = torch_mla.mla_sparse_attention(q, kv_latent, k_rope, wkv_b, topk_indices, cu_seqlens=cu_seqlens)
    return out.float().square().sum()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compile_fullgraph_dynamic_matches_eager(packed):
    torch._dynamo.reset()
    compiled = torch.compile(sparse_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for n, lengths in enumerate(([3, 11, 0], [8, 1, 5, 2]) if packed else ([9, 9], [13, 13])):
        layout = dict(seqlens=lengths) if packed else dict(batch=len(lengths), seqlen=lengths[0])
        inputs, cu = make_inputs(SMALL, requires_grad=False, seed=n, **layout)
        topk = random_topk(lengths, 5, seed=n, padded=not packed)
        results = []
        for fn in (sparse_loss, compiled):
            leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
            loss = fn(**leaves, topk_indices=topk, cu_seqlens=cu)
            results.append((loss, torch.autograd.grad(loss, [leaves[k] for k in TENSOR_ARGS])))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_runs_in_the_autocast_dtype():
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=9, requires_grad=False)
    topk = random_topk([9, 9], 4, seed=0, padded=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch_mla.mla_sparse_attention(**inputs, topk_indices=topk)
    expected = torch_mla.mla_sparse_attention(**{k: v.bfloat16() for k, v in inputs.items()}, topk_indices=topk)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


# ---- bad input -----------------------------------------------------------------------------------


def bad_call(packed=False, **replace):
    lengths = [3, 4] if packed else [4, 4]
    layout = dict(seqlens=lengths) if packed else dict(batch=2, seqlen=4)
    inputs, cu = make_inputs(SMALL, requires_grad=False, **layout)
    args = {**inputs, "topk_indices": random_topk(lengths, 3, seed=0, padded=not packed), "cu_seqlens": cu}
    args.update(replace)
    return torch_mla.mla_sparse_attention(**args)


def with_entry(packed, row, values):
    topk = random_topk([3, 4] if packed else [4, 4], 3, seed=0, padded=not packed)
    topk.view(-1, 3)[row] = torch.tensor(values, dtype=torch.int32)
    return topk


BAD = {
    "int64 indices": (False, dict(topk_indices=torch.zeros(2, 4, 3, dtype=torch.int64)),
                      r"topk_indices must be int32 of shape \(B, S, k\), got Long"),
    "indices rank": (False, dict(topk_indices=torch.zeros(8, 3, dtype=torch.int32)),
                     r"topk_indices must have shape \(B, S, k\) \(padded batch\), got a 2-D"),
    "indices length": (False, dict(topk_indices=torch.zeros(2, 5, 3, dtype=torch.int32)),
                       r"topk_indices must have shape \(B, S, k\) with S = 4 \(from q\)"),
    "packed indices rows": (True, dict(topk_indices=torch.zeros(8, 3, dtype=torch.int32)),
                            r"topk_indices must have shape \(T, k\) with T = 7 \(from q\)"),
    "indices device": (False, dict(topk_indices=torch.zeros(2, 4, 3, dtype=torch.int32, device="meta")),
                       r"topk_indices must be on the same device as q"),
    "q rank, renamed": (False, dict(q=torch.randn(8, SMALL.heads, SMALL.nope + SMALL.rope)),
                        r"^torch_mla.mla_sparse_attention: q must have shape \(B, S, H, Dn\+Dr\)"),
    "outside the sequence": (False, dict(topk_indices=with_entry(False, 6, [1, 4, -1])),
                             r"topk_indices\[1, 2\] holds 4, outside its sequence of length 4"),
    "below -1": (False, dict(topk_indices=with_entry(False, 0, [-2, -1, -1])),
                 r"topk_indices\[0, 0\] holds -2, outside its sequence"),
    "packed outside": (True, dict(topk_indices=with_entry(True, 2, [0, 3, -1])),
                       r"topk_indices\[2\] \(sequence 0, position 2\) holds 3, outside its sequence of length 3"),
    "repeated": (True, dict(topk_indices=with_entry(True, 4, [1, -1, 1])),
                 r"topk_indices\[4\] \(sequence 1, position 1\) holds 1 twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    packed, replace, message = BAD[case]
    for core in SPARSE_CORES:
        with torch_mla.use_core(core), pytest.raises(ValueError, match=message):
            bad_call(packed, **replace)


def test_a_core_without_a_sparse_form_is_named():
    message = r'core "efficient" has no sparse form; a sparse call takes one of: auto, cpu, composed'
    with torch_mla.use_core("efficient"), pytest.raises(ValueError, match=message):
        bad_call()


# ---- explain -------------------------------------------------------------------------------------


def explain_sparse(inputs, topk, cu=None, **kwargs):
    return torch_mla.explain(*(inputs[k] for k in TENSOR_ARGS), topk_indices=topk, cu_seqlens=cu, **kwargs)


def test_explain_a_sparse_call():
    """Which sparse core runs and why each other core's sparse form declines, and why the dense
    shortcut does not take the call."""
    inputs, cu, topk = shape_inputs(SHAPES[2], FP32)
    choice = explain_sparse(inputs, topk, cu)
    assert choice.sparse and choice.core == "cpu" and not choice.dense_shortcut
    assert tuple(choice.reasons) == ("dense shortcut", *torch_mla.cores.names())
    assert choice.reasons["dense shortcut"] == "a row selects less than its whole causal prefix"
    assert choice.reasons["cpu"] is None and choice.reasons["composed"] is None
    for core in ("cudnn", "cuda", "efficient", "simt"):
        assert choice.reasons[core] == "has no sparse form", core
    assert "runs this sparse call on the 'cpu' core" in str(choice)
    with torch_mla.use_core("composed"):
        forced = explain_sparse(inputs, topk, cu)
    assert forced.core == "composed"
    assert forced.reasons["dense shortcut"] == 'a sparse core is named; only "auto" takes the shortcut'
    assert explain_sparse(inputs, topk, cu, core="cpu").core == "cpu"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_explain_the_dense_shortcut(packed):
    """Every row selecting its whole causal prefix: the call runs as mla_attention, on the core
    explain names for that dense call."""
    lengths = [5, 0, 3, 7] if packed else [7, 7]
    layout = dict(seqlens=lengths) if packed else dict(batch=2, seqlen=7)
    inputs, cu = make_inputs(SMALL, requires_grad=False, **layout)
    topk = prefix_topk(lengths, 9, seed=4, padded=not packed)
    choice = explain_sparse(inputs, topk, cu)
    assert choice.dense_shortcut and choice.reasons["dense shortcut"] is None
    assert choice.core == torch_mla.explain(*(inputs[k] for k in TENSOR_ARGS), cu_seqlens=cu).core
    assert "as dense causal attention" in str(choice)


@pytest.mark.parametrize("case", ["outside the sequence", "repeated", "indices length"])
def test_explain_checks_a_sparse_call_as_the_call_does(case):
    packed, replace, message = BAD[case]
    lengths = [3, 4] if packed else [4, 4]
    layout = dict(seqlens=lengths) if packed else dict(batch=2, seqlen=4)
    inputs, cu = make_inputs(SMALL, requires_grad=False, **layout)
    with pytest.raises(ValueError, match=message):
        explain_sparse(inputs, replace["topk_indices"], cu)
