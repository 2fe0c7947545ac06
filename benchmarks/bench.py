"""python benchmarks/bench.py {memory,speed,all}: what torch_mla saves and what it costs, against
the attention people train MLA with today, on one MLA attention block (MultiHeadLatentAttention:
projections, norms, RoPE, attention, o_proj), forward and backward.

Suites:
  memory  bytes saved for backward per token, and peak memory of one forward+backward, vs S;
          then the longest S an N-layer attention stack fits into a memory budget
  speed   forward, backward and forward+backward time vs S, and attention TFLOP/s, of the block
          and of the attention op alone (incl. the K/V expansion) against SDPA on expanded K/V
  all     both

Methods (the same parameters and the same function; they differ in what they keep and redo):
  torch_mla          torch_mla's op: saves the latents, q, out, lse; recomputes K/V in backward
  torch_mla_qlatent  torch_mla's q-latent op: q's latent saved instead of q
  torch_mla_latent   torch_mla's latent-only block op (save="latent"): saves the block's input,
                     the pre-norm latents and the norms' statistics; reruns the attention forward,
                     its heads in the op's default 4 groups (docs/design.md §13.6)
  hf_eager           HF "eager": K/V expanded per head, full score matrix and softmax
  hf_sdpa            HF "sdpa": K/V expanded per head, scaled_dot_product_attention
  hf_sdpa_ckpt       hf_sdpa with the whole block under torch.utils.checkpoint
  up_proj_recompute  Megatron-style up-projection recompute, emulated by checkpointing the
                     K/V expansion and SDPA (both rerun in backward)
  torch_mla_dsa      (only when named in --methods) the DSA block: torch_mla_latent's op with
                     --topk indices per token (docs/design.md §13.7); saves them on top. The
                     indices stand in for the indexer's: each query's last k positions

Measures. Saved bytes: every storage autograd keeps for backward (torch_mla.SavedTensors,
parameters excluded, the block's input included), per token. Peak memory: on CUDA
max_memory_allocated above what was allocated before the step; on the CPU the growth of the peak
resident set size (ru_maxrss) of a fresh process running one forward+backward, which includes the
C library allocator's slack. Longest S: computed, not searched: a·S + b·S² is fitted by least
squares to the measured saved bytes and to the step's extra peak (peak − saved), and the stack
needs layers × saved(S) + extra(S) for one sequence (parameters, gradients and optimizer state
not counted). Attention TFLOP/s: docs/design.md §6 (forward 2·B·H·S²/2·(Dn+Dr+Dv), backward 2.5×)
over the block's time, which includes its projections (the same for every method), so it is a
lower bound on the attention's own rate. Times: every method of one S is timed in the same
process, one step of each in turn (interleaved), so that machine load hits all of them alike; the
tables give medians over the timed steps, their spread ((max − min) / median) and the ratio of each
median to HF-style SDPA's. The op-level table times torch_mla.mla_attention (K/V expansion +
attention core) against the HF-style path on the same tensors (expansion, K built with k_rope
broadcast to the heads, scaled_dot_product_attention), forward+backward;
benchmarks/bench_gpu.py times the op alone on a GPU.

Defaults: on CUDA DeepSeek-V3 sizes in bf16; on the CPU the same head dims with 8 heads in fp32
on one thread, sized to finish in about a minute and a half on two cores. Writes memory.csv,
budget.csv, speed.csv and memory.png, speed.png to --out, and prints the tables.
"""
import argparse
import csv
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from torch_mla import SavedTensors, mla_attention_block

from baselines import ATTENTION_CORES, attention_block

MIB = 2 ** 20


@dataclass(frozen=True)
class Method:
    core: str            # "torch_mla" or a baseline of baselines.ATTENTION_CORES
    save: str            # MultiHeadLatentAttention's save
    checkpoint_block: bool
    label: str
    sparse: bool = False  # the block op with top-k indices (DsaBlock)


