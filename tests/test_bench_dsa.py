"""benchmarks/bench_dsa.py: the patched DeepSeek-V3.2 stack keeps fewer bytes per token than HF's,
flat in S, and a configuration predicted over the budget is not run but printed as predicted."""
import pytest

from support import HAVE_TRANSFORMERS

pytestmark = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs transformers")


def test_patched_keeps_less_and_flat_and_hf_is_predicted_past_the_budget():
    import bench_dsa

    rows = bench_dsa.main(["--seqlens", "128", "256", "512", "--layers", "1", "--max-gib", "0.12"])
    by = {(r["method"], r["seqlen"]): r for r in rows}
    for s in (128, 256):
        assert by["torch_mla", s]["saved"] < by["hf_eager", s]["saved"]
        assert by["torch_mla_latent", s]["saved"] < by["torch_mla", s]["saved"]
        assert by["torch_mla", s]["peak"] < by["hf_eager", s]["peak"]
    # HF's (H, S, S) scores make its bytes per token grow with S; the patched ones do not grow
    # with S below k (the selection is every earlier key, but the op saves no score matrix).
    assert by["hf_eager", 256]["saved"] > by["hf_eager", 128]["saved"]
    assert by["torch_mla", 256]["saved"] == pytest.approx(by["torch_mla", 128]["saved"], rel=0.05)
    # HF's quadratic peak, fitted on S = 128 and 256, is over 0.12 GiB at S = 512: predicted, not run.
    assert "predicted" in by["hf_eager", 512] and by["hf_eager", 512]["predicted"] > 0.12 * 2 ** 30
    assert "saved" in by["torch_mla", 512]
