"""The latent-only attention block (docs/design.md §13): MultiHeadLatentAttention(save="latent") and
the ops under it (torch_mla::mla_attention_block, torch_mla::rms_norm), against the float64 block
spec and today's module, with gradcheck, opcheck, torch.compile, autocast, and by counting what
is saved."""
import pytest
import torch

import torch_mla
from torch_mla import MultiHeadLatentAttention
from torch_mla.ops import mla_attention_block, rms_norm
from support import (BF16, FP32, block_spec, cu_seqlens_of, labelled, make_module, max_abs_err, max_rel_err,
                     peak_live_bytes)
from support import MODULE_SIZES as SIZES

CASES = ["q-lora", "no-q-lora", "half-rotate-bias"]  # of support.MODULE_CASES
LAYOUTS = {"padded": None, "packed": [1, 17, 0, 19]}


def layout_args(layout, hidden_size, dtype=torch.float32, device="cpu", seed=1):
    """x, position_ids, cu_seqlens of a padded (2, 37) or packed batch."""
    seqlens = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    if seqlens is None:
        lead, positions, cu = (2, 37), torch.arange(37), None
    else:
        lead, cu = (sum(seqlens),), cu_seqlens_of(seqlens)
        positions = torch.cat([torch.arange(n) for n in seqlens])
    x = torch.randn(*lead, hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(device), positions.to(device), None if cu is None else cu.to(device)


def out_and_grads(fn, params, x):
    """fn(params, x) and the grads of x and every parameter, for a fixed random grad_out."""
    x = x.detach().clone().requires_grad_()
    out = fn(params, x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, *params.values()], grad_out.to(out.device, out.dtype))
    return {"out": out.detach(), "x": grads[0], **dict(zip(params, grads[1:]))}


def module_fn(module, **kwargs):
    def fn(params, x):
        return torch.func.functional_call(module, params, (x,), kwargs)
    return fn


def spec_results(module, x, positions, cu, dtype):
    params = {k: v.detach().to("cpu", dtype).requires_grad_() for k, v in module.named_parameters()}
    return out_and_grads(lambda p, h: block_spec(module, p, h, positions.cpu(), None if cu is None else cu.cpu()),
                         params, x.detach().to("cpu", dtype))


def assert_close_rel(results, ref, tol):
    assert results.keys() == ref.keys()
    for name in ref:
        err = max_rel_err(results[name].cpu().double(), ref[name].double())
        assert err <= tol, f"{name}: max relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_float64_spec(case, layout):
    module = make_module(case, save="latent")
    x, positions, cu = layout_args(layout, SIZES["hidden_size"])
    ours = out_and_grads(module_fn(module, position_ids=positions + 5, cu_seqlens=cu),
                         dict(module.named_parameters()), x)
    assert_close_rel(ours, spec_results(module, x, positions + 5, cu, torch.float64), 1e-5)


# 3 heads in one group, in two (2 + 1) and, by default, in three (docs/design.md §13.6).
HEAD_CHUNKS = {"one-group": 1, "uneven-groups": 2, "default": None}


