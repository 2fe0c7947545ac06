"""Everything the tests share (no test file imports another): the (device, core) pairs and the cases
each core must serve; random MLA inputs and the docs/design.md §8 accuracy rules; float64
specifications of the q-latent op and the attention block; tiny Hugging Face DeepSeek models; the
module builder; op-call counting; CPU process groups for the distributed tests."""
import collections
import contextlib
import datetime
import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_mla
from torch_mla.reference import mla_attention_reference

# ---- inputs ---------------------------------------------------------------------------------------


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
TINY = HeadDims(heads=2, nope=4, rope=2, v=3, latent=5)  # gradcheck: one forward per input element

TENSOR_ARGS = ("q", "kv_latent", "k_rope", "wkv_b")


def cu_seqlens_of(seqlens: Sequence[int], device="cpu") -> torch.Tensor:
    """(B+1,) int32 offsets of sequences of the given lengths."""
    return torch.tensor([0, *torch.tensor(list(seqlens), dtype=torch.long).cumsum(0).tolist()],
                        dtype=torch.int32, device=device)


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
    cu_seqlens = None if seqlens is None else cu_seqlens_of(seqlens, device)
    return inputs, cu_seqlens


# ---- the cores and the cases each must serve ------------------------------------------------------

FP64, FP32, BF16, FP16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_NAMES = {FP64: "fp64", FP32: "fp32", BF16: "bf16", FP16: "fp16"}
# Named head dims (Dn, Dr, Dv) and the HeadDims a body gets by default (heads and Dc never decide
# the core). dsv3 and minicpm3 are the two shapes our CUDA kernels are tuned for.
NAMED_DIMS = {"small": SMALL, "dsv3": DSV3, "minicpm3": MINICPM3, "tiny": TINY}

# Every (device, core) pair a shared body runs on (docs/design.md §10.2); CUDA pairs are collected
# only where a CUDA device is present (conftest.py).
CORE_PAIRS = (("cpu", "cpu"), ("cpu", "composed"), ("cpu", "simt"),
              ("cuda", "cudnn"), ("cuda", "cuda"), ("cuda", "efficient"), ("cuda", "composed"))


@dataclass(frozen=True)
class Case:
    """A call a core must serve: dtype, named head dims, padded or packed."""
    dtype: torch.dtype
    dims: str
    packed: bool

    def head_dims(self, heads: int = 2, latent: Optional[int] = None) -> HeadDims:
        d = NAMED_DIMS[self.dims]
        return HeadDims(heads=heads, nope=d.nope, rope=d.rope, v=d.v, latent=latent or d.latent)

    def __str__(self) -> str:
        d = NAMED_DIMS[self.dims]
        return (f"{DTYPE_NAMES[self.dtype]} {self.dims} ({d.nope}+{d.rope}, {d.v}) "
                f"{'packed' if self.packed else 'padded'}")


def _cases(dtypes, dims, layouts=(False, True)) -> Tuple[Case, ...]:
    return tuple(Case(t, d, p) for t in dtypes for d in dims for p in layouts)


def served_cases(device: str, core: str, capability: int = 90, deterministic: bool = False) -> Tuple[Case, ...]:
    """The cases `core` must serve: written here from docs/design.md §10.3, never read from the
    selection code, so that a selection regression fails a test instead of shrinking the suite.
    capability is 10·major + minor of the CUDA device (90 = sm_90)."""
    every = _cases((FP32, BF16, FP16, FP64), ("small", "minicpm3", "dsv3", "tiny"))
    if device == "cpu":
        # simt: our CUDA kernels (bf16/fp16, the tuned (Dn+Dr, Dv) = (96, 64) and (192, 128),
        # Dn and Dr multiples of 8) on the SIMT emulator.
        simt = _cases((BF16, FP16), ("minicpm3", "dsv3"))
        return {"cpu": every, "composed": every, "simt": simt}[core]
    if core == "composed":
        return every
    if core == "efficient":  # PyTorch's memory-efficient SDPA: head dims multiples of 8 here
        return () if deterministic else _cases((FP32, BF16, FP16), ("small", "minicpm3", "dsv3"))
    if core == "cudnn":  # sm_90 and later, padded only (no ragged layout), not deterministic
        if capability < 90 or deterministic:
            return ()
        return _cases((BF16, FP16), ("small", "minicpm3", "dsv3"), layouts=(False,))
    if core == "cuda":  # our kernels; (192, 128)'s backward needs more than sm_86/89's 99 KiB
        if capability < 80:
            return ()
        dims = ("minicpm3", "dsv3") if capability in (80, 87) or capability >= 90 else ("minicpm3",)
        return _cases((BF16, FP16), dims)
    raise ValueError(f"unknown core {core!r}")


