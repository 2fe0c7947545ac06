"""The benchmark baselines that attend their own way (SDPA on expanded K/V, with or without
recompute) compute the op's function, against the float64 reference; they differ only in memory.
(The `eager` baseline is mla_attention_reference itself and `torch_mla` the op: test_op.py's.)"""
import pytest
import torch

import torch_mla
from baselines import ATTENTION_CORES
from support import SMALL, assert_matches_reference, labelled, make_inputs


@pytest.mark.parametrize("baseline", ["sdpa", "sdpa_recompute"])
def test_sdpa_baselines_match_reference(baseline):
    for shape in (dict(seqlens=[3, 0, 70]), dict(batch=2, seqlen=33)):
        inputs, cu = make_inputs(SMALL, dtype=torch.float64, **shape)
        with labelled("packed" if cu is not None else "padded"):
            assert_matches_reference(ATTENTION_CORES[baseline], inputs, cu_seqlens=cu)


def test_recompute_baseline_saves_no_expanded_kv():
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=33)
    sizes = {}
    for core in ("sdpa", "sdpa_recompute"):
        with torch_mla.SavedTensors() as saved:
            ATTENTION_CORES[core](**inputs)
        sizes[core] = saved.nbytes_excluding(inputs["wkv_b"])
    kv_bytes = 2 * 33 * SMALL.heads * (SMALL.nope + SMALL.rope + SMALL.v) * 4
    assert sizes["sdpa"] - sizes["sdpa_recompute"] >= kv_bytes
