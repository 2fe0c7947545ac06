"""torch_mla inside PyTorch's distributed stack (gloo CPU ranks): DDP, FSDP2, head-sharded tensor
parallelism and the module's context-parallel flag, each against a single-process run of the
default module (the latent-only block, save="latent", too: docs/design.md §13.4)."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from torch_mla.distributed import shard_sequence
from models import MLAConfig, MLATransformerLM, next_token_loss, periodic_sequences
from support import max_rel_err, run_ranks

CONFIG = MLAConfig(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, q_lora_rank=48,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   intermediate_size=96)
BATCH, SEQLEN = 4, 24


def model_and_batch(save=None):
    """The model (its attention's `save` as MultiHeadLatentAttention's; None: the default) and a batch."""
    torch.manual_seed(0)
    tokens = periodic_sequences(BATCH, SEQLEN, CONFIG.vocab_size, torch.Generator().manual_seed(1))
    config = CONFIG if save is None else dataclasses.replace(CONFIG, extra=dict(save=save))
    return MLATransformerLM(config), tokens


def single_process_reference():
    """Loss and every parameter's grad of one step on the full batch."""
    model, tokens = model_and_batch()
    loss = next_token_loss(model(tokens), tokens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_grads_match(grads, ref_grads):
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        err = max_rel_err(grad, ref_grads[name])
        assert err <= 1e-5, f"{name}: max relative error {err:.3g}"


def _ddp(rank, world, save=None):
    from torch.nn.parallel import DistributedDataParallel
    ref_loss, ref_grads = single_process_reference()
    model, tokens = model_and_batch(save)
    ddp = DistributedDataParallel(model)
    local = tokens.chunk(world)[rank]
    loss = next_token_loss(ddp(local), local)
    loss.backward()
    dist.all_reduce(loss := loss.detach().clone())
    assert max_rel_err(loss / world, ref_loss) <= 1e-5
    assert_grads_match({n: p.grad for n, p in model.named_parameters()}, ref_grads)


def _fsdp2(rank, world, save=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    ref_loss, ref_grads = single_process_reference()
    model, tokens = model_and_batch(save)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = tokens.chunk(world)[rank]
    loss = next_token_loss(model(local), local)
    loss.backward()
    # FSDP2 averages gradients over the data-parallel ranks; on gloo this is checked, not assumed.
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    assert_grads_match(grads, ref_grads)


def _tensor_parallel(rank, world, save=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    ref_loss, ref_grads = single_process_reference()
    model, tokens = model_and_batch(save)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        parallelize_module(layer.self_attn, mesh, {"q_b_proj": ColwiseParallel(),
                                                   "kv_b_proj": ColwiseParallel(),
                                                   "o_proj": RowwiseParallel()})
    loss = next_token_loss(model(tokens), tokens)
    loss.backward()
    assert max_rel_err(loss.detach(), ref_loss) <= 1e-5
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in model.named_parameters()}
    assert_grads_match(grads, ref_grads)


def _context_parallel_module(rank, world):
    import torch.nn.functional as F
    from torch_mla.distributed import shard_positions
    ref_loss, ref_grads = single_process_reference()
    model, tokens = model_and_batch()
    for layer in model.layers:
        layer.self_attn.context_parallel_group = dist.group.WORLD
    # Every rank holds the whole batch and its share of each sequence; its loss is the sum over
    # its tokens, normalised by the global count, so the ranks' losses and grads add up.
    local = shard_sequence(tokens)
    positions = shard_positions(local.shape[1])
    logits = model(local)
    has_target = positions + 1 < SEQLEN
    targets = tokens[:, (positions + 1).clamp(max=SEQLEN - 1)]
    loss = F.cross_entropy(logits[:, has_target].flatten(0, 1), targets[:, has_target].flatten(),
                           reduction="sum") / (BATCH * (SEQLEN - 1))
    loss.backward()
    dist.all_reduce(loss := loss.detach().clone())
    assert max_rel_err(loss, ref_loss) <= 1e-5
    grads = {}
    for n, p in model.named_parameters():
        dist.all_reduce(g := p.grad.clone())
        grads[n] = g
    assert_grads_match(grads, ref_grads)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", [_ddp, _fsdp2, _tensor_parallel, _context_parallel_module],
                         ids=["ddp", "fsdp2", "tp", "context_parallel"])
def test_matches_single_process(setup):
    run_ranks(setup, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", [_ddp, _fsdp2, _tensor_parallel], ids=["ddp", "fsdp2", "tp"])
def test_latent_only_block_matches_single_process(setup):
    """save="latent" under DDP, FSDP2 and head-sharded TP (o_proj row-parallel: the op's partial
    sums reduced over the mesh) against the default module in one process."""
    run_ranks(setup, 2, "latent")


@pytest.mark.timeout(300)
def test_torchrun_fsdp_context_parallel_example_matches_single_process():
    """benchmarks/train_fsdp_cp.py under torchrun (2 gloo ranks, FSDP2 + context parallel)
    prints the same losses as the same training in one process."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_fsdp_cp.py"
    steps = 6
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
         "--steps", str(steps), "--batch", "2", "--seqlen", "37"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    printed = {int(s): float(l) for s, l in re.findall(r"step +(\d+) +loss ([\d.]+)", run.stdout)}
    assert set(printed) == {0, 5}

    torch.manual_seed(0)
    model = MLATransformerLM(MLAConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        tokens = periodic_sequences(2, 37, model.config.vocab_size, data)
        loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in printed:
            assert abs(printed[step] - loss.item()) <= 1e-4, (step, printed[step], loss.item())
