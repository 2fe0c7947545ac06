"""The per-head maximum attention logit (docs/design.md §12), for QK-Clip: every core against the
float64 reference (fp64 to 1e-12, fp32 to 1e-5 relative, bf16 by the 2× rule), padded and packed
with empty sequences, causal and not; the shared fallback forced on every core; the q-latent op,
the module, the Hugging Face patch and context parallelism; opcheck, torch.compile, and what the
op saves."""
import os

import pytest
import torch

import torch_mla
from torch_mla import MultiHeadLatentAttention
from torch_mla.reference import mla_attention_reference
from support import (BF16, FP32, FP64, HAVE_TRANSFORMERS, SMALL, TENSOR_ARGS, attention_modules, block_spec,
                     cu_seqlens_of, hidden, labelled, make_inputs, make_model, make_module, max_abs_err,
                     max_rel_err, q_latent_inputs, q_latent_op, q_latent_spec, run_ranks)

# 8 heads: the bf16 rule compares the largest error over the heads, which needs more than a couple.
HEADS = 8
LAYOUTS = {False: dict(batch=2, seqlen=37), True: dict(seqlens=[5, 0, 70, 1])}
FP64_TOL, FP32_TOL = 1e-12, 1e-5


def reference_max_logits(inputs, dtype, **kwargs):
    cast = {k: v.detach().to(dtype) for k, v in inputs.items()}
    return mla_attention_reference(**cast, return_max_logits=True, **kwargs)[1]


def check_against_reference(max_logits, inputs, **kwargs):
    """max_logits (H,) of `inputs` against the float64 reference by the dtype's rule."""
    dtype = inputs["q"].dtype
    heads = inputs["q"].shape[-2]
    assert max_logits.shape == (heads,)
    assert max_logits.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not max_logits.requires_grad
    ref = reference_max_logits(inputs, torch.float64, **kwargs)
    assert torch.isfinite(ref).all(), "the cases below give every head a visible pair"
    if dtype in (torch.float64, torch.float32):
        tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
        err = max_rel_err(max_logits, ref)
        assert err <= tol, f"max relative error {err:.3g} > {tol:g}"
    else:
        naive = reference_max_logits(inputs, dtype, **kwargs)
        err, naive_err = max_abs_err(max_logits, ref), max_abs_err(naive, ref)
        assert err <= 2 * naive_err, f"max error {err:.3g} > 2 × naive {dtype} error {naive_err:.3g}"


# MINICPM3's head dims (Dn+Dr = 96, Dv = 64) are ones our kernels are built for, so simt serves bf16.
ACCURACY = dict(dtypes=(FP64, FP32, BF16), dims=("minicpm3",))


def inputs_for(core, case):
    return core.inputs(case, heads=HEADS, **LAYOUTS[case.packed], requires_grad=False)


@pytest.mark.cases(**ACCURACY)
def test_matches_reference(core):
    for case in core.cases:
        inputs, cu = inputs_for(core, case)
        for causal in (True, False):
            with labelled(case, "causal" if causal else "full"):
                out, lse, max_logits = torch_mla.mla_attention(**inputs, causal=causal, cu_seqlens=cu,
                                                               return_lse=True, return_max_logits=True)
                check_against_reference(max_logits, inputs, causal=causal, cu_seqlens=cu)
                # Asking for it changes nothing else the forward returns.
                plain_out, plain_lse = torch_mla.mla_attention(**inputs, causal=causal, cu_seqlens=cu,
                                                               return_lse=True)
                assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)


@pytest.mark.cases(**ACCURACY)
def test_shared_fallback_matches_reference(core, mla_env):
    """The fallback of the stock cores (cudnn, efficient), forced on every core: lse-pruned
    recomputation of the scores. One head is given one dominant query row, so that lse prunes."""
    mla_env.setenv("TORCH_MLA_MAX_LOGITS", "recompute")
    for case in core.cases:
        inputs, cu = inputs_for(core, case)
        with torch.no_grad():
            inputs["q"][..., 3, 0, :] *= 4  # padded: token 3 of each sequence; packed: token 3
        for causal in (True, False):
            with labelled(case, "causal" if causal else "full"):
                _, max_logits = torch_mla.mla_attention(**inputs, causal=causal, cu_seqlens=cu,
                                                        return_max_logits=True)
                check_against_reference(max_logits, inputs, causal=causal, cu_seqlens=cu)