METHODS: Dict[str, Method] = {
    "torch_mla": Method("torch_mla", "q", False, "torch_mla"),
    "torch_mla_qlatent": Method("torch_mla", "q_latent", False, "torch_mla + q latent"),
    "torch_mla_latent": Method("torch_mla", "latent", False, "torch_mla latent-only block"),
    "hf_eager": Method("eager", "q", False, "HF-style eager"),
    "hf_sdpa": Method("sdpa", "q", False, "HF-style SDPA"),
    "hf_sdpa_ckpt": Method("sdpa", "q", True, "HF-style SDPA + checkpointed block"),
    "up_proj_recompute": Method("sdpa_recompute", "q", False, "up-projection recompute (Megatron-style)"),
}

#: Methods run only when --methods names them.
OPT_IN_METHODS: Dict[str, Method] = {
    "torch_mla_dsa": Method("torch_mla", "latent", False, "torch_mla DSA block (latent-only + indices)", True),
}
ALL_METHODS = {**METHODS, **OPT_IN_METHODS}

PRESETS = {
    "cpu": dict(hidden=1024, heads=8, q_lora_rank=384, head_dims=(128, 64, 128, 512), dtype="float32",
                memory_seqlens=(256, 512, 1024, 2048), speed_seqlens=(256, 512, 1024),
                layers=4, budget_gib=8.0, warmup=1, reps=5, threads=1),
    "cuda": dict(hidden=7168, heads=128, q_lora_rank=1536, head_dims=(128, 64, 128, 512), dtype="bfloat16",
                 memory_seqlens=(1024, 4096, 16384), speed_seqlens=(1024, 4096, 16384),
                 layers=61, budget_gib=80.0, warmup=2, reps=5, threads=None),
}


@dataclass
class Spec:
    """One benchmark configuration (what a worker process needs to rebuild the block)."""
    device: str
    dtype: str
    batch: int
    hidden: int
    heads: int
    q_lora_rank: Optional[int]
    head_dims: Sequence[int]  # Dn, Dr, Dv, Dc
    threads: Optional[int] = None
    seed: int = 0
    topk: int = 2048  # the DSA block's k (DeepSeek-V3.2's index_topk)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        dn, dr, dv, dc = self.head_dims
        where = (torch.cuda.get_device_name(self.device) if self.device.startswith("cuda")
                 else f"CPU, threads: {torch.get_num_threads()}")
        return (f"{where}, {self.dtype}, B={self.batch}, hidden {self.hidden}, H={self.heads}, "
                f"q_lora {self.q_lora_rank}, Dn/Dr/Dv/Dc = {dn}/{dr}/{dv}/{dc}, causal")


# ---------------------------------------------------------------------------------------------
# Counting (docs/design.md §6) and context-parallel communication volume (docs/design.md §5.4)

def attention_flops(batch: int, seqlen: int, heads: int, dim_qk: int, dim_v: int,
                    causal: bool = True) -> float:
    """Forward FLOPs of attention, FlashAttention's count: 2·B·H·S²·(Dqk + Dv), halved when
    causal (QKᵀ and PV, two FLOPs per multiply-add). The backward counts 2.5× this."""
    return 2.0 * batch * heads * seqlen * seqlen * (dim_qk + dim_v) / (2 if causal else 1)


def context_parallel_bytes_per_token(heads: int, dim_nope: int, dim_rope: int, dim_v: int,
                                     dim_latent: int, elem_bytes: int = 2) -> Dict[str, int]:
    """Bytes each token contributes to the forward all-gather of a context-parallel attention
    layer: torch_mla's latents (Dc + Dr) against expanded K/V (H·(Dn+Dr) + H·Dv). The backward
    reduce-scatters gradients of the same size."""
    latent = (dim_latent + dim_rope) * elem_bytes
    expanded = heads * (dim_nope + dim_rope + dim_v) * elem_bytes
    return {"latent": latent, "expanded_kv": expanded}


# ---------------------------------------------------------------------------------------------
# The block under test

