"""CUDA-only properties of mla_attention, per CUDA attention core (docs/design.md §10.2).

The accuracy bodies shared with the CPU cores live in test_op.py; here: long sequences, 128 heads,
determinism, memory past tensors' ends, opcheck/compile on CUDA, peak memory, the auto rule on
this device. Accuracy by docs/design.md §8. Not collected where no CUDA device is present (the
`cuda` marker; conftest.py counts the cases). A test taking `core` runs once per CUDA core whose
served list (support.served_cases, for this device's capability) holds a case it asks for.
"""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torch_mla
from support import (BF16, DSV3, FP16, SMALL, TENSOR_ARGS, check_lowp_against_reference, check_results,
                     labelled, make_inputs, max_abs_err, max_rel_err, nan_padded, reference_results,
                     run_with_grads)

pytestmark = pytest.mark.cuda

CUDA = "cuda"
# The cases these bodies ask of each CUDA core: DeepSeek-V3's head dims in bf16 unless said.
DSV3_BF16 = dict(devices=("cuda",), dtypes=(BF16,), dims=("dsv3",))


@pytest.fixture
def deterministic(monkeypatch):
    """torch.use_deterministic_algorithms(True) for one test (cuBLAS needs its workspace config)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def cuda_inputs(dims, dtype, **kwargs):
    """make_inputs on the GPU (for tests that leave the core to `auto`)."""
    return make_inputs(dims, dtype=dtype, device=CUDA, **kwargs)


def run_and_check(inputs, **kwargs):
    results = run_with_grads(torch_mla.mla_attention, inputs, **kwargs)
    check_results(results, inputs, **kwargs)
    return results


@pytest.mark.cases(**DSV3_BF16, packed=False)
def test_long_sequences_match_reference(core):
    for case in core.cases:
        for batch, seqlen, heads in ((2, 1000, 2), (1, 4097, 1)):
            inputs, _ = core.inputs(case, heads=heads, batch=batch, seqlen=seqlen)
            with labelled(case, f"B={batch} S={seqlen} H={heads}"):
                run_and_check(inputs, causal=True)


VARLEN = [1, 0, 65, 3, 129, 64, 0, 200, 1]


@pytest.mark.cases(devices=("cuda",), dtypes=(BF16, FP16), dims=("dsv3", "minicpm3"), packed=True, deterministic=True)
def test_deterministic_varlen_matches_reference(deterministic, core):
    for case in core.cases:
        inputs, cu = core.inputs(case, seqlens=VARLEN)
        for causal in (True, False):
            with labelled(case, "causal" if causal else "full"):
                run_and_check(inputs, causal=causal, cu_seqlens=cu)


@pytest.mark.cases(**DSV3_BF16, packed=True)
def test_varlen_with_max_seqlen_given_matches_reference(core):
    for case in core.cases:
        inputs, cu = core.inputs(case, seqlens=VARLEN)
        results = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu, max_seqlen=max(VARLEN))
        check_results(results, inputs, cu_seqlens=cu)


@pytest.mark.cases(**DSV3_BF16, packed=False)
def test_head_count_128_matches_reference(core):
    for case in core.cases:
        inputs, _ = core.inputs(case, heads=128, batch=2, seqlen=130)
        run_and_check(inputs, causal=True)


def test_auto_takes_the_rule_for_this_device():
    """explain() on this GPU agrees with the rule evaluated on a description of it."""
    major, minor = torch.cuda.get_device_capability()
    inputs, cu = cuda_inputs(DSV3, torch.bfloat16, seqlens=[70, 1, 129], requires_grad=False)
    chosen = torch_mla.explain(*(inputs[k] for k in TENSOR_ARGS), cu_seqlens=cu).core
    described = torch_mla.cores.choose_core(
        device="cuda", capability=10 * major + minor, dtype=torch.bfloat16, dim_nope=DSV3.nope,
        dim_rope=DSV3.rope, dim_v=DSV3.v, varlen=True, cudnn_version=torch.backends.cudnn.version() or 0,
        kernel_archs=torch_mla.cores.compiled_kernel_archs()).core
    assert chosen == described
    print(f"\nauto on sm_{major}{minor}, DSv3 bf16 packed: {chosen}")


@pytest.mark.cases(**DSV3_BF16, packed=True, deterministic=True)
def test_deterministic_backward_is_bitwise_reproducible(deterministic, core):
    inputs, cu = core.inputs(core.cases[0], heads=16, seqlens=[300, 1, 129, 64])
    first_out, first_grads = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu)
    for _ in range(49):
        out, grads = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu)
        assert torch.equal(out, first_out)
        for k in TENSOR_ARGS:
            assert torch.equal(grads[k], first_grads[k]), k


@pytest.mark.cases(**DSV3_BF16, packed=True)
def test_forward_is_bitwise_reproducible_without_deterministic_mode(core):
    inputs, cu = core.inputs(core.cases[0], seqlens=[300, 1, 129], requires_grad=False)
    first = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_lse=True)
    for _ in range(10):
        out, lse = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_lse=True)
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])


@pytest.mark.cases(devices=("cuda",), dtypes=(BF16,), dims=("dsv3", "minicpm3"), packed=True)
def test_memory_past_the_logical_end_is_never_read(core):
    for case in core.cases:
        with labelled(case):
            memory_past_the_logical_end_is_never_read(core, case)


def memory_past_the_logical_end_is_never_read(core, case):
    """q and grad_out are views whose neighbouring rows and columns are NaN, kv_latent and
    k_rope the two halves of one NaN-padded kv_a_proj_with_mqa output, and the allocator's free
    memory is NaN too: a read past a sequence's end or an unwritten output would show as NaN."""
    seqlens = [65, 1, 130]
    T = sum(seqlens)
    dims = case.head_dims()
    inputs, cu = core.inputs(case, seqlens=seqlens, requires_grad=False)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(T, dims.heads, dims.v, generator=gen).to(torch.bfloat16).to(CUDA)

    q_buf, _ = nan_padded(inputs["q"], 64, 8)
    kv_a_buf, _ = nan_padded(torch.cat([inputs["kv_latent"], inputs["k_rope"]], dim=-1), 64, 8)
    _, grad_out_view = nan_padded(grad_out, 64, 8)
    q_buf.requires_grad_(True)
    kv_a_buf.requires_grad_(True)
    wkv_b = inputs["wkv_b"].clone().requires_grad_(True)
    views = dict(q=q_buf[:T, :, : dims.nope + dims.rope], kv_latent=kv_a_buf[:T, : dims.latent],
                 k_rope=kv_a_buf[:T, dims.latent: dims.latent + dims.rope], wkv_b=wkv_b)

    torch.full((1 << 28,), math.nan, device=CUDA)  # freed at once: the allocator hands it out next
    out = torch_mla.mla_attention(**views, cu_seqlens=cu)
    grads = dict(zip(TENSOR_ARGS, torch.autograd.grad(out, [views[k] for k in TENSOR_ARGS], grad_out_view)))
    check_lowp_against_reference({"out": out.detach(), **grads}, inputs, grad_out, cu_seqlens=cu)


