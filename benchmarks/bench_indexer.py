"""python benchmarks/bench_indexer.py: time and peak memory of torch_mla.dsa_indexer_topk (docs/design.md §17).

For each S, one call (after a warm-up at S = 256) at DeepSeek-V3.2's indexer sizes (H_I = 64,
D_I = 128, k = 2048), float32, one sequence, on the CPU: its wall time, and the peak of live
tensor bytes above the inputs (torch.profiler's allocation events, tests/support.py), less the
outputs (S·k·8 bytes), beside one (S × S) and one (S × H_I × S) float32 matrix for scale.

    python benchmarks/bench_indexer.py [--seqlens 1024 2048 4096] [--threads 2]
"""
import argparse
import os
import sys
import time

import torch

import torch_mla

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support import peak_live_bytes  # noqa: E402

HEADS, DIM, TOPK = 64, 128, 2048


def inputs(seqlen: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, seqlen, HEADS, DIM, generator=g), torch.randn(1, seqlen, DIM, generator=g),
            torch.randn(1, seqlen, HEADS, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, H_I = {HEADS}, D_I = {DIM}, k = {TOPK}, float32, B = 1")
    torch_mla.dsa_indexer_topk(*inputs(256), TOPK)
    for seqlen in args.seqlens:
        q, k, w = inputs(seqlen)
        start = time.perf_counter()
        torch_mla.dsa_indexer_topk(q, k, w, TOPK)
        seconds = time.perf_counter() - start
        extra = peak_live_bytes(lambda: torch_mla.dsa_indexer_topk(q, k, w, TOPK)) - seqlen * TOPK * 8
        print(f"S = {seqlen}: {seconds:.2f} s, peak extra {extra / 2**20:.1f} MiB "
              f"(one S×S float32: {seqlen**2 * 4 / 2**20:.0f} MiB, S×H_I×S: {seqlen**2 * HEADS * 4 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