class DsaBlock(torch.nn.Module):
    """A MultiHeadLatentAttention(save="latent")'s projections with the DSA block op after them:
    mla_attention_block with topk_indices (docs/design.md §13.7). The indices stand in for the
    indexer's: each query's last k positions, int32 (B, S, k) made per call as an indexer's would
    be (what the block keeps does not depend on which positions)."""

    def __init__(self, attn: torch.nn.Module, topk: int):
        super().__init__()
        self.attn, self.topk = attn, topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        window = torch.arange(x.shape[-2], device=x.device)[:, None] - torch.arange(self.topk, device=x.device)
        topk_indices = torch.where(window >= 0, window, -1).int().expand(*x.shape[:-1], self.topk).contiguous()
        cos, sin = a.rotation(x)
        q_norm = a.q_a_layernorm
        return mla_attention_block(
            x if a.q_a_proj is None else a.q_a_proj(x), None if q_norm is None else q_norm.weight,
            (a.q_proj if a.q_a_proj is None else a.q_b_proj).weight, a.kv_a_proj_with_mqa(x),
            a.kv_a_layernorm.weight, a.kv_b_proj.weight, a.o_proj.weight, a.o_proj.bias, cos, sin,
            num_heads=a.num_heads, softmax_scale=a.glue.op_scale,
            q_norm_eps=1e-6 if q_norm is None else q_norm.variance_epsilon,
            kv_norm_eps=a.kv_a_layernorm.variance_epsilon, rope_interleave=a.glue.rope_interleave,
            head_chunks=a.head_chunks, topk_indices=topk_indices)


def make_block(spec: Spec, method: Method) -> torch.nn.Module:
    dn, dr, dv, dc = spec.head_dims
    torch.manual_seed(spec.seed)
    block = attention_block(
        method.core, hidden_size=spec.hidden, num_heads=spec.heads, q_lora_rank=spec.q_lora_rank,
        kv_lora_rank=dc, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, save=method.save,
        device=spec.device, dtype=spec.torch_dtype)
    return DsaBlock(block, spec.topk) if method.sparse else block


def block_forward(block: torch.nn.Module, method: Method) -> Callable[[torch.Tensor], torch.Tensor]:
    if method.checkpoint_block:
        return lambda x: checkpoint(block, x, use_reentrant=False)
    return block


