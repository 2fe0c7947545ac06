"""DeepSeek Sparse Attention in MultiHeadLatentAttention (docs/design.md §19): the indexer and the
attention load DeepseekV32Attention / GlmMoeDsaAttention state dicts with strict=True and compute
what HF's eager attention computes (output and every parameter grad, indexer frozen on both sides,
fp32 ≤ 1e-5 relative), through the ops (counted); the modes, the topk_indices override (replay,
IndexShare), the recorded selection, packed sequences, and the refusals."""
import pytest
import torch

import torch_mla
from torch_mla.nn import MultiHeadLatentAttention
from torch_mla.nn.indexer import DsaIndexer
from support import HAVE_TRANSFORMERS, OpCounter, max_rel_err

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")

TOL = 1e-5
HIDDEN, SEQLEN, TOPK = 64, 24, 6
# Tiny DSA configs: 16 indexer heads, so that a key's score is an exact zero (every head's ReLU
# zero: a tie) rarely; sequences (24) far longer than index_topk (6): the selection is sparse.
DSA_COMMON = dict(vocab_size=96, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                  num_experts_per_tok=2, index_n_heads=16, index_head_dim=16, index_topk=TOPK, pad_token_id=0,
                  use_cache=False, initializer_range=HIDDEN ** -0.5, max_position_embeddings=256)
FAMILIES = {  # config class, its modeling module, attention class, rotary class
    "v32": ("DeepseekV32Config", "deepseek_v32", "DeepseekV32Attention", "DeepseekV32RotaryEmbedding"),
    "glm": ("GlmMoeDsaConfig", "glm_moe_dsa", "GlmMoeDsaAttention", "GlmMoeDsaRotaryEmbedding"),
}


def dsa_config(family):
    import transformers
    name = FAMILIES[family][0]
    extra = dict(indexer_types=["full", "shared"]) if family == "glm" else {}
    config = getattr(transformers, name)(**DSA_COMMON, **extra)
    config._attn_implementation = "eager"
    return config


def modeling(family):
    import importlib
    return importlib.import_module(f"transformers.models.{FAMILIES[family][1]}.modeling_{FAMILIES[family][1]}")


def hf_attention(family, layer_idx=0, seed=0):
    torch.manual_seed(seed)
    return getattr(modeling(family), FAMILIES[family][2])(dsa_config(family), layer_idx)


def ours_from(hf, **overrides):
    ours = MultiHeadLatentAttention.from_config(hf.config, layer_idx=hf.layer_idx, **overrides)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


def hidden(batch=2, seqlen=SEQLEN, seed=1):
    return torch.randn(batch, seqlen, HIDDEN, generator=torch.Generator().manual_seed(seed))


def run_hf(hf, x, prev_topk_indices=None):
    """HF's eager attention on whole causal rows: its outputs (out, attention probabilities (B, H, S, S)
    and, for GLM, the selection passed on)."""
    batch, seqlen = x.shape[:2]
    position_ids = torch.arange(seqlen)[None].expand(batch, -1)
    family = _family(hf)
    cos_sin = getattr(modeling(family), FAMILIES[family][3])(hf.config)(x, position_ids)
    mask = torch.full((seqlen, seqlen), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None].expand(batch, 1, -1, -1)
    extra = {} if prev_topk_indices is None else dict(prev_topk_indices=prev_topk_indices)
    return hf(x, cos_sin, mask, position_ids=position_ids, **extra)


def _family(hf):
    return "glm" if hf.config.model_type == "glm_moe_dsa" else "v32"


