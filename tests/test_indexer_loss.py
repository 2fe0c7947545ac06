"""torch_mla.dsa_indexer_loss (docs/design.md §18): the per-query KL between the main attention's
head-summed probabilities and the indexer's softmax, dense and sparse, against its float64
reference (padded and packed, several query chunks), gradcheck, the teacher from the real attention
ops, the detached teacher, SGD lowering it, opcheck, torch.compile, bad input, empty calls and the
streaming memory bound."""
import contextlib

import pytest
import torch

import torch_mla
from torch_mla.reference import (dsa_indexer_loss_reference, mla_attention_reference,
                                 mla_sparse_attention_reference)
from support import (BF16, FP32, FP64, SMALL, TINY, cu_seqlens_of, make_inputs, max_abs_err, max_rel_err,
                     peak_live_bytes)
from test_sparse import SPARSE_CORES, random_topk
INDEX_ARGS = ("index_q", "index_k", "weights")
TEACHER_ARGS = ("q", "kv_latent", "k_rope", "wkv_b", "lse")
INDEX_HEADS, INDEX_DIM = 3, 8


def loss_inputs(lengths, *, packed, dtype=FP32, dims=SMALL, k=None, seed=0, index_heads=INDEX_HEADS,
                index_dim=INDEX_DIM):
    """(args, cu_seqlens, topk_indices): the eight tensor arguments in `dtype`, lse float32 (float64
    for float64) from the float64 reference attention (dense, or sparse on topk when k is given)."""
    layout = dict(seqlens=lengths) if packed else dict(batch=len(lengths), seqlen=lengths[0])
    teacher, cu = make_inputs(dims, dtype=FP64, seed=seed, requires_grad=False, **layout)
    topk = None if k is None else random_topk(lengths, k, seed, padded=not packed)
    lead = teacher["q"].shape[:-2]
    gen = torch.Generator().manual_seed(seed + 100)
    index = dict(index_q=torch.randn(*lead, index_heads, index_dim, generator=gen, dtype=FP64),
                 index_k=torch.randn(*lead, index_dim, generator=gen, dtype=FP64),
                 weights=torch.randn(*lead, index_heads, generator=gen, dtype=FP64) * index_dim ** -0.5)
    teacher = {name: t.to(dtype) for name, t in teacher.items()}
    index = {name: t.to(dtype) for name, t in index.items()}
    # The lse of the attention in float64 on the very inputs the op gets.
    up = {name: t.double() for name, t in teacher.items()}
    if topk is None:
        _, lse = mla_attention_reference(**up, cu_seqlens=cu, return_lse=True)
    else:
        _, lse = mla_sparse_attention_reference(**up, topk_indices=topk, cu_seqlens=cu, return_lse=True)
    lse = lse.to(FP64 if dtype == FP64 else FP32)
    return {**index, **teacher, "lse": lse}, cu, topk