def op_args(inputs, cu, dims, core, causal=True):
    return (*[inputs[k] for k in TENSOR_ARGS], (dims.nope + dims.rope) ** -0.5, causal, cu, 0, core)


@pytest.mark.cases(**DSV3_BF16)
def test_opcheck(core):
    for case in core.cases:
        shape = dict(seqlens=[4, 0, 70, 1]) if case.packed else dict(batch=2, seqlen=70)
        inputs, cu = core.inputs(case, requires_grad=False, **shape)
        args = op_args(inputs, cu, DSV3, core.name)
        with labelled(case):
            torch.library.opcheck(torch.ops.torch_mla.mla_attention.default, args)
            out, lse, _ = torch.ops.torch_mla.mla_attention(*args)
            grad_out = torch.randn_like(out)
            torch.library.opcheck(torch.ops.torch_mla.mla_attention_backward.default,
                                  (grad_out, *args[:4], out, lse, *args[4:]))


@pytest.mark.cases(**DSV3_BF16, packed=True, deterministic=True)
def test_compile_fullgraph_equals_eager(deterministic, core):
    def loss_fn(q, kv_latent, k_rope, wkv_b, cu_seqlens):
        out = torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b, cu_seqlens=cu_seqlens)
        return out.float().square().sum()

    inputs, cu = core.inputs(core.cases[0], seqlens=[70, 1, 129])
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss, eager_grads = run_with_grads(lambda **kw: loss_fn(**kw, cu_seqlens=cu), inputs)
    loss, grads = run_with_grads(lambda **kw: compiled(**kw, cu_seqlens=cu), inputs)
    # The compiled graph may sum the loss in another order; the op itself must be identical.
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    for k in TENSOR_ARGS:
        assert torch.equal(grads[k], eager_grads[k]), k


@pytest.mark.filterwarnings("ignore:.*composed-ATen")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_agrees_with_cpu(dtype):
    """The same inputs through the CPU core and the core `auto` picks on CUDA. Each is within
    docs/design.md §8 of the float64 reference; here they are compared to each other: fp32 within
    the two 1e-5 bounds combined, bf16 within FlashAttention's rule with the CPU result in the
    reference's place."""
    dims = DSV3 if dtype == torch.bfloat16 else SMALL
    inputs, cu = make_inputs(dims, seqlens=[70, 1, 129], dtype=dtype)
    cpu_out, cpu_grads = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu)
    cuda_in = {k: v.detach().to(CUDA) for k, v in inputs.items()}
    cuda_out, cuda_grads = run_with_grads(torch_mla.mla_attention, cuda_in, cu_seqlens=cu.to(CUDA))
    ours = {"out": cuda_out.cpu(), **{k: v.cpu() for k, v in cuda_grads.items()}}
    cpu = {"out": cpu_out, **cpu_grads}
    if dtype == torch.float32:
        for name in ours:
            assert max_rel_err(ours[name], cpu[name]) <= 2e-5, name
        return
    ref_out, ref_grads = reference_results(inputs, torch.float64, cu_seqlens=cu)
    naive_out, naive_grads = reference_results(inputs, dtype, cu_seqlens=cu)
    refs, naive = {"out": ref_out, **ref_grads}, {"out": naive_out, **naive_grads}
    for name in ours:
        factor = 2 if name == "out" else 3
        assert max_abs_err(ours[name], cpu[name]) <= factor * max_abs_err(naive[name], refs[name]), name