@contextlib.contextmanager
def labelled(*what):
    """Prefixes an AssertionError raised inside with `what`: a body that loops over cases says
    which one failed."""
    try:
        yield
    except AssertionError as e:
        e.args = (f"[{' '.join(str(w) for w in what)}] {e.args[0] if e.args else ''}", *e.args[1:])
        raise


@dataclass(frozen=True)
class Core:
    """A (device, core) pair and the cases of its served list a test body asked for; the body
    runs inside torch_mla.use_core(name) (conftest.py's `core` fixture)."""
    device: str
    name: str
    cases: Tuple[Case, ...]

    @property
    def id(self) -> str:
        return f"{self.device}-{self.name}"

    def first(self, packed: bool) -> Optional[Case]:
        """The first listed case of one layout (None if the core serves none of it)."""
        return next((c for c in self.cases if c.packed == packed), None)

    def one_per_layout(self) -> Tuple[Case, ...]:
        """One case per layout: for bodies whose property holds for any dtype and head dims."""
        return tuple(c for c in (self.first(False), self.first(True)) if c is not None)

    def assert_serves(self, inputs, cu_seqlens=None):
        """torch_mla.explain must agree that this core serves the call (a listed case)."""
        args = [inputs[k] for k in TENSOR_ARGS]
        try:
            chosen = torch_mla.explain(*args, cu_seqlens=cu_seqlens).core
        except ValueError as e:
            raise AssertionError(f"{self.name} must serve this call: {e}") from None
        assert chosen == self.name, f"{self.name} must serve this call, explain says {chosen}"

    def inputs(self, case: Case, heads: int = 2, latent: Optional[int] = None, **kwargs):
        """make_inputs for `case` on this device, after asserting the core serves them."""
        inputs, cu = make_inputs(case.head_dims(heads, latent), dtype=case.dtype, device=self.device, **kwargs)
        assert (cu is not None) == case.packed, f"{case}: the body built the other layout"
        self.assert_serves(inputs, cu)
        return inputs, cu


def cores_for(filters: Sequence[dict], capability: int) -> list:
    """The pairs with at least one served case matching any of `filters` (a `cases` marker's
    keyword arguments: dtypes, dims, packed, deterministic, devices), each with those cases."""
    filters = filters or [{}]
    cores = []
    for device, name in CORE_PAIRS:
        picked = []
        for f in filters:
            if device not in f.get("devices", (device,)):
                continue
            for case in served_cases(device, name, capability, f.get("deterministic", False)):
                if (case.dtype in f.get("dtypes", (case.dtype,)) and case.dims in f.get("dims", (case.dims,))
                        and f.get("packed", case.packed) == case.packed and case not in picked):
                    picked.append(case)
        if picked:
            cores.append(Core(device, name, tuple(picked)))
    return cores


# ---- the accuracy rules (docs/design.md §8) ------------------------------------------------------

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


class OpCounter(TorchDispatchMode):
    """Counts the torch_mla ops that reach their kernels, by name (mla_attention,
    mla_attention_backward, ...): tells the op from a fallback that computes the same numbers."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torch_mla":
            self.counts[func._schema.name.split("::")[1]] += 1
        return func(*args, **(kwargs or {}))

    def attention_calls(self) -> int:
        """Forward calls of the attention op in any of its forms: plain, q-latent, latent-only block."""
        return sum(self.counts[op] for op in ("mla_attention", "mla_attention_q_latent",
                                              "_mla_attention_block_with_rstd"))


def assert_ran_the_op(layers: int, forward: OpCounter, backward: Optional[OpCounter] = None):
    """forward and backward count the ops of one forward and of its backward through a model with
    `layers` attention layers, each patched to torch_mla (layers = 0: unpatched, no op at all).
    One attention call per layer in the forward, the op's backward at least once per layer (the
    latent-only block runs it once per head group): the op ran, not a fallback to the model's own
    attention, which computes the same numbers."""
    assert forward.attention_calls() == layers, f"forward ops {dict(forward.counts)}, {layers} layers"
    if backward is not None:
        calls = backward.counts["mla_attention_backward"]
        assert calls >= layers and (calls == 0) == (layers == 0), f"backward ops {dict(backward.counts)}"


# ---- float64 specifications of the q-latent op and the block --------------------------------------

def rope_spec(x, cos, sin, interleave):
    """x·cos + rotate_half(x)·sin with cos/sin (…, Dr/2) repeated to full width; adjacent pairs
    (interleave) are gathered into halves first and scattered back after."""
    if interleave:
        halves = torch.cat((x[..., 0::2], x[..., 1::2]), -1)
        rotated = rope_spec(halves, cos, sin, interleave=False)
        return torch.stack(rotated.chunk(2, -1), -1).flatten(-2)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = x.chunk(2, -1)
    return x * cos2 + torch.cat((-x2, x1), -1) * sin2


def yarn_scale_spec(qk_head_dim, rope_scaling):
    """DeepSeek's softmax scale: (Dn+Dr)^-0.5 · (0.1·mscale_all_dim·ln(factor) + 1)²."""
    scale = qk_head_dim ** -0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim") and rope_scaling["factor"] > 1:
        scale *= (0.1 * rope_scaling["mscale_all_dim"] * math.log(rope_scaling["factor"]) + 1) ** 2
    return scale


