"""The functional API over the ``torch.ops.torch_mla`` operators: the attention op, its q-latent form
(docs/design.md §5.2: q expanded and rotated inside from its latent, the latent saved for backward),
the latent-only attention block (docs/design.md §13: norms, q's expansion, RoPE, attention and
o_proj in one op that saves only its inputs and the norms' statistics) and the RMSNorm op."""
from typing import Optional

import torch

from .cores import current_core


def default_softmax_scale(q: torch.Tensor) -> float:
    """``(Dn + Dr) ** -0.5``: q's last dimension is Dn + Dr."""
    return q.shape[-1] ** -0.5


def mla_attention(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """Multi-Head Latent Attention from the latents; saves only the latents for backward.

    K and V are expanded inside (``kv_latent @ wkv_b.T``, per head ``[k_nope | v]``), used, and
    freed; the backward recomputes them. ``k_rope`` is shared by all heads.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        q:          (B, S, H, Dn+Dr) | (T, H, Dn+Dr), per head ``[q_nope | q_rope]``
        kv_latent:  (B, S, Dc)       | (T, Dc)
        k_rope:     (B, S, Dr)       | (T, Dr)
        wkv_b:      (H*(Dn+Dv), Dc), Hugging Face's ``kv_b_proj.weight`` (rows interleaved per head)
        cu_seqlens: (B+1,) int32 sequence starts in the packed layout, 0 first and T last
        max_seqlen: a bound on every sequence's length, checked (0 or None: not given)
        returns out (B, S, H, Dv) | (T, H, Dv), and with ``return_lse`` also
        lse (B, S, H) | (T, H) in float32 (float64 for float64 inputs), and with
        ``return_max_logits`` also (last) max_logits (H,) in lse's dtype: per head the maximum of
        ``softmax_scale * q·k`` over the visible (query, key) pairs of the call, -inf for a head
        with none; not differentiable (docs/design.md §12, for QK-Clip)

    ``softmax_scale=None`` means ``(Dn+Dr) ** -0.5``; ``causal`` masks within each sequence. The
    attention core is chosen per call (:func:`torch_mla.use_core`, :func:`torch_mla.explain`).
    """
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q)
    out, lse, max_logits = torch.ops.torch_mla.mla_attention(
        q, kv_latent, k_rope, wkv_b, float(softmax_scale), bool(causal), cu_seqlens,
        0 if max_seqlen is None else max_seqlen, current_core(), bool(return_max_logits),
    )
    return _select_outputs(out, lse, max_logits, return_lse, return_max_logits)


def _head_softmax_scale(wq_b: torch.Tensor, num_heads: int) -> float:
    """``(Dn + Dr) ** -0.5`` from wq_b's H·(Dn+Dr) rows. Sizes the op rejects (num_heads < 1, fewer
    rows than heads) give 1.0, so that the op's own check, which names the argument, speaks."""
    head_dim = wq_b.shape[0] // num_heads if num_heads > 0 else 0
    return head_dim ** -0.5 if head_dim > 0 else 1.0


def _select_outputs(out, lse, max_logits, return_lse: bool, return_max_logits: bool):
    """out, then lse and max_logits as asked for: a tensor alone, else a tuple."""
    extra = ((lse,) if return_lse else ()) + ((max_logits,) if return_max_logits else ())
    return (out, *extra) if extra else out

