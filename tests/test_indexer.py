"""torch_mla.dsa_indexer_topk (docs/design.md §17): the DSA indexer's top k against the float64
reference with its tie rule, padded and packed, against Hugging Face's DeepseekV32Indexer, its
streaming memory bound, opcheck, torch.compile, bad input and determinism."""
import pytest
import torch

import torch_mla
from torch_mla.reference import dsa_indexer_topk_reference
from support import BF16, FP16, FP32, FP64, cu_seqlens_of, peak_live_bytes

# The kernel's blocks (ops/device/dsa_indexer_topk_device.cpp): sequences longer than one query
# block and head counts over one head block exercise the streaming.
QUERY_BLOCK, HEAD_BLOCK = 64, 8


def plateau_inputs(lead, heads=HEAD_BLOCK + 3, dim=6, seed=0, dtype=FP64):
    """Small integers (weights in quarters): every score is exact in every dtype and accumulation
    order, and the ReLU sums are full of exact ties, zero (all heads negative) and not."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (*lead, heads, dim), generator=g)
    k = torch.randint(-2, 3, (*lead, dim), generator=g)
    w = torch.randint(-4, 5, (*lead, heads), generator=g) / 4
    return q.to(dtype), k.to(dtype), w.to(dtype)


def tied_selections(indices, scores):
    """How many selected entries share their score with another selected entry of the row."""
    valid = indices >= 0
    same = (scores.unsqueeze(-1) == scores.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    return int((same.sum(-1) > 1).sum())


def assert_equals_reference(inputs, topk, cu_seqlens=None):
    indices, scores = torch_mla.dsa_indexer_topk(*inputs, topk, cu_seqlens=cu_seqlens)
    ref_indices, ref_scores = dsa_indexer_topk_reference(*(x.double() for x in inputs), topk, cu_seqlens=cu_seqlens)
    assert indices.dtype == torch.int32 and indices.shape == ref_indices.shape
    assert torch.equal(indices, ref_indices)
    # Exact: the inputs make every score exact in float32 (see plateau_inputs).
    assert torch.equal(scores.double(), ref_scores)
    return ref_indices, ref_scores


@pytest.mark.parametrize("dtype", [FP64, FP32, BF16, FP16], ids=["fp64", "fp32", "bf16", "fp16"])
def test_padded_equals_reference_with_ties(dtype):
    inputs = plateau_inputs((2, QUERY_BLOCK + 37), dtype=dtype)
    ref_indices, ref_scores = assert_equals_reference(inputs, topk=24)
    assert tied_selections(ref_indices, ref_scores) > 1000, "the inputs must hold many ties in the top k"
    scores = torch_mla.dsa_indexer_topk(*inputs, 24)[1]
    assert scores.dtype == (FP64 if dtype == FP64 else FP32)


def test_packed_equals_reference_lengths_0_1_below_and_above_k():
    seqlens = [0, 1, 3, 2 * QUERY_BLOCK + 5, 0, 7]
    inputs = plateau_inputs((sum(seqlens),), dtype=FP32, seed=1)
    ref_indices, _ = assert_equals_reference(inputs, topk=5, cu_seqlens=cu_seqlens_of(seqlens))
    # Rows with fewer than k visible keys: all of them, then -1.
    assert ref_indices[0].tolist() == [0, -1, -1, -1, -1]
    assert sorted(ref_indices[3].tolist()[:3]) == [0, 1, 2] and ref_indices[3].tolist()[3:] == [-1, -1]


def test_padded_shorter_than_k_and_k_of_one():
    inputs = plateau_inputs((3, 9), dtype=FP32, seed=2)
    assert_equals_reference(inputs, topk=12)
    assert_equals_reference(inputs, topk=1)


def test_empty_batches_and_sequences():
    for lead, cu in [((0, 5), None), ((2, 0), None), ((0,), cu_seqlens_of([])), ((0,), cu_seqlens_of([0, 0]))]:
        q, k, w = plateau_inputs(lead, dtype=FP32)
        indices, scores = torch_mla.dsa_indexer_topk(q, k, w, 4, cu_seqlens=cu)
        assert indices.shape == scores.shape == (*lead, 4) and indices.dtype == torch.int32


def test_equals_hf_deepseek_v32_indexer_without_ties():
    """HF scores ``Σ_j w_j·n_heads^-0.5 · ReLU(σ q_j·k)``, σ = head_dim^-0.5 > 0: our op on HF's q, k
    and weights·n_heads^-0.5·σ. Equal up to the first zero score, where ties (ReLU plateaus)
    start and HF's torch.topk order is unspecified."""
    modeling = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")
    from transformers import DeepseekV32Config
    torch.manual_seed(0)
    config = DeepseekV32Config(hidden_size=32, q_lora_rank=16, index_n_heads=4, index_head_dim=16,
                               qk_rope_head_dim=8, index_topk=6, num_attention_heads=2)
    indexer = modeling.DeepseekV32Indexer(config, layer_idx=0).eval()
    batch, seqlen = 2, 40
    hidden, q_resid = torch.randn(batch, seqlen, 32), torch.randn(batch, seqlen, 16)
    angles = torch.randn(batch, seqlen, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril().expand(batch, seqlen, seqlen)
    hf = indexer(hidden, q_resid, (cos, sin), causal, None)

    # HF's own q, k and weights (its forward, lines before the scores).
    with torch.no_grad():
        q = indexer.wq_b(q_resid).view(batch, seqlen, 4, 16)
        q_rot, q_pass = q.split([8, 8], dim=-1)
        k = indexer.k_norm(indexer.wk(hidden)).unsqueeze(2)
        k_rot, k_pass = k.split([8, 8], dim=-1)
        q_rot, k_rot = modeling.apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q, k = torch.cat([q_rot, q_pass], -1), torch.cat([k_rot, k_pass], -1).squeeze(2)
        weights = indexer.weights_proj(hidden) * 4 ** -0.5 * indexer.softmax_scale
    indices, scores = torch_mla.dsa_indexer_topk(q, k, weights, 6)
    compared = 0
    for row, (ours, score, theirs) in enumerate(zip(indices.flatten(0, 1), scores.flatten(0, 1), hf.flatten(0, 1))):
        distinct = int((score > 0).sum())  # positive scores come first and are tie-free here
        assert torch.equal(ours[:distinct], theirs[:distinct]), f"row {row}"
        compared += distinct
    assert compared > batch * seqlen * 2


def test_streams_in_query_blocks():
    """Peak extra memory is O(block · S): at most the documented bound, 64 query rows × S keys ×
    (4·8 + 48) bytes, plus the sequence's keys and the outputs, against 4·S² for one (S × S)."""
    seqlen, heads, dim, topk = 4096, 16, 8, 64
    q, k, w = (x.float() for x in plateau_inputs((1, seqlen), heads=heads, dim=dim))
    peak = peak_live_bytes(lambda: torch_mla.dsa_indexer_topk(q, k, w, topk))
    outputs = seqlen * topk * (4 + 4)
    bound = QUERY_BLOCK * seqlen * (4 * HEAD_BLOCK + 48) + seqlen * dim * 4 + outputs
    assert peak <= bound, f"peak {peak} B > bound {bound} B"
    assert bound < seqlen * seqlen * 4 / 2
    # The measure sees an (S × S) matrix when one exists (the reference's, at a smaller S).
    small = 512
    sq, sk, sw = (x[:, :small].float() for x in (q, k, w))
    assert peak_live_bytes(lambda: torch.einsum("th,ths->ts", sw[0], torch.einsum(
        "thd,sd->ths", sq[0], sk[0]).relu())) >= small * heads * small * 4


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    if packed:
        q, k, w = plateau_inputs((12,), dtype=FP32)
        args = (q, k, w, 3, cu_seqlens_of([5, 0, 7]), 0)
    else:
        q, k, w = plateau_inputs((2, 6), dtype=FP32)
        args = (q, k, w, 3, None, 0)
    torch.library.opcheck(torch.ops.torch_mla.dsa_indexer_topk.default, args)
    grads = tuple(x.requires_grad_() for x in args[:3]) + args[3:]
    torch.library.opcheck(torch.ops.torch_mla.dsa_indexer_topk.default, grads)


def test_inputs_requiring_grad_give_outputs_that_do_not():
    q, k, w = (x.float().requires_grad_() for x in plateau_inputs((1, 8)))
    indices, scores = torch_mla.dsa_indexer_topk(q, k, w, 3)
    assert not indices.requires_grad and not scores.requires_grad


def test_compile_fullgraph_dynamic_equals_eager():
    torch._dynamo.reset()
    compiled = torch.compile(torch_mla.dsa_indexer_topk, fullgraph=True, dynamic=True, backend="aot_eager")
    for lead, seqlens in [((2, 20), None), ((2, 33), None), ((30,), [10, 20]), ((41,), [1, 0, 40])]:
        q, k, w = (x.float() for x in plateau_inputs(lead))
        cu = None if seqlens is None else cu_seqlens_of(seqlens)
        eager = torch_mla.dsa_indexer_topk(q, k, w, 4, cu_seqlens=cu)
        got = compiled(q, k, w, 4, cu_seqlens=cu)
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


def test_deterministic_across_runs_and_threads():
    """General float inputs (no exact arithmetic): bitwise equal runs, 1 thread and 2."""
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 150, 12, 16, generator=g), torch.randn(2, 150, 16, generator=g),
            torch.randn(2, 150, 12, generator=g), 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = [torch_mla.dsa_indexer_topk(*args) for _ in range(2)]
        torch.set_num_threads(1)
        one = torch_mla.dsa_indexer_topk(*args)
    finally:
        torch.set_num_threads(threads)
    for run in (two[1], one):
        assert torch.equal(run[0], two[0][0]) and torch.equal(run[1], two[0][1])