def hidden_states(spec: Spec, seqlen: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=spec.device).manual_seed(seed)
    x = torch.randn(spec.batch, seqlen, spec.hidden, generator=gen, device=spec.device)
    return x.to(spec.torch_dtype).requires_grad_(True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


# ---------------------------------------------------------------------------------------------
# Memory suite

def memory_point(spec: Spec, name: str, seqlen: int) -> dict:
    """Saved bytes and peak memory of one forward+backward of the block at length seqlen."""
    method = ALL_METHODS[name]
    block = make_block(spec, method)
    forward = block_forward(block, method)
    params = list(block.parameters())
    # Warm-up at a short length: library start-up and the parameters' gradients (kept, as in
    # training) are not this step's memory.
    forward(hidden_states(spec, 16)).sum().backward()
    x = hidden_states(spec, seqlen)
    grad_out = torch.randn_like(x)
    _sync(spec.device)
    if spec.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(spec.device)
        base = torch.cuda.memory_allocated(spec.device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward(x).backward(grad_out)
    _sync(spec.device)
    if spec.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(spec.device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    x.grad = None

    with SavedTensors() as saved:
        out = forward(x)
    saved_bytes = saved.nbytes_excluding(*params)
    del out
    tokens = spec.batch * seqlen
    return dict(saved_bytes=saved_bytes, saved_bytes_per_token=saved_bytes / tokens,
                peak_mib=peak / MIB)


def _memory_point_to_pipe(conn, spec: Spec, name: str, seqlen: int) -> None:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        conn.send(memory_point(spec, name, seqlen))
    except Exception as exc:  # reported as the point's result, not a crash of the suite
        conn.send(dict(error=_error(exc)))
    finally:
        conn.close()


def memory_point_fresh_process(spec: Spec, name: str, seqlen: int) -> dict:
    """memory_point in a new process, so that its peak RSS is this configuration's alone. The
    process is forked from a server that has imported torch once (fast to start, and clean: it
    never ran an operator)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch_mla"])
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_point_to_pipe, args=(send, spec, name, seqlen))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    proc.join()
    if result is None:
        result = dict(error=f"worker process died (exit code {proc.exitcode})")
    return result


MEMORY_FIELDS = ["method", "seqlen", "batch", "saved_bytes", "saved_bytes_per_token", "peak_mib",
                 "peak_kind", "error"]


def run_memory(spec: Spec, names: Sequence[str], seqlens: Sequence[int], out: Path,
               progress: bool = True) -> List[dict]:
    cpu = not spec.device.startswith("cuda")
    peak_kind = "peak RSS growth, fresh process" if cpu else "max_memory_allocated"
    rows: List[dict] = []
    configs = [(s, n) for s in seqlens for n in names]
    for seqlen, name in _progress(configs, "memory", progress):
        if cpu:
            result = memory_point_fresh_process(spec, name, seqlen)
        else:
            try:
                result = memory_point(spec, name, seqlen)
            except Exception as exc:  # e.g. out of memory at long S: a result, not a crash
                result = dict(error=_error(exc))
            torch.cuda.empty_cache()
        rows.append(dict(method=name, seqlen=seqlen, batch=spec.batch, peak_kind=peak_kind, **result))
        write_csv(out / "memory.csv", MEMORY_FIELDS, rows)
    return rows


def fit_linear_quadratic(xs: Sequence[float], ys: Sequence[float]) -> tuple:
    """Least-squares a, b ≥ 0 of y ≈ a·x + b·x² (two measured points or more)."""
    sxx = sum(x ** 2 for x in xs)
    sx3 = sum(x ** 3 for x in xs)
    sx4 = sum(x ** 4 for x in xs)
    sxy = sum(x * y for x, y in zip(xs, ys))
    sx2y = sum(x * x * y for x, y in zip(xs, ys))
    det = sxx * sx4 - sx3 * sx3
    a = (sxy * sx4 - sx2y * sx3) / det if det else 0.0
    b = (sxx * sx2y - sx3 * sxy) / det if det else 0.0
    if b < 0 or not det:
        return max(sxy / sxx, 0.0), 0.0
    if a < 0:
        return 0.0, max(sx2y / sx4, 0.0)
    return a, b


def longest_seqlen(rows: Sequence[dict], layers: int, budget_bytes: float) -> Optional[int]:
    """Longest S (one sequence) whose N-layer stack fits budget_bytes: layers·saved(S) + extra(S),
    with saved and extra = peak − saved fitted as a·S + b·S² to the measured rows of one method."""
    good = [r for r in rows if not r.get("error")]
    if len(good) < 2:
        return None
    seqlens = [r["seqlen"] for r in good]
    per_seq = [r["batch"] for r in good]
    saved = [r["saved_bytes"] / b for r, b in zip(good, per_seq)]
    extra = [max(r["peak_mib"] * MIB / b - s, 0.0) for r, b, s in zip(good, per_seq, saved)]
    a_s, b_s = fit_linear_quadratic(seqlens, saved)
    a_e, b_e = fit_linear_quadratic(seqlens, extra)
    a, b = layers * a_s + a_e, layers * b_s + b_e
    if b > 0:
        return int((-a + math.sqrt(a * a + 4 * b * budget_bytes)) / (2 * b))
    return int(budget_bytes / a) if a > 0 else None


BUDGET_FIELDS = ["method", "layers", "budget_gib", "longest_seqlen", "how"]


def run_budget(rows: Sequence[dict], names: Sequence[str], layers: int, budget_gib: float,
               out: Path) -> List[dict]:
    budget = []
    for name in names:
        seqlen = longest_seqlen([r for r in rows if r["method"] == name], layers, budget_gib * 2 ** 30)
        budget.append(dict(method=name, layers=layers, budget_gib=budget_gib, longest_seqlen=seqlen,
                           how="computed from a*S+b*S^2 fits of measured saved bytes and step peak"))
    write_csv(out / "budget.csv", BUDGET_FIELDS, budget)
    return budget


# ---------------------------------------------------------------------------------------------
# Speed suite

class _Timer:
    """Wall time on the CPU, CUDA events on a GPU: mark() records a point, ms() the gaps."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.points: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def ms(self) -> List[float]:
        if self.cuda:
            self.points[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        return [1e3 * (b - a) for a, b in zip(self.points, self.points[1:])]


def _timed_step(device, forward: Callable[[], torch.Tensor], grad_out: torch.Tensor) -> tuple:
    """forward() then backward(grad_out): (forward wall ms, backward wall ms, process CPU ms)."""
    _sync(device)
    timer = _Timer(device)
    cpu0 = time.process_time()
    timer.mark()
    out = forward()
    timer.mark()
    out.backward(grad_out)
    timer.mark()
    cpu_ms = 1e3 * (time.process_time() - cpu0)
    del out
    return (*timer.ms(), cpu_ms)


def _prepare_block(spec: Spec, name: str, seqlen: int) -> Callable[[], tuple]:
    """One training step of the block (forward, then backward), returning its forward and backward
    wall ms and the process's CPU ms (all threads) of the step."""
    method = ALL_METHODS[name]
    block = make_block(spec, method)
    forward = block_forward(block, method)
    x = hidden_states(spec, seqlen)
    grad_out = torch.randn_like(x)
    return lambda: _timed_step(spec.device, lambda: forward(x), grad_out)


OP_METHODS = {"torch_mla": "torch_mla op (expansion + core)", "hf_sdpa": "SDPA on expanded K/V"}


def _prepare_op(spec: Spec, name: str, seqlen: int) -> Callable[[], tuple]:
    """One forward+backward of the attention op alone on the block's attention shapes: torch_mla's
    mla_attention or HF-style expansion + SDPA (baselines.py), both from the latents."""
    attention = ATTENTION_CORES["torch_mla" if name == "torch_mla" else "sdpa"]
    dn, dr, dv, dc = spec.head_dims
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed)

    def make(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, device=spec.device) * scale
        return t.to(spec.torch_dtype).requires_grad_(True)

    b, h = spec.batch, spec.heads
    q = make(b, seqlen, h, dn + dr)
    kv_latent = make(b, seqlen, dc)
    k_rope = make(b, seqlen, dr)
    wkv_b = make(h * (dn + dv), dc, scale=dc ** -0.5)
    inputs = (q, kv_latent, k_rope, wkv_b)
    grad_out = torch.randn(b, seqlen, h, dv, generator=gen, device=spec.device).to(spec.torch_dtype)

    def step() -> tuple:
        for t in inputs:
            t.grad = None
        return _timed_step(spec.device, lambda: attention(*inputs, causal=True), grad_out)
    return step


def _spread(values: Sequence[float]) -> float:
    """(max − min) / median of the timed steps."""
    return (max(values) - min(values)) / statistics.median(values)


def timed_rows(spec: Spec, names: Sequence[str], seqlen: int, warmup: int, reps: int,
               prepare: Callable[[Spec, str, int], Callable[[], tuple]]) -> List[dict]:
    """Times every method at one S in this process, interleaved: warmup untimed steps of each,
    then reps rounds of one step of each method in turn (the order rotating every round). Medians
    of the forward, backward and forward+backward times, their spread and the ratio to hf_sdpa's."""
    steps, errors, samples = {}, {}, {}
    for name in names:
        try:
            steps[name] = prepare(spec, name, seqlen)
        except Exception as exc:  # e.g. out of memory at long S: a result, not a crash
            errors[name] = _error(exc)
        samples[name] = []
    live = [n for n in names if n in steps]
    for i in range(warmup + reps):
        shift = i % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            if name in errors:
                continue
            try:
                fwd, bwd, cpu_ms = steps[name]()
            except Exception as exc:
                errors[name] = _error(exc)
                continue
            if i >= warmup:
                samples[name].append((fwd, bwd, cpu_ms))
    rows = []
    dn, dr, dv, _ = spec.head_dims
    flops = attention_flops(spec.batch, seqlen, spec.heads, dn + dr, dv)
    for name in names:
        if name in errors or not samples[name]:
            rows.append(dict(method=name, seqlen=seqlen, batch=spec.batch,
                             error=errors.get(name, "no timed steps")))
            continue
        fwd = [f for f, _, _ in samples[name]]
        bwd = [b for _, b, _ in samples[name]]
        both = [f + b for f, b, _ in samples[name]]
        result = dict(method=name, seqlen=seqlen, batch=spec.batch, reps=len(both),
                      fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd),
                      fwd_bwd_ms=statistics.median(both), fwd_bwd_min_ms=min(both),
                      fwd_bwd_max_ms=max(both), fwd_bwd_spread=_spread(both),
                      fwd_bwd_cpu_ms=statistics.median(c for _, _, c in samples[name]))
        result["attn_fwd_tflops"] = flops / (result["fwd_ms"] * 1e-3) / 1e12
        result["attn_bwd_tflops"] = 2.5 * flops / (result["bwd_ms"] * 1e-3) / 1e12
        result["attn_fwd_bwd_tflops"] = 3.5 * flops / (result["fwd_bwd_ms"] * 1e-3) / 1e12
        result["tokens_per_s"] = spec.batch * seqlen / (result["fwd_bwd_ms"] * 1e-3)
        rows.append(result)
    base = next((r for r in rows if r["method"] == "hf_sdpa" and not r.get("error")), None)
    for r in rows:
        if base is not None and not r.get("error"):
            r["fwd_bwd_vs_sdpa"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            r["fwd_bwd_cpu_vs_sdpa"] = r["fwd_bwd_cpu_ms"] / base["fwd_bwd_cpu_ms"]
    return rows


SPEED_FIELDS = ["method", "seqlen", "batch", "reps", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_min_ms",
                "fwd_bwd_max_ms", "fwd_bwd_spread", "fwd_bwd_vs_sdpa", "fwd_bwd_cpu_ms",
                "fwd_bwd_cpu_vs_sdpa", "attn_fwd_tflops",
                "attn_bwd_tflops", "attn_fwd_bwd_tflops", "tokens_per_s", "error"]


def run_speed(spec: Spec, names: Sequence[str], seqlens: Sequence[int], warmup: int, reps: int,
              out: Path, progress: bool = True, csv_name: str = "speed.csv",
              prepare: Callable[[Spec, str, int], Callable[[], tuple]] = _prepare_block) -> List[dict]:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    rows: List[dict] = []
    for seqlen in _progress(list(seqlens), csv_name.split(".")[0], progress):
        rows += timed_rows(spec, names, seqlen, warmup, reps, prepare)
        if spec.device.startswith("cuda"):
            torch.cuda.empty_cache()
        write_csv(out / csv_name, SPEED_FIELDS, rows)
    return rows


def run_op_speed(spec: Spec, seqlens: Sequence[int], warmup: int, reps: int, out: Path,
                 progress: bool = True) -> List[dict]:
    """The attention op alone: torch_mla's op against expansion + SDPA, interleaved."""
    return run_speed(spec, list(OP_METHODS), seqlens, warmup, reps, out, progress, "op_speed.csv",
                     _prepare_op)


# ---------------------------------------------------------------------------------------------
# Output: CSV, plots, tables

def _progress(configs: Sequence, desc: str, enabled: bool):
    """A tqdm progress bar over configs where tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return configs
    return tqdm(configs, desc=desc, unit="config", ncols=80, disable=not enabled)


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, title: str, rows: Sequence[dict], panels: Sequence[tuple]) -> None:
    """One PNG with a panel per (field, y label, log y) over S (log scale), a line per method."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    names = list(dict.fromkeys(r["method"] for r in rows))
    for ax, (key, ylabel, logy) in zip(axes[0], panels):
        for name in names:
            pts = [(r["seqlen"], r[key]) for r in rows if r["method"] == name and not r.get("error")]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=ALL_METHODS[name].label)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _table(rows: Sequence[dict], names: Sequence[str], key: str, fmt: str) -> List[str]:
    width = max(12, *(len(n) for n in names))
    lines = [f"{'S':>7} " + " ".join(f"{n:>{width}}" for n in names)]
    for seqlen in dict.fromkeys(r["seqlen"] for r in rows):
        cells = []
        for name in names:
            row = next((r for r in rows if r["seqlen"] == seqlen and r["method"] == name), None)
            cell = ("-" if row is None or (not row.get("error") and row.get(key) is None) else
                    "failed" if row.get("error") else format(row[key], fmt))
            cells.append(f"{cell:>{width}}")
        lines.append(f"{seqlen:>7} " + " ".join(cells))
    return lines


def memory_report(spec: Spec, rows, budget, names, layers, budget_gib) -> str:
    peak_kind = rows[0]["peak_kind"] if rows else ""
    lines = [f"memory: {spec.describe()}",
             "saved for backward, bytes/token (parameters excluded):",
             *_table(rows, names, "saved_bytes_per_token", ",.0f"),
             f"peak memory of one forward+backward, MiB ({peak_kind}):",
             *_table(rows, names, "peak_mib", ",.1f"),
             f"longest S for a {layers}-layer attention stack in {budget_gib:g} GiB, one sequence "
             f"(computed from fits of the costs above, parameters excluded):"]
    lines += [f"  {b['method']:<20} {b['longest_seqlen']:>12,}" if b["longest_seqlen"] else
              f"  {b['method']:<20} {'n/a':>12}" for b in budget]
    failed = [r for r in rows if r.get("error")]
    lines += [f"  failed: {r['method']} S={r['seqlen']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def speed_report(spec: Spec, rows, names, op_rows=()) -> str:
    reps = max((r.get("reps", 0) for r in list(rows) + list(op_rows)), default=0)
    lines = [f"speed: {spec.describe()}",
             f"medians of {reps} timed steps per method, interleaved in one process",
             "forward ms:", *_table(rows, names, "fwd_ms", ",.1f"),
             "backward ms:", *_table(rows, names, "bwd_ms", ",.1f"),
             "forward+backward ms:", *_table(rows, names, "fwd_bwd_ms", ",.1f"),
             "forward+backward spread, (max - min) / median:", *_table(rows, names, "fwd_bwd_spread", ".0%")]
    if any("fwd_bwd_vs_sdpa" in r for r in rows):
        lines += ["forward+backward time / HF-style SDPA's (same run):",
                  *_table(rows, names, "fwd_bwd_vs_sdpa", ".2f")]
        if not spec.device.startswith("cuda"):
            lines += ["forward+backward process CPU time (all threads) / HF-style SDPA's, medians "
                      "(less sensitive to other processes than wall time):",
                      *_table(rows, names, "fwd_bwd_cpu_vs_sdpa", ".2f")]
    lines += ["attention TFLOP/s, forward+backward (FlashAttention's FLOP count over the block's time):",
              *_table(rows, names, "attn_fwd_bwd_tflops", ".3g")]
    if op_rows:
        ops = list(OP_METHODS)
        lines += ["attention op alone, forward+backward ms (torch_mla: mla_attention, K/V expansion "
                  "included; hf_sdpa: the same expansion + SDPA on expanded K/V):",
                  *_table(op_rows, ops, "fwd_bwd_ms", ",.2f"),
                  "  spread, (max - min) / median:", *_table(op_rows, ops, "fwd_bwd_spread", ".0%"),
                  "  time / SDPA's:", *_table(op_rows, ops, "fwd_bwd_vs_sdpa", ".2f"),
                  *(["  process CPU time / SDPA's:", *_table(op_rows, ops, "fwd_bwd_cpu_vs_sdpa", ".2f")]
                    if not spec.device.startswith("cuda") else []),
                  "  attention TFLOP/s, forward+backward (a lower bound: the expansion is included):",
                  *_table(op_rows, ops, "attn_fwd_bwd_tflops", ".3g")]
    failed = [r for r in list(rows) + list(op_rows) if r.get("error")]
    lines += [f"  failed: {r['method']} S={r['seqlen']}: {r['error']}" for r in failed]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["memory", "speed", "all"])
    parser.add_argument("--out", default="bench_out", help="output folder (default bench_out/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--methods", nargs="+", choices=list(ALL_METHODS), default=list(METHODS),
                        help=f"default: all but {', '.join(OPT_IN_METHODS)}")
    parser.add_argument("--topk", type=int, default=2048,
                        help="k of torch_mla_dsa, top-k indices per token (default 2048, DeepSeek-V3.2's)")
    parser.add_argument("--seqlens", type=int, nargs="+",
                        help="S values for both suites (default: CUDA 1024 4096 16384; CPU memory "
                             "256 to 2048, speed 256 to 1024)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--hidden", type=int, help="hidden size (CUDA 7168, CPU 1024)")
    parser.add_argument("--heads", type=int, help="attention heads H (CUDA 128, CPU 8)")
    parser.add_argument("--q-lora-rank", type=int, help="q latent width, 0 for none (CUDA 1536, CPU 384)")
    parser.add_argument("--head-dims", type=int, nargs=4, metavar=("DN", "DR", "DV", "DC"),
                        help="qk_nope, qk_rope, v head dims and kv latent width (default 128 64 128 512)")
    parser.add_argument("--layers", type=int,
                        help="layers of the stack for the longest-S estimate (CUDA 61, CPU 4)")
    parser.add_argument("--budget-gib", type=float,
                        help="memory budget of the longest-S estimate (CUDA 80, CPU 8)")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (CUDA 2, CPU 1)")
    parser.add_argument("--reps", type=int, help="timed steps, the median is reported (default 5)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (CPU default 1: multi-threaded timings swing wildly "
                             "on a busy machine, where OpenMP threads spin-wait for each other)")
    parser.add_argument("--no-op", action="store_true",
                        help="speed: skip the table of the attention op alone")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    q_lora = pick("q_lora_rank")
    spec = Spec(device=args.device, dtype=pick("dtype"), batch=args.batch, hidden=pick("hidden"),
                heads=pick("heads"), q_lora_rank=q_lora or None, head_dims=tuple(pick("head_dims")),
                threads=pick("threads"), topk=args.topk)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    results, reports = {}, []

    if args.suite in ("memory", "all"):
        seqlens = args.seqlens or preset["memory_seqlens"]
        layers, budget_gib = pick("layers"), pick("budget_gib")
        rows = run_memory(spec, args.methods, seqlens, out, progress)
        budget = run_budget(rows, args.methods, layers, budget_gib, out)
        peak_kind = "peak RSS growth" if spec.device == "cpu" else "peak allocated"
        plot(out / "memory.png", f"MLA block memory: {spec.describe()}", rows,
             [("saved_bytes_per_token", "saved for backward, bytes/token", True),
              ("peak_mib", f"forward+backward {peak_kind}, MiB", True)])
        results.update(memory=rows, budget=budget)
        reports.append(memory_report(spec, rows, budget, args.methods, layers, budget_gib))

    if args.suite in ("speed", "all"):
        seqlens = args.seqlens or preset["speed_seqlens"]
        rows = run_speed(spec, args.methods, seqlens, pick("warmup"), pick("reps"), out, progress)
        plot(out / "speed.png", f"MLA block speed: {spec.describe()}", rows,
             [("fwd_bwd_ms", "forward+backward ms", True),
              ("attn_fwd_bwd_tflops", "attention TFLOP/s (fwd+bwd)", False)])
        op_rows = [] if args.no_op else run_op_speed(spec, seqlens, pick("warmup"), pick("reps"), out,
                                                     progress)
        results["speed"] = rows
        results["op_speed"] = op_rows
        reports.append(speed_report(spec, rows, args.methods, op_rows))

    print("\n\n".join(reports))
    print(f"\nCSV and PNG files in {out}/")
    results["spec"] = asdict(spec)
    return results


if __name__ == "__main__":
    results = main()
    # A failed torch_mla configuration fails the command (the baselines may run out of memory).
    ours = [r for suite in ("memory", "speed", "op_speed") for r in results.get(suite, ())
            if r["method"].startswith("torch_mla")]
    sys.exit(1 if any(r.get("error") for r in ours) else 0)