EMPTY = {False: dict(batch=0, seqlen=4), True: dict(seqlens=[0, 0])}


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"))
def test_no_visible_pair_is_minus_inf(core, mla_env):
    for case in core.one_per_layout():
        inputs, cu = core.inputs(case, **EMPTY[case.packed], requires_grad=False)
        for mode in ("core", "recompute"):
            mla_env.setenv("TORCH_MLA_MAX_LOGITS", mode)
            with labelled(case, mode):
                _, max_logits = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_max_logits=True)
                assert max_logits.shape == (2,) and max_logits.dtype == torch.float32
                assert (max_logits == float("-inf")).all()
                ref = reference_max_logits(inputs, torch.float64, cu_seqlens=cu)
                assert (ref == float("-inf")).all()


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"), packed=False)
def test_not_asked_for_is_an_empty_tensor(core):
    case = core.cases[0]  # any dtype and head dims
    inputs, cu = core.inputs(case, batch=2, seqlen=5, requires_grad=False)
    dims = case.head_dims()
    args = (*[inputs[k] for k in TENSOR_ARGS], (dims.nope + dims.rope) ** -0.5, True, cu, 0, core.name)
    _, lse, max_logits = torch.ops.torch_mla.mla_attention(*args)
    assert max_logits.shape == (0,) and max_logits.dtype == lse.dtype
    assert torch_mla.mla_attention(**inputs).shape == (2, 5, dims.heads, dims.v)


@pytest.mark.cases(dtypes=(BF16,), dims=("minicpm3",), packed=True)
def test_saved_tensors_unchanged(core):
    """max_logits is returned, never saved: the op saves the same six tensors."""
    for case in core.cases:
        inputs, cu = core.inputs(case, heads=HEADS, seqlens=[3, 0, 9])
        with torch_mla.SavedTensors() as saved:
            out, lse, max_logits = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_lse=True,
                                                           return_max_logits=True)
        six = [inputs["q"], inputs["kv_latent"], inputs["k_rope"], inputs["wkv_b"], out, lse]
        assert all(saved.holds(t) for t in six) and not saved.holds(max_logits)
        assert len(saved.storages) == 6
        assert not max_logits.requires_grad
        # The graph is whole: the loss may use max_logits' value, no gradient flows through it.
        (out.float().sum() + max_logits.sum()).backward()
        assert all(inputs[k].grad is not None for k in TENSOR_ARGS)


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("small", "minicpm3"))
def test_opcheck(core):
    for case in core.one_per_layout():
        shape = dict(seqlens=[4, 0, 9, 1]) if case.packed else dict(batch=2, seqlen=7)
        inputs, cu = core.inputs(case, **shape)
        dims = case.head_dims()
        args = (*[inputs[k] for k in TENSOR_ARGS], (dims.nope + dims.rope) ** -0.5, True, cu,
                0 if cu is None else 9, core.name, True)
        with labelled(case):
            torch.library.opcheck(torch.ops.torch_mla.mla_attention.default, args)


def test_compile_fullgraph_matches_eager():
    def fn(q, kv_latent, k_rope, wkv_b, cu_seqlens=None):
        out, max_logits = torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b, cu_seqlens=cu_seqlens,
                                                  return_max_logits=True)
        return out.float().square().sum(), max_logits

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for seqlens in ([5, 0, 17], [1, 30, 2, 9]):
        inputs, cu = make_inputs(SMALL, seqlens=seqlens)
        loss, max_logits = compiled(**inputs, cu_seqlens=cu)
        eager_loss, eager_max_logits = fn(**inputs, cu_seqlens=cu)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(max_logits, eager_max_logits)
        check_against_reference(max_logits, inputs, cu_seqlens=cu)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_q_latent_op_matches_spec(layout):
    lead, seqlens = ((2, 37), None) if layout == "padded" else ((45,), [1, 17, 0, 27])
    inputs = q_latent_inputs(lead)
    cu = cu_seqlens_of(seqlens) if seqlens else None
    kwargs = dict(rope_interleave=True, cu_seqlens=cu, softmax_scale=0.3)
    out, max_logits = q_latent_op(**inputs, **kwargs, return_max_logits=True)
    assert not max_logits.requires_grad and max_logits.dtype == torch.float32
    ref = q_latent_spec(**{k: v.double() for k, v in inputs.items()}, **kwargs, return_max_logits=True)[1]
    assert max_rel_err(max_logits, ref) <= FP32_TOL
    assert torch.equal(out, q_latent_op(**inputs, **kwargs))