def mla_attention_q_latent(
    q_latent: torch.Tensor,
    wq_b: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    *,
    num_heads: int,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    rope_interleave: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """:func:`torch_mla.mla_attention` on ``q = rope(q_latent @ wq_b.T)``, saving q_latent instead of q.

    q per head is ``[q_nope | q_rope]`` (wq_b is Hugging Face's ``q_b_proj.weight``, or
    ``q_proj.weight`` with the hidden states as q_latent); q_rope's pairs are rotated by cos/sin as
    :func:`torch_mla.nn.rope.apply_rope` does. k_rope is passed already rotated.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        q_latent:   (B, S, Lq)    | (T, Lq)
        wq_b:       (H*(Dn+Dr), Lq)
        cos, sin:   (B, S, Dr/2)  | (T, Dr/2), any float dtype (float32 recommended)
        kv_latent, k_rope, wkv_b, cu_seqlens, max_seqlen: as :func:`torch_mla.mla_attention`
        returns out (B, S, H, Dv) | (T, H, Dv), and with ``return_lse`` also lse, with
        ``return_max_logits`` also (last) max_logits (H,), as :func:`torch_mla.mla_attention`

    ``softmax_scale=None`` means ``(Dn+Dr) ** -0.5``.
    """
    if softmax_scale is None:
        softmax_scale = _head_softmax_scale(wq_b, num_heads)
    out, lse, max_logits = torch.ops.torch_mla.mla_attention_q_latent(
        q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, int(num_heads), float(softmax_scale),
        bool(causal), bool(rope_interleave), cu_seqlens, 0 if max_seqlen is None else max_seqlen,
        current_core(), bool(return_max_logits),
    )
    return _select_outputs(out, lse, max_logits, return_lse, return_max_logits)


def mla_attention_block(
    q_a: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor],
    wq_b: torch.Tensor,
    kv_a: torch.Tensor,
    kv_norm_weight: torch.Tensor,
    wkv_b: torch.Tensor,
    wo: torch.Tensor,
    bo: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    softmax_scale: Optional[float] = None,
    q_norm_eps: float = 1e-6,
    kv_norm_eps: float = 1e-6,
    causal: bool = True,
    rope_interleave: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    head_chunks: Optional[int] = None,
) -> torch.Tensor:
    """The attention block from q_a_proj's and kv_a_proj_with_mqa's outputs to o_proj's:
    ``o_proj(mla_attention(rope(rms_norm(q_a) @ wq_b.T), rms_norm(kv_a[..., :Dc]), rope(kv_a[..., Dc:])))``.

    Saved for backward: q_a, kv_a, cos, sin, the weights and the norms' per-row rstd (float32) —
    not q, its latent, the normalised kv latent, k_rope, out or lse.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        q_a:            (B, S, Lq)     | (T, Lq)  q_a_proj's output (the hidden states, and
                        q_norm_weight None, without a q latent)
        q_norm_weight:  (Lq,) or None  q_a_layernorm.weight
        wq_b:           (H*(Dn+Dr), Lq) q_b_proj.weight (or q_proj.weight)
        kv_a:           (B, S, Dc+Dr)  | (T, Dc+Dr)  kv_a_proj_with_mqa's output, k_rope not rotated
        kv_norm_weight: (Dc,)          kv_a_layernorm.weight
        wkv_b:          (H*(Dn+Dv), Dc) kv_b_proj.weight
        wo, bo:         (hidden, H*Dv), (hidden,) or None  o_proj's weight and bias
        cos, sin:       (B, S, Dr/2)   | (T, Dr/2)
        returns         (B, S, hidden) | (T, hidden)

    ``softmax_scale=None`` means ``(Dn+Dr) ** -0.5``. ``head_chunks``: the heads run in this many
    groups of ``ceil(H / head_chunks)``, forward and backward, so that only one group's q, out
    and attention transients exist at a time (docs/design.md §13.6); None: the op's default, 4.
    """
    if softmax_scale is None:
        softmax_scale = _head_softmax_scale(wq_b, num_heads)
    chunks = {} if head_chunks is None else dict(head_chunks=int(head_chunks))
    return torch.ops.torch_mla.mla_attention_block(
        q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, int(num_heads),
        float(softmax_scale), float(q_norm_eps), float(kv_norm_eps), bool(causal), bool(rope_interleave),
        cu_seqlens, 0 if max_seqlen is None else max_seqlen, current_core(), **chunks)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's DeepSeek RMSNorm, ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``
    (float64 statistics for float64 x); saves only x and the per-row rstd for backward."""
    return torch.ops.torch_mla.rms_norm(x, weight, float(eps))


def dsa_indexer_topk(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """The DSA lightning indexer's top k keys per query (docs/design.md §17), streamed over query
    blocks: ``I(t, s) = Σ_j weights[t, j] · ReLU(index_q[t, j] · index_k[s])`` over the keys s ≤ t of
    t's own sequence; never materialises (S × S) scores. Not differentiable.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        index_q:    (B, S, H_I, D_I) | (T, H_I, D_I)
        index_k:    (B, S, D_I)      | (T, D_I), shared by the indexer heads
        weights:    (B, S, H_I)      | (T, H_I), the per-head weights (any scale folded in)
        cu_seqlens: (B+1,) int32, as :func:`torch_mla.mla_attention`; max_seqlen likewise
        returns indices (B, S, topk) | (T, topk) int32: positions within the query's own sequence,
        score descending then position ascending, -1 after the visible keys when fewer than topk;
        and scores of the same shape, float32 (float64 for float64 inputs), -inf where -1
    """
    return torch.ops.torch_mla.dsa_indexer_topk(index_q, index_k, weights, int(topk), cu_seqlens,
                                                0 if max_seqlen is None else max_seqlen)


def mla_sparse_attention(
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    topk_indices: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
):
    """DeepSeek Sparse Attention's attention (docs/design.md §16): :func:`mla_attention` (causal) with
    each query t attending only to its selected keys S_t; saves q, the latents, wkv_b, topk_indices,
    out and lse for backward (never the absorbed q or the latent output).

    Shapes (padded batch | packed, when ``cu_seqlens`` is given): q, kv_latent, k_rope, wkv_b,
    cu_seqlens, max_seqlen and the results as :func:`mla_attention`, and
        topk_indices: (B, S, k) | (T, k) int32, positions within the query's own sequence; -1 means
                      none, entries past the query are ignored (causal), order does not matter; an
                      entry outside the sequence or a repeated one is a ValueError naming the row
                      (CPU tensors; on CUDA a device-side assert, §16.3)
    A query with no selected key gets out 0, lse -inf and zero gradients. ``return_max_logits``: the
    per-head maximum of ``softmax_scale * q·k`` over the selected pairs (QK-Clip, §12).
    """
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q)
    out, lse, max_logits = torch.ops.torch_mla.mla_sparse_attention(
        q, kv_latent, k_rope, wkv_b, topk_indices, float(softmax_scale), cu_seqlens,
        0 if max_seqlen is None else max_seqlen, current_core(), bool(return_max_logits),
    )
    return _select_outputs(out, lse, max_logits, return_lse, return_max_logits)


def dsa_indexer_loss(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    weights: torch.Tensor,
    q: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    topk_indices: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """The DSA indexer's loss per query (docs/design.md §18): ``kl[t] = KL(p_t ‖ softmax(I(t, ·)))``
    over t's key set V_t, where the teacher ``p_t`` is the main attention's probabilities
    ``exp(softmax_scale · q_h·k_h(s) − lse_h(t))`` summed over heads and L1-normalised over V_t, and
    ``I(t, s) = Σ_j weights[t, j] · ReLU(index_q[t, j] · index_k[s])`` as in :func:`dsa_indexer_topk`.
    Dense mode (``topk_indices`` None, the warm-up): V_t = every key s ≤ t of t's sequence. Sparse
    mode: V_t = t's selected keys (entries ≥ 0 and ≤ t). A query with an empty V_t gives 0. The caller
    reduces and scales (sum, mean, loss coefficient).

    Gradients reach index_q, index_k and weights only: the teacher's tensors q, kv_latent, k_rope,
    wkv_b and lse are treated as detached (they get no gradient, whatever their requires_grad).
    Streamed over query chunks: never an (S × S) tensor; the backward recomputes per chunk and only
    the inputs are saved. A packed call reads cu_seqlens on the host once per call.

    Shapes (padded batch | packed, when ``cu_seqlens`` is given):
        index_q:      (B, S, H_I, D_I) | (T, H_I, D_I)
        index_k:      (B, S, D_I)      | (T, D_I)
        weights:      (B, S, H_I)      | (T, H_I), any scale folded in
        q, kv_latent, k_rope, wkv_b, cu_seqlens, max_seqlen: as :func:`mla_attention`
        lse:          (B, S, H) | (T, H) float32 (float64 for float64 q): the lse that
                      :func:`mla_attention` (dense mode) or :func:`mla_sparse_attention` (sparse
                      mode) returned for these inputs with ``return_lse=True``
        topk_indices: (B, S, k) | (T, k) int32, as :func:`mla_sparse_attention` takes it
        softmax_scale: as the attention took it (None: ``(Dn+Dr) ** -0.5``)
        returns kl (B, S) | (T,) in lse's dtype (computed in it: float32, float64 for float64)
    """
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(q)
    return torch.ops.torch_mla.dsa_indexer_loss(
        index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, float(softmax_scale), topk_indices,
        cu_seqlens, 0 if max_seqlen is None else max_seqlen)
