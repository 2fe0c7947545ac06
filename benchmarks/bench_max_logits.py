"""python benchmarks/bench_max_logits.py: what return_max_logits costs the forward (docs/design.md §12).

For each attention core and S, times torch_mla.mla_attention's forward three ways on the same
tensors, one call of each in turn (interleaved, so that machine load hits all alike):
  plain      return_max_logits=False
  core       return_max_logits=True, the core's own row maxima (cpu, cuda, simt, composed)
  fallback   return_max_logits=True with TORCH_MLA_MAX_LOGITS=recompute: the shared lse-pruned
             recomputation the stock cores (cudnn, efficient) use, forced on this core
and prints the medians and their ratios to plain. DeepSeek-V3 head dims, causal, no autograd.
On the CPU the default is fp32 on one thread; on CUDA bf16.

    python benchmarks/bench_max_logits.py [--device cpu] [--cores cpu composed] [--seqlens 512 1024]
"""
import argparse
import os
import statistics
import time
from typing import Dict, List, Sequence

import torch

import torch_mla

DN, DR, DV, DC = 128, 64, 128, 512
MODES = ("plain", "core", "fallback")


def make_inputs(heads: int, seqlen: int, batch: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    return dict(q=rand(batch, seqlen, heads, DN + DR), kv_latent=rand(batch, seqlen, DC),
                k_rope=rand(batch, seqlen, DR), wkv_b=rand(heads * (DN + DV), DC, scale=DC ** -0.5))


def _forward(inputs: dict, core: str, mode: str) -> None:
    if mode == "fallback":
        os.environ["TORCH_MLA_MAX_LOGITS"] = "recompute"
    try:
        with torch.no_grad(), torch_mla.use_core(core):
            torch_mla.mla_attention(**inputs, return_max_logits=mode != "plain")
    finally:
        os.environ.pop("TORCH_MLA_MAX_LOGITS", None)


def time_modes(inputs: dict, core: str, device: str, warmup: int, reps: int) -> Dict[str, float]:
    """Median forward ms of each mode, the modes interleaved call by call."""
    times: Dict[str, List[float]] = {m: [] for m in MODES}
    for rep in range(warmup + reps):
        for mode in MODES:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            _forward(inputs, core, mode)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep >= warmup:
                times[mode].append(1e3 * (time.perf_counter() - start))
    return {m: statistics.median(t) for m, t in times.items()}


def run(device: str, cores: Sequence[str], seqlens: Sequence[int], heads: int, batch: int,
        dtype: torch.dtype, warmup: int, reps: int) -> List[dict]:
    rows = []
    for core in cores:
        for seqlen in seqlens:
            inputs = make_inputs(heads, seqlen, batch, dtype, device)
            ms = time_modes(inputs, core, device, warmup, reps)
            rows.append(dict(core=core, seqlen=seqlen, **{f"{m}_ms": ms[m] for m in MODES}))
    return rows


def report(rows: Sequence[dict], where: str) -> str:
    lines = [f"forward ms, median ({where}); ratio to return_max_logits=False",
             f"{'core':>9} {'S':>6} {'plain':>9} {'core':>9} {'ratio':>6} {'fallback':>9} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['core']:>9} {r['seqlen']:>6} {r['plain_ms']:9.2f} {r['core_ms']:9.2f} "
                     f"{r['core_ms'] / r['plain_ms']:6.3f} {r['fallback_ms']:9.2f} "
                     f"{r['fallback_ms'] / r['plain_ms']:6.3f}")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_max_logits.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cores", nargs="+", default=None,
                        help="attention cores (default: cpu composed on the CPU, cuda on CUDA)")
    parser.add_argument("--seqlens", nargs="+", type=int, default=None,
                        help="default: CPU 512 1024 2048, CUDA 4096 16384")
    parser.add_argument("--heads", type=int, default=None, help="default: CPU 8, CUDA 128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="default: CPU float32, CUDA bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    cores = args.cores or (["cuda"] if cuda else ["cpu", "composed"])
    seqlens = args.seqlens or ([4096, 16384] if cuda else [512, 1024, 2048])
    heads = args.heads or (128 if cuda else 8)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    rows = run(args.device, cores, seqlens, heads, args.batch, dtype, args.warmup, args.reps)
    where = (torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} thread(s)")
    print(report(rows, f"{where}, {dtype}, B={args.batch}, H={heads}, Dn/Dr/Dv = {DN}/{DR}/{DV}, causal"))
    return rows


if __name__ == "__main__":
    main()