@pytest.mark.parametrize("save_q_latent", [True, False], ids=["q-latent", "q-saved"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_module_records_last_forward(layout, save_q_latent):
    module = make_module("yarn-bias", save_q_latent=save_q_latent, record_max_logits=True).double()
    if layout == "padded":
        x, positions, cu = hidden((2, 19), dtype=torch.float64), torch.arange(19), None
    else:
        seqlens = [7, 0, 12]
        x, positions = hidden((19,), dtype=torch.float64), torch.cat([torch.arange(n) for n in seqlens])
        cu = torch.tensor([0, 7, 7, 19], dtype=torch.int32)
    assert module.max_logits is None
    module(x, cu_seqlens=cu).sum().backward()
    _, ref = block_spec(module, dict(module.named_parameters()), x, positions, cu, return_max_logits=True)
    # The spec's RoPE angles are float64, the module's float32 (as HF's): hence 1e-6.
    assert module.max_logits.shape == (module.num_heads,) and not module.max_logits.requires_grad
    assert max_rel_err(module.max_logits, ref) <= 1e-6
    # Each forward replaces the value: the last step's, for the optimizer step that follows.
    y = hidden(tuple(x.shape[:-1]), seed=2, dtype=torch.float64)
    module(y, cu_seqlens=cu)
    _, ref_y = block_spec(module, dict(module.named_parameters()), y, positions, cu, return_max_logits=True)
    assert max_rel_err(module.max_logits, ref_y) <= 1e-6


def test_module_off_records_nothing():
    module = make_module("q-lora")
    module(hidden((1, 6)))
    assert module.record_max_logits is False and module.max_logits is None


def test_latent_only_block_refuses_to_record():
    module = make_module("q-lora", save="latent", record_max_logits=True)
    with pytest.raises(ValueError, match="record_max_logits needs save='q' or save='q_latent'"):
        module(hidden((1, 6)))


def test_module_compile_fullgraph_records():
    torch._dynamo.reset()
    module = make_module("q-lora", record_max_logits=True)
    x = hidden((2, 11))
    module(x)
    eager = module.max_logits
    module.max_logits = None
    torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(module.max_logits, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
def test_hf_patched_attention_records_as_the_module():
    """patch_model's attention takes the module's path: setting record_max_logits on a patched
    Hugging Face attention records the same values as MultiHeadLatentAttention on its weights."""
    model = make_model("v3")
    assert torch_mla.patch_model(model) == model.config.num_hidden_layers
    attn = attention_modules(model)[0]
    attn.record_max_logits = True
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    model(ids)
    ours = MultiHeadLatentAttention.from_config(model.config, record_max_logits=True)
    ours.load_state_dict(attn.state_dict())
    ours(seen["x"])
    torch.testing.assert_close(attn.max_logits, ours.max_logits, rtol=1e-6, atol=1e-6)


def _cp_max_logits(rank, world, seqlen):
    from torch_mla.distributed import context_parallel_mla_attention, shard_sequence
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=seqlen, seed=7, requires_grad=False)
    ref = reference_max_logits(inputs, torch.float64, causal=True)
    local = {k: v if k == "wkv_b" else shard_sequence(v) for k, v in inputs.items()}
    _, max_logits = context_parallel_mla_attention(**local, return_max_logits=True)
    # Every rank holds the maximum over the whole sequence, not over its own share.
    assert max_rel_err(max_logits, ref) <= FP32_TOL


@pytest.mark.timeout(300)
def test_context_parallel_is_the_maximum_over_ranks():
    run_ranks(_cp_max_logits, 2, 16)


def test_overhead_benchmark_times_every_mode():
    import bench_max_logits
    rows = bench_max_logits.main(["--device", "cpu", "--cores", "cpu", "composed", "--seqlens", "16", "40",
                                  "--heads", "2", "--warmup", "0", "--reps", "1"])
    assert [(r["core"], r["seqlen"]) for r in rows] == [("cpu", 16), ("cpu", 40), ("composed", 16), ("composed", 40)]
    assert all(r[f"{m}_ms"] > 0 for r in rows for m in bench_max_logits.MODES)
    assert "TORCH_MLA_MAX_LOGITS" not in os.environ  # the fallback mode leaves no trace
