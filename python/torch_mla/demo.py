"""torch_mla demo: train a small MLA language model twice — with torch_mla, and with the same
model attending HF-style (per-head K/V expanded, then SDPA or eager softmax) — on a synthetic
language (repeated random motifs; no download), then compare what each kept for backward, peak
memory, speed and loss.

    python -m torch_mla.demo [--steps N] [--layers L] [--hidden D] [--heads H] [--seqlen S]
                             [--batch B] [--baseline sdpa|eager] [--device cpu|cuda]
"""
import argparse
import multiprocessing as mp
import os
import resource
import time

import torch

MIB = 2 ** 20


def _measure_saved(model, tokens):
    """Bytes saved for backward per token per layer: the attention block alone, and the whole
    layer (attention + MLP + norms), parameters excluded."""
    from torch_mla import SavedTensors
    params = list(model.parameters())
    layer = model.layers[0]
    hidden = model.embed_tokens(tokens).detach().requires_grad_(True)
    with SavedTensors() as attn:
        layer.self_attn(layer.input_layernorm(hidden))
    with SavedTensors() as whole:
        layer(hidden)
    n = tokens.numel()
    return attn.nbytes_excluding(*params) / n, whole.nbytes_excluding(*params) / n


# Steps a run takes per turn. The two runs alternate in turns of this many steps, so that both
# meet the same load of a shared machine (a busy 2-core machine swings 2x between minutes).
CHUNK_STEPS = 5


def _train(args, attention_core, conn):
    """One training run, in its own process so its peak memory is its own. It runs its first
    (untimed, warm-up) step, then its steps in chunks of CHUNK_STEPS, each when the parent sends
    "go" on conn, answering ("paused", steps done) after each chunk and its results at the end."""
    from torch_mla.models import MLAConfig, MLATransformerLM, next_token_loss, periodic_sequences

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = MLAConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       attention_core=attention_core, vocab_size=args.vocab)
    model = MLATransformerLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed + 1)
    batches = [periodic_sequences(args.batch, args.seqlen, args.vocab, data) for _ in range(args.steps)]

    saved_attn, saved_layer = _measure_saved(model, batches[0].to(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses, elapsed = [], 0.0
    for step, tokens in enumerate(batches):
        if step % CHUNK_STEPS == 1 or (CHUNK_STEPS == 1 and step > 0):
            conn.send(("paused", step))
            conn.recv()  # "go": this run's turn
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        tokens = tokens.to(device, non_blocking=True)
        loss = next_token_loss(model(tokens), tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step >= 1:  # timed from the second step: the first one warms up allocators and caches
            elapsed += time.perf_counter() - begin
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    conn.send(dict(core=attention_core, saved_attn=saved_attn, saved_layer=saved_layer,
                     peak_mib=peak / MIB, tokens_per_s=(args.steps - 1) * tokens.numel() / elapsed,
                     first_loss=losses[0], final_loss=sum(losses[-10:]) / len(losses[-10:])))


def _alternate(args, cores):
    """Runs _train for each core in its own process, the runs taking turns of CHUNK_STEPS steps
    (one runs while the other waits), and returns their results by core."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    children = {}

    def receive(core):
        proc, conn = children[core]
        try:
            return conn.recv()
        except EOFError:
            proc.join()
            raise SystemExit(f"the {core} run failed (exit code {proc.exitcode})") from None

    runs, done = {}, {core: 1 for core in cores}
    for core in cores:  # start-up and the untimed first step, one run at a time
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_train, args=(args, core, child_conn))
        proc.start()
        child_conn.close()
        children[core] = (proc, conn)
        message = receive(core)
        if isinstance(message, dict):  # a one-step run has no timed steps to alternate
            runs[core] = message
            proc.join()
    with tqdm(total=len(cores) * args.steps, initial=len(cores), unit="step", ncols=80,
              desc=" + ".join(cores)) as bar:
        while len(runs) < len(cores):
            for core in cores:
                if core in runs:
                    continue
                children[core][1].send("go")
                message = receive(core)
                steps = message[1] if isinstance(message, tuple) else args.steps
                bar.update(steps - done[core])
                done[core] = steps
                if isinstance(message, dict):
                    runs[core] = message
                    children[core][0].join()
    return runs


def _row(name, ours, theirs, fmt):
    ratio = ours / theirs if theirs else float("nan")
    return f"{name:<38} {format(ours, fmt):>14} {format(theirs, fmt):>14} {ratio:>8.2f}x"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m torch_mla.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps per run (default 120)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    parser.add_argument("--heads", type=int, default=16,
                        help="attention heads H; MLA's saving grows with H (default 16)")
    parser.add_argument("--seqlen", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--vocab", type=int, default=64, help="vocabulary of the synthetic language")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--baseline", choices=["sdpa", "eager"], default="sdpa",
                        help="HF-style attention to compare with (default sdpa)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"torch_mla demo on {args.device}: {args.layers} layers, hidden {args.hidden}, "
          f"H={args.heads}, batch {args.batch} × S={args.seqlen}, {args.steps} steps")
    # The runs happen in child processes. OpenMP's default busy-waiting turns a core shared with
    # other processes into long stalls for both runs alike; passive waiting keeps them steady.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runs = _alternate(args, ("torch_mla", args.baseline))

    ours, theirs = runs["torch_mla"], runs[args.baseline]
    memory = "peak GPU memory in training (MiB)" if args.device.startswith("cuda") else \
        "peak RSS growth in training (MiB)"
    print()
    print(f"{'':<38} {'torch_mla':>14} {'HF-style ' + args.baseline:>14} {'ratio':>9}")
    print(_row("saved for backward, bytes/token, attn", ours["saved_attn"], theirs["saved_attn"], ",.0f"))
    print(_row("saved for backward, bytes/token, layer", ours["saved_layer"], theirs["saved_layer"], ",.0f"))
    print(_row(memory, ours["peak_mib"], theirs["peak_mib"], ".1f"))
    print(_row("tokens/s", ours["tokens_per_s"], theirs["tokens_per_s"], ",.0f"))
    print(_row("loss, first step", ours["first_loss"], theirs["first_loss"], ".4f"))
    print(_row("loss, mean of last 10 steps", ours["final_loss"], theirs["final_loss"], ".4f"))
    return runs


if __name__ == "__main__":
    main()
