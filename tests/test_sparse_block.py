"""The DSA block (docs/design.md §13.7): mla_attention_block with topk_indices, whose attention is
mla_sparse_attention, against the float64 composition of the block's projections and
mla_sparse_attention_reference; the dense block where the selection is every prefix; the saved set
(the dense block's plus topk_indices); PyTorch's tooling; and bad indices, named as the sparse op
names them."""
import math

import pytest
import torch

import torch_mla
from torch_mla.ops import mla_attention_block
from torch_mla.reference import mla_sparse_attention_reference
from support import BF16, FP32, FP64, OpCounter, cu_seqlens_of, max_abs_err, max_rel_err, rope_spec
from test_sparse import prefix_topk, random_topk

# 3 heads: head_chunks 2 makes uneven groups (2 + 1).
DIMS = dict(heads=3, nope=8, rope=4, v=6, latent=10, q_latent=12, hidden=9)
SCALE, Q_EPS, KV_EPS = 0.3, 1e-5, 1e-4
BLOCK_TENSORS = ("q_a", "q_norm_weight", "wq_b", "kv_a", "kv_norm_weight", "wkv_b", "wo", "bo", "cos", "sin")
SPARSE_CORES = ("auto", "composed")

# (lead dims, lengths, k): padded S > k, packed with lengths 0, 1, < k and > k.
LAYOUTS = {"padded": ((2, 11), [11, 11], 4), "packed": ((25,), [5, 0, 1, 11, 8], 4)}