def out_and_grads(module, x, call=None, **kwargs):
    """output and the grads of x and of every parameter of module, for a fixed nonlinear loss;
    call(x) (default module(x, **kwargs)) gives the output."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = module(x, **kwargs) if call is None else call(x)
    out.double().sin().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_same(ours, theirs, what):
    (out, x_grad, grads), (ref, ref_x_grad, ref_grads) = ours, theirs
    assert max_rel_err(out.double(), ref.double()) <= TOL, f"{what}: out"
    assert max_rel_err(x_grad.double(), ref_x_grad.double()) <= TOL, f"{what}: hidden_states.grad"
    assert grads.keys() == ref_grads.keys(), f"{what}: {sorted(grads)} vs {sorted(ref_grads)}"
    for name in ref_grads:
        assert max_rel_err(grads[name].double(), ref_grads[name].double()) <= TOL, f"{what}: {name}.grad"


def hf_selection(hf, x):
    """HF's own indexer selection (B, S, k) of a call, captured from its indexer."""
    captured = []
    handle = hf.indexer.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        run_hf(hf, x)
    finally:
        handle.remove()
    return captured[0]


def as_sets(indices, seqlen):
    """Each row's selected visible positions, sorted (-1 and positions past the query dropped)."""
    rows = indices.reshape(-1, seqlen, indices.shape[-1])
    return [[sorted(p for p in rows[b, t].tolist() if 0 <= p <= t) for t in range(seqlen)]
            for b in range(rows.shape[0])]


# ---- loading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layer_idx", [("v32", 0), ("glm", 0), ("glm", 1)])
def test_state_dict_loads_strict(family, layer_idx):
    """The HF attention's state dict loads with strict=True, both ways; GLM's "shared" layer has no
    indexer, as HF's; the indexer's RoPE layout is the family's."""
    hf = hf_attention(family, layer_idx)
    ours = MultiHeadLatentAttention.from_config(hf.config, layer_idx=layer_idx)
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert (ours.indexer is None) == (hf.indexer is None) == (family == "glm" and layer_idx == 1)
    assert ours.dsa_mode == "sparse" and not ours.train_indexer and ours.index_topk == TOPK
    if ours.indexer is not None:
        assert isinstance(ours.indexer, DsaIndexer)
        assert ours.indexer.rope_layout == ("interleaved" if family == "glm" else "half_split")
        assert ours.indexer.k_norm.eps == hf.indexer.k_norm.eps == 1e-6


def test_from_config_needs_layer_idx_with_shared_layers():
    with pytest.raises(ValueError, match="IndexShare.*layer_idx"):
        MultiHeadLatentAttention.from_config(dsa_config("glm"))
    assert MultiHeadLatentAttention.from_config(dsa_config("v32")).indexer is not None


# ---- sparse attention against HF -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["v32", "glm"])
def test_sparse_matches_hf_eager(family):
    """Output, hidden_states.grad and every parameter grad as HF's eager attention (its index mask
    over a dense softmax), indexer frozen on both sides (no grads for it); the indexer and the
    sparse op ran, once each, and the selection kept on the module is HF's."""
    hf = hf_attention(family)
    ours = ours_from(hf)
    x = hidden()
    theirs = out_and_grads(hf, x, lambda h: run_hf(hf, h)[0])
    with OpCounter() as forward:
        ours.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        out = ours(xs)
    assert forward.counts["dsa_indexer_topk"] == 1 and forward.counts["mla_sparse_attention"] == 1
    assert forward.attention_calls() == 0  # no dense attention op
    with OpCounter() as backward:
        out.double().sin().sum().backward()
    assert backward.counts["mla_sparse_attention_backward"] == 1
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert not any(n.startswith("indexer.") for n in grads)
    assert_same((out.detach(), xs.grad, grads), theirs, family)
    assert ours.topk_indices.shape == (2, SEQLEN, TOPK) and ours.topk_indices.dtype == torch.int32
    assert as_sets(ours.topk_indices, SEQLEN) == as_sets(hf_selection(hf, x), SEQLEN)
    assert ours.indexer_loss is None  # frozen: no loss recorded


