"""python benchmarks/bench_sparse.py: DeepSeek Sparse Attention's attention, torch_mla's sparse op
against torch_mla's dense op and HF-style masked-dense attention (docs/design.md §16).

For each S: one sequence, DeepSeek-V3.2's head dims (Dn/Dr/Dv/Dc = 128/64/128/512) with H = 8
heads (this machine's size), k = 256 keys per query chosen by torch_mla.dsa_indexer_topk on random
indexer inputs (a row with fewer than k earlier keys takes them all), float32 on the CPU. Methods,
each one forward+backward of the attention alone (from q and the latents to out):

  sparse        torch_mla.mla_sparse_attention, core "auto"
  dense         torch_mla.mla_attention, causal: every earlier key (what k >= S would select)
  masked_eager  HF DeepseekV32Attention with attn_implementation "eager": K/V expanded per head,
                the full (H, S, S) scores with -inf outside the selection, softmax
                (reference.mla_sparse_attention_reference is that computation)
  masked_sdpa   the same with "sdpa": expanded K/V, scaled_dot_product_attention with the (S, S)
                boolean mask HF folds the selection into

Columns: bytes saved for backward per token (torch_mla.SavedTensors; wkv_b, a parameter, left
out), the peak of live tensor bytes above the inputs during one forward+backward
(torch.profiler's allocation events, as benchmarks/bench_indexer.py), and the forward+backward
time: a profiled step (the warm-up), then --reps timed steps, the methods interleaved so that
machine load hits all alike; the median is printed and its ratio to the sparse op's. A method whose
estimated peak exceeds --max-gib is skipped and says so.

    python benchmarks/bench_sparse.py [--seqlens 1024 2048 4096 8192] [--topk 256] [--reps 3]
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import torch_mla
from torch_mla import SavedTensors
from torch_mla.reference import _sparse_mask, expand_kv, mla_sparse_attention_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support import peak_live_bytes  # noqa: E402

DIM_NOPE, DIM_ROPE, DIM_V, DIM_LATENT = 128, 64, 128, 512
INDEX_HEADS, INDEX_DIM = 4, 32


def masked_sdpa(q, kv_latent, k_rope, wkv_b, topk_indices, *, softmax_scale):
    """HF DeepseekV32's "sdpa" path: expanded K/V and SDPA under the selection's boolean mask."""
    heads = q.shape[-2]
    k_nope, v = expand_kv(kv_latent, wkv_b, heads, DIM_NOPE)
    k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], DIM_ROPE)], dim=-1)
    mask = _sparse_mask(topk_indices, q.shape[1]).unsqueeze(1)  # (B, 1, S, S)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


METHODS: Dict[str, Callable] = {
    "sparse": lambda q, c, r, w, idx, s: torch_mla.mla_sparse_attention(q, c, r, w, idx, softmax_scale=s),
    "dense": lambda q, c, r, w, idx, s: torch_mla.mla_attention(q, c, r, w, softmax_scale=s),
    "masked_eager": lambda q, c, r, w, idx, s: mla_sparse_attention_reference(q, c, r, w, idx, softmax_scale=s),
    "masked_sdpa": lambda q, c, r, w, idx, s: masked_sdpa(q, c, r, w, idx, softmax_scale=s),
}


def estimated_peak_bytes(method: str, seqlen: int, heads: int) -> float:
    """A rough upper estimate, to skip what would not fit: the eager path holds about five
    (H, S, S) float32 tensors at once (scores, masked scores, probabilities and their grads), SDPA
    about two plus the (S, S) mask; the torch_mla ops are linear in S."""
    square = heads * seqlen * seqlen * 4
    return {"masked_eager": 5 * square, "masked_sdpa": 2 * square}.get(method, 0)


def inputs(seqlen: int, heads: int, topk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen, heads, DIM_NOPE + DIM_ROPE, generator=g)
    kv_latent = torch.randn(1, seqlen, DIM_LATENT, generator=g)
    k_rope = torch.randn(1, seqlen, DIM_ROPE, generator=g)
    wkv_b = torch.randn(heads * (DIM_NOPE + DIM_V), DIM_LATENT, generator=g) * DIM_LATENT ** -0.5
    index_q = torch.randn(1, seqlen, INDEX_HEADS, INDEX_DIM, generator=g)
    index_k = torch.randn(1, seqlen, INDEX_DIM, generator=g)
    weights = torch.rand(1, seqlen, INDEX_HEADS, generator=g)
    topk_indices, _ = torch_mla.dsa_indexer_topk(index_q, index_k, weights, topk)
    return (q, kv_latent, k_rope, wkv_b, topk_indices)


def step(method: str, tensors, softmax_scale: float):
    q, kv_latent, k_rope, wkv_b, topk_indices = tensors
    leaves = [t.detach().requires_grad_() for t in (q, kv_latent, k_rope, wkv_b)]
    out = METHODS[method](*leaves, topk_indices, softmax_scale)
    out.backward(torch.ones_like(out))


def saved_bytes_per_token(method: str, tensors, softmax_scale: float) -> float:
    q, kv_latent, k_rope, wkv_b, topk_indices = tensors
    leaves = [t.detach().requires_grad_() for t in (q, kv_latent, k_rope, wkv_b)]
    with SavedTensors() as saved:
        METHODS[method](*leaves, topk_indices, softmax_scale)
    return saved.nbytes_excluding(leaves[3]) / q.shape[1]


def run(seqlens, methods, heads: int, topk: int, reps: int, max_gib: float):
    softmax_scale = (DIM_NOPE + DIM_ROPE) ** -0.5
    rows = []
    for seqlen in seqlens:
        tensors = inputs(seqlen, heads, topk)
        live = [m for m in methods if estimated_peak_bytes(m, seqlen, heads) <= max_gib * 2 ** 30]
        found = {m: dict(method=m, seqlen=seqlen, skipped=f"estimated peak "
                         f"{estimated_peak_bytes(m, seqlen, heads) / 2 ** 30:.1f} GiB > --max-gib {max_gib}")
                 for m in methods if m not in live}
        for m in live:
            found[m] = dict(method=m, seqlen=seqlen,
                            saved=saved_bytes_per_token(m, tensors, softmax_scale),
                            peak=peak_live_bytes(lambda: step(m, tensors, softmax_scale)), times=[])
        for _ in range(reps):
            for m in live:
                start = time.perf_counter()
                step(m, tensors, softmax_scale)
                found[m]["times"].append(time.perf_counter() - start)
        for m in methods:
            if "times" in found[m]:
                found[m]["seconds"] = statistics.median(found[m]["times"])
            rows.append(found[m])
        del tensors
    return rows


def report(rows, methods, heads: int, topk: int, reps: int) -> str:
    lines = [f"CPU, threads {torch.get_num_threads()}, float32, B = 1, H = {heads}, "
             f"Dn/Dr/Dv/Dc = {DIM_NOPE}/{DIM_ROPE}/{DIM_V}/{DIM_LATENT}, k = {topk}, "
             f"forward+backward, median of {reps}",
             f"{'S':>6} {'method':<13} {'saved B/token':>14} {'peak MiB':>10} {'time s':>9} {'vs sparse':>10}"]
    by_key = {(r["method"], r["seqlen"]): r for r in rows}
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['seqlen']:>6} {r['method']:<13} skipped: {r['skipped']}")
            continue
        base = by_key.get(("sparse", r["seqlen"]), {}).get("seconds")
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        lines.append(f"{r['seqlen']:>6} {r['method']:<13} {r['saved']:>14,.0f} {r['peak'] / 2 ** 20:>10.1f} "
                     f"{r['seconds']:>9.3f} {ratio:>10}")
    # Growth per doubling of S: about 2 for a cost linear in S, 4 for a quadratic one.
    for m in methods:
        times = [(r["seqlen"], r["seconds"]) for r in rows if r["method"] == m and "seconds" in r]
        growth = [f"{b[1] / a[1]:.1f}" for a, b in zip(times, times[1:]) if b[0] == 2 * a[0]]
        if growth:
            lines.append(f"time growth per doubling of S, {m}: {' '.join(growth)}")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-gib", type=float, default=12.0,
                        help="skip a method whose estimated peak exceeds this (default 12)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.seqlens, args.methods, args.heads, args.topk, args.reps, args.max_gib)
    print(report(rows, args.methods, args.heads, args.topk, args.reps))
    return rows


if __name__ == "__main__":
    main()
