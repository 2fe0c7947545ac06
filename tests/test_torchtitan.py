"""torchtitan's DeepSeek-V3 on torch_mla (docs/design.md §14): the converted model against the stock
one (logits, every parameter's grad, 20 training steps, saved bytes), packed documents against
the stock model run per document, selective AC's call count, and tensor parallelism on 2 gloo
ranks with torchtitan's own plan. Skips when torchtitan is not installed."""
import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchtitan", reason="torchtitan is not installed (requirements-torchtitan.txt)")

from torchtitan.distributed.activation_checkpoint import SelectiveAC  # noqa: E402
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm  # noqa: E402
from torchtitan.models.common.attention import (  # noqa: E402
    ScaledDotProductAttention, VarlenAttention)
from torchtitan.models.deepseek_v3 import DeepSeekV3Model, _build_dsv3_layers  # noqa: E402
from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config  # noqa: E402

import torch_mla  # noqa: E402
from torch_mla.integrations.torchtitan import (  # noqa: E402
    TorchMLAAttention, TorchMLAConverter, TorchMLASelectiveAC)
from models import periodic_sequences  # noqa: E402
from support import FP32, OpCounter, labelled, run_ranks  # noqa: E402

VOCAB, BATCH, SEQLEN = 128, 2, 12
Q_LORA_RANKS = [0, 24]  # wq, or wq_a → q_norm → wq_b (the q-latent op)
DOCS = [[(0, 5), (5, 12)], [(0, 3), (3, 4), (4, 12)]]  # (start, end) per row; a 1-token document


def model_config(q_lora_rank: int, *, sdpa=True, dim=64, n_heads=4, kv_lora_rank=32, nope=16, rope=8,
                 v=16):
    """A tiny DeepSeek-V3 (one dense layer, one MoE layer, YaRN RoPE with mscale); its inner
    attention is torchtitan's default, FlexAttention, or with sdpa SDPA (causal over each row),
    which runs eagerly on the CPU (the stock model of these tests)."""
    layers = _build_dsv3_layers(
        n_layers=2, n_dense_layers=1, dim=dim, n_heads=n_heads, q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        mscale=0.7, dense_hidden_dim=96, moe_hidden_dim=32, num_experts=4, num_shared_experts=1,
        router_top_k=2, router_score_func="softmax", attn_backend="flex", moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=rope, max_seq_len=64, theta=10000.0, scaling="yarn",
                                rope_factor=40.0, beta_fast=32.0, beta_slow=1.0, original_seq_len=16))
    for layer in layers if sdpa else []:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    init = {"weight": torch.nn.init.normal_}
    return DeepSeekV3Model.Config(
        vocab_size=VOCAB, dim=dim, layers=layers, mtp_layers=[],
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim, param_init=init),
        norm=RMSNorm.Config(normalized_shape=dim),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB))


def convert(config):
    return TorchMLAConverter.Config().build().convert(copy.deepcopy(config))


def stock_and_ours(q_lora_rank: int, *, tp_plan=False, device="cpu", **dims):
    """(stock model, converted model holding the stock model's state dict); with tp_plan, both
    carry torchtitan's DeepSeek-V3 tensor-parallel plan (used once parallelized)."""
    config = model_config(q_lora_rank, **dims)
    converted = convert(model_config(q_lora_rank, sdpa=False, **dims))
    if tp_plan:
        for c in (config, converted):
            set_deepseek_v3_sharding_config(c, enable_sp=False, enable_ep=False)
    torch.manual_seed(0)
    stock = config.build()
    stock.init_states(buffer_device=torch.device("cpu"))
    ours = converted.build()
    ours.init_states(buffer_device=torch.device("cpu"))
    ours.load_state_dict(stock.state_dict())  # strict: the same keys
    return stock.to(device), ours.to(device)


def tokens(batch=BATCH, seqlen=SEQLEN, seed=1):
    return periodic_sequences(batch, seqlen, VOCAB, torch.Generator().manual_seed(seed))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def loss_fn(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy, so that per-document losses add up to the packed one."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten(),
                                             reduction="sum")