def test_selection_is_sparse_and_causal():
    """Rows past index_topk keep exactly k distinct visible keys; earlier rows all their prefix."""
    ours = ours_from(hf_attention("v32"))
    with torch.no_grad():
        ours(hidden())
    for b in range(2):
        for t in range(SEQLEN):
            row = [p for p in ours.topk_indices[b, t].tolist() if p >= 0]
            assert len(set(row)) == len(row) == min(t + 1, TOPK) and max(row) <= t


# ---- override, IndexShare, packed ------------------------------------------------------------------

def random_selection(batch, seqlen, k, seed=3):
    """(B, S, k) int32: distinct random earlier positions per row, -1 beyond the prefix."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((batch, seqlen, k), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(seqlen):
            picked = torch.randperm(t + 1, generator=g)[:k]
            rows[b, t, :picked.numel()] = picked.to(torch.int32)
    return rows


@pytest.mark.parametrize("family", ["v32", "glm"])
def test_override_replays_a_selection(family):
    """topk_indices= replaces the indexer (which does not run): equal to HF's attention with that
    selection injected in place of its indexer's; kept as self.topk_indices."""
    hf = hf_attention(family)
    ours = ours_from(hf)
    x = hidden()
    given = random_selection(2, SEQLEN, TOPK)
    hf.indexer.forward = lambda *args, **kwargs: given.clamp(min=0)  # HF takes no -1; 0 is in every prefix
    with OpCounter() as forward:
        mine = out_and_grads(ours, x, topk_indices=given)
    assert forward.counts["dsa_indexer_topk"] == 0 and forward.counts["mla_sparse_attention"] == 1
    assert ours.topk_indices is given
    # Rows with fewer than k keys: -1 pads ours; HF's clamp(0) repeats key 0, which it selects anyway.
    assert_same(mine, out_and_grads(hf, x, lambda h: run_hf(hf, h)[0]), f"{family} override")


def test_index_share_layer_uses_the_full_layers_selection():
    """GLM IndexShare: the "shared" layer has no indexer and raises without a selection; given the
    "full" layer's (its self.topk_indices) it computes what HF's shared layer computes with
    prev_topk_indices."""
    full_hf, shared_hf = hf_attention("glm", 0), hf_attention("glm", 1, seed=5)
    full, shared = ours_from(full_hf), ours_from(shared_hf)
    x, x2 = hidden(), hidden(seed=2)
    with torch.no_grad():
        full(x)
    with pytest.raises(ValueError, match="no indexer.*pass topk_indices"):
        shared(x2)
    prev = full.topk_indices
    with OpCounter() as forward:
        mine = out_and_grads(shared, x2, topk_indices=prev)
    assert forward.counts["dsa_indexer_topk"] == 0 and shared.topk_indices is prev
    # HF scatters every entry: -1 (rows with fewer than k keys) as 0, which those rows select anyway.
    theirs = out_and_grads(shared_hf, x2, lambda h: run_hf(shared_hf, h, prev_topk_indices=prev.clamp(min=0))[0])
    assert_same(mine, theirs, "shared layer")


def test_packed_equals_rows():
    """Packed sequences (cu_seqlens) give each sequence's own padded-call result, the selection in
    positions within each sequence."""
    ours = ours_from(hf_attention("v32"))
    lengths = [SEQLEN, 9, 1, 17]
    xs = [hidden(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(xs, 1)[0], cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
        packed_topk = ours.topk_indices
        for i, x in enumerate(xs):
            row = ours(x)[0]
            lo, hi = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            assert max_rel_err(packed[lo:hi].double(), row.double()) <= TOL
            k = min(TOPK, max(lengths))
            assert torch.equal(packed_topk[lo:hi, :ours.topk_indices.shape[-1]], ours.topk_indices[0][:, :k])


# ---- modes and settings ----------------------------------------------------------------------------

def test_off_mode_is_dense_attention():
    """dsa_mode "off": dense causal attention (mla_attention), the indexer not run; equal to the
    same weights without DSA."""
    hf = hf_attention("v32")
    ours = ours_from(hf, dsa_mode="off")
    dense = MultiHeadLatentAttention.from_config(hf.config, index_topk=None)
    dense.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith("indexer.")}, strict=True)
    x = hidden()
    with OpCounter() as forward:
        mine = out_and_grads(ours, x)
    assert forward.counts["dsa_indexer_topk"] == 0 and forward.attention_calls() == 1
    assert ours.topk_indices is None and ours.indexer_loss is None
    assert_same(mine, out_and_grads(dense, x), "off")


