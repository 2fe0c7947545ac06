"""GPU benchmark: torch_mla against attention on expanded K/V, DeepSeek-V3 dims, bf16, causal.

For each S (B·S ≈ 16k tokens) and method it times forward, backward and forward+backward (CUDA
events, warm-up, median of --reps) and measures the peak memory of one forward+backward
(max_memory_allocated over what was allocated before). Every method includes its K/V expansion
from the latents, so all compute the same function:

  torch_mla          torch_mla.mla_attention, core "auto" (the one it picks is printed)
  mla:CORE           the same with each attention core forced (cudnn, cuda, efficient; composed
                     at S <= 4096): one run settles which core wins at each shape
  mla:cuda@ORDER     our kernels under each grid order (query_fastest, head_fastest): the A/B of
                     issue 25
  torch_mla:packed   auto on the same tokens packed (cu_seqlens, max_seqlen given)
  mla:cuda:packed    our kernels on them
  torch_mla:det      auto under torch.use_deterministic_algorithms(True)
  sdpa_cudnn         HF-style: KV = c·wkv_bᵀ, k = [k_nope | k_rope broadcast], SDPA on cuDNN
  sdpa_efficient     the same with the memory-efficient backend
  upproj_recompute   Megatron-style up-projection recompute: expansion + SDPA (cuDNN) checkpointed
  flex               HF-style with torch.compile(flex_attention) and a causal block mask
  eager_reference    torch_mla.reference (full score matrix), small S only

The `ran` column says what really ran: for torch_mla the core torch_mla.explain names, for SDPA
the aten op SDPA dispatched to (recorded by a dispatch mode during one forward).

Attention TFLOP/s use docs/design.md §6: forward 2·B·H·S²/2·(Dn+Dr+Dv), backward 2.5× that, divided
by the measured time (which includes the expansion). For torch_mla an "attention only" estimate
also subtracts the separately timed expansion GEMMs (1 in the forward, 3 in the backward). The
bf16 GEMM rate of an 8192³ product on the same card is printed as the ceiling.

Usage: python benchmarks/bench_gpu.py [--seqlens 1024 4096 16384] [--tokens 16384] [--csv FILE]
       [--check] [--methods NAME...]
--check runs the methods of benchmarks/gpu_check.sh (auto, each core, each grid order, packed,
deterministic, SDPA on cuDNN and efficient; composed at S <= 2048) and prints `summary:` lines.
Writes the CSV to FILE, or to $OUT/bench_gpu.csv when $OUT is set (after every row).
"""
import argparse
import contextlib
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torch_mla
from torch_mla.reference import mla_attention_reference

H, DN, DR, DV, DC = 128, 128, 64, 128, 512  # DeepSeek-V3 (docs/design.md §7)
DTYPE = torch.bfloat16
EAGER_MAX_SEQLEN = 1024
COMPOSED_MAX_SEQLEN = 4096
CHECK_COMPOSED_MAX_SEQLEN = 2048
FORCED_CORES = ("cudnn", "cuda", "efficient", "composed")
CHECK_METHODS = ("torch_mla", "mla:cudnn", "mla:cuda", "mla:efficient", "mla:composed", "torch_mla:packed",
                 "mla:cuda:packed", "torch_mla:det", "sdpa_cudnn", "sdpa_efficient")


@contextlib.contextmanager
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