def assert_grads_match(model, ref_model, tol=1e-5, skip=()):
    """The largest relative error of the grads (each checked against tol)."""
    ref, worst = dict(ref_model.named_parameters()), 0.0
    for name, p in model.named_parameters():
        if any(s in name for s in skip):
            continue
        assert p.grad is not None and ref[name].grad is not None, name
        err = rel_err(p.grad, ref[name].grad)
        assert err <= tol, f"{name}: max relative error {err:.3g}"
        worst = max(worst, err)
    return worst


def test_converter_swaps_every_attention_keeping_parameters():
    config = model_config(24)
    converted = convert(model_config(24, sdpa=False))
    assert all(type(layer.attention) is TorchMLAAttention.Config for layer in converted.layers)
    # Flex's BlockMask becomes varlen's document offsets, which the op takes.
    assert all(type(layer.attention.inner_attention) is VarlenAttention.Config
               for layer in converted.layers)
    stock, ours = config.build(), converted.build()
    assert all(isinstance(layer.attention, TorchMLAAttention) for layer in ours.layers.values())
    assert ours.state_dict().keys() == stock.state_dict().keys()
    assert {n: p.shape for n, p in ours.named_parameters()} == \
        {n: p.shape for n, p in stock.named_parameters()}


# model_config's head dims are support's "small" ones (16 + 8, 16), in float32.
@pytest.mark.cases(dtypes=(FP32,), dims=("small",), packed=False)
def test_logits_and_grads_match_stock(core):
    core.inputs(core.cases[0], heads=4, batch=BATCH, seqlen=SEQLEN)  # asserts the core serves the model's calls
    for q_lora_rank in Q_LORA_RANKS:
        stock, ours = stock_and_ours(q_lora_rank, device=core.device)
        tok = tokens().to(core.device)
        logits = {}
        for name, model in (("stock", stock), ("ours", ours)):
            with OpCounter() as counter:
                logits[name] = model(tok)
                loss_fn(logits[name], tok).backward()
            # Ours runs the op in both layers (the stock model never), forward and backward.
            layers = len(model.layers) if name == "ours" else 0
            assert counter.attention_calls() == layers == counter.counts["mla_attention_backward"]
        with labelled(f"q_lora_rank={q_lora_rank}"):
            err = rel_err(logits["ours"], logits["stock"])
            assert err <= 1e-5
            print(f"\n{core.name}, q_lora_rank={q_lora_rank}: logits {err:.2e}, worst parameter grad "
                  f"{assert_grads_match(ours, stock):.2e} (max relative error to stock)")


@pytest.mark.cases(dtypes=(FP32,), dims=("small",), packed=True)
def test_packed_documents_match_stock_per_document(core):
    """Documents delimited by positions (torchtitan's VarlenMetadata) attend only within
    themselves: the packed run equals the stock model run on each document alone."""
    core.inputs(core.cases[0], heads=4, seqlens=[e - s for spans in DOCS for s, e in spans])
    for q_lora_rank in Q_LORA_RANKS:
        with labelled(f"q_lora_rank={q_lora_rank}"):
            packed_documents_match_stock(core, q_lora_rank)