def test_q_latent_runs_as_q_and_latent_runs_the_dsa_block():
    hf = hf_attention("v32")
    x = hidden()
    reference = out_and_grads(ours_from(hf, save="q"), x)
    assert_same(out_and_grads(ours_from(hf, save="q_latent"), x), reference, "q_latent as q")
    # save="latent" with a frozen indexer: the block op with the selection (docs/design.md §13.7).
    latent = ours_from(hf, save="latent")
    with OpCounter() as forward:
        mine = out_and_grads(latent, x)
    assert forward.counts["dsa_indexer_topk"] == 1 and forward.counts["_mla_attention_block_with_rstd"] == 1
    assert forward.counts["mla_sparse_attention"] >= 1 and forward.counts["mla_attention"] == 0
    assert_same(mine, reference, "latent")
    with pytest.raises(ValueError, match="save='latent' does not serve the indexer loss"):
        ours_from(hf, save="latent", train_indexer=True)(x)
    with pytest.raises(ValueError, match="save='latent' does not serve the indexer loss"):
        ours_from(hf, save="latent", dsa_mode="dense_warmup")(x)
    ours_from(hf, save="latent", dsa_mode="off")(x)  # dense: the latent-only block serves it


def test_bad_settings_are_refused():
    hf = hf_attention("v32")
    with pytest.raises(ValueError, match="dsa_mode must be one of"):
        ours_from(hf, dsa_mode="dense")
    ours = ours_from(hf, dsa_mode="off")
    with pytest.raises(ValueError, match="topk_indices .* needs dsa_mode='sparse'"):
        ours(hidden(), topk_indices=random_selection(2, SEQLEN, TOPK))
    dense = MultiHeadLatentAttention.from_config(hf.config, index_topk=None)
    with pytest.raises(ValueError, match="topk_indices needs DeepSeek Sparse Attention"):
        dense(hidden(), topk_indices=random_selection(2, SEQLEN, TOPK))
    with pytest.raises(ValueError, match="dsa_mode='sparse' needs DeepSeek Sparse Attention"):
        MultiHeadLatentAttention.from_config(hf.config, index_topk=None, dsa_mode="sparse")
    with pytest.raises(ValueError, match="indexer needs q_lora_rank"):
        MultiHeadLatentAttention.from_config(hf.config, q_lora_rank=None)


def test_compiled_fullgraph_equals_eager():
    """torch.compile(fullgraph=True, dynamic=True) traces the DSA module whole (indexer top-k,
    sparse op, indexer loss: no graph break) and computes what eager does through inductor."""
    from torch._inductor.compile_fx import compile_fx

    traced = []

    def backend(graph, example_inputs):  # records the graph's ops, then compiles it as default
        traced.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return compile_fx(graph, example_inputs)

    hf = hf_attention("v32")
    x = hidden()
    module = ours_from(hf)
    eager = out_and_grads(module, x)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=backend)
    assert_same(out_and_grads(module, x, call=compiled), eager, "compiled sparse")
    assert any("dsa_indexer_topk" in t for t in traced) and any("mla_sparse_attention" in t for t in traced)
    warmup = ours_from(hf, dsa_mode="dense_warmup", train_indexer=True)
    warmup(x)
    expected = warmup.indexer_loss
    traced.clear()
    torch.compile(warmup, fullgraph=True, dynamic=True, backend=backend)(x)
    assert any("dsa_indexer_loss" in t for t in traced)
    assert max_rel_err(warmup.indexer_loss.detach().double(), expected.detach().double()) <= TOL