class SdpaOps(TorchDispatchMode):
    """The aten ops SDPA dispatches to (its composite picks one backend's op)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if ("scaled_dot_product" in name or "attention" in name) and name not in self.names:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def median_ms(fn, warmup, reps, setup=None):
    """Median over reps of the time between the events fn records: fn(start, end) -> None."""
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn(start, end)
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_ceiling_tflops(reps):
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)

    def run(start, end):
        start.record()
        torch.mm(a, b)
        end.record()

    ms = median_ms(run, 3, reps)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def make_inputs(batch, seqlen):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(DTYPE).requires_grad_(True)

    return dict(q=rand(batch, seqlen, H, DN + DR), kv_latent=rand(batch, seqlen, DC),
                k_rope=rand(batch, seqlen, DR), wkv_b=rand(H * (DN + DV), DC, scale=DC ** -0.5))


def expanded_qkv(q, kv_latent, k_rope, wkv_b):
    """(B, H, S, ·) q, k, v as a model hands them to SDPA: K/V expanded, k_rope broadcast."""
    kv = (kv_latent @ wkv_b.t()).unflatten(-1, (H, DN + DV))
    k = torch.cat([kv[..., :DN], k_rope.unsqueeze(2).expand(*kv.shape[:-1], DR)], dim=-1)
    return q.transpose(1, 2), k.transpose(1, 2), kv[..., DN:].transpose(1, 2)


def sdpa_method(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, kv_latent, k_rope, wkv_b):
        qt, kt, vt = expanded_qkv(q, kv_latent, k_rope, wkv_b)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=(DN + DR) ** -0.5)
        return out.transpose(1, 2)

    return run


def upproj_recompute_method():
    from torch.nn.attention import SDPBackend
    from torch.utils.checkpoint import checkpoint

    sdpa = sdpa_method(SDPBackend.CUDNN_ATTENTION)
    return lambda q, c, kr, w: checkpoint(sdpa, q, c, kr, w, use_reentrant=False)


def torch_mla_method(core, batch=None, seqlen=None):
    """The op on (B, S, ...) inputs; with batch and seqlen, on the same tokens packed as B
    sequences of S (cu_seqlens and max_seqlen given, as the modules give them)."""
    if batch is None:
        def run(q, kv_latent, k_rope, wkv_b):
            with torch_mla.use_core(core):  # the backward runs the forward's core
                return torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b, causal=True)
        return run
    cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device="cuda")

    def run_packed(q, kv_latent, k_rope, wkv_b):
        with torch_mla.use_core(core):
            out = torch_mla.mla_attention(q.flatten(0, 1), kv_latent.flatten(0, 1), k_rope.flatten(0, 1), wkv_b,
                                          causal=True, cu_seqlens=cu, max_seqlen=seqlen)
        return out.unflatten(0, (batch, seqlen))
    return run_packed


def flex_method(seqlen):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seqlen, seqlen,
                                   device="cuda")
    compiled = torch.compile(flex_attention)

    def run(q, kv_latent, k_rope, wkv_b):
        qt, kt, vt = expanded_qkv(q, kv_latent, k_rope, wkv_b)
        return compiled(qt, kt, vt, block_mask=block_mask, scale=(DN + DR) ** -0.5).transpose(1, 2)

    return run


def methods_for(seqlen, batch, check=False):
    """name -> factory of the method's function (built inside the timing loop's error handling)."""
    from torch.nn.attention import SDPBackend

    methods = {"torch_mla": lambda: torch_mla_method("auto")}
    for core in FORCED_CORES:
        if core != "composed" or seqlen <= (CHECK_COMPOSED_MAX_SEQLEN if check else COMPOSED_MAX_SEQLEN):
            methods[f"mla:{core}"] = lambda core=core: torch_mla_method(core)
    for order in torch_mla.cores.GRID_ORDERS:
        methods[f"mla:cuda@{order}"] = lambda: torch_mla_method("cuda")
    methods.update({
        "torch_mla:packed": lambda: torch_mla_method("auto", batch, seqlen),
        "mla:cuda:packed": lambda: torch_mla_method("cuda", batch, seqlen),
        "torch_mla:det": lambda: torch_mla_method("auto"),
        "sdpa_cudnn": lambda: sdpa_method(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": lambda: sdpa_method(SDPBackend.EFFICIENT_ATTENTION),
        "upproj_recompute": upproj_recompute_method,
        "flex": lambda: flex_method(seqlen),
    })
    if seqlen <= EAGER_MAX_SEQLEN:
        methods["eager_reference"] = lambda: (lambda q, c, kr, w: mla_attention_reference(q, c, kr, w, causal=True))
    if check:
        # With both grid orders timed, plain mla:cuda would time the default order a second time.
        skip = {"mla:cuda"}
        return {name: f for name, f in methods.items()
                if (name in CHECK_METHODS or name.startswith("mla:cuda@")) and name not in skip}
    return methods


def method_context(name):
    """The mode a method runs in: a grid order, or deterministic algorithms."""
    if "@" in name:
        return torch_mla.cores.grid_order(name.split("@", 1)[1])
    if name.endswith(":det"):
        return deterministic()
    return contextlib.nullcontext()


def what_ran(name, fn, inputs, batch, seqlen):
    """torch_mla's core (explain) or the aten op SDPA dispatched to, for one forward."""
    if name.startswith("sdpa"):
        with torch.no_grad(), SdpaOps() as ops:
            fn(*inputs.values())
        return "+".join(ops.names) or "math (no fused SDPA op)"
    if name.startswith(("torch_mla", "mla:")):
        tensors = [t.detach() for t in inputs.values()]
        core = "auto" if name.startswith("torch_mla") else name[4:].split("@")[0].split(":")[0]
        cu = None
        if name.endswith(":packed"):
            tensors = [t.flatten(0, 1) for t in tensors[:3]] + tensors[3:]
            cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device="cuda")
        try:
            return torch_mla.explain(*tensors, cu_seqlens=cu, core=core).core
        except ValueError as e:
            return f"declined: {str(e)[:80]}"
    return ""