def packed_documents_match_stock(core, q_lora_rank):
    docs = DOCS
    stock, ours = stock_and_ours(q_lora_rank, device=core.device)
    tok = tokens().to(core.device)
    positions = torch.zeros(BATCH, SEQLEN, dtype=torch.long, device=core.device)
    for row, spans in enumerate(docs):
        for s, e in spans:
            positions[row, s:e] = torch.arange(e - s, device=core.device)
    masks = ours.get_attention_masks(positions)  # torchtitan's VarlenMetadata for the documents
    logits = ours(tok, positions=positions, attention_masks=masks)
    loss_fn(logits, tok).backward()
    ref_logits = torch.empty_like(logits)
    for row, spans in enumerate(docs):
        for s, e in spans:
            doc = tok[row:row + 1, s:e]
            ref_logits[row, s:e] = stock(doc)[0]
            if e - s > 1:
                loss_fn(stock(doc), doc).backward()
    # The packed loss also predicts each document's first token from the previous document's last.
    for row, spans in enumerate(docs):
        for (start, end), (nxt, _) in zip(spans, spans[1:]):
            last = stock(tok[row:row + 1, start:end])[0, -1:]
            pair = torch.nn.functional.cross_entropy(last, tok[row, nxt:nxt + 1], reduction="sum")
            pair.backward()
    err = rel_err(logits, ref_logits.detach())
    assert err <= 1e-5
    # The routed experts' grads depend on how tokens are grouped into calls: the stock model
    # alone gives grads 4e-3 apart for one batch and for its rows run one by one (its grouped
    # GEMMs on the CPU), so they are compared where the grouping is the same (the tests above).
    worst = assert_grads_match(ours, stock, skip=("moe.routed_experts",))
    print(f"\n{core.name}, q_lora_rank={q_lora_rank}: packed documents: logits {err:.2e}, worst grad {worst:.2e}")


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_twenty_training_steps_match_stock(q_lora_rank):
    stock, ours = stock_and_ours(q_lora_rank)
    losses = {}
    for name, model in (("stock", stock), ("ours", ours)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        tok = tokens()
        for step in range(20):
            loss = loss_fn(model(tok), tok) / tok[:, 1:].numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["ours"][-1] < 0.5 * losses["ours"][0]  # it trains
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["ours"], losses["stock"]))
    print(f"\nq_lora_rank={q_lora_rank}: loss {losses['ours'][0]:.4f} -> {losses['ours'][-1]:.4f}, "
          f"max relative loss difference to stock over 20 steps {worst:.2e}")
    for step, (a, b) in enumerate(zip(losses["ours"], losses["stock"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {a} vs stock {b}"


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_saved_bytes_per_token_of_one_layer(q_lora_rank):
    """Activations one transformer layer keeps for backward (torch_mla.SavedTensors, parameters
    left out), at DeepSeek-V3's head dims (16 heads): torch_mla's against the stock layer's."""
    dims = dict(dim=256, n_heads=16, kv_lora_rank=512, nope=128, rope=64, v=128)
    stock, ours = stock_and_ours(4 * q_lora_rank and 384, **dims)
    x = torch.randn(1, 64, dims["dim"], requires_grad=True)
    per_token = {}
    for name, model in (("stock", stock), ("ours", ours)):
        layer = model.layers["1"]  # an MoE layer
        with torch_mla.SavedTensors() as saved:
            layer(x, None)
        per_token[name] = saved.nbytes_excluding(*layer.parameters()) / x.shape[1]
        with torch_mla.SavedTensors() as saved:
            layer.attention(x, None)
        per_token[name + " attention"] = saved.nbytes_excluding(*layer.parameters()) / x.shape[1]
    print(f"\nq_lora_rank={4 * q_lora_rank and 384}: saved bytes/token, one layer: stock "
          f"{per_token['stock']:.0f}, torch_mla {per_token['ours']:.0f} (ratio "
          f"{per_token['ours'] / per_token['stock']:.3f}); attention only: stock "
          f"{per_token['stock attention']:.0f}, torch_mla {per_token['ours attention']:.0f} (ratio "
          f"{per_token['ours attention'] / per_token['stock attention']:.3f})")
    assert per_token["ours attention"] < 0.5 * per_token["stock attention"]
    assert per_token["ours"] < per_token["stock"]


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_selective_ac_runs_our_forward_once_per_step(q_lora_rank):
    _, reference = stock_and_ours(q_lora_rank)
    op = "mla_attention" if q_lora_rank == 0 else "mla_attention_q_latent"
    tok = tokens()
    loss_fn(reference(tok), tok).backward()
    layers = len(reference.layers)
    for policy, forwards in ((SelectiveAC.Config(), 2 * layers), (TorchMLASelectiveAC.Config(), layers)):
        _, model = stock_and_ours(q_lora_rank)
        policy.build().apply(model)
        with OpCounter() as counter:
            loss_fn(model(tok), tok).backward()
        print(f"\n{type(policy).__qualname__}: {counter.counts[op]} {op} forwards in one step "
              f"of {layers} layers")
        assert counter.counts[op] == forwards, (type(policy).__qualname__, counter.counts)
        assert counter.counts[op.replace("_q_latent", "") + "_backward"] == layers
        ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            name = name.replace("._checkpoint_wrapped_module", "")
            assert rel_err(p.grad, ref[name].grad) <= 1e-6, name


def test_unsupported_settings_raise_naming_them():
    config = convert(model_config(0))
    config.layers[0].attention.inner_attention = VarlenAttention.Config(window_size=(4, 0))
    with pytest.raises(NotImplementedError, match=r"window_size=\(4, 0\)"):
        config.build()

    from torchtitan.distributed import ParallelDims
    attention = convert(model_config(0)).build().layers["0"].attention
    cp = ParallelDims(dp_replicate=1, dp_shard=1, cp=2, tp=1, pp=1, ep=1, world_size=2)
    with pytest.raises(NotImplementedError, match=r"context parallelism \(cp=2\)"):
        attention.parallelize(cp)  # what model.parallelize reaches for every attention
    tp = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, ep=1, world_size=2,
                      spmd_backend="partial_dtensor")
    with pytest.raises(NotImplementedError, match="spmd_backend='partial_dtensor'"):
        attention.parallelize(tp)
    with pytest.raises(NotImplementedError, match="attention_masks of type dict"):
        attention(torch.randn(1, 4, 64), {"causal": None})
    # torchtitan's partial_dtensor CP (apply_cp_to_forward) rebinds inner_attention.forward
    # without parallelize(); the module never calls it, so it refuses to run.
    attention.inner_attention.forward = lambda q, k, v, **kwargs: None
    with pytest.raises(NotImplementedError, match="context parallelism"):
        attention(torch.randn(1, 4, 64), None)


def _tensor_parallel(rank, world, q_lora_rank):
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import get_spmd_context
    stock, ours = stock_and_ours(q_lora_rank, tp_plan=True)
    single = copy.deepcopy(ours)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=world, pp=1, ep=1, world_size=world)
    tok = tokens()
    # lm_head is vocab-sharded under TP: each rank's loss is its logits' share of one fixed sum.
    weights = torch.randn(BATCH, SEQLEN, VOCAB, generator=torch.Generator().manual_seed(2))
    loss_single = (single(tok) * weights).sum()
    loss_single.backward()
    sharded = {}
    with get_spmd_context(parallel_dims=dims)():
        for name, model in (("stock", stock), ("ours", ours)):
            model.parallelize(dims)
            logits = model(tok)
            (logits * weights.chunk(world, dim=-1)[rank]).sum().backward()
            sharded[name] = logits.detach()
    # torchtitan's plan keeps each rank's local shards of wq / wq_b / wkv_b (rows) and wo (columns).
    attention = ours.layers["0"].attention
    full_attention = single.layers["0"].attention
    up = attention.wq if q_lora_rank == 0 else attention.wq_b
    assert up.weight.shape[0] * world == (full_attention.wq if q_lora_rank == 0 else full_attention.wq_b).weight.shape[0]
    assert attention.wkv_b.weight.shape[0] * world == full_attention.wkv_b.weight.shape[0]
    assert attention.wo.weight.shape[1] * world == full_attention.wo.weight.shape[1]
    # Against the stock model under the same plan: every local logit and grad.
    err_stock = rel_err(sharded["ours"], sharded["stock"])
    assert err_stock <= 1e-5
    grad_stock = assert_grads_match(ours, stock)
    # Against one process: the local shards of the logits and of the attention weights' grads;
    # grads of replicated weights are rank-partial under the plan (reduced later by FSDP/DDP).
    full = single(tok).detach()
    err_single = rel_err(sharded["ours"], full.chunk(world, dim=-1)[rank])
    assert err_single <= 1e-5
    ref, grad_single = dict(single.named_parameters()), 0.0
    for name, p in ours.named_parameters():
        if ".attention." not in name:
            continue
        grad, ref_grad = p.grad, ref[name].grad
        if grad.shape == ref_grad.shape:
            grad = grad.clone()
            dist.all_reduce(grad)
        else:
            dim = next(d for d in range(grad.dim()) if grad.shape[d] != ref_grad.shape[d])
            ref_grad = ref_grad.chunk(world, dim=dim)[rank]
        err = rel_err(grad, ref_grad)
        assert err <= 1e-5, f"rank {rank} {name}: max relative error {err:.3g}"
        grad_single = max(grad_single, err)
    print(f"\nrank {rank}, q_lora_rank={q_lora_rank}: vs stock TP logits {err_stock:.2e}, grads "
          f"{grad_stock:.2e}; vs one process logits {err_single:.2e}, attention grads "
          f"{grad_single:.2e}", flush=True)


@pytest.mark.parametrize("q_lora_rank", Q_LORA_RANKS)
def test_tensor_parallel_matches_one_process_on_gloo(q_lora_rank):
    run_ranks(_tensor_parallel, 2, q_lora_rank)
