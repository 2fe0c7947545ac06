"""The memory claim, measured: the op saves exactly q, kv_latent, k_rope, wkv_b, out and lse."""
import pytest

import torch_mla
from torch_mla.reference import mla_attention_reference
from support import BF16, DSV3, FP32, HeadDims, labelled, make_inputs

DSV3_H128 = HeadDims(heads=128, nope=DSV3.nope, rope=DSV3.rope, v=DSV3.v, latent=DSV3.latent)


@pytest.mark.cases(dtypes=(FP32, BF16), dims=("dsv3",))
def test_op_saves_exactly_the_six_tensors(core):
    """Whatever the core: no core may keep K, V or anything else of its own for backward."""
    for case in core.cases:
        shape = dict(seqlens=[3, 0, 9]) if case.packed else dict(batch=2, seqlen=6)
        inputs, cu = core.inputs(case, **shape)
        with torch_mla.SavedTensors() as saved:
            out, lse = torch_mla.mla_attention(**inputs, cu_seqlens=cu, return_lse=True)
        six = [inputs["q"], inputs["kv_latent"], inputs["k_rope"], inputs["wkv_b"], out, lse]
        with labelled(case):
            assert all(saved.holds(t) for t in six)
            assert len(saved.storages) == 6
            assert saved.nbytes == sum(t.untyped_storage().nbytes() for t in six)


def bytes_per_token(fn, inputs, tokens):
    with torch_mla.SavedTensors() as saved:
        fn(**inputs)
    return saved.nbytes_excluding(inputs["wkv_b"]) / tokens


def test_saved_bytes_per_token_dsv3_head_dims():
    """DeepSeek-V3 head dims, H = 128, fp32: ours saves q + latents + out + lse per token, the
    reference (what HF does: expanded K/V, full softmax) far more."""
    batch, seqlen = 1, 64
    d = DSV3_H128
    inputs, _ = make_inputs(d, batch=batch, seqlen=seqlen)
    ours = bytes_per_token(torch_mla.mla_attention, inputs, batch * seqlen)
    ref = bytes_per_token(mla_attention_reference, inputs, batch * seqlen)
    elem = 4
    expected = elem * (d.heads * (d.nope + d.rope) + d.latent + d.rope + d.heads * d.v) + 4 * d.heads
    print(f"\nsaved bytes/token (fp32, H={d.heads}, S={seqlen}, parameters excluded): "
          f"torch_mla {ours:,.0f}  reference {ref:,.0f}  ratio {ref / ours:.2f}x")
    assert ours == expected
    # K and V alone are H·(Dn+Dr+Dv) values per token in the reference.
    assert ref - ours >= elem * d.heads * (d.nope + d.rope + d.v) - elem * (d.latent + d.rope)
