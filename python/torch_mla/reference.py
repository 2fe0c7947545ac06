"""The specification of mla_attention in plain PyTorch (docs/design.md §4): expands K and V per head,
builds the full score matrix and softmax. Slow and memory-hungry by design; every kernel is
tested against it, in float64 where the test needs exact figures.
"""
from typing import Optional, Tuple

import torch


def expand_kv(kv_latent: torch.Tensor, wkv_b: torch.Tensor, num_heads: int, dim_nope: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(…, Dc) latents → k_nope (…, H, Dn) and v (…, H, Dv), wkv_b's rows interleaved per head."""
    kv = (kv_latent @ wkv_b.t()).unflatten(-1, (num_heads, -1))
    return kv[..., :dim_nope], kv[..., dim_nope:]


def _attention_padded(q, kv_latent, k_rope, wkv_b, softmax_scale, causal):
    """q (B, S, H, Dn+Dr) → out (B, S, H, Dv), lse (B, S, H), max_logits (H,)."""
    num_heads, dim_rope = q.shape[-2], k_rope.shape[-1]
    dim_nope = q.shape[-1] - dim_rope
    k_nope, v = expand_kv(kv_latent, wkv_b, num_heads, dim_nope)
    k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], dim_rope)], dim=-1)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale
    if causal:
        seqlen = q.shape[1]
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    # The maximum logit (docs/design.md §12): masked pairs are -inf, so they never win.
    max_logits = scores.transpose(0, 1).flatten(1).amax(1) if scores.numel() else \
        scores.new_full((scores.shape[1],), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhst,bthd->bshd", probs, v)
    return out, lse.transpose(1, 2), max_logits


def mla_attention_reference(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """Same arguments, shapes and results as :func:`torch_mla.mla_attention`; max_logits in
    the scores' dtype (q's)."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if cu_seqlens is None:
        out, lse, max_logits = _attention_padded(q, kv_latent, k_rope, wkv_b, softmax_scale, causal)
    else:
        bounds = cu_seqlens.tolist()
        outs, lses = [], []
        max_logits = q.new_full((q.shape[-2],), float("-inf"))
        for start, end in zip(bounds[:-1], bounds[1:]):
            o, l, m = _attention_padded(q[None, start:end], kv_latent[None, start:end],
                                        k_rope[None, start:end], wkv_b, softmax_scale, causal)
            outs.append(o[0])
            lses.append(l[0])
            max_logits = torch.maximum(max_logits, m)
        dim_v = wkv_b.shape[0] // q.shape[-2] - (q.shape[-1] - k_rope.shape[-1])
        out = torch.cat(outs) if outs else q.new_empty(0, q.shape[-2], dim_v)
        lse = torch.cat(lses) if lses else q.new_empty(0, q.shape[-2], dtype=torch.float32)
    extra = ((lse,) if return_lse else ()) + ((max_logits,) if return_max_logits else ())
    return (out, *extra) if extra else out


# The DSA indexer top-k (docs/design.md §17).

def _indexer_topk_one(index_q, index_k, weights, topk):
    """One sequence: index_q (L, H_I, D_I), index_k (L, D_I), weights (L, H_I) → indices (L, topk)
    int32 and scores (L, topk) in the inputs' dtype, the full (L, H_I, L) scores at once."""
    seqlen = index_q.shape[0]
    scores = torch.einsum("th,ths->ts", weights, torch.relu(torch.einsum("thd,sd->ths", index_q, index_k)))
    later = torch.ones(seqlen, seqlen, dtype=torch.bool, device=index_q.device).triu(1)
    scores = scores.masked_fill(later, float("-inf"))
    indices = torch.full((seqlen, topk), -1, dtype=torch.int32, device=index_q.device)
    top = torch.full((seqlen, topk), float("-inf"), dtype=scores.dtype, device=index_q.device)
    for t in range(seqlen):
        # The tie rule: score descending, then position ascending.
        order = sorted(range(t + 1), key=lambda s: (-scores[t, s].item(), s))[:topk]
        indices[t, :len(order)] = torch.tensor(order, dtype=torch.int32)
        top[t, :len(order)] = scores[t, order]
    return indices, top


def dsa_indexer_topk_reference(index_q, index_k, weights, topk, *, cu_seqlens=None):
    """Same arguments, shapes and results as :func:`torch_mla.dsa_indexer_topk`; scores in the
    inputs' dtype (pass float64 for exact figures). Materialises each sequence's (L, H_I, L) scores."""
    if cu_seqlens is None:
        pairs = [_indexer_topk_one(index_q[b], index_k[b], weights[b], topk) for b in range(index_q.shape[0])]
        shape = (*index_q.shape[:2], topk)
    else:
        bounds = cu_seqlens.tolist()
        pairs = [_indexer_topk_one(index_q[s:e], index_k[s:e], weights[s:e], topk)
                 for s, e in zip(bounds[:-1], bounds[1:])]
        shape = (index_q.shape[0], topk)
    indices = torch.cat([p[0] for p in pairs]).reshape(shape) if pairs else \
        torch.empty(shape, dtype=torch.int32, device=index_q.device)
    scores = torch.cat([p[1] for p in pairs]).reshape(shape) if pairs else index_q.new_empty(shape)
    return indices, scores


# ---- mla_sparse_attention (docs/design.md §16) ----------------------------------------------------


def _sparse_mask(topk_indices: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(…, S, k) int positions → (…, S, S) bool: query t sees key s iff s is one of its entries and
    s ≤ t. −1 entries and entries past t select nothing."""
    positions = torch.arange(seqlen, device=topk_indices.device)
    idx = topk_indices.long()
    valid = (idx >= 0) & (idx <= positions.unsqueeze(-1))
    mask = torch.zeros(*idx.shape[:-1], seqlen + 1, dtype=torch.bool, device=idx.device)
    # Invalid entries land in the spare last column, which is dropped.
    mask.scatter_(-1, torch.where(valid, idx, seqlen), True)
    return mask[..., :seqlen]


def _sparse_attention_padded(q, kv_latent, k_rope, wkv_b, topk_indices, softmax_scale):
    """mla_attention's MHA form with every score outside S_t masked: q (B, S, H, Dn+Dr),
    topk_indices (B, S, k) → out (B, S, H, Dv), lse (B, S, H), max_logits (H,)."""
    num_heads, dim_rope = q.shape[-2], k_rope.shape[-1]
    dim_nope = q.shape[-1] - dim_rope
    k_nope, v = expand_kv(kv_latent, wkv_b, num_heads, dim_nope)
    k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], dim_rope)], dim=-1)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale
    mask = _sparse_mask(topk_indices, q.shape[1]).unsqueeze(1)  # (B, 1, S, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    max_logits = scores.transpose(0, 1).flatten(1).amax(1) if scores.numel() else \
        scores.new_full((scores.shape[1],), float("-inf"))
    # A row with no selected key: out 0 and zero gradients (a softmax of all −inf would be NaN in
    # both directions, so such rows take a finite dummy row whose probabilities are then zeroed).
    selects = mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~selects, 0.0), dim=-1).masked_fill(~mask, 0.0)
    out = torch.einsum("bhst,bthd->bshd", probs, v)
    return out, lse.transpose(1, 2), max_logits


def mla_sparse_attention_reference(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    topk_indices: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """The specification of :func:`torch_mla.mla_sparse_attention`: mla_attention's reference (the
    MHA form, K and V expanded per head) with each query t's scores restricted to its selected set
    S_t = {entries of topk_indices[t] that are ≥ 0 and ≤ t}; positions are within the query's own
    sequence. Same arguments, shapes and results as the op; the entries are assumed valid (the op
    checks them)."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if cu_seqlens is None:
        out, lse, max_logits = _sparse_attention_padded(q, kv_latent, k_rope, wkv_b, topk_indices, softmax_scale)
    else:
        bounds = cu_seqlens.tolist()
        outs, lses = [], []
        max_logits = q.new_full((q.shape[-2],), float("-inf"))
        for start, end in zip(bounds[:-1], bounds[1:]):
            o, l, m = _sparse_attention_padded(q[None, start:end], kv_latent[None, start:end],
                                               k_rope[None, start:end], wkv_b,
                                               topk_indices[None, start:end], softmax_scale)
            outs.append(o[0])
            lses.append(l[0])
            max_logits = torch.maximum(max_logits, m)
        dim_v = wkv_b.shape[0] // q.shape[-2] - (q.shape[-1] - k_rope.shape[-1])
        out = torch.cat(outs) if outs else q.new_empty(0, q.shape[-2], dim_v)
        lse = torch.cat(lses) if lses else q.new_empty(0, q.shape[-2], dtype=torch.float32)
    extra = ((lse,) if return_lse else ()) + ((max_logits,) if return_max_logits else ())
    return (out, *extra) if extra else out


# ---- dsa_indexer_loss (docs/design.md §18) --------------------------------------------------------


def _indexer_loss_padded(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, topk_indices,
                         softmax_scale):
    """Padded (B, S, ...) tensors → kl (B, S): the teacher in the MHA form with its (B, H, S, S)
    probabilities, the student a log_softmax over full (B, S, S) rows with the keys outside V_t
    masked."""
    seqlen = q.shape[1]
    if topk_indices is None:
        visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril().expand(q.shape[0], -1, -1)
    else:
        visible = _sparse_mask(topk_indices, seqlen)  # (B, S, S)
    with torch.no_grad():  # the teacher is detached
        num_heads, dim_rope = q.shape[-2], k_rope.shape[-1]
        k_nope, _ = expand_kv(kv_latent, wkv_b, num_heads, q.shape[-1] - dim_rope)
        k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], dim_rope)], dim=-1)
        scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale
        # A head with lse -inf (no selected key) has no probability anywhere.
        head_lse = lse.transpose(1, 2).unsqueeze(-1).to(scores.dtype)
        probs = torch.exp(scores - head_lse.masked_fill(head_lse == float("-inf"), float("inf")))
        mass = probs.masked_fill(~visible.unsqueeze(1), 0).sum(1)  # (B, S, S)
        total = mass.sum(-1, keepdim=True)
        p = mass / torch.where(total > 0, total, torch.ones_like(total))
    index_scores = torch.einsum("bshd,btd->bsht", index_q, index_k).relu()
    index_scores = (index_scores * weights.unsqueeze(-1)).sum(2).to(p.dtype)  # (B, S, S)
    # Rows with an empty V_t get finite scores (their p is 0, so they add nothing).
    empty = ~visible.any(-1, keepdim=True)
    log_q = torch.log_softmax(index_scores.masked_fill(~visible & ~empty, float("-inf")), dim=-1)
    terms = torch.where(p > 0, p * (p.log() - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def dsa_indexer_loss_reference(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, *,
                               softmax_scale=None, topk_indices=None, cu_seqlens=None):
    """The specification of :func:`torch_mla.dsa_indexer_loss`: same arguments, shapes and result
    (in lse's dtype; pass float64 inputs for exact figures). Materialises each sequence's (H, S, S)
    teacher probabilities (K expanded per head, as mla_attention's reference) and (S, S) indexer
    scores; differentiable in index_q, index_k and weights only (the teacher runs under no_grad)."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    args = (index_q, index_k, weights, q, kv_latent, k_rope)
    if cu_seqlens is None:
        return _indexer_loss_padded(*args, wkv_b, lse, topk_indices, softmax_scale).to(lse.dtype)
    bounds = cu_seqlens.tolist()
    rows = [_indexer_loss_padded(*(x[None, start:end] for x in args), wkv_b, lse[None, start:end],
                                 None if topk_indices is None else topk_indices[None, start:end], softmax_scale)[0]
            for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(rows).to(lse.dtype) if rows else lse.new_zeros(0)
