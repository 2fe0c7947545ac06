"""Context parallelism that moves latents, not per-head K/V.

The sequence is cut into 2W equal chunks for a group of W ranks; rank r holds chunks r and
2W−1−r, which balances the causal work (``shard_sequence``). Each rank all-gathers only
``kv_latent`` and ``k_rope`` — (Dc+Dr) values per token, 576 at DeepSeek-V3 sizes, instead of
H·(Dn+Dr+Dv) for expanded K/V — and runs the op on (query chunk, key chunk) pairs, merging the
partial results with their log-sum-exps. The backward runs the op's backward per pair with the
merged out and lse (exact: the softmax of every pair is then the global one) and
reduce-scatters the latent grads back to their owners; ``wkv_b``'s grad is this rank's share,
to be all-reduced like any replicated weight's (DDP and FSDP do that).
"""
from typing import List, Optional

import torch
import torch.distributed as dist

from .cores import current_core
from .ops import default_softmax_scale


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over `group` (Megatron's "copy to the
    tensor-parallel region")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def tensor_parallel_input(x: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
    """x as the replicated input of a head-sharded computation on `sharded_weight`'s local shard.

    When the weight is a DTensor (tensor parallelism) each rank's gradient for x covers only its
    heads, so the gradients are summed over the weight's mesh; otherwise x is returned as is.
    """
    mesh = getattr(sharded_weight, "device_mesh", None)
    if mesh is None:
        return x
    return _SumGradOverGroup.apply(x, mesh.get_group())


class _SumOverGroup(torch.autograd.Function):
    """All-reduce forward, identity backward (Megatron's "reduce from the tensor-parallel region")."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def tensor_parallel_output(partial: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
    """The sum over `sharded_weight`'s mesh of each rank's partial result (a row-parallel layer
    such as o_proj on head-sharded input computed from the local shard); when the weight is not a
    DTensor, `partial` is the whole result and is returned as is."""
    mesh = getattr(sharded_weight, "device_mesh", None)
    if mesh is None:
        return partial
    return _SumOverGroup.apply(partial, mesh.get_group())


def _chunk_ids(rank: int, world: int):
    return rank, 2 * world - 1 - rank


def padded_length(seqlen: int, world: int) -> int:
    """The sequence length rounded up to a multiple of 2·world (padding goes at the end, where
    causal attention keeps it from every real token)."""
    return -(-seqlen // (2 * world)) * (2 * world)


def shard_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1
                   ) -> torch.Tensor:
    """This rank's share of a full sequence: chunks r and 2W−1−r of 2W, after zero-padding
    `dim` to ``padded_length``. x (…, S, …) → (…, 2·S_pad/(2W), …)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    seqlen = x.shape[dim]
    pad = padded_length(seqlen, world) - seqlen
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    chunks = x.chunk(2 * world, dim=dim)
    first, second = _chunk_ids(rank, world)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def shard_positions(local_len: int, group: Optional[dist.ProcessGroup] = None, device=None
                    ) -> torch.Tensor:
    """(local_len,) global positions of this rank's tokens under ``shard_sequence`` (for RoPE)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = local_len // 2
    first, second = _chunk_ids(rank, world)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def unshard_sequence(x_local: torch.Tensor, seqlen: int, group: Optional[dist.ProcessGroup] = None,
                     dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence`` (all-gathers; for checks and losses, not autograd)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    chunks: List[Optional[torch.Tensor]] = [None] * (2 * world)
    for rank, part in enumerate(parts):
        first, second = _chunk_ids(rank, world)
        chunks[first], chunks[second] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim).narrow(dim, 0, seqlen)


def _merge(outs: List[torch.Tensor], lses: List[torch.Tensor]):
    """Combines attention over disjoint key sets: out (B, L, H, Dv), lse (B, L, H)."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(o.float() * torch.exp(l - lse).unsqueeze(-1) for o, l in zip(outs, lses))
    return out.to(outs[0].dtype), lse


class _ContextParallelMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv_latent, k_rope, wkv_b, softmax_scale, group, return_max_logits):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dim_latent = kv_latent.shape[-1]
        # One collective of (Dc + Dr) values per token.
        latents = torch.cat([kv_latent, k_rope], dim=-1).contiguous()
        gathered = latents.new_empty((world * latents.shape[0], *latents.shape[1:]))
        dist.all_gather_into_tensor(gathered, latents, group=group)
        gathered = gathered.view(world, *latents.shape)
        key_chunks = [None] * (2 * world)
        for r in range(world):
            first, second = _chunk_ids(r, world)
            key_chunks[first], key_chunks[second] = gathered[r].chunk(2, dim=1)

        # One core for every part, forward and backward (docs/design.md §10.1): chosen once here.
        core = torch.ops.torch_mla._resolve_core(q, kv_latent, k_rope, wkv_b, None, current_core())
        outs, lses, max_logits = [], [], []
        for g, q_chunk in zip(_chunk_ids(rank, world), q.chunk(2, dim=1)):
            parts = [torch.ops.torch_mla.mla_attention(
                q_chunk, key_chunks[j][..., :dim_latent], key_chunks[j][..., dim_latent:], wkv_b,
                softmax_scale, j == g, None, 0, core, return_max_logits) for j in range(g + 1)]
            out, lse = _merge([p[0] for p in parts], [p[1] for p in parts])
            outs.append(out)
            lses.append(lse)
            max_logits += [p[2] for p in parts]
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(q, gathered, wkv_b, out, torch.cat(lses, dim=1))
        ctx.softmax_scale, ctx.group, ctx.dim_latent, ctx.core = softmax_scale, group, dim_latent, core
        if return_max_logits:
            # Each rank sees the keys of its own query chunks: the maximum over the group is the
            # maximum over the whole sequence (docs/design.md §12).
            max_logits = torch.stack(max_logits).amax(0)
            dist.all_reduce(max_logits, op=dist.ReduceOp.MAX, group=group)
        else:
            max_logits = max_logits[0]  # the op's empty (0,) tensor
        ctx.mark_non_differentiable(max_logits)
        return out, max_logits

    @staticmethod
    def backward(ctx, grad_out, _grad_max_logits):
        q, gathered, wkv_b, out, lse = ctx.saved_tensors
        group, dim_latent = ctx.group, ctx.dim_latent
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad_gathered = torch.zeros_like(gathered, dtype=torch.float32)
        key_chunks, grad_chunks = [None] * (2 * world), [None] * (2 * world)
        for r in range(world):
            first, second = _chunk_ids(r, world)
            key_chunks[first], key_chunks[second] = gathered[r].chunk(2, dim=1)
            grad_chunks[first], grad_chunks[second] = grad_gathered[r].chunk(2, dim=1)

        grad_q_chunks, grad_wkv_b = [], torch.zeros_like(wkv_b, dtype=torch.float32)
        chunked = zip(_chunk_ids(rank, world), q.chunk(2, dim=1), grad_out.chunk(2, dim=1),
                      out.chunk(2, dim=1), lse.chunk(2, dim=1))
        for g, q_chunk, grad_out_chunk, out_chunk, lse_chunk in chunked:
            grad_q = torch.zeros_like(q_chunk, dtype=torch.float32)
            for j in range(g + 1):
                dq, dc, dkr, dw = torch.ops.torch_mla.mla_attention_backward(
                    grad_out_chunk.contiguous(), q_chunk, key_chunks[j][..., :dim_latent],
                    key_chunks[j][..., dim_latent:], wkv_b, out_chunk, lse_chunk,
                    ctx.softmax_scale, j == g, None, 0, ctx.core)
                grad_q += dq
                grad_chunks[j][..., :dim_latent] += dc
                grad_chunks[j][..., dim_latent:] += dkr
                grad_wkv_b += dw
            grad_q_chunks.append(grad_q)

        grad_latents = torch.empty_like(grad_gathered[0])
        dist.reduce_scatter_tensor(grad_latents, grad_gathered.flatten(0, 1), op=dist.ReduceOp.SUM,
                                   group=group)
        grad_latents = grad_latents.to(gathered.dtype)
        return (torch.cat(grad_q_chunks, dim=1).to(q.dtype), grad_latents[..., :dim_latent],
                grad_latents[..., dim_latent:], grad_wkv_b.to(wkv_b.dtype), None, None, None)


def context_parallel_mla_attention(q: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
                                   wkv_b: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                                   softmax_scale: Optional[float] = None, return_max_logits: bool = False):
    """Causal ``mla_attention`` over a sequence split across the ranks of `group`.

    Each argument holds this rank's share as laid out by ``shard_sequence`` (dim 1):
        q (B, 2L, H, Dn+Dr), kv_latent (B, 2L, Dc), k_rope (B, 2L, Dr), wkv_b (H*(Dn+Dv), Dc)
    where 2W·L is the padded sequence length. Returns this rank's out (B, 2L, H, Dv), and with
    ``return_max_logits`` also max_logits (H,): the maximum over all ranks (all-reduced), the
    same on every rank.
    """
    if q.dim() != 4 or q.shape[1] % 2:
        raise ValueError("context_parallel_mla_attention: q must have shape (B, 2L, H, Dn+Dr), the "
                         f"two chunks of shard_sequence; got {tuple(q.shape)}")
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q)
    out, max_logits = _ContextParallelMLA.apply(q, kv_latent, k_rope, wkv_b, float(softmax_scale), group,
                                                bool(return_max_logits))
    return (out, max_logits) if return_max_logits else out