def block_inputs(lead, dims=DIMS, dtype=FP64, seed=0, with_q_norm=True, with_bias=True):
    """Unit-scale inputs of the block op (cos/sin of random angles, scaled by 1.2 as YaRN's factor)."""
    d = dims
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=FP64) * scale).to(dtype)

    angles = torch.rand(*lead, d["rope"] // 2, generator=gen, dtype=FP64) * 6.28
    return dict(
        q_a=rand(*lead, d["q_latent"]),
        q_norm_weight=rand(d["q_latent"]) + 1 if with_q_norm else None,
        wq_b=rand(d["heads"] * (d["nope"] + d["rope"]), d["q_latent"], scale=d["q_latent"] ** -0.5),
        kv_a=rand(*lead, d["latent"] + d["rope"]),
        kv_norm_weight=rand(d["latent"]) + 1,
        wkv_b=rand(d["heads"] * (d["nope"] + d["v"]), d["latent"], scale=d["latent"] ** -0.5),
        wo=rand(d["hidden"], d["heads"] * d["v"], scale=(d["heads"] * d["v"]) ** -0.5),
        bo=rand(d["hidden"]) if with_bias else None,
        cos=(angles.cos() * 1.2).to(dtype),
        sin=(angles.sin() * 1.2).to(dtype),
    )


def block_reference(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, *, topk_indices,
                    num_heads, rope_interleave=True, cu_seqlens=None, **_):
    """The block's spec in the inputs' dtype: its projections, norms and RoPE written out, the
    attention mla_sparse_attention_reference."""
    def rms_norm(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    dim_latent = wkv_b.shape[1]
    dim_rope = kv_a.shape[-1] - dim_latent
    c_q = q_a if q_norm_weight is None else rms_norm(q_a, q_norm_weight, Q_EPS)
    q = (c_q @ wq_b.t()).unflatten(-1, (num_heads, -1))
    q = torch.cat((q[..., :-dim_rope], rope_spec(q[..., -dim_rope:], cos.unsqueeze(-2), sin.unsqueeze(-2),
                                                 rope_interleave)), -1)
    kv_latent = rms_norm(kv_a[..., :dim_latent], kv_norm_weight, KV_EPS)
    k_rope = rope_spec(kv_a[..., dim_latent:], cos, sin, rope_interleave)
    out = mla_sparse_attention_reference(q, kv_latent, k_rope, wkv_b, topk_indices, softmax_scale=SCALE,
                                         cu_seqlens=cu_seqlens)
    y = out.flatten(-2) @ wo.t()
    return y if bo is None else y + bo


def block_op(**kwargs):
    return mla_attention_block(**kwargs, softmax_scale=SCALE, q_norm_eps=Q_EPS, kv_norm_eps=KV_EPS)


def out_and_grads(fn, inputs, **kwargs):
    """fn's output and the grad of every tensor input, on fresh leaves, for a fixed random grad_y."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, num_heads=DIMS["heads"], **kwargs)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=FP64).to(y.dtype)
    names = [k for k in BLOCK_TENSORS if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], grad_y)
    return {"out": y.detach(), **dict(zip(names, grads))}


def layout(name, dtype=FP32, seed=0):
    lead, lengths, k = LAYOUTS[name]
    packed = name == "packed"
    inputs = block_inputs(lead, dtype=dtype, seed=seed)
    return inputs, random_topk(lengths, k, seed, padded=not packed), cu_seqlens_of(lengths) if packed else None


def head_groups(head_chunks):
    return math.ceil(DIMS["heads"] / math.ceil(DIMS["heads"] / head_chunks))


@pytest.mark.parametrize("head_chunks", [1, 2], ids=["one-group", "uneven-groups"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matches_float64_reference(name, dtype, head_chunks):
    """out and every input's grad: fp32 ≤ 1e-5 relative, bf16 within 2× (out) / 3× (grads) the naive
    bf16 composition's error. The backward ran the sparse op's backward once per head group."""
    inputs, topk, cu = layout(name, dtype)
    with OpCounter() as counter:
        ours = out_and_grads(block_op, inputs, topk_indices=topk, cu_seqlens=cu, head_chunks=head_chunks)
    assert counter.counts["mla_sparse_attention_backward"] == head_groups(head_chunks)
    assert counter.counts["mla_attention_backward"] == 0
    ref = out_and_grads(block_reference, {k: v.double() for k, v in inputs.items()}, topk_indices=topk,
                        cu_seqlens=cu)
    naive = out_and_grads(block_reference, inputs, topk_indices=topk, cu_seqlens=cu)
    assert ours.keys() == ref.keys() == set(["out", *BLOCK_TENSORS])
    for key in ref:
        assert ours[key].dtype == dtype and torch.isfinite(ours[key]).all(), key
        if dtype == FP32:
            err = max_rel_err(ours[key], ref[key])
            assert err <= 1e-5, f"{key}: max relative error {err:.3g}"
        else:
            factor = 2 if key == "out" else 3
            err, naive_err = max_abs_err(ours[key], ref[key]), max_abs_err(naive[key], ref[key])
            assert err <= factor * naive_err, f"{key}: max error {err:.3g} > {factor} × naive {naive_err:.3g}"


def test_selection_matters():
    """The indices reach the attention: another selection gives another output."""
    inputs, topk, _ = layout("padded")
    first = block_op(**inputs, num_heads=DIMS["heads"], topk_indices=topk)
    second = block_op(**inputs, num_heads=DIMS["heads"], topk_indices=random_topk([11, 11], 4, 9, padded=True))
    assert max_abs_err(first, second) > 1e-2


@pytest.mark.parametrize("interleave", [True, False], ids=["interleave", "half"])
@pytest.mark.parametrize("optional", ["norm-bias", "no-norm-no-bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_float64(packed, optional, interleave):
    lengths, k = ([4, 0, 1, 4], 2) if packed else ([5, 5], 2)
    lead = (sum(lengths),) if packed else (2, 5)
    cu = cu_seqlens_of(lengths) if packed else None
    extras = optional == "norm-bias"
    tiny = dict(heads=2, nope=4, rope=4, v=4, latent=6, q_latent=5, hidden=7)
    inputs = block_inputs(lead, tiny, with_q_norm=extras, with_bias=extras)
    topk = random_topk(lengths, k, 1, padded=not packed)
    names = [key for key, v in inputs.items() if v is not None]

    def fn(*tensors):
        return block_op(**dict(inputs, **dict(zip(names, tensors))), num_heads=2, topk_indices=topk,
                        rope_interleave=interleave, cu_seqlens=cu)

    assert torch.autograd.gradcheck(fn, tuple(inputs[key].requires_grad_() for key in names))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_full_selection_equals_the_dense_block(packed):
    """k ≥ every length and every prefix selected: the sparse layer's dense shortcut makes the block
    the dense block bit for bit; the composed sparse core, forced, agrees to float32 rounding."""
    lengths = [5, 0, 3, 7] if packed else [7, 7]
    inputs = block_inputs((sum(lengths),) if packed else (2, 7), dtype=FP32)
    cu = cu_seqlens_of(lengths) if packed else None
    topk = prefix_topk(lengths, 9, seed=4, padded=not packed)
    dense = out_and_grads(block_op, inputs, cu_seqlens=cu, head_chunks=2)
    shortcut = out_and_grads(block_op, inputs, cu_seqlens=cu, head_chunks=2, topk_indices=topk)
    with torch_mla.use_core("composed"):
        composed = out_and_grads(block_op, inputs, cu_seqlens=cu, head_chunks=2, topk_indices=topk)
    for key in dense:
        assert torch.equal(shortcut[key], dense[key]), key
        assert max_rel_err(composed[key], dense[key]) <= 1e-5, key


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_empty_calls(packed):
    """No tokens: an empty output and zero grads."""
    lead = (0,) if packed else (0, 5)
    inputs = {k: v.requires_grad_() for k, v in block_inputs(lead).items()}
    y = block_op(**inputs, num_heads=DIMS["heads"], topk_indices=torch.empty(*lead, 4, dtype=torch.int32),
                 cu_seqlens=cu_seqlens_of([0, 0]) if packed else None)
    assert y.shape == (*lead, DIMS["hidden"])
    y.sum().backward()
    assert all(not t.grad.any() for t in inputs.values())


# ---- what is saved --------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_core", SPARSE_CORES)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_saves_the_dense_blocks_set_and_the_indices(name, dtype, sparse_core):
    """The same storages, dtypes and bytes as the dense block, plus topk_indices: not q, the
    absorbed q, out, the latent output or lse."""
    inputs, topk, cu = layout(name, dtype)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    with torch_mla.SavedTensors() as dense:
        block_op(**inputs, num_heads=DIMS["heads"], cu_seqlens=cu)
    with torch_mla.use_core(sparse_core), torch_mla.SavedTensors() as sparse:
        y = block_op(**inputs, num_heads=DIMS["heads"], cu_seqlens=cu, topk_indices=topk)
    kept = [t for key, t in inputs.items() if key != "bo"]  # the bias's grad needs no tensor
    assert all(sparse.holds(t) for t in (*kept, topk)) and not sparse.holds(y)
    assert len(sparse.storages) == len(dense.storages) + 1
    expected = dense.nbytes_by_dtype()
    expected[torch.int32] = topk.untyped_storage().nbytes()
    assert sparse.nbytes_by_dtype() == expected


def test_saved_bytes_per_token_at_deepseek_v32_head_dims():
    """bf16, DeepSeek-V3.2's latent and head dims (H = 16, k = 2048): per token q_a (Lq) and kv_a
    (Dc+Dr) in bf16, the two rstd and cos/sin in float32, and 4·k for the indices."""
    lq, dc, dr, k, seqlen = 1536, 512, 64, 2048, 16
    dims = dict(heads=16, nope=128, rope=dr, v=128, latent=dc, q_latent=lq, hidden=64)
    inputs = {key: v.requires_grad_() for key, v in block_inputs((1, seqlen), dims, BF16).items()}
    inputs["cos"], inputs["sin"] = inputs["cos"].float(), inputs["sin"].float()
    topk = random_topk([seqlen], k, 0, padded=True)
    weights = [inputs[key] for key in ("q_norm_weight", "wq_b", "kv_norm_weight", "wkv_b", "wo", "bo")]
    with torch_mla.SavedTensors() as saved:
        block_op(**inputs, num_heads=16, topk_indices=topk)
    per_token = saved.nbytes_excluding(*weights) / seqlen
    assert per_token == 2 * (lq + dc + dr) + 4 * (dr + 2) + 4 * k


# ---- PyTorch's tooling ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_opcheck(name):
    inputs, topk, cu = layout(name)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    args = (*inputs.values(), DIMS["heads"], SCALE, Q_EPS, KV_EPS, True, True, cu, 0, "auto", 2, topk)
    torch.library.opcheck(torch.ops.torch_mla.mla_attention_block.default, args)


def block_loss(inputs, topk, cu):
    return block_op(**inputs, num_heads=DIMS["heads"], topk_indices=topk, cu_seqlens=cu).float().square().sum()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compile_fullgraph_dynamic_matches_eager(name):
    torch._dynamo.reset()
    compiled = torch.compile(block_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for seed in (0, 1):
        inputs, topk, cu = layout(name, seed=seed)
        results = []
        for fn in (block_loss, compiled):
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            loss = fn(leaves, topk, cu)
            results.append((loss, torch.autograd.grad(loss, list(leaves.values()))))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_runs_in_the_autocast_dtype():
    """Under torch.autocast(bfloat16): the block as on bf16 projections' inputs and weights, the
    norm weights, cos and sin kept (the dense block's rule), the indices never cast."""
    inputs, topk, _ = layout("padded")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_op(**inputs, num_heads=DIMS["heads"], topk_indices=topk)
    cast = {k: v if k in ("q_norm_weight", "kv_norm_weight", "cos", "sin") else v.bfloat16()
            for k, v in inputs.items()}
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, block_op(**cast, num_heads=DIMS["heads"], topk_indices=topk))


# ---- bad input ------------------------------------------------------------------------------------


def with_entry(packed, row, values):
    lengths = [3, 4] if packed else [4, 4]
    topk = random_topk(lengths, 3, seed=0, padded=not packed)
    topk.view(-1, 3)[row] = torch.tensor(values, dtype=torch.int32)
    return topk


# test_sparse.py's bad indices, named by the block (and "from q_a", the tensor the block's
# indices follow); the layout errors also from the Meta kernel.
BAD = {
    "int64 indices": (False, torch.zeros(2, 4, 3, dtype=torch.int64),
                      r"topk_indices must be int32 of shape \(B, S, k\), got Long", True),
    "indices rank": (False, torch.zeros(8, 3, dtype=torch.int32),
                     r"topk_indices must have shape \(B, S, k\) \(padded batch\), got a 2-D", True),
    "indices length": (False, torch.zeros(2, 5, 3, dtype=torch.int32),
                       r"topk_indices must have shape \(B, S, k\) with S = 4 \(from q_a\)", True),
    "packed indices rows": (True, torch.zeros(8, 3, dtype=torch.int32),
                            r"topk_indices must have shape \(T, k\) with T = 7 \(from q_a\)", True),
    "outside the sequence": (False, with_entry(False, 6, [1, 4, -1]),
                             r"topk_indices\[1, 2\] holds 4, outside its sequence of length 4", False),
    "below -1": (False, with_entry(False, 0, [-2, -1, -1]), r"topk_indices\[0, 0\] holds -2, outside its sequence",
                 False),
    "packed outside": (True, with_entry(True, 2, [0, 3, -1]),
                       r"topk_indices\[2\] \(sequence 0, position 2\) holds 3, outside its sequence of length 3",
                       False),
    "repeated": (True, with_entry(True, 4, [1, -1, 1]), r"topk_indices\[4\] \(sequence 1, position 1\) holds 1 twice",
                 False),
}


def bad_call(packed, topk, meta=False, **kwargs):
    lengths = [3, 4] if packed else [4, 4]
    inputs = block_inputs((7,) if packed else (2, 4), dtype=FP32)
    cu = cu_seqlens_of(lengths) if packed else None
    if meta:
        inputs, topk, cu = ({k: v.to("meta") for k, v in inputs.items()}, topk.to("meta"),
                            None if cu is None else cu.to("meta"))
    return block_op(**inputs, num_heads=DIMS["heads"], topk_indices=topk, cu_seqlens=cu, **kwargs)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_indices_are_named_as_the_sparse_op_names_them(case):
    packed, topk, message, layout_error = BAD[case]
    for core in SPARSE_CORES:
        with torch_mla.use_core(core), pytest.raises(ValueError, match=f"^torch_mla.mla_attention_block: {message}"):
            bad_call(packed, topk)
    if layout_error:
        with pytest.raises(ValueError, match=f"^torch_mla.mla_attention_block: {message}"):
            bad_call(packed, topk, meta=True)


def test_indices_on_another_device_are_named():
    with pytest.raises(ValueError, match=r"^torch_mla.mla_attention_block: topk_indices must be on the same "
                                         r"device as q_a \(cpu\), got meta"):
        bad_call(False, torch.zeros(2, 4, 3, dtype=torch.int32, device="meta"))


def test_sparse_attention_is_causal_only():
    with pytest.raises(ValueError, match=r"^torch_mla.mla_attention_block: causal must be True with topk_indices"):
        bad_call(False, with_entry(False, 0, [0, -1, -1]), causal=False)


def test_a_core_without_a_sparse_form_is_named_by_the_block():
    with torch_mla.use_core("cuda"), pytest.raises(
            ValueError, match=r'^torch_mla.mla_attention_block: core "cuda" has no sparse form; a sparse call takes '
                              r"one of: auto, cpu, composed"):
        bad_call(False, with_entry(False, 0, [0, -1, -1]))
