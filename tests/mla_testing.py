"""Shared helpers for the tests: random MLA inputs and the docs/design.md §8 accuracy rules."""
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from torch_mla.reference import mla_attention_reference


@dataclass(frozen=True)
class HeadDims:
    """Per-head sizes (docs/design.md §7): H heads, q/k nope Dn, rope Dr, value Dv, latent Dc."""
    heads: int
    nope: int
    rope: int
    v: int
    latent: int


SMALL = HeadDims(heads=2, nope=16, rope=8, v=16, latent=32)
DSV3 = HeadDims(heads=2, nope=128, rope=64, v=128, latent=512)  # DeepSeek-V3 head dims, small H
MINICPM3 = HeadDims(heads=2, nope=64, rope=32, v=64, latent=256)


def make_inputs(dims: HeadDims, batch: int = 2, seqlen: int = 16, *,
                seqlens: Optional[Sequence[int]] = None, dtype=torch.float32, device="cpu",
                seed: int = 0, requires_grad: bool = True):
    """Random inputs of unit scale; packed (T, ...) with cu_seqlens when `seqlens` is given.

    wkv_b is scaled by Dc^-0.5 so the expanded K and V have unit variance, as in a trained model.
    """
    gen = torch.Generator().manual_seed(seed)
    lead = (sum(seqlens),) if seqlens is not None else (batch, seqlen)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    inputs = dict(
        q=rand(*lead, dims.heads, dims.nope + dims.rope),
        kv_latent=rand(*lead, dims.latent),
        k_rope=rand(*lead, dims.rope),
        wkv_b=rand(dims.heads * (dims.nope + dims.v), dims.latent, scale=dims.latent ** -0.5),
    )
    cu_seqlens = None
    if seqlens is not None:
        cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32,
                                  device=device)
    return inputs, cu_seqlens


TENSOR_ARGS = ("q", "kv_latent", "k_rope", "wkv_b")

# Where the exact result is identically zero (dq and dk_rope when every sequence has one token, so
# P = 1 and dS = dP − delta = 0), the naive low-precision error is zero too and FlashAttention's
# rule degenerates; there the float32 rounding of dP − delta must stay at this level.
EXACT_ZERO_TOL = 1e-5


def run_with_grads(fn, inputs, grad_out_seed=1, **kwargs):
    """out and the grads of the four tensor inputs for a fixed random grad_out."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [leaves[k] for k in TENSOR_ARGS], grad_out, allow_unused=True)
    grads = [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(TENSOR_ARGS, grads)]
    return out.detach(), dict(zip(TENSOR_ARGS, grads))


def reference_results(inputs, dtype, **kwargs):
    """The reference run in `dtype` on the given inputs (cast first)."""
    cast = {k: v.detach().to(dtype) for k, v in inputs.items()}
    return run_with_grads(mla_attention_reference, cast, **kwargs)


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x − ref| / max(max|ref|, 1) (0 for empty tensors).

    The inputs are unit-scale, so 1 is the unit of every result; the floor only matters for a
    result that is exactly zero in exact arithmetic (dq and dk_rope of a length-1 causal
    sequence), where a pure ratio would judge rounding noise against zero.
    """
    if ref.numel() == 0:
        return 0.0
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def assert_matches_reference(fn, inputs, *, rel_tol=None, **kwargs):
    """Checks fn's out and grads against the float64 reference (docs/design.md §8).

    fp64/fp32 inputs: max relative error ≤ rel_tol (default 1e-10 / 1e-5).
    bf16/fp16 inputs: FlashAttention's rule, max|ours − ref| ≤ 2× (out) / 3× (grads)
    max|naive − ref|, where naive is the reference run in the same low precision.
    """
    return check_results(run_with_grads(fn, inputs, **kwargs), inputs, rel_tol=rel_tol, **kwargs)


def check_results(results, inputs, *, rel_tol=None, **kwargs):
    """assert_matches_reference on results = (out, grads) already computed from `inputs`."""
    dtype = inputs["q"].dtype
    out, grads = results
    ref_out, ref_grads = reference_results(inputs, torch.float64, **kwargs)
    results = {"out": (out, ref_out), **{k: (grads[k], ref_grads[k]) for k in TENSOR_ARGS}}
    assert out.dtype == dtype and out.shape == ref_out.shape
    for name, (x, _) in results.items():
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
    if dtype in (torch.float64, torch.float32):
        tol = rel_tol if rel_tol is not None else (1e-10 if dtype == torch.float64 else 1e-5)
        for name, (x, ref) in results.items():
            err = max_rel_err(x, ref)
            assert err <= tol, f"{name}: max relative error {err:.3g} > {tol:g}"
    else:
        naive_out, naive_grads = reference_results(inputs, dtype, **kwargs)
        naive = {"out": naive_out, **naive_grads}
        for name, (x, ref) in results.items():
            if ref.numel() and ref.abs().max() == 0:
                err = max_abs_err(x, ref)
                assert err <= EXACT_ZERO_TOL, f"{name}: exact result is 0, max |ours| = {err:.3g}"
                continue
            factor = 2 if name == "out" else 3
            err, naive_err = max_abs_err(x, ref), max_abs_err(naive[name], ref)
            assert err <= factor * naive_err, (
                f"{name}: max error {err:.3g} > {factor} × naive {dtype} error {naive_err:.3g}")
    return results


def nan_padded(t, extra_rows, extra_cols):
    """A copy of t inside a larger NaN-filled buffer: (buffer, view); the rows and last-dim
    columns of the buffer past t's end are NaN."""
    buf = torch.full((t.shape[0] + extra_rows, *t.shape[1:-1], t.shape[-1] + extra_cols), float("nan"),
                     dtype=t.dtype, device=t.device)
    buf[: t.shape[0], ..., : t.shape[-1]] = t
    return buf, buf[: t.shape[0], ..., : t.shape[-1]]


def out_and_grads(fn, tensors, grad_out, **kwargs):
    """out and the four grads of fn on fresh leaves made from `tensors`, for a given grad_out."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out = fn(**leaves, **kwargs)
    grads = torch.autograd.grad(out, [leaves[k] for k in TENSOR_ARGS], grad_out.to(out.dtype))
    return out.detach(), dict(zip(TENSOR_ARGS, grads))


def check_lowp_against_reference(ours, inputs, grad_out, **kwargs):
    """ours = {"out", *TENSOR_ARGS} computed from views of `inputs` (bf16/fp16) with grad_out:
    finite, and within FlashAttention's rule (2× / 3× the naive low-precision error)."""
    for name, x in ours.items():
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
    ref_out, ref_grads = out_and_grads(mla_attention_reference, {k: v.double() for k, v in inputs.items()},
                                       grad_out, **kwargs)
    naive_out, naive_grads = out_and_grads(mla_attention_reference, inputs, grad_out, **kwargs)
    refs, naive = {"out": ref_out, **ref_grads}, {"out": naive_out, **naive_grads}
    for name in ours:
        factor = 2 if name == "out" else 3
        err, naive_err = max_abs_err(ours[name], refs[name]), max_abs_err(naive[name], refs[name])
        assert err <= factor * naive_err, f"{name}: max error {err:.3g} > {factor} × naive {naive_err:.3g}"


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """The peak of CPU bytes held by live tensors while fn() runs, above what was held when it
    started: from the allocation events of torch.profiler (profile_memory=True), each of which
    carries the allocator's running total. Unlike the process's peak RSS, no allocator slack."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    first = min(events, key=lambda e: e["ts"])["args"]
    start = first["Total Allocated"] - first["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start