B, S, H, D = 2, 5, 3, 4


def padded_args():
    return dict(index_q=torch.randn(B, S, H, D), index_k=torch.randn(B, S, D), weights=torch.randn(B, S, H))


def packed_args():
    return dict(index_q=torch.randn(B * S, H, D), index_k=torch.randn(B * S, D), weights=torch.randn(B * S, H),
                cu_seqlens=cu_seqlens_of([2, 8]))


BAD_INPUTS = {
    "index_q rank": (padded_args, dict(index_q=torch.randn(B * S, H, D)), r"index_q must have shape \(B, S, H_I, D_I\)"),
    "index_k rank": (padded_args, dict(index_k=torch.randn(B, S, 1, D)), r"index_k must have shape \(B, S, D_I\)"),
    "weights rank": (padded_args, dict(weights=torch.randn(B, S)), r"weights must have shape \(B, S, H_I\)"),
    "index_k batch": (padded_args, dict(index_k=torch.randn(B + 1, S, D)), r"index_k .* B \(from index_q\) = 2"),
    "weights seqlen": (padded_args, dict(weights=torch.randn(B, S + 1, H)), r"weights .* S \(from index_q\) = 5"),
    "index_k width": (padded_args, dict(index_k=torch.randn(B, S, D + 1)), r"index_k .* D_I \(from index_q\) = 4"),
    "weights heads": (padded_args, dict(weights=torch.randn(B, S, H + 1)), r"weights .* H_I \(from index_q\) = 3"),
    "no heads": (padded_args, dict(index_q=torch.randn(B, S, 0, D), weights=torch.randn(B, S, 0)),
                 r"index_q .* H_I >= 1 and D_I >= 1"),
    "mixed dtype": (padded_args, dict(weights=torch.randn(B, S, H, dtype=FP64)),
                    r"weights must have the same dtype as index_q \(Float\)"),
    "integer dtype": (padded_args, dict(index_q=torch.ones(B, S, H, D, dtype=torch.int64)),
                      r"index_q must be float64, float32, bfloat16 or float16"),
    "meta device": (padded_args, dict(index_k=torch.randn(B, S, D, device="meta")),
                    r"index_k must be on the same device as index_q"),
    "topk zero": (padded_args, dict(topk=0), r"topk must be at least 1, got 0"),
    "max_seqlen negative": (padded_args, dict(max_seqlen=-1), r"max_seqlen must be 0 \(not given\)"),
    "max_seqlen too small": (padded_args, dict(max_seqlen=S - 1), r"max_seqlen \(4\) is smaller than the longest"),
    "packed index_q rank": (packed_args, dict(index_q=torch.randn(B, S, H, D)),
                            r"index_q must have shape \(T, H_I, D_I\) \(packed, cu_seqlens given\)"),
    "packed index_k tokens": (packed_args, dict(index_k=torch.randn(B * S + 1, D)), r"index_k .* T \(from index_q\) = 10"),
    "cu_seqlens dtype": (packed_args, dict(cu_seqlens=cu_seqlens_of([2, 8]).long()), r"cu_seqlens must be int32"),
    "cu_seqlens rank": (packed_args, dict(cu_seqlens=torch.zeros(1, 3, dtype=torch.int32)),
                        r"cu_seqlens must be a 1-D tensor of shape \(B\+1,\)"),
    "cu_seqlens end": (packed_args, dict(cu_seqlens=cu_seqlens_of([2, 7])),
                       r"cu_seqlens must end at T = 10"),
    "packed max_seqlen too small": (packed_args, dict(max_seqlen=7),
                                    r"max_seqlen \(7\) is smaller than the longest sequence"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    make, override, message = BAD_INPUTS[case]
    kwargs = {**make(), "topk": 2, **override}
    with pytest.raises(ValueError, match="torch_mla.dsa_indexer_topk: " + ".*" + message):
        torch_mla.dsa_indexer_topk(**kwargs)
    # The same message from the Meta kernel (torch.compile's fake tensors, any device).
    meta = {name: value.to("meta") if isinstance(value, torch.Tensor) and name != "cu_seqlens" else value
            for name, value in kwargs.items()}
    if "cu_seqlens" in meta or case in ("max_seqlen too small", "meta device"):
        return  # checked where the data is (cu_seqlens' values, S against max_seqlen), or all meta
    with pytest.raises(ValueError, match=message):
        torch_mla.dsa_indexer_topk(**meta)