def kl_and_grads(fn, args, grad_seed=1, **kwargs):
    """kl and the grads of index_q, index_k, weights for a fixed random grad_kl."""
    leaves = {name: t.detach().clone().requires_grad_(name in INDEX_ARGS) for name, t in args.items()}
    kl = fn(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_kl = torch.rand(kl.shape, generator=gen, dtype=FP64).to(kl.dtype)
    grads = torch.autograd.grad(kl, [leaves[name] for name in INDEX_ARGS], grad_kl)
    return {"kl": kl.detach(), **dict(zip(INDEX_ARGS, grads))}


def float64(args):
    return {name: t.double() for name, t in args.items()}


@contextlib.contextmanager
def chunk_elements(n):
    """The score-chunk budget (layer/chunking.h) set to n elements, restored after."""
    previous = torch.ops.torch_mla._set_chunk_elements(n)
    try:
        yield
    finally:
        torch.ops.torch_mla._set_chunk_elements(previous)


# (label, lengths, packed): lengths 0, 1, short and long; k = 4 in sparse mode.
SHAPES = [("padded", [9, 9], False), ("padded S=1", [1, 1, 1], False),
          ("packed", [3, 0, 1, 9, 6, 17], True)]
MODES = {"dense": None, "sparse": 4}


@pytest.mark.parametrize("budget", [0, 50, 150], ids=["default chunks", "one query per chunk", "a few per chunk"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_reference(shape, dtype, mode, budget):
    """fp32 ≤ 1e-5 relative for kl and the three grads; bf16 by the 2× / 3× rule against the
    reference run in bf16 (the op computes in float32, so only its inputs are rounded)."""
    _, lengths, packed = shape
    args, cu, topk = loss_inputs(lengths, packed=packed, dtype=dtype, k=MODES[mode])
    with chunk_elements(budget):
        ours = kl_and_grads(torch_mla.dsa_indexer_loss, args, topk_indices=topk, cu_seqlens=cu)
    ref = kl_and_grads(dsa_indexer_loss_reference, float64(args), topk_indices=topk, cu_seqlens=cu)
    naive = kl_and_grads(dsa_indexer_loss_reference, args, topk_indices=topk, cu_seqlens=cu)
    assert ours["kl"].dtype == FP32 and ours["kl"].shape == args["lse"].shape[:-1]
    # One key per query (S = 1) makes every KL 0; any longer sequence must give a non-trivial loss.
    assert (ref["kl"] > 0).any() == (max(lengths) > 1)
    for name in ("kl", *INDEX_ARGS):
        assert torch.isfinite(ours[name]).all(), name
        if dtype == FP32:
            err = max_rel_err(ours[name], ref[name])
            assert err <= 1e-5, f"{name}: max relative error {err:.3g}"
        else:
            assert ours[name].dtype == (FP32 if name == "kl" else BF16)
            factor = 2 if name == "kl" else 3
            err, naive_err = max_abs_err(ours[name], ref[name]), max_abs_err(naive[name], ref[name])
            assert err <= factor * naive_err, f"{name}: {err:.3g} > {factor} × naive bf16 {naive_err:.3g}"
    assert (ours["kl"] >= 0).all()


def test_float64_keeps_float64():
    args, cu, topk = loss_inputs([3, 0, 8], packed=True, dtype=FP64, k=5)
    ours = kl_and_grads(torch_mla.dsa_indexer_loss, args, topk_indices=topk, cu_seqlens=cu)
    ref = kl_and_grads(dsa_indexer_loss_reference, args, topk_indices=topk, cu_seqlens=cu)
    for name in ("kl", *INDEX_ARGS):
        assert ours[name].dtype == FP64
        assert max_rel_err(ours[name], ref[name]) <= 1e-12, name


def test_rows_with_an_empty_set_give_zero():
    """Sparse rows that select nothing (all -1, or only keys past the query): kl 0, no gradient."""
    args, _, topk = loss_inputs([6], packed=False, k=3)
    topk[0, 2] = -1
    topk[0, 3] = torch.tensor([5, -1, 4])
    _, args["lse"] = mla_sparse_attention_reference(**{n: args[n].double() for n in TEACHER_ARGS[:4]},
                                                    topk_indices=topk, return_lse=True)
    args["lse"] = args["lse"].float()
    ours = kl_and_grads(torch_mla.dsa_indexer_loss, args, topk_indices=topk)
    assert ours["kl"][0, 2] == 0 and ours["kl"][0, 3] == 0
    for name in ("index_q", "weights"):
        assert (ours[name][0, 2:4] == 0).all(), name


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_float64(mode):
    """TINY head dims; no index_q·index_k within 1e-4 of 0: gradcheck's steps (1e-6 on one element,
    moving a dot product by at most 1e-6 · max|x| < 1e-5) never cross the ReLU's kink."""
    lengths = [4, 1, 3]
    args, cu, topk = loss_inputs(lengths, packed=True, dtype=FP64, dims=TINY, k=None if mode == "dense" else 3,
                                 index_heads=2, index_dim=3, seed=3)
    dots = torch.einsum("thd,sd->ths", args["index_q"], args["index_k"])
    assert dots.abs().min() > 1e-4 and max(args[n].abs().max() for n in INDEX_ARGS[:2]) < 10
    teacher = [args[name] for name in TEACHER_ARGS]
    assert torch.autograd.gradcheck(
        lambda q, k, w: torch_mla.dsa_indexer_loss(q, k, w, *teacher, topk_indices=topk, cu_seqlens=cu),
        tuple(args[name].requires_grad_() for name in INDEX_ARGS))


# ---- the teacher from the real attention ops -----------------------------------------------------


def real_op_inputs(packed, k, seed=0):
    """loss_inputs whose lse comes from torch_mla's own attention op on the current core: returns
    (args, cu, topk, reference lse in float64)."""
    lengths = [5, 0, 12, 1] if packed else [12, 12]
    args, cu, topk = loss_inputs(lengths, packed=packed, k=k, seed=seed)
    teacher = {name: args[name] for name in TEACHER_ARGS[:4]}
    ref_lse = args["lse"]
    if topk is None:
        _, args["lse"] = torch_mla.mla_attention(**teacher, cu_seqlens=cu, return_lse=True)
    else:
        _, args["lse"] = torch_mla.mla_sparse_attention(**teacher, topk_indices=topk, cu_seqlens=cu, return_lse=True)
    return args, cu, topk, ref_lse


@pytest.mark.cases(dtypes=(FP32,), dims=("small",))
def test_dense_teacher_from_mla_attention(core):
    """Dense warm-up: lse from mla_attention(return_lse=True) on every CPU core that serves fp32;
    kl ≥ 0 and equal to the reference (whose lse is the float64 attention's) to 1e-5."""
    for packed in (False, True):
        args, cu, _, ref_lse = real_op_inputs(packed, None)
        ours = kl_and_grads(torch_mla.dsa_indexer_loss, args, cu_seqlens=cu)
        ref = kl_and_grads(dsa_indexer_loss_reference, {**float64(args), "lse": ref_lse.double()}, cu_seqlens=cu)
        assert (ours["kl"] >= 0).all() and (ours["kl"] > 0).any()
        for name in ("kl", *INDEX_ARGS):
            assert max_rel_err(ours[name], ref[name]) <= 1e-5, (packed, name)


@pytest.mark.parametrize("sparse_core", SPARSE_CORES)
def test_sparse_teacher_from_mla_sparse_attention(sparse_core):
    for packed in (False, True):
        with torch_mla.use_core(sparse_core):
            args, cu, topk, ref_lse = real_op_inputs(packed, 5)
        ours = kl_and_grads(torch_mla.dsa_indexer_loss, args, topk_indices=topk, cu_seqlens=cu)
        ref = kl_and_grads(dsa_indexer_loss_reference, {**float64(args), "lse": ref_lse.double()},
                           topk_indices=topk, cu_seqlens=cu)
        assert (ours["kl"] >= 0).all() and (ours["kl"] > 0).any()
        for name in ("kl", *INDEX_ARGS):
            assert max_rel_err(ours[name], ref[name]) <= 1e-5, (packed, name)


@pytest.mark.parametrize("mode", list(MODES))
def test_sgd_on_the_indexer_lowers_the_loss(mode):
    """The student cannot equal the teacher in general; the loss is minimised instead: ten SGD steps
    on index_q, index_k and weights lower the summed KL, each step."""
    args, cu, topk = loss_inputs([7, 13], packed=True, k=MODES[mode], seed=5)
    params = [args[name].clone().requires_grad_() for name in INDEX_ARGS]
    teacher = [args[name] for name in TEACHER_ARGS]
    optimizer = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = torch_mla.dsa_indexer_loss(*params, *teacher, topk_indices=topk, cu_seqlens=cu).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("mode", list(MODES))
def test_the_teacher_gets_no_gradient(mode):
    args, cu, topk = loss_inputs([4, 9], packed=True, k=MODES[mode])
    leaves = {name: t.clone().requires_grad_() for name, t in args.items()}
    torch_mla.dsa_indexer_loss(**leaves, topk_indices=topk, cu_seqlens=cu).sum().backward()
    for name in TEACHER_ARGS:
        assert leaves[name].grad is None, name
    for name in INDEX_ARGS:
        assert leaves[name].grad is not None and leaves[name].grad.abs().sum() > 0, name
    # The teacher alone requiring grad: nothing to differentiate reaches it either.
    teacher_only = {name: t.clone().requires_grad_(name in TEACHER_ARGS) for name, t in args.items()}
    torch_mla.dsa_indexer_loss(**teacher_only, topk_indices=topk, cu_seqlens=cu).sum().backward()
    assert all(teacher_only[name].grad is None for name in TEACHER_ARGS)


def test_saves_only_its_inputs():
    args, cu, topk = loss_inputs([4, 9], packed=True, k=4)
    leaves = {name: t.clone().requires_grad_(name in INDEX_ARGS) for name, t in args.items()}
    with torch_mla.SavedTensors() as saved:
        torch_mla.dsa_indexer_loss(**leaves, topk_indices=topk, cu_seqlens=cu)
    inputs = [*leaves.values(), topk]
    assert all(saved.holds(t) for t in inputs)
    assert saved.nbytes == sum(t.untyped_storage().nbytes() for t in inputs)


def test_autocast_runs_in_the_autocast_dtype():
    args, cu, topk = loss_inputs([4, 9], packed=True, k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = torch_mla.dsa_indexer_loss(**args, topk_indices=topk, cu_seqlens=cu)
    cast = {name: t if name == "lse" else t.bfloat16() for name, t in args.items()}
    expected = torch_mla.dsa_indexer_loss(**cast, topk_indices=topk, cu_seqlens=cu)
    assert kl.dtype == FP32 and torch.equal(kl, expected)


# ---- PyTorch's tooling ---------------------------------------------------------------------------


def op_args(args, cu, topk):
    scale = args["q"].shape[-1] ** -0.5
    return (*[args[name] for name in (*INDEX_ARGS, *TEACHER_ARGS)], scale, topk, cu, 0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck(packed, mode):
    args, cu, topk = loss_inputs([4, 0, 7] if packed else [6, 6], packed=packed, k=MODES[mode])
    forward = op_args(args, cu, topk)
    torch.library.opcheck(torch.ops.torch_mla.dsa_indexer_loss.default, forward)
    with_grad = tuple(t.clone().requires_grad_() if i < 3 else t for i, t in enumerate(forward))
    torch.library.opcheck(torch.ops.torch_mla.dsa_indexer_loss.default, with_grad)
    kl = torch.ops.torch_mla.dsa_indexer_loss(*forward)
    torch.library.opcheck(torch.ops.torch_mla.dsa_indexer_loss_backward.default, (torch.rand_like(kl), *forward))


def summed_loss(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, topk_indices=None, cu_seqlens=None):
    return torch_mla.dsa_indexer_loss(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
                                      topk_indices=topk_indices, cu_seqlens=cu_seqlens).sum()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compile_fullgraph_dynamic_matches_eager(packed, mode):
    torch._dynamo.reset()
    compiled = torch.compile(summed_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for n, lengths in enumerate(([3, 11, 0], [8, 1, 5, 2]) if packed else ([9, 9], [13, 13])):
        args, cu, topk = loss_inputs(lengths, packed=packed, k=MODES[mode], seed=n)
        results = []
        for fn in (summed_loss, compiled):
            leaves = {name: t.clone().requires_grad_(name in INDEX_ARGS) for name, t in args.items()}
            loss = fn(**leaves, topk_indices=topk, cu_seqlens=cu)
            results.append((loss, torch.autograd.grad(loss, [leaves[name] for name in INDEX_ARGS])))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- empty calls and bad input -------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("lengths,packed", [([], True), ([0, 0], True), ([0, 0], False)],
                         ids=["no sequence", "empty sequences", "padded S=0"])
def test_empty_calls(lengths, packed, mode):
    args, cu, topk = loss_inputs(lengths, packed=packed, k=MODES[mode]) if lengths or not packed else \
        loss_inputs([0], packed=True, k=MODES[mode])
    if not lengths:
        cu = cu_seqlens_of([])
    ours = kl_and_grads(torch_mla.dsa_indexer_loss, args, topk_indices=topk, cu_seqlens=cu)
    assert ours["kl"].shape == args["lse"].shape[:-1] and ours["kl"].numel() == 0
    assert all(ours[name].shape == args[name].shape for name in INDEX_ARGS)


def bad_call(packed=False, mode="sparse", **replace):
    lengths = [3, 4] if packed else [4, 4]
    args, cu, topk = loss_inputs(lengths, packed=packed, k=MODES[mode])
    call = {**args, "topk_indices": topk, "cu_seqlens": cu}
    call.update(replace)
    return torch_mla.dsa_indexer_loss(**call)


def with_entry(packed, row, values):
    topk = random_topk([3, 4] if packed else [4, 4], 4, seed=0, padded=not packed)
    topk.view(-1, 4)[row] = torch.tensor(values, dtype=torch.int32)
    return topk


H, HI, DI = SMALL.heads, INDEX_HEADS, INDEX_DIM
BAD = {
    "index_q rank": (False, dict(index_q=torch.randn(8, HI, DI)),
                     r"^torch_mla.dsa_indexer_loss: index_q must have shape \(B, S, H_I, D_I\) \(padded batch\)"),
    "index_k dim": (False, dict(index_k=torch.randn(2, 4, DI + 1)),
                    r"index_k must have shape \(B, S, D_I\) with D_I \(from index_q\) = 8"),
    "weights heads": (True, dict(weights=torch.randn(7, HI + 1)),
                      r"weights must have shape \(T, H_I\) with H_I \(from index_q\) = 3"),
    "index dtype": (False, dict(index_k=torch.randn(2, 4, DI, dtype=FP64)),
                    r"index_k must have the same dtype as index_q \(Float\), got Double"),
    "index tokens": (False, dict(index_q=torch.randn(2, 5, HI, DI), index_k=torch.randn(2, 5, DI),
                                 weights=torch.randn(2, 5, HI)),
                     r"index_q must have shape \(B, S, H_I, D_I\) with S = 4 \(from q\), got shape \[2, 5, 3, 8\]"),
    "index_q device": (False, dict(index_q=torch.randn(2, 4, HI, DI, device="meta"),
                                   index_k=torch.randn(2, 4, DI, device="meta"),
                                   weights=torch.randn(2, 4, HI, device="meta")),
                       r"index_q must be on the same device as q"),
    "q rank": (False, dict(q=torch.randn(8, H, SMALL.nope + SMALL.rope)),
               r"^torch_mla.dsa_indexer_loss: q must have shape \(B, S, H, Dn\+Dr\)"),
    "kv_latent dtype": (False, dict(kv_latent=torch.randn(2, 4, SMALL.latent, dtype=FP64)),
                        r"^torch_mla.dsa_indexer_loss: kv_latent must have the same dtype as q"),
    "lse dtype": (False, dict(lse=torch.zeros(2, 4, H, dtype=BF16)),
                  r"lse must be Float \(the dtype mla_attention returns it in for Float q\), got BFloat16"),
    "lse shape": (True, dict(lse=torch.zeros(7, H + 1)),
                  r"lse must have shape \(T, H\) \(packed, cu_seqlens given\) = \[7, 2\] \(from q\), got shape \[7, 3\]"),
    "cu_seqlens dtype": (True, dict(cu_seqlens=torch.tensor([0, 3, 7])),
                         r"^torch_mla.dsa_indexer_loss: cu_seqlens must be int32"),
    "cu_seqlens values": (True, dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)),
                          r"^torch_mla.dsa_indexer_loss: cu_seqlens"),
    "max_seqlen": (False, dict(max_seqlen=3), r"^torch_mla.dsa_indexer_loss: max_seqlen \(3\) is smaller"),
    "indices dtype": (False, dict(topk_indices=torch.zeros(2, 4, 3, dtype=torch.int64)),
                      r"^torch_mla.dsa_indexer_loss: topk_indices must be int32 of shape \(B, S, k\)"),
    "indices rows": (True, dict(topk_indices=torch.zeros(8, 3, dtype=torch.int32)),
                     r"topk_indices must have shape \(T, k\) with T = 7 \(from q\)"),
    "outside the sequence": (False, dict(topk_indices=with_entry(False, 6, [1, 4, -1, -1])),
                             r"^torch_mla.dsa_indexer_loss: topk_indices\[1, 2\] holds 4, outside its sequence"),
    "repeated": (True, dict(topk_indices=with_entry(True, 4, [1, -1, 1, -1])),
                 r"topk_indices\[4\] \(sequence 1, position 1\) holds 1 twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    packed, replace, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        bad_call(packed, **replace)


# Checked where the data is (cu_seqlens' values, S against max_seqlen, topk_indices' entries) or a
# device mismatch, which an all-meta call cannot have.
DATA_CASES = {"cu_seqlens values", "max_seqlen", "outside the sequence", "repeated", "index_q device"}


@pytest.mark.parametrize("case", sorted(set(BAD) - DATA_CASES))
def test_the_meta_kernel_gives_the_same_messages(case):
    """torch.compile's fake tensors reach the Meta kernel: the same ValueError, any device."""
    packed, replace, message = BAD[case]
    lengths = [3, 4] if packed else [4, 4]
    args, cu, topk = loss_inputs(lengths, packed=packed, k=MODES["sparse"])
    call = {**args, "topk_indices": topk, "cu_seqlens": cu, **replace}
    meta = {name: t.to("meta") if isinstance(t, torch.Tensor) else t for name, t in call.items()}
    with pytest.raises(ValueError, match=message):
        torch_mla.dsa_indexer_loss(**meta)


def test_double_backward_is_an_error():
    args, cu, topk = loss_inputs([4, 9], packed=True, k=4)
    leaves = {name: t.clone().requires_grad_(name in INDEX_ARGS) for name, t in args.items()}
    kl = torch_mla.dsa_indexer_loss(**leaves, topk_indices=topk, cu_seqlens=cu)
    grads = torch.autograd.grad(kl.sum(), [leaves[name] for name in INDEX_ARGS], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grads[0].sum().backward()


def test_bad_grad_kl_names_it():
    args, cu, topk = loss_inputs([4, 4], packed=False, k=3)
    forward = op_args(args, cu, topk)
    with pytest.raises(ValueError, match=r"grad_kl must have shape \(B, S\) = \[2, 4\], got shape \[2, 5\]"):
        torch.ops.torch_mla.dsa_indexer_loss_backward(torch.zeros(2, 5), *forward)
    with pytest.raises(ValueError, match=r"grad_kl must be a Float tensor of shape \(B, S\)"):
        torch.ops.torch_mla.dsa_indexer_loss_backward(torch.zeros(2, 4, dtype=FP64), *forward)


# ---- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_streams_without_an_s_by_s_tensor(mode):
    """S = 6144: one (S × S) float32 tensor is 144 MiB. With a chunk budget of 2^20 elements the
    forward and the backward hold at most a few chunk-sized buffers (§18.3's bound: 8 · 2^20 · 4 B
    here) beside the inputs' linear-size copies, far below one (S × S)."""
    seqlen, budget, k = 6144, 1 << 20, 64
    args, _, _ = loss_inputs([8], packed=False, seed=2)  # small, only for the sizes
    gen = torch.Generator().manual_seed(0)
    big = {name: torch.randn(1, seqlen, *t.shape[2:], generator=gen) for name, t in args.items() if name != "wkv_b"}
    big["wkv_b"] = args["wkv_b"]
    big["lse"] = big["lse"].abs() + 10  # any finite lse: the memory does not depend on it
    # Sparse: every query selects the first k positions (those past the query are ignored).
    topk = None if mode == "dense" else torch.arange(k, dtype=torch.int32).expand(1, seqlen, k).contiguous()
    leaves = {name: t.requires_grad_(name in INDEX_ARGS) for name, t in big.items()}

    def forward_backward():
        torch_mla.dsa_indexer_loss(**leaves, topk_indices=topk).sum().backward()

    with chunk_elements(budget):
        peak = peak_live_bytes(forward_backward)
    linear = seqlen * (SMALL.latent + SMALL.rope + 2 * INDEX_DIM + 2 * INDEX_HEADS * INDEX_DIM + 8 * INDEX_HEADS) * 4
    bound = 8 * budget * 4 + linear
    print(f"\n{mode}: peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, "
          f"one S×S float32 {seqlen * seqlen * 4 / 2**20:.0f} MiB", end="")
    assert peak <= bound, f"peak {peak} B > bound {bound} B"
    assert bound < seqlen * seqlen * 4 / 3
    # The measure sees an (S × S) tensor when one exists: the reference's, at a smaller S.
    small = 1024
    cut = {name: (t if name == "wkv_b" else t[:, :small]).detach().double() for name, t in big.items()}
    cut_topk = None if topk is None else topk[:, :small]
    assert peak_live_bytes(lambda: dsa_indexer_loss_reference(**cut, topk_indices=cut_topk)) >= small * small * 8
