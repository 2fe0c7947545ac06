"""Latent all-gather context parallelism vs the single-process op (gloo CPU ranks)."""
import pytest
import torch
import torch.distributed as dist

import torch_mla
from torch_mla.distributed import (context_parallel_mla_attention, shard_sequence,
                                    unshard_sequence)
from support import SMALL, TENSOR_ARGS, make_inputs, max_rel_err, run_ranks


def _cp_matches_single_process(rank, world, seqlen):
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=seqlen, seed=7)
    grad_out = torch.randn(2, seqlen, SMALL.heads, SMALL.v, generator=torch.Generator().manual_seed(8))
    full_out = torch_mla.mla_attention(**inputs)
    full_grads = dict(zip(TENSOR_ARGS, torch.autograd.grad(full_out, list(inputs.values()), grad_out)))

    local = {k: (v.detach() if k == "wkv_b" else shard_sequence(v.detach())).requires_grad_(True)
             for k, v in inputs.items()}
    sent = []
    all_gather = dist.all_gather_into_tensor

    def counting_all_gather(output, tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_gather(output, tensor, *args, **kwargs)

    dist.all_gather_into_tensor = counting_all_gather
    try:
        out = context_parallel_mla_attention(**local)
    finally:
        dist.all_gather_into_tensor = all_gather
    out.backward(shard_sequence(grad_out))

    local_tokens = 2 * local["q"].shape[1]  # batch 2
    assert sum(sent) / local_tokens == (SMALL.latent + SMALL.rope) * 4
    # Padding rows (S not a multiple of 2W) hold attention over zeros: compare the real ones.
    assert max_rel_err(unshard_sequence(out.detach(), seqlen), full_out.detach()) <= 1e-5
    for k in ("q", "kv_latent", "k_rope"):
        assert max_rel_err(local[k].grad, shard_sequence(full_grads[k])) <= 1e-5, k
    grad_wkv_b = local["wkv_b"].grad.clone()
    dist.all_reduce(grad_wkv_b)
    assert max_rel_err(grad_wkv_b, full_grads["wkv_b"]) <= 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("seqlen", [16, 13, 70])
def test_context_parallel_matches_single_process(world, seqlen):
    run_ranks(_cp_matches_single_process, world, seqlen)