def test_composed_under_auto_warns_once():
    """TORCH_WARN_ONCE: the first CUDA call `auto` sends to the composed core warns, later ones not.
    float64 is a call only composed serves on CUDA (the fused cores take 16-bit or float32 inputs,
    cores/table.cpp); the script first checks that auto does send it there."""
    script = textwrap.dedent(f"""
        import sys, warnings
        import torch, torch_mla
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from support import SMALL, make_inputs
        probe, _ = make_inputs(SMALL, batch=1, seqlen=9, dtype=torch.float64, device="cuda")
        print(torch_mla.explain(*probe.values()).core)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                inputs, _ = make_inputs(SMALL, batch=1, seqlen=9, dtype=torch.float64, device="cuda")
                torch_mla.mla_attention(**inputs).sum().backward()
        print(sum("composed-ATen" in str(w.message) for w in caught))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    chosen, warnings_seen = result.stdout.strip().splitlines()[-2:]
    assert chosen == "composed", f"auto sends float64 to {chosen}: the test no longer reaches composed"
    assert warnings_seen == "1", f"{warnings_seen} warnings in 3 calls"


def test_invalid_cu_seqlens_raise_value_error():
    inputs, _ = cuda_inputs(DSV3, torch.bfloat16, seqlens=[4, 4], requires_grad=False)
    bad = torch.tensor([0, 6, 4], dtype=torch.int32, device=CUDA)
    with pytest.raises(ValueError, match="non-decreasing"):
        torch_mla.mla_attention(**inputs, cu_seqlens=bad)
    with pytest.raises(ValueError, match="end at"):
        torch_mla.mla_attention(**inputs, cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32, device=CUDA))


@pytest.mark.cases(**DSV3_BF16, packed=False)
def test_backward_peak_memory_is_one_layer_of_kv_dkv_and_dq(core):
    """Transient memory of the backward: KV + dKV (input dtype) + the float32 dQ accumulator and
    O(T·H) statistics, nothing per (query, key) pair; the stock cores also hold K = [k_nope | k_rope],
    V and their gradients for the call."""
    case = core.cases[0]
    dims = case.head_dims(heads=16)
    inputs, _ = core.inputs(case, heads=16, batch=1, seqlen=4096)
    out = torch_mla.mla_attention(**inputs)
    grad_out = torch.randn_like(out)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    T, H = 4096, dims.heads
    kv = T * H * (dims.nope + dims.v) * 2
    dq_accum = T * H * (dims.nope + dims.rope) * 4
    grads = sum(t.numel() * t.element_size() for t in inputs.values())
    stock = 2 * T * H * (dims.nope + dims.rope + dims.v) * 2 if core.name in ("cudnn", "efficient") else 0
    if core.name == "composed":  # float32 dKV and one chunk of scores (kChunkElements floats)
        stock = kv * 2 + (1 << 25) * 4 * 3
    bound = 2 * kv + dq_accum + grads + stock + T * H * 16 + (64 << 20)  # + statistics, cuBLAS workspace
    assert peak <= bound, f"backward peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"


@pytest.mark.cases(**DSV3_BF16, packed=False)
def test_non_contiguous_views_match_reference(core):
    """The views a model hands over: q a (B, H, S, D) → (B, S, H, D) transpose, kv_latent and
    k_rope the two halves of kv_a_proj_with_mqa's output, wkv_b a column slice."""
    dims = DSV3
    inputs, _ = core.inputs(core.cases[0], batch=2, seqlen=100, requires_grad=False)
    q_base = inputs["q"].transpose(1, 2).contiguous().requires_grad_(True)
    kv_a = torch.cat([inputs["kv_latent"], inputs["k_rope"]], dim=-1).requires_grad_(True)
    w_base = torch.cat([inputs["wkv_b"], torch.randn_like(inputs["wkv_b"][:, :8])], dim=1).requires_grad_(True)
    views = dict(q=q_base.transpose(1, 2), kv_latent=kv_a[..., : dims.latent], k_rope=kv_a[..., dims.latent:],
                 wkv_b=w_base[:, : dims.latent])
    assert not any(v.is_contiguous() for v in views.values())
    grad_out = torch.randn(2, 100, dims.heads, dims.v, device=CUDA).to(torch.bfloat16)
    out = torch_mla.mla_attention(**views)
    grads = dict(zip(TENSOR_ARGS, torch.autograd.grad(out, [views[k] for k in TENSOR_ARGS], grad_out)))
    check_lowp_against_reference({"out": out.detach(), **grads}, inputs, grad_out)