def block_spec(module, params, hidden_states, position_ids, cu_seqlens=None, return_max_logits=False):
    """The MultiHeadLatentAttention block on `params` (name → tensor, e.g. float64 leaves); with
    return_max_logits also the attention's per-head maximum logit."""
    m = module

    def linear(name, x):
        out = x @ params[f"{name}.weight"].t()
        bias = params.get(f"{name}.bias")
        return out if bias is None else out + bias

    def rms_norm(name, x):
        eps = getattr(m, name).variance_epsilon
        return params[f"{name}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    dn, dr, dc = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    if m.q_lora_rank is None:
        q = linear("q_proj", hidden_states)
    else:
        q = linear("q_b_proj", rms_norm("q_a_layernorm", linear("q_a_proj", hidden_states)))
    q = q.unflatten(-1, (m.num_heads, dn + dr))
    kv = linear("kv_a_proj_with_mqa", hidden_states)
    kv_latent, k_rope = rms_norm("kv_a_layernorm", kv[..., :dc]), kv[..., dc:]

    # Angles in at least float32 (a bf16 position would be off by whole radians), cos/sin then
    # in the block's dtype: the naive low-precision spec of docs/design.md §8.
    angle_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    angles = position_ids[..., None].to(angle_dtype) * m.inv_freq.to(angle_dtype)
    cos = (angles.cos() * m.attention_factor).to(hidden_states.dtype)
    sin = (angles.sin() * m.attention_factor).to(hidden_states.dtype)
    cos, sin = cos.expand(*k_rope.shape[:-1], dr // 2), sin.expand(*k_rope.shape[:-1], dr // 2)
    q = torch.cat((q[..., :dn], rope_spec(q[..., dn:], cos.unsqueeze(-2), sin.unsqueeze(-2),
                                          m.rope_interleave)), -1)
    k_rope = rope_spec(k_rope, cos, sin, m.rope_interleave)
    out = mla_attention_reference(q, kv_latent, k_rope, params["kv_b_proj.weight"],
                                  softmax_scale=yarn_scale_spec(dn + dr, m.rope_scaling),
                                  cu_seqlens=cu_seqlens, return_max_logits=return_max_logits)
    if return_max_logits:
        out, max_logits = out
        return linear("o_proj", out.flatten(-2)), max_logits
    return linear("o_proj", out.flatten(-2))


@dataclass(frozen=True)
class QLatentDims:
    heads: int
    nope: int
    rope: int
    v: int
    latent: int
    q_latent: int


Q_SMALL = QLatentDims(heads=2, nope=16, rope=8, v=16, latent=32, q_latent=24)
Q_TINY = QLatentDims(heads=2, nope=4, rope=4, v=4, latent=6, q_latent=5)  # gradcheck
Q_TENSORS = ("q_latent", "wq_b", "cos", "sin", "kv_latent", "k_rope", "wkv_b")


def q_latent_inputs(lead, dims=Q_SMALL, dtype=torch.float32, seed=0, rope_scale=1.0):
    """Unit-scale inputs of the q-latent op; cos/sin of random angles, times rope_scale (YaRN's
    attention factor)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    angles = torch.rand(*lead, dims.rope // 2, generator=gen, dtype=torch.float64) * 6.28
    return dict(
        q_latent=rand(*lead, dims.q_latent),
        wq_b=rand(dims.heads * (dims.nope + dims.rope), dims.q_latent, scale=dims.q_latent ** -0.5),
        cos=(angles.cos() * rope_scale).float(),
        sin=(angles.sin() * rope_scale).float(),
        kv_latent=rand(*lead, dims.latent),
        k_rope=rand(*lead, dims.rope),
        wkv_b=rand(dims.heads * (dims.nope + dims.v), dims.latent, scale=dims.latent ** -0.5),
    )


def q_latent_spec(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, *, rope_interleave,
                  cu_seqlens=None, softmax_scale=None, return_max_logits=False):
    """q = rope(c_q · wq_bᵀ) (rotate-half RoPE), then the mla_attention reference."""
    dim_rope = k_rope.shape[-1]
    q = (q_latent @ wq_b.t()).unflatten(-1, (Q_SMALL.heads, -1))
    q_rope = rope_spec(q[..., -dim_rope:], cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype),
                       rope_interleave)
    q = torch.cat((q[..., :-dim_rope], q_rope), -1)
    return mla_attention_reference(q, kv_latent, k_rope, wkv_b, cu_seqlens=cu_seqlens,
                                   softmax_scale=softmax_scale, return_max_logits=return_max_logits)


def q_latent_op(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, *, rope_interleave, cu_seqlens=None,
                softmax_scale=None, return_max_logits=False):
    """torch_mla.mla_attention_q_latent with Q_SMALL's (and Q_TINY's) head count."""
    return torch_mla.mla_attention_q_latent(
        q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, num_heads=Q_SMALL.heads,
        rope_interleave=rope_interleave, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale,
        return_max_logits=return_max_logits)


# ---- the module -----------------------------------------------------------------------------------

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
            mscale=0.707, mscale_all_dim=0.8, beta_fast=32, beta_slow=1)

MODULE_SIZES = dict(hidden_size=48, num_heads=3, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=12)
MODULE_CASES = {
    "q-lora": dict(q_lora_rank=24),
    "no-q-lora": dict(q_lora_rank=None),
    "half-rotate": dict(q_lora_rank=24, rope_interleave=False),
    "half-rotate-bias": dict(q_lora_rank=24, rope_interleave=False, attention_bias=True),
    "yarn-bias": dict(q_lora_rank=24, rope_scaling=YARN, rope_theta=YARN["rope_theta"], attention_bias=True),
}


def make_module(case, sizes=MODULE_SIZES, seed=0, **overrides):
    """A MultiHeadLatentAttention with unit-scale projections, non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    module = torch_mla.MultiHeadLatentAttention(**sizes, **MODULE_CASES[case], **overrides)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return module


def hidden(lead, seed=1, dtype=torch.float32, hidden_size=MODULE_SIZES["hidden_size"]):
    """Unit-scale block input (*lead, hidden_size)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, hidden_size, generator=gen, dtype=torch.float64).to(dtype)


# ---- tiny Hugging Face DeepSeek-V2/V3 models ------------------------------------------------------
# Every layer is dense (first_k_dense_replace = num_hidden_layers): MoE routing picks experts by
# top-k, so rounding differences could switch experts and hide what the tests measure.
# initializer_range = hidden_size^-0.5 gives unit-scale activations, so the attention's share of
# the logits is not lost in rounding.

HF_HIDDEN = 64
HF_COMMON = dict(vocab_size=96, hidden_size=HF_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=2, max_position_embeddings=256,
                 initializer_range=HF_HIDDEN ** -0.5, rms_norm_eps=1e-5, use_cache=False)

# name -> (model family, config overrides): the shapes docs/design.md §2 asks to cover.
HF_CASES = {
    "v3": ("v3", dict(q_lora_rank=24)),
    "v3-half-rotate": ("v3", dict(q_lora_rank=24, rope_interleave=False)),
    "v3-yarn-bias": ("v3", dict(q_lora_rank=24, rope_parameters=dict(YARN), attention_bias=True)),
    "v2-lite": ("v2", dict(q_lora_rank=None)),
    "v2-yarn": ("v2", dict(q_lora_rank=24, rope_parameters=dict(YARN))),
}


def make_config(case: str, attn_implementation: str = "sdpa", **overrides):
    import transformers
    family, extra = HF_CASES[case]
    cls = transformers.DeepseekV3Config if family == "v3" else transformers.DeepseekV2Config
    kwargs = {**HF_COMMON, **extra, **overrides}
    if family == "v2":
        kwargs.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    config = cls(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def make_model(case: str, dtype=torch.float32, seed: int = 0, **config_overrides):
    import transformers
    config = make_config(case, **config_overrides)
    cls = transformers.DeepseekV3ForCausalLM if HF_CASES[case][0] == "v3" else transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    return cls(config).to(dtype)


def clone_model(model, dtype=None, attn_implementation=None):
    """A copy of `model` (same weights), optionally cast and with another attention implementation."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config._attn_implementation = attn_implementation or model.config._attn_implementation
    copy = model.__class__(config).to(dtype or next(model.parameters()).dtype)
    copy.load_state_dict({k: v.to(copy.dtype) for k, v in model.state_dict().items()})
    return copy


def attention_modules(model):
    names = ("DeepseekV2Attention", "DeepseekV3Attention")
    return [m for m in model.modules() if type(m).__name__ in names]


def attention_saved_bytes(model, *args, **kwargs):
    """Bytes autograd keeps for backward inside the attention modules (parameters excluded)."""
    saved = torch_mla.SavedTensors()
    handles = []
    for m in model.modules():
        if type(m).__name__.endswith("Attention"):
            handles.append(m.register_forward_pre_hook(lambda *_: saved.__enter__() and None))
            handles.append(m.register_forward_hook(lambda *_: saved.__exit__(None, None, None)))
    try:
        model(*args, **kwargs).logits.sum().backward()
    finally:
        for h in handles:
            h.remove()
    return saved.nbytes_excluding(*model.parameters())


# ---- CPU process groups ---------------------------------------------------------------------------

def _entry(rank, world, init_file, fn, args):
    import torch.distributed as dist
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    fn(rank, world, *args)
    # Tear down together: a rank leaving while its peer's gloo threads still talk to it aborts.
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """Runs fn(rank, world, *args) in `world` fresh processes (gloo over a file store); a failure
    on any rank fails the caller (mp.spawn re-raises it). fn must be a module-level function."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "store"), fn, args), nprocs=world, join=True)


def cuda_capability() -> int:
    """10·major + minor of the current CUDA device; 90 where there is none (CUDA pairs are then
    not collected, and only counted as if on sm_90)."""
    if not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor



# ---- the other MLA families of transformers (docs/design.md §15) ---------------------------------

_FAMILY_COMMON = dict(HF_COMMON, q_lora_rank=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# name -> (config class, overrides, attention class): tiny random models, two attention layers each
# (LongCat-Flash: one decoder layer holds two; Kimi Linear: one MLA layer after a linear one).
FAMILY_CASES = {
    "sarvam": ("SarvamMLAConfig", dict(first_k_dense_replace=2), "DeepseekV3Attention"),
    "minicpm3": ("MiniCPM3Config", {}, "MiniCPM3Attention"),
    "minicpm3-yarn": ("MiniCPM3Config", dict(rope_parameters=dict(YARN)), "MiniCPM3Attention"),
    "glm4-moe-lite": ("Glm4MoeLiteConfig", dict(mlp_layer_types=["dense", "dense"]), "Glm4MoeLiteAttention"),
    "glm4-moe-lite-half-rotate": ("Glm4MoeLiteConfig", dict(mlp_layer_types=["dense", "dense"], rope_interleave=False),
                                  "Glm4MoeLiteAttention"),
    "longcat-flash": ("LongcatFlashConfig", dict(num_layers=1, head_dim=8, ffn_hidden_size=96,
                                                 expert_ffn_hidden_size=16, n_routed_experts=4, moe_topk=2,
                                                 zero_expert_num=1), "LongcatFlashMLA"),
    "kimi-linear": ("KimiLinearConfig", dict(q_lora_rank=None, layer_types=["linear_attention", "full_attention"],
                                             mlp_layer_types=["dense", "dense"], linear_head_dim=16,
                                             linear_num_heads=4), "KimiLinearAttention"),
}


def make_family_config(case: str, attn_implementation: str = "sdpa", **overrides):
    import transformers
    cls_name, extra, _ = FAMILY_CASES[case]
    config = getattr(transformers, cls_name)(**{**_FAMILY_COMMON, **extra, **overrides})
    config._attn_implementation = attn_implementation
    return config


def make_family_model(case: str, dtype=torch.float32, seed: int = 0, attn_implementation: str = "sdpa",
                      **config_overrides):
    import transformers
    config = make_family_config(case, attn_implementation, **config_overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def family_attention_layers(case: str, model) -> list:
    """The MLA attention modules of a FAMILY_CASES model (its linear attention layers excluded)."""
    return [m for m in model.modules() if type(m).__name__ == FAMILY_CASES[case][2]]
