"""python benchmarks/bench.py at tiny sizes (seconds): its files, the sanity of its numbers, and
the counting functions behind them (FLOPs, context-parallel bytes, the longest-S estimate)."""
import csv

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from torch_mla.reference import expand_kv, mla_attention_reference

import bench

HEADS, HIDDEN, Q_LORA, (DN, DR, DV, DC) = 2, 64, 32, (16, 8, 16, 32)
SEQLENS = (32, 64)
TINY = ["--heads", str(HEADS), "--hidden", str(HIDDEN), "--q-lora-rank", str(Q_LORA),
        "--head-dims", str(DN), str(DR), str(DV), str(DC), "--seqlens", *map(str, SEQLENS),
        "--threads", "1", "--warmup", "1", "--reps", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, bench.main(["all", "--out", str(out), *TINY])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_writes_csv_and_png(run):
    out, _ = run
    for name in ("memory.png", "speed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    expected = {(m, str(s)) for m in bench.METHODS for s in SEQLENS}
    for name in ("memory.csv", "speed.csv"):
        rows = read_csv(out / name)
        assert {(r["method"], r["seqlen"]) for r in rows} == expected, name
        assert not any(r["error"] for r in rows), name
    budget = read_csv(out / "budget.csv")
    assert {r["method"] for r in budget} == set(bench.METHODS)


def per_token(rows, method, seqlen):
    return next(r["saved_bytes_per_token"] for r in rows if r["method"] == method and r["seqlen"] == seqlen)


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_saved_bytes_follow_what_each_method_keeps(run, seqlen):
    rows = run[1]["memory"]
    saved = {m: per_token(rows, m, seqlen) for m in bench.METHODS}
    f32 = 4
    # The checkpointed block keeps only its input.
    assert saved["hf_sdpa_ckpt"] == HIDDEN * f32
    # The q-latent op drops q, nothing else (q's latent is q_b_proj's input, saved anyway).
    assert saved["torch_mla"] - saved["torch_mla_qlatent"] == HEADS * (DN + DR) * f32
    # The latent-only block keeps the block input, q_a_proj's output, kv_a_proj_with_mqa's output,
    # cos and sin (float32, Dr/2 each) and the two norms' rstd.
    assert saved["torch_mla_latent"] == (HIDDEN + Q_LORA + DC + DR) * f32 + DR * f32 + 2 * f32
    # Recomputing expansion and attention in backward saves all torch_mla saves but lse.
    assert saved["torch_mla"] - saved["up_proj_recompute"] == HEADS * f32
    # HF-style SDPA keeps the expanded K and V on top.
    assert saved["hf_sdpa"] - saved["torch_mla"] >= HEADS * (DN + DR + DV) * f32
    assert saved["hf_eager"] > saved["hf_sdpa"]


def test_dsa_block_keeps_the_latent_blocks_bytes_and_the_indices(tmp_path):
    """--methods torch_mla_dsa (opt-in): per token what torch_mla_latent keeps plus 4·k bytes of
    int32 indices (k below S: the sparse core runs)."""
    topk = 16
    results = bench.main(["memory", "--out", str(tmp_path), *TINY, "--methods", "torch_mla_latent", "torch_mla_dsa",
                          "--topk", str(topk)])
    rows = results["memory"]
    assert not any(r.get("error") for r in rows)
    for seqlen in SEQLENS:
        assert per_token(rows, "torch_mla_dsa", seqlen) == per_token(rows, "torch_mla_latent", seqlen) + 4 * topk


def test_saved_bytes_per_token_do_not_grow_with_s_without_a_score_matrix(run):
    rows = run[1]["memory"]
    short, long = SEQLENS
    # On the CPU, SDPA with Dn+Dr != Dv takes its math path, which keeps the probabilities too.
    for method in set(bench.METHODS) - {"hf_eager", "hf_sdpa"}:
        assert per_token(rows, method, short) == per_token(rows, method, long), method
    # eager keeps at least the probabilities: S values per query and head
    assert per_token(rows, "hf_eager", long) - per_token(rows, "hf_eager", short) >= HEADS * (long - short) * 4


def test_speed_rows_are_consistent(run):
    for row in run[1]["speed"]:
        assert 0 < row["fwd_ms"] < row["fwd_bwd_ms"] and 0 < row["bwd_ms"] < row["fwd_bwd_ms"]
        flops = bench.attention_flops(1, row["seqlen"], HEADS, DN + DR, DV)
        assert row["attn_fwd_bwd_tflops"] == pytest.approx(3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12)


@pytest.mark.parametrize("batch,seqlen,heads", [(1, 16, 2), (3, 7, 5)])
def test_attention_flops_match_the_counted_matmuls(batch, seqlen, heads):
    q = torch.randn(batch, seqlen, heads, DN + DR)
    kv_latent, k_rope = torch.randn(batch, seqlen, DC), torch.randn(batch, seqlen, DR)
    wkv_b = torch.randn(heads * (DN + DV), DC)
    with FlopCounterMode(display=False) as counter:
        mla_attention_reference(q, kv_latent, k_rope, wkv_b, causal=False)
    expansion = 2 * batch * seqlen * DC * heads * (DN + DV)
    full = bench.attention_flops(batch, seqlen, heads, DN + DR, DV, causal=False)
    assert counter.get_total_flops() == expansion + full
    assert bench.attention_flops(batch, seqlen, heads, DN + DR, DV) == full / 2


def test_context_parallel_bytes_are_the_gathered_tensors():
    """DeepSeek-V3 dims in bf16, on the meta device: the latents the op all-gathers against the
    K (k_rope broadcast to every head) and V a K/V all-gather would move."""
    heads, dn, dr, dv, dc, tokens = 128, 128, 64, 128, 512, 10
    meta = dict(device="meta", dtype=torch.bfloat16)
    kv_latent, k_rope = torch.empty(tokens, dc, **meta), torch.empty(tokens, dr, **meta)
    k_nope, v = expand_kv(kv_latent, torch.empty(heads * (dn + dv), dc, **meta), heads, dn)
    k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(tokens, heads, dr)], dim=-1)
    latents = torch.cat([kv_latent, k_rope], dim=-1)
    per_token = bench.context_parallel_bytes_per_token(heads, dn, dr, dv, dc, elem_bytes=2)
    assert per_token["latent"] == latents.nbytes / tokens
    assert per_token["expanded_kv"] == (k.nbytes + v.nbytes) / tokens


