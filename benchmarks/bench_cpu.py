"""CPU benchmark: torch_mla.mla_attention vs the reference path (expanded K/V, full softmax).

DeepSeek-V3 head dims (Dn=128, Dr=64, Dv=128, Dc=512), a few heads, fp32, causal. For each S it
times forward+backward (median of --reps after a warm-up), counts the bytes saved for backward
(parameters excluded) and measures the peak RSS of a fresh process running one forward+backward.
Prints a table with ours/reference ratios.

    python benchmarks/bench_cpu.py [--heads 4] [--seqlens 512 1024 2048] [--reps 3]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import torch_mla
from torch_mla.reference import mla_attention_reference

IMPLS = {"torch_mla": torch_mla.mla_attention, "reference": mla_attention_reference}
DIMS = dict(nope=128, rope=64, v=128, latent=512)


def make_inputs(heads, seqlen, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)

    return dict(
        q=rand(batch, seqlen, heads, DIMS["nope"] + DIMS["rope"]),
        kv_latent=rand(batch, seqlen, DIMS["latent"]),
        k_rope=rand(batch, seqlen, DIMS["rope"]),
        wkv_b=rand(heads * (DIMS["nope"] + DIMS["v"]), DIMS["latent"], scale=DIMS["latent"] ** -0.5),
    )


def fwd_bwd(fn, inputs):
    out = fn(**inputs)
    out.backward(torch.ones_like(out))


def worker(impl, heads, seqlen, reps):
    """Runs in a fresh process so that its peak RSS belongs to this measurement alone."""
    fn = IMPLS[impl]
    inputs = make_inputs(heads, seqlen)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_bwd(fn, inputs)  # warm-up, and the peak-RSS run
    peak_rss_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fwd_bwd(fn, inputs)
        times.append(time.perf_counter() - start)
    with torch_mla.SavedTensors() as saved:
        fn(**inputs)
    return dict(ms=1e3 * statistics.median(times), peak_rss_mib=peak_rss_mib,
                saved_per_token=saved.nbytes_excluding(inputs["wkv_b"]) / seqlen)


def measure(impl, heads, seqlen, reps):
    cmd = [sys.executable, __file__, "--worker", impl, "--heads", str(heads),
           "--seqlens", str(seqlen), "--reps", str(reps)]
    return json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.heads, args.seqlens[0], args.reps)))
        return

    print(f"CPU, {torch.get_num_threads()} threads, fp32, causal, B=1, H={args.heads}, "
          f"Dn/Dr/Dv/Dc = {DIMS['nope']}/{DIMS['rope']}/{DIMS['v']}/{DIMS['latent']}")
    header = (f"{'S':>6} | {'fwd+bwd ms':>21} | {'peak RSS MiB':>21} | {'saved bytes/token':>23} | "
              f"{'ratios ours/ref (time, RSS, saved)':>34}")
    print(header)
    print(f"{'':>6} | {'ours':>10} {'ref':>10} | {'ours':>10} {'ref':>10} | {'ours':>11} {'ref':>11} |")
    print("-" * len(header))
    for seqlen in args.seqlens:
        ours = measure("torch_mla", args.heads, seqlen, args.reps)
        ref = measure("reference", args.heads, seqlen, args.reps)
        print(f"{seqlen:>6} | {ours['ms']:>10.1f} {ref['ms']:>10.1f} | "
              f"{ours['peak_rss_mib']:>10.1f} {ref['peak_rss_mib']:>10.1f} | "
              f"{ours['saved_per_token']:>11,.0f} {ref['saved_per_token']:>11,.0f} | "
              f"{ours['ms'] / ref['ms']:>10.2f} {ours['peak_rss_mib'] / ref['peak_rss_mib']:>10.2f} "
              f"{ours['saved_per_token'] / ref['saved_per_token']:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