def bench_method(fn, inputs, warmup, reps):
    leaves = list(inputs.values())
    grad_out = torch.randn(*inputs["q"].shape[:-1], DV, device="cuda", dtype=DTYPE)

    def clear_grads():
        for t in leaves:
            t.grad = None

    def fwd(start, end):
        start.record()
        fn(*leaves)
        end.record()

    def bwd(start, end):
        out = fn(*leaves)
        start.record()
        out.backward(grad_out)
        end.record()

    def fwd_bwd(start, end):
        start.record()
        fn(*leaves).backward(grad_out)
        end.record()

    result = {"fwd_ms": median_ms(fwd, warmup, reps),
              "bwd_ms": median_ms(bwd, warmup, reps, clear_grads),
              "fwd_bwd_ms": median_ms(fwd_bwd, warmup, reps, clear_grads)}
    clear_grads()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*leaves).backward(grad_out)
    torch.cuda.synchronize()
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    clear_grads()
    return result


def expansion_gemm_ms(tokens, warmup, reps):
    """The forward expansion GEMM and the backward's three (recompute, dkv_latent, dwkv_b)."""
    c = torch.randn(tokens, DC, device="cuda", dtype=DTYPE)
    w = torch.randn(H * (DN + DV), DC, device="cuda", dtype=DTYPE)
    dkv = torch.randn(tokens, H * (DN + DV), device="cuda", dtype=DTYPE)

    def timed(op):
        def run(start, end):
            start.record()
            op()
            end.record()
        return median_ms(run, warmup, reps)

    fwd = timed(lambda: c @ w.t())
    bwd = fwd + timed(lambda: dkv @ w) + timed(lambda: dkv.t() @ c)
    return fwd, bwd


