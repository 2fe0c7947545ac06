"""torch_mla demo: what the library is for, in two minutes on a CPU.

Trains a small DeepSeek-V3 (transformers' DeepseekV3ForCausalLM, random init, fp32) on a
synthetic sequence task at a sequence length where attention's activations dominate, twice from
the same initial weights on the same batches: as transformers runs it (HF-style attention: K/V
expanded per head, then SDPA or eager softmax) and patched with
``torch_mla.patch_model(model, save="latent")``. Prints what each kept for backward, tokens/s
and the losses, then a one-line verdict computed from them.

    python examples/demo.py [--steps N] [--seqlen S] [--batch B] [--baseline sdpa|eager]
"""
import argparse
import copy
import os
import statistics
import time
import warnings

# OpenMP's default busy-waiting turns a core shared with other processes into long stalls; passive
# waiting keeps the steps steady on a loaded machine. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import torch_mla  # noqa: E402


def make_model(args) -> DeepseekV3ForCausalLM:
    """A tiny random DeepSeek-V3: dense MLPs only (first_k_dense_replace = layers), MLA with
    DeepSeek-V3's head layout scaled down (Dn, Dr, Dv, Dc = 32, 16, 32, 64)."""
    config = DeepseekV3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, first_k_dense_replace=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=args.seqlen, attn_implementation=args.baseline)
    torch.manual_seed(args.seed)
    return DeepseekV3ForCausalLM(config)


def progressions(batch: int, seqlen: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """The task: each row counts from a random start in a random stride modulo the vocabulary, so
    a token is predictable from the two before it (attention has to find them), never from
    token frequencies. (batch, seqlen) int64."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, vocab, (batch, 1), generator=generator)
    return (start + stride * torch.arange(seqlen)) % vocab


def saved_bytes(model, tokens):
    """Bytes autograd keeps for backward in one training forward, parameters excluded: the whole
    model's and the attention modules' (each module's calls counted on their own)."""
    params = list(model.parameters())
    with torch_mla.SavedTensors() as whole:
        model(tokens, labels=tokens, use_cache=False)
    # A second forward, for the attention modules alone: a saved tensor reaches only the innermost
    # saved_tensors_hooks, so the whole-model counter could not run beside these. One counter per
    # attention call, opened by a pre-hook and closed by a hook.
    counters, handles = [], []
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda *_: counters.append(torch_mla.SavedTensors().__enter__())))
        handles.append(layer.self_attn.register_forward_hook(lambda *_: counters[-1].__exit__()))
    model(tokens, labels=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    attention = sum(c.nbytes_excluding(*params) for c in counters)
    return whole.nbytes_excluding(*params), attention


def step(model, optimizer, tokens) -> tuple:
    """One AdamW step; returns (loss, seconds)."""
    begin = time.perf_counter()
    loss = model(tokens, labels=tokens, use_cache=False).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), time.perf_counter() - begin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per model (default 60)")
    parser.add_argument("--seqlen", type=int, default=1024, help="sequence length S (default 1024)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads H (default 8)")
    parser.add_argument("--vocab", type=int, default=64, help="vocabulary of the task (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--baseline", choices=["sdpa", "eager"], default="sdpa",
                        help="transformers' attention to compare with (default sdpa, its default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 12:
        parser.error("--steps must be at least 12 (the last 10 steps' loss, timed steps after the first)")

    hf = make_model(args).train()
    ours = copy.deepcopy(hf)  # the same initial weights
    with warnings.catch_warnings():
        # Its one warning says that config._attn_implementation no longer runs the attention,
        # which is the point here.
        warnings.simplefilter("ignore")
        torch_mla.patch_model(ours, save="latent")
    base = args.baseline
    models = {base: hf, "torch_mla": ours}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=args.lr) for name, m in models.items()}
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = [progressions(args.batch, args.seqlen, args.vocab, generator) for _ in range(args.steps)]

    tokens = batches[0].numel()
    saved = {name: saved_bytes(m, batches[0]) for name, m in models.items()}
    losses = {name: [] for name in models}
    seconds = {name: [] for name in models}
    # Steps alternate between the models, so that both meet the same load of a shared machine.
    for batch in batches:
        for name, model in models.items():
            loss, elapsed = step(model, optimizers[name], batch)
            losses[name].append(loss)
            seconds[name].append(elapsed)
    # The first step of each model warms up allocators and caches: not timed.
    timed = {name: s[1:] for name, s in seconds.items()}
    # Per step pair, HF's time over ours (> 1: torch_mla faster); its quartiles show how far the
    # machine's load moved the ratio within this run.
    speedups = statistics.quantiles([h / o for h, o in zip(timed[base], timed["torch_mla"])], n=4)
    loss_gap = max(abs(o - h) / h for h, o in zip(losses[base], losses["torch_mla"]))

    def both(value):
        return tuple(value(name) for name in (base, "torch_mla"))

    rows = [
        ("kept for backward, attention, B/token/layer",
         both(lambda n: saved[n][1] / tokens / args.layers), ",.0f"),
        ("kept for backward, whole model, B/token", both(lambda n: saved[n][0] / tokens), ",.0f"),
        ("tokens/s", both(lambda n: len(timed[n]) * tokens / sum(timed[n])), ",.0f"),
        ("loss, first step", both(lambda n: losses[n][0]), ".4f"),
        ("loss, mean of the last 10 steps", both(lambda n: statistics.fmean(losses[n][-10:])), ".4f"),
    ]
    threads = torch.get_num_threads()
    print(f"torch_mla demo: DeepseekV3ForCausalLM, {args.layers} layers, hidden {args.hidden}, "
          f"H={args.heads}, fp32, cpu, {threads} thread{'s' if threads > 1 else ''}")
    print(f"{args.steps} steps of {args.batch} x {args.seqlen} tokens per model, "
          f"the same initial weights and batches")
    print()
    print(f"{'':<44} {'HF ' + base:>12} {'torch_mla':>12} {'ratio':>7}")
    for label, (theirs, ours_), fmt in rows:
        print(f"{label:<44} {format(theirs, fmt):>12} {format(ours_, fmt):>12} {ours_ / theirs:>6.2f}x")
    print()
    print(f"speed-up per step pair (HF time / torch_mla time): quartiles "
          f"{speedups[0]:.2f}, {speedups[1]:.2f}, {speedups[2]:.2f}")
    print(verdict({label: values for label, values, _ in rows}, speedups, loss_gap, base))


def verdict(rows, speedups, loss_gap, base) -> str:
    """One sentence from the numbers: memory as measured; faster or slower only where the middle
    half of the per-step speed-ups lies on one side of 1."""
    attention = rows["kept for backward, attention, B/token/layer"]
    whole = rows["kept for backward, whole model, B/token"]
    first, last = rows["loss, first step"], rows["loss, mean of the last 10 steps"]
    if speedups[0] > 1:
        speed = f"faster ({speedups[1]:.2f}x the tokens/s per step, median)"
    elif speedups[2] < 1:
        speed = f"slower ({speedups[1]:.2f}x the tokens/s per step, median)"
    else:
        speed = "as fast within this machine's noise"
    return (f"verdict: torch_mla kept {attention[1] / attention[0]:.2f}x HF {base}'s attention "
            f"activations ({whole[1] / whole[0]:.2f}x the whole model's), trained {speed}, and "
            f"learned the same: loss {first[1]:.2f} -> {last[1]:.2f}, at most {loss_gap:.0e} "
            f"from HF's at any step (relative).")


if __name__ == "__main__":
    main()
