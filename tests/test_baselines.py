"""The benchmark baselines compute the same function as the op (they differ only in memory)."""
import pytest
import torch

import torch_mla
from baselines import ATTENTION_CORES
from mla_testing import SMALL, assert_matches_reference, make_inputs


@pytest.mark.parametrize("core", list(ATTENTION_CORES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_attention_cores_match_reference(core, packed):
    if packed:
        inputs, cu = make_inputs(SMALL, seqlens=[3, 0, 70], dtype=torch.float64)
    else:
        inputs, cu = make_inputs(SMALL, batch=2, seqlen=33, dtype=torch.float64)
    assert_matches_reference(ATTENTION_CORES[core], inputs, cu_seqlens=cu)


def test_recompute_baseline_saves_no_expanded_kv():
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=33)
    sizes = {}
    for core in ("sdpa", "sdpa_recompute"):
        with torch_mla.SavedTensors() as saved:
            ATTENTION_CORES[core](**inputs)
        sizes[core] = saved.nbytes_excluding(inputs["wkv_b"])
    kv_bytes = 2 * 33 * SMALL.heads * (SMALL.nope + SMALL.rope + SMALL.v) * 4
    assert sizes["sdpa"] - sizes["sdpa_recompute"] >= kv_bytes