@pytest.mark.parametrize("head_chunks", list(HEAD_CHUNKS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_equals_todays_module_float64(case, layout, head_chunks):
    """Same core, same math: out and every grad as saving q or q's latent, to rounding, however
    the heads are grouped."""
    module = make_module(case, head_chunks=HEAD_CHUNKS[head_chunks]).double()
    x, positions, cu = layout_args(layout, SIZES["hidden_size"], torch.float64)
    params = dict(module.named_parameters())
    results = {}
    for save in ("q", "q_latent", "latent"):
        module.save = save
        results[save] = out_and_grads(module_fn(module, cu_seqlens=cu), params, x)
    assert_close_rel(results["latent"], results["q_latent"], 1e-12)
    assert_close_rel(results["latent"], results["q"], 1e-12)


# DeepSeek's head dims halved, (96, 64): served by every core, the kernels' too.
CORE_SIZES = dict(hidden_size=64, num_heads=2, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64)


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("minicpm3",))
def test_every_core_matches_float64_spec(core):
    """fp32 where the core serves it (≤ 1e-5), else bf16 by the 2×/3× rule against the naive bf16 spec."""
    d = CORE_SIZES
    for case in core.one_per_layout():
        layout = "packed" if case.packed else "padded"
        module = make_module("q-lora", CORE_SIZES, save="latent").to(core.device, case.dtype)
        x, positions, cu = layout_args(layout, d["hidden_size"], case.dtype, core.device)
        lead = x.shape[:-1]
        core.assert_serves(dict(
            q=x.new_empty(*lead, d["num_heads"], d["qk_nope_head_dim"] + d["qk_rope_head_dim"]),
            kv_latent=x.new_empty(*lead, d["kv_lora_rank"]), k_rope=x.new_empty(*lead, d["qk_rope_head_dim"]),
            wkv_b=x.new_empty(d["num_heads"] * (d["qk_nope_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"])), cu)
        ours = out_and_grads(module_fn(module, cu_seqlens=cu), dict(module.named_parameters()), x)
        ref = spec_results(module, x, positions, cu, torch.float64)
        with labelled(case):
            if case.dtype == FP32:
                assert_close_rel(ours, ref, 1e-5)
                continue
            naive = spec_results(module, x, positions, cu, torch.bfloat16)
            for name in ref:
                factor = 2 if name == "out" else 3
                err, naive_err = max_abs_err(ours[name].cpu(), ref[name]), max_abs_err(naive[name], ref[name])
                assert err <= factor * naive_err, f"{name}: max error {err:.3g} > {factor} × naive {naive_err:.3g}"


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    module = make_module("half-rotate-bias", save="latent")
    params = dict(module.named_parameters())
    for layout in LAYOUTS:
        x, _, cu = layout_args(layout, SIZES["hidden_size"])
        eager = out_and_grads(module_fn(module, cu_seqlens=cu), params, x)
        compiled = torch.compile(module_fn(module, cu_seqlens=cu), fullgraph=True, dynamic=True, backend="aot_eager")
        assert_close_rel(out_and_grads(compiled, params, x), eager, 1e-6)


def test_autocast_matches_todays_module():
    """Under torch.autocast(bfloat16) the block runs in bf16 with float32 norm weights, as the
    q-latent path does: both within the 2×/3× rule of the float64 spec."""
    module = make_module("q-lora")
    x, positions, _ = layout_args("padded", SIZES["hidden_size"])
    ref = spec_results(module, x, positions, None, torch.float64)
    naive = spec_results(module, x, positions, None, torch.bfloat16)
    for save in ("q_latent", "latent"):
        module.save = save
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = out_and_grads(module_fn(module), dict(module.named_parameters()), x)
        assert ours["out"].dtype == torch.bfloat16
        for name in ref:
            factor = 2 if name == "out" else 3
            err, naive_err = max_abs_err(ours[name], ref[name]), max_abs_err(naive[name], ref[name])
            assert err <= factor * naive_err, f"{save} {name}: {err:.3g} > {factor} × naive {naive_err:.3g}"


# ---- what is saved ------------------------------------------------------------------------------

def test_saves_only_input_prenorm_latents_and_statistics():
    """bf16 at DeepSeek-V3 head dims (H = 16): per token the block input x, q_a (Lq) and kv_a
    (Dc+Dr) in bf16, cos/sin (Dr/2 each) and two rstd in float32; not q, c_q, kv_latent, k_rope, out
    or lse — by storage and dtype."""
    sizes = dict(hidden_size=256, num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128)
    lq, batch, seqlen = 1536, 1, 64
    module = MultiHeadLatentAttention(**sizes, q_lora_rank=lq, save="latent", dtype=torch.bfloat16)
    x = torch.randn(batch, seqlen, sizes["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    with torch_mla.SavedTensors() as saved:
        out = module(x)
    tokens = batch * seqlen
    dr, dc = sizes["qk_rope_head_dim"], sizes["kv_lora_rank"]
    assert saved.nbytes_by_dtype(*module.parameters()) == {
        torch.bfloat16: 2 * tokens * (sizes["hidden_size"] + lq + dc + dr),
        torch.float32: 4 * (2 * seqlen * dr // 2 + 2 * tokens),  # cos, sin (positions shared by the batch), rstd
    }
    assert saved.holds(x) and not saved.holds(out)
    # The q-latent path keeps c_q, the normalised latent, k_rope, lse and out on top.
    module.save = "q_latent"
    with torch_mla.SavedTensors() as saved_q_latent:
        module(x)
    h, dv = sizes["num_heads"], sizes["v_head_dim"]
    extra = saved_q_latent.nbytes_excluding(*module.parameters()) - saved.nbytes_excluding(*module.parameters())
    assert extra >= tokens * (2 * (lq + dc + dr + h * dv) + 4 * h)


def test_rms_norm_saves_input_and_rstd_only():
    x = torch.randn(5, 7, 24, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.rand(24, requires_grad=True)
    with torch_mla.SavedTensors() as saved:
        y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.float32  # a float32 weight on bf16 x promotes, as HF's RMSNorm
    assert saved.nbytes_by_dtype(weight) == {torch.bfloat16: x.numel() * 2, torch.float32: 5 * 7 * 4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_is_hugging_faces(dtype):
    """Forward bit for bit as HF's DeepSeek RMSNorm; grads as autograd through it (fp32 ≤ 1e-5; bf16
    the 3× rule against float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 40, generator=gen).to(dtype)
    weight = (torch.rand(40, generator=gen) + 0.5).to(dtype)
    grad = torch.randn(3, 11, 40, generator=gen).to(dtype)

    def hf(x, weight):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return weight * h.to(x.dtype)

    def run(fn, x, weight):
        x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
        y = fn(x, weight)
        return (y.detach(), *torch.autograd.grad(y, [x, weight], grad.to(y.dtype)))

    ours, theirs = run(lambda a, b: rms_norm(a, b, 1e-6), x, weight), run(hf, x, weight)
    assert torch.equal(ours[0], theirs[0])
    ref = run(hf, x.double(), weight.double())
    for name, a, b, r in zip(("x", "weight"), ours[1:], theirs[1:], ref[1:]):
        if dtype == torch.float32:
            assert max_rel_err(a, r) <= 1e-5, name
        else:
            assert max_abs_err(a, r) <= 3 * max_abs_err(b, r), name


# ---- the op itself ------------------------------------------------------------------------------

TINY = dict(heads=2, nope=4, rope=4, v=4, latent=6, q_latent=5, hidden=7)


def block_inputs(lead, with_q_norm=True, with_bias=True, dtype=torch.float64, seed=0):
    d = TINY
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    angles = torch.rand(*lead, d["rope"] // 2, generator=gen, dtype=torch.float64) * 6.28
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


OP_CONFIGS = {"padded": ((2, 5), None), "packed": ((9,), [4, 0, 1, 4])}


@pytest.mark.parametrize("interleave", [True, False], ids=["interleave", "half"])
@pytest.mark.parametrize("optional", ["norm-bias", "no-norm-no-bias"])
@pytest.mark.parametrize("layout", list(OP_CONFIGS))
def test_gradcheck_float64(layout, optional, interleave):
    """Every tensor input, cos and sin included, with and without q_norm_weight and bo."""
    lead, seqlens = OP_CONFIGS[layout]
    cu = None if seqlens is None else cu_seqlens_of(seqlens)
    with_extras = optional == "norm-bias"
    inputs = block_inputs(lead, with_extras, with_extras)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}

    def fn(*tensors):
        args = dict(inputs, **dict(zip(names, tensors)))
        return mla_attention_block(**args, num_heads=TINY["heads"], softmax_scale=0.4, q_norm_eps=1e-3,
                                   kv_norm_eps=1e-2, rope_interleave=interleave, cu_seqlens=cu)

    assert torch.autograd.gradcheck(fn, tuple(leaves[k] for k in names))


def op_args(inputs, cu):
    return (*inputs.values(), TINY["heads"], 0.3, 1e-6, 1e-5, True, True, cu, 0 if cu is None else 9)


@pytest.mark.parametrize("layout", list(OP_CONFIGS))
def test_opcheck(layout):
    lead, seqlens = OP_CONFIGS[layout]
    cu = None if seqlens is None else cu_seqlens_of(seqlens)
    inputs = {k: None if v is None else v.float().requires_grad_() for k, v in block_inputs(lead).items()}
    torch.library.opcheck(torch.ops.torch_mla.mla_attention_block.default, op_args(inputs, cu))
    x = torch.randn(*lead, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.torch_mla.rms_norm.default, (x, torch.rand(6, requires_grad=True), 1e-6))


def test_double_backward_is_refused():
    inputs = {k: None if v is None else v.requires_grad_() for k, v in block_inputs((1, 4)).items()}
    out = mla_attention_block(**inputs, num_heads=TINY["heads"])
    (grad_q_a,) = torch.autograd.grad(out.sum(), inputs["q_a"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q_a.sum().backward()


@pytest.mark.parametrize("head_chunks", [1, 2])
@pytest.mark.parametrize("lead,seqlens", [((0, 5), None), ((2, 0), None), ((0,), []), ((0,), [0, 0])],
                         ids=["no-sequences", "empty-sequences", "packed-none", "packed-empty"])
def test_empty_batches_and_sequences(lead, seqlens, head_chunks):
    """No tokens: an empty output and zero grads for every input, in one head group or two."""
    inputs = {k: None if v is None else v.requires_grad_() for k, v in block_inputs(lead).items()}
    cu = None if seqlens is None else cu_seqlens_of(seqlens)
    y = mla_attention_block(**inputs, num_heads=TINY["heads"], cu_seqlens=cu, head_chunks=head_chunks)
    assert y.shape == (*lead, TINY["hidden"])
    y.sum().backward()
    for name, t in inputs.items():
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name


BAD = {
    "kv_a": (lambda i: dict(i, kv_a=i["kv_a"][..., :5]), "kv_a must have shape"),  # narrower than Dc = 6
    "kv_norm_weight": (lambda i: dict(i, kv_norm_weight=i["kv_norm_weight"][:-1]), "kv_norm_weight must have shape"),
    "q_norm_weight": (lambda i: dict(i, q_norm_weight=i["q_norm_weight"][:-1]), "q_norm_weight must have shape"),
    "wq_b": (lambda i: dict(i, wq_b=i["wq_b"][:, :-1]), "wq_b must have shape"),
    "wo": (lambda i: dict(i, wo=i["wo"][:, :-1]), "wo must have shape"),
    "bo": (lambda i: dict(i, bo=i["bo"][:-1]), "bo must have shape"),
    "cos": (lambda i: dict(i, cos=i["cos"][..., :-1]), "cos must have shape"),
    "dtype": (lambda i: dict(i, wo=i["wo"].float()), "wo must have q_a's dtype"),
    "q_a": (lambda i: dict(i, q_a=i["q_a"][0]), "q_a must be a floating-point tensor of shape"),
    "head_chunks": (lambda i: dict(i, head_chunks=0), "head_chunks must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_argument_errors_name_the_argument(case):
    make_bad, message = BAD[case]
    inputs = make_bad(block_inputs((2, 5)))
    with pytest.raises(ValueError, match=f"torch_mla.mla_attention_block: {message}"):
        mla_attention_block(**inputs, num_heads=TINY["heads"])
    with pytest.raises(ValueError, match=message):  # the Meta kernel: the same checks
        meta = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in inputs.items()}
        mla_attention_block(**meta, num_heads=TINY["heads"])


def test_module_settings_errors():
    with pytest.raises(ValueError, match="save must be one of"):
        make_module("q-lora", save="everything")
    with pytest.raises(ValueError, match="head_chunks must be >= 1 or None, got 0"):
        make_module("q-lora", save="latent", head_chunks=0)
    module = make_module("q-lora", save="latent")
    module.context_parallel_group = object()  # checked before the group is used
    with pytest.raises(ValueError, match="save='latent' does not support context parallelism"):
        module(torch.randn(1, 4, SIZES["hidden_size"]))


def test_head_groups_bound_the_backward_transient():
    """docs/design.md §13.6: with the heads in H groups, one head's q, out and grad of out exist at
    a time in the backward, not all H heads'. The peak of live bytes of one forward+backward (the
    profiler's allocation events) drops by at least what those three tensors of the other H − 1
    heads weigh."""
    sizes = dict(SIZES, num_heads=8)
    x = torch.randn(1, 512, sizes["hidden_size"], requires_grad=True)
    peaks = {}
    for head_chunks in (1, 8):
        module = make_module("q-lora", sizes, save="latent", head_chunks=head_chunks)
        module(x[:, :8]).sum().backward()  # parameters' grads allocated before the measured step
        peaks[head_chunks] = peak_live_bytes(lambda: module(x).backward(torch.ones_like(x)))
    tokens, dims = x.shape[1], sizes["qk_nope_head_dim"] + sizes["qk_rope_head_dim"] + 2 * sizes["v_head_dim"]
    per_head = tokens * dims * x.element_size()  # q, out and grad_out of one head
    assert peaks[1] - peaks[8] >= 7 * per_head, f"peaks {peaks}, 7 heads' q/out/grad_out {7 * per_head}"


# Errors that the attention inside the block raises (data-dependent checks of cu_seqlens, the
# core) name the op the user called: the block.
INNER_ERRORS = {
    "cu_seqlens end": (dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), "cu_seqlens must end at T = 9"),
    "max_seqlen": (dict(cu_seqlens=cu_seqlens_of([4, 5]), max_seqlen=2), r"max_seqlen \(2\) is smaller"),
}


@pytest.mark.parametrize("case", list(INNER_ERRORS))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_errors_of_the_inner_attention_name_the_block(case, requires_grad):
    kwargs, message = INNER_ERRORS[case]
    inputs = {k: v.requires_grad_(requires_grad) if torch.is_tensor(v) else v
              for k, v in block_inputs((9,)).items()}
    with pytest.raises(ValueError, match=f"^torch_mla.mla_attention_block: {message}"):
        mla_attention_block(**inputs, num_heads=TINY["heads"], **kwargs)


def test_a_core_that_cannot_serve_the_block_is_named_by_the_block():
    inputs = {k: v.requires_grad_() if torch.is_tensor(v) else v for k, v in block_inputs((2, 5)).items()}
    with torch_mla.use_core("simt"):  # float64: the emulated kernels take bf16/fp16 only
        with pytest.raises(ValueError, match='^torch_mla.mla_attention_block: core "simt" cannot serve'):
            mla_attention_block(**inputs, num_heads=TINY["heads"])