def test_fit_recovers_exact_costs():
    xs = [256, 512, 1024, 2048]
    assert bench.fit_linear_quadratic(xs, [3.0 * x + 0.5 * x * x for x in xs]) == pytest.approx((3.0, 0.5))
    assert bench.fit_linear_quadratic(xs, [7.0 * x for x in xs]) == pytest.approx((7.0, 0.0))


@pytest.mark.parametrize("saved,extra", [((100.0, 0.0), (20.0, 0.0)), ((100.0, 0.25), (10.0, 1.0))])
def test_longest_seqlen_is_the_last_s_that_fits(saved, extra):
    layers, budget = 8, 3 * 2 ** 30

    def stack(s):
        return layers * (saved[0] * s + saved[1] * s * s) + extra[0] * s + extra[1] * s * s

    rows = [dict(seqlen=s, batch=2, saved_bytes=2 * (saved[0] * s + saved[1] * s * s),
                 peak_mib=2 * (stack(s) - (layers - 1) * (saved[0] * s + saved[1] * s * s)) / bench.MIB)
            for s in (128, 256, 512)]
    longest = bench.longest_seqlen(rows, layers, budget)
    assert stack(longest) <= budget < stack(longest + 1)


def test_speed_rows_report_medians_spread_and_ratio_to_sdpa(run):
    """Every method of one S is timed in the same run (interleaved), so each row carries its
    spread and its ratio to HF-style SDPA's median of that run."""
    rows = run[1]["speed"]
    for seqlen in SEQLENS:
        at_s = {r["method"]: r for r in rows if r["seqlen"] == seqlen}
        assert at_s["hf_sdpa"]["fwd_bwd_vs_sdpa"] == 1.0
        for row in at_s.values():
            assert row["reps"] == 1
            assert row["fwd_bwd_min_ms"] <= row["fwd_bwd_ms"] <= row["fwd_bwd_max_ms"]
            assert row["fwd_bwd_spread"] == pytest.approx(
                (row["fwd_bwd_max_ms"] - row["fwd_bwd_min_ms"]) / row["fwd_bwd_ms"])
            assert row["fwd_bwd_vs_sdpa"] == pytest.approx(row["fwd_bwd_ms"] / at_s["hf_sdpa"]["fwd_bwd_ms"])
            assert row["fwd_bwd_cpu_ms"] > 0


def test_op_speed_times_the_op_against_sdpa_on_expanded_kv(run):
    out, results = run
    rows = results["op_speed"]
    assert {(r["method"], r["seqlen"]) for r in rows} == {(m, s) for m in bench.OP_METHODS for s in SEQLENS}
    assert not any(r.get("error") for r in rows)
    for row in rows:
        assert 0 < row["fwd_ms"] < row["fwd_bwd_ms"] and 0 < row["bwd_ms"] < row["fwd_bwd_ms"]
    assert {(r["method"], r["seqlen"]) for r in read_csv(out / "op_speed.csv")} == \
        {(m, str(s)) for m in bench.OP_METHODS for s in SEQLENS}


@pytest.mark.parametrize("name", list(bench.OP_METHODS))
def test_op_steps_time_forward_and_backward(name):
    """One step of each op-level path, in float64: a forward time, a backward time, CPU time."""
    spec = bench.Spec(device="cpu", dtype="float64", batch=2, hidden=HIDDEN, heads=HEADS, q_lora_rank=None,
                      head_dims=(DN, DR, DV, DC))
    step = bench._prepare_op(spec, name, 16)
    fwd, bwd, cpu_ms = step()
    assert fwd > 0 and bwd > 0 and cpu_ms >= 0


def test_speed_report_prints_the_ratio_and_op_tables(run):
    _, results = run
    spec = bench.Spec(**results["spec"])
    text = bench.speed_report(spec, results["speed"], list(bench.METHODS), results["op_speed"])
    assert "forward+backward time / HF-style SDPA's" in text
    assert "attention op alone" in text and "spread" in text
