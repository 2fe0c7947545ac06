"""benchmarks/bench_sparse.py: its methods compute one function, and its saved-bytes column is
what each keeps (docs/design.md §16.2)."""
import pytest
import torch

import bench_sparse


def test_the_sparse_methods_agree_and_dense_differs():
    softmax_scale = (bench_sparse.DIM_NOPE + bench_sparse.DIM_ROPE) ** -0.5
    tensors = bench_sparse.inputs(96, heads=2, topk=16)
    outs = {m: fn(*tensors, softmax_scale) for m, fn in bench_sparse.METHODS.items()}
    for m in ("masked_eager", "masked_sdpa"):
        torch.testing.assert_close(outs[m], outs["sparse"], rtol=1e-5, atol=1e-5)
    assert (outs["dense"] - outs["sparse"]).abs().max() > 1e-2  # 96 keys > k = 16: a real selection


def test_rows_report_saved_bytes_peak_and_time():
    rows = bench_sparse.main(["--seqlens", "64", "128", "--heads", "2", "--topk", "16", "--reps", "1"])
    by = {(r["method"], r["seqlen"]): r for r in rows}
    assert set(by) == {(m, s) for m in bench_sparse.METHODS for s in (64, 128)}
    for s in (64, 128):
        # The sparse op keeps the dense op's set plus the int32 indices.
        assert by["sparse", s]["saved"] == pytest.approx(by["dense", s]["saved"] + 4 * 16)
        assert all(by[m, s]["seconds"] > 0 and by[m, s]["peak"] > 0 for m in bench_sparse.METHODS)
    # The masked-dense eager path keeps (H, S, S) tensors: each adds H·4 bytes per token for every
    # key, so doubling S from 64 adds at least H·64·4 per token; ours stay flat.
    assert by["masked_eager", 128]["saved"] - by["masked_eager", 64]["saved"] >= 2 * 64 * 4
    assert by["sparse", 128]["saved"] == by["sparse", 64]["saved"]


def test_a_method_over_the_budget_is_skipped_and_says_why():
    rows = bench_sparse.main(["--seqlens", "64", "--heads", "2", "--topk", "16", "--reps", "1",
                              "--methods", "sparse", "masked_eager", "--max-gib", "1e-6"])
    by = {r["method"]: r for r in rows}
    assert "seconds" in by["sparse"]
    assert "--max-gib" in by["masked_eager"]["skipped"]
