"""Train the demo's MLA language model with FSDP2 and latent context parallelism.

    torchrun --nproc-per-node 2 benchmarks/train_fsdp_cp.py [--steps 20] [--seqlen 128]

Every rank holds the same batch and its share of each sequence (torch_mla.distributed's
load-balanced causal chunks); attention all-gathers only the latents. FSDP2 shards the
parameters over the same ranks. gloo on CPU, NCCL on GPUs.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from torch_mla.distributed import shard_positions, shard_sequence

from models import MLAConfig, MLATransformerLM, periodic_sequences


def sharded_loss(model, tokens, seqlen):
    """Next-token loss of this rank's tokens, normalised by the global token count, so that the
    ranks' losses (and gradients) add up to the full batch's."""
    local = shard_sequence(tokens)
    positions = shard_positions(local.shape[1], device=tokens.device)
    logits = model(local)
    has_target = positions + 1 < seqlen
    targets = tokens[:, (positions + 1).clamp(max=seqlen - 1)]
    return F.cross_entropy(logits[:, has_target].flatten(0, 1).float(),
                           targets[:, has_target].flatten(), reduction="sum") / (
        tokens.shape[0] * (seqlen - 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = MLATransformerLM(MLAConfig()).to(device)
    for layer in model.layers:
        layer.self_attn.context_parallel_group = dist.group.WORLD
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)

    start = time.perf_counter()
    for step in range(args.steps):
        tokens = periodic_sequences(args.batch, args.seqlen, model.config.vocab_size, data).to(device)
        loss = sharded_loss(model, tokens, args.seqlen)
        # FSDP averages gradients over the ranks; the per-rank losses are parts of one sum.
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(total := loss.detach().clone())
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {total.item():.4f}", flush=True)
    if rank == 0:
        tokens_done = args.steps * args.batch * args.seqlen
        print(f"{world} ranks, {tokens_done / (time.perf_counter() - start):,.0f} tokens/s")
    # Tear down together: a rank leaving while its peer's gloo threads still talk to it aborts.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
