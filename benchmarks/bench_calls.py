"""Per-call overhead of the packed path on the CPU (issue 25 items 3-4): the time of many small
packed forward+backward calls, where the work is tiny and what the op does around the core (checks,
core selection, reading cu_seqlens) dominates.

Three sequences of lengths (5, 9, 2), DeepSeek-like small head dims (Dn=64, Dr=32, Dv=64, Dc=128,
one of the cuda kernels' tuned shapes). Rows:
  mla_attention, default core (float32), max_seqlen given and not given;
  mla_attention on three empty sequences (T = 0): the op's overhead alone, no core runs;
  mla_attention_block with its default head groups (H=8), max_seqlen given and not given.
Prints ms per forward+backward call: the best of --rounds runs of --calls calls after a warm-up,
in process CPU time. The simt core is
left out: emulating the CUDA kernels costs ~200 ms per call here, which hides the overhead.

    python benchmarks/bench_calls.py [--calls 1000] [--rounds 3] [--only "mla_attention_block given"]
"""
import argparse
import time

import torch

import torch_mla

LENGTHS = (5, 9, 2)
DN, DR, DV, DC, H = 64, 32, 64, 128, 4
LQ, HIDDEN, BLOCK_HEADS = 64, 128, 8


def cu_seqlens(lengths=LENGTHS):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def attention_inputs(dtype, gen, lengths=LENGTHS):
    T = sum(lengths)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(True)

    return dict(q=rand(T, H, DN + DR), kv_latent=rand(T, DC), k_rope=rand(T, DR),
                wkv_b=rand(H * (DN + DV), DC, scale=DC ** -0.5))


def block_inputs(gen):
    T = sum(LENGTHS)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)

    angles = torch.rand(T, DR // 2, generator=gen) * 6.28
    return dict(q_a=rand(T, LQ), q_norm_weight=rand(LQ), wq_b=rand(BLOCK_HEADS * (DN + DR), LQ, scale=LQ ** -0.5),
                kv_a=rand(T, DC + DR), kv_norm_weight=rand(DC),
                wkv_b=rand(BLOCK_HEADS * (DN + DV), DC, scale=DC ** -0.5),
                wo=rand(HIDDEN, BLOCK_HEADS * DV, scale=(BLOCK_HEADS * DV) ** -0.5), bo=None,
                cos=angles.cos(), sin=angles.sin())


def ms_per_call(step, calls, rounds, warmup=20):
    """The best of `rounds` runs of `calls` calls, in this process's CPU time: on a shared machine
    wall-clock time counts the other processes' load too."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            step()
        best = min(best, time.process_time() - start)
    return best / calls * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help='rows whose "op max_seqlen" label contains this, '
                        'e.g. "mla_attention_block given"')
    args = parser.parse_args()
    torch.set_num_threads(1)  # overhead, not parallel speed; the same on every machine
    gen = torch.Generator().manual_seed(0)
    cu, longest = cu_seqlens(), max(LENGTHS)

    def attention_step(x, max_seqlen, cu=cu):
        def step():
            out = torch_mla.mla_attention(x["q"], x["kv_latent"], x["k_rope"], x["wkv_b"], cu_seqlens=cu,
                                          max_seqlen=max_seqlen)
            out.sum().backward()
        return step

    def block_step(x, max_seqlen):
        def step():
            y = torch_mla.mla_attention_block(**x, num_heads=BLOCK_HEADS, cu_seqlens=cu, max_seqlen=max_seqlen)
            y.sum().backward()
        return step

    f32, blk = attention_inputs(torch.float32, gen), block_inputs(gen)
    # Three empty sequences (T = 0): no core runs, what is left is the op's own overhead.
    empty, cu_empty = attention_inputs(torch.float32, gen, (0, 0, 0)), cu_seqlens((0, 0, 0))
    rows = [("mla_attention", "auto", "float32", True, attention_step(f32, longest)),
            ("mla_attention", "auto", "float32", False, attention_step(f32, None)),
            ("mla_attention T=0", "auto", "float32", False, attention_step(empty, None, cu_empty)),
            ("mla_attention_block", "auto", "float32", True, block_step(blk, longest)),
            ("mla_attention_block", "auto", "float32", False, block_step(blk, None))]
    print(f"{args.calls} packed forward+backward calls (best of {args.rounds}, CPU time), lengths {LENGTHS}, "
          f"torch {torch.__version__}, 1 thread")
    print(f"{'op':<20} {'core':<5} {'dtype':<9} {'max_seqlen':<10} {'ms/call':>8}")
    for op, core, dtype, given, step in rows:
        if args.only not in f"{op} {'given' if given else 'not given'}":
            continue
        with torch_mla.use_core(core):
            ms = ms_per_call(step, args.calls, args.rounds)
        print(f"{op:<20} {core:<5} {dtype:<9} {'given' if given else 'not given':<10} {ms:>8.3f}")


if __name__ == "__main__":
    main()