def print_check_summary(rows):
    """`summary:` lines for benchmarks/gpu_check.sh (one S): auto, the fastest of ours and of
    SDPA's, each grid order, the packed and deterministic rows."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    failed = [r["method"] for r in rows if "error" in r]

    def brief(name):
        r = ok.get(name)
        return (f"{name} [{r['ran']}] {r['fwd_bwd_ms']:.1f} ms {r['fwd_bwd_tflops']:.0f} TF/s "
                f"{r['peak_mib']:.0f} MiB") if r else f"{name} -"

    head = rows[0]
    print(f"summary: S={head['seqlen']} B={head['batch']}: {brief('torch_mla')}; {brief('sdpa_cudnn')}; "
          f"{brief('sdpa_efficient')}")
    ours = [n for n in ok if n.startswith("mla:cuda")] + ["torch_mla:packed", "torch_mla:det"]
    print(f"summary:   {'; '.join(brief(n) for n in ours)}" + (f"; failed: {', '.join(failed)}" if failed else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="B·S per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods to run")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--check", action="store_true", help="the method set of benchmarks/gpu_check.sh")
    args = parser.parse_args()
    # Deterministic cuBLAS (the expansion GEMMs of the :det rows) needs this before its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    csv_path = args.csv or (os.path.join(os.environ["OUT"], "bench_gpu.csv") if os.environ.get("OUT") else None)

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ceiling = gemm_ceiling_tflops(args.reps)
    print(f"bf16 GEMM ceiling (8192^3): {ceiling:.0f} TFLOP/s", flush=True)

    rows = []
    fields = ["seqlen", "batch", "method", "ran", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_tflops", "bwd_tflops",
              "fwd_bwd_tflops", "attn_only_fwd_tflops", "attn_only_bwd_tflops", "peak_mib", "error"]
    header = (f"{'S':>6} {'B':>3} {'method':<24} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} "
              f"{'fwd TF/s':>8} {'bwd TF/s':>8} {'f+b TF/s':>8} {'peak MiB':>9}  ran")
    print(header, flush=True)
    for seqlen in args.seqlens:
        batch = max(1, args.tokens // seqlen)
        attn_fwd = 2 * batch * H * seqlen * seqlen / 2 * (DN + DR + DV)
        gemm_fwd_ms, gemm_bwd_ms = expansion_gemm_ms(batch * seqlen, args.warmup, args.reps)
        probe = make_inputs(batch, seqlen)
        print(f"S={seqlen}: auto picks {torch_mla.explain(*probe.values()).core!r}", flush=True)
        probe = None
        for name, factory in methods_for(seqlen, batch, args.check).items():
            if args.methods and name not in args.methods:
                continue
            row = {"seqlen": seqlen, "batch": batch, "method": name}
            t0 = time.time()
            inputs = None
            try:
                inputs = make_inputs(batch, seqlen)
                with method_context(name):
                    fn = factory()
                    row["ran"] = what_ran(name, fn, inputs, batch, seqlen)
                    row.update(bench_method(fn, inputs, args.warmup, args.reps))
                row["fwd_tflops"] = attn_fwd / (row["fwd_ms"] * 1e-3) / 1e12
                row["bwd_tflops"] = 2.5 * attn_fwd / (row["bwd_ms"] * 1e-3) / 1e12
                row["fwd_bwd_tflops"] = 3.5 * attn_fwd / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                if name == "torch_mla" or name.startswith("mla:"):
                    row["attn_only_fwd_tflops"] = attn_fwd / ((row["fwd_ms"] - gemm_fwd_ms) * 1e-3) / 1e12
                    row["attn_only_bwd_tflops"] = 2.5 * attn_fwd / ((row["bwd_ms"] - gemm_bwd_ms) * 1e-3) / 1e12
                print(f"{seqlen:>6} {batch:>3} {name:<24} {row['fwd_ms']:>8.2f} {row['bwd_ms']:>8.2f} "
                      f"{row['fwd_bwd_ms']:>8.2f} {row['fwd_tflops']:>8.0f} {row['bwd_tflops']:>8.0f} "
                      f"{row['fwd_bwd_tflops']:>8.0f} {row['peak_mib']:>9.0f}  {row['ran']}  ({time.time() - t0:.0f}s)",
                      flush=True)
            except Exception as e:  # an unsupported backend or OOM is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                print(f"{seqlen:>6} {batch:>3} {name:<24} failed: {row['error']}", flush=True)
            finally:
                inputs = None
                torch.cuda.empty_cache()
            rows.append(row)
            if csv_path:
                with open(csv_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(rows)
        ours = next((r for r in rows if r["seqlen"] == seqlen and r["method"] == "torch_mla" and "error" not in r), None)
        others = [r for r in rows if r["seqlen"] == seqlen and "error" not in r
                  and not (r["method"] == "torch_mla" or r["method"].startswith("mla:"))]
        cores = [r for r in rows if r["seqlen"] == seqlen and r["method"].startswith("mla:") and "error" not in r]
        if cores:
            fastest = min(cores, key=lambda r: r["fwd_bwd_ms"])
            print(f"{'':>10} fastest core at S={seqlen}: {fastest['method'][4:]} "
                  f"({fastest['fwd_bwd_ms']:.2f} ms fwd+bwd)", flush=True)
        if ours:
            print(f"{'':>10} torch_mla attention-only estimate (expansion GEMMs {gemm_fwd_ms:.2f} / "
                  f"{gemm_bwd_ms:.2f} ms subtracted): fwd {ours['attn_only_fwd_tflops']:.0f}, "
                  f"bwd {ours['attn_only_bwd_tflops']:.0f} TFLOP/s "
                  f"({ours['attn_only_fwd_tflops'] / ceiling:.0%} / {ours['attn_only_bwd_tflops'] / ceiling:.0%} "
                  f"of the GEMM ceiling)", flush=True)
        if ours and others:
            best_time = min(others, key=lambda r: r["fwd_bwd_ms"])
            best_mem = min(others, key=lambda r: r["peak_mib"])
            print(f"{'':>10} torch_mla / best other: fwd+bwd time {ours['fwd_bwd_ms'] / best_time['fwd_bwd_ms']:.2f}x "
                  f"({best_time['method']}), peak memory {ours['peak_mib'] / best_mem['peak_mib']:.2f}x "
                  f"({best_mem['method']})", flush=True)
        if args.check:
            print_check_summary([r for r in rows if r["seqlen"] == seqlen])
    if csv_path:
        print(f"CSV: {csv_path}")
    return 0 if any(r["method"] == "torch_mla" and "error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
