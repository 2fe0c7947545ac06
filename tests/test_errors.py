"""Bad input gives a ValueError that names the argument and what was expected (never a crash)."""
import pytest
import torch

import torch_mla
from support import BF16, FP32, SMALL, labelled, make_inputs

B, S = 2, 5
H, DN, DR, DV, DC = SMALL.heads, SMALL.nope, SMALL.rope, SMALL.v, SMALL.latent


def padded():
    inputs, _ = make_inputs(SMALL, batch=B, seqlen=S, requires_grad=False)
    return inputs


def packed(seqlens=(2, 3)):
    return make_inputs(SMALL, seqlens=list(seqlens), requires_grad=False)


def call(inputs, **kwargs):
    return torch_mla.mla_attention(**inputs, **kwargs)


PADDED_CASES = {
    "q rank": (dict(q=torch.randn(B * S, H, DN + DR)), r"q must have shape \(B, S, H, Dn\+Dr\)"),
    "kv_latent rank": (dict(kv_latent=torch.randn(B, S, 1, DC)), r"kv_latent must have shape \(B, S, Dc\)"),
    "k_rope rank": (dict(k_rope=torch.randn(B, S)), r"k_rope must have shape \(B, S, Dr\)"),
    "wkv_b rank": (dict(wkv_b=torch.randn(H, DN + DV, DC)), r"wkv_b must have shape \(H\*\(Dn\+Dv\), Dc\)"),
    "kv_latent batch": (dict(kv_latent=torch.randn(B + 1, S, DC)), r"kv_latent .* B \(from q\) = 2"),
    "k_rope seqlen": (dict(k_rope=torch.randn(B, S + 1, DR)), r"k_rope .* S \(from q\) = 5"),
    "wkv_b latent width": (dict(wkv_b=torch.randn(H * (DN + DV), DC + 1)), r"wkv_b .* Dc = 32"),
    "wkv_b rows not divisible by H": (dict(wkv_b=torch.randn(H * (DN + DV) + 1, DC)), r"wkv_b .* not divisible by H"),
    "Dv zero": (dict(wkv_b=torch.randn(H * DN, DC)), r"wkv_b .* Dv >= 1"),
    "Dr too wide": (dict(k_rope=torch.randn(B, S, DN + DR)), r"k_rope's last dimension Dr .* must be smaller"),
    "mixed dtype": (dict(kv_latent=torch.randn(B, S, DC, dtype=torch.float64)), r"kv_latent must have the same dtype as q"),
    "integer dtype": (dict(q=torch.ones(B, S, H, DN + DR, dtype=torch.int64)), r"q must be float64, float32, bfloat16 or float16"),
    "inner stride": (dict(k_rope=torch.randn(B, S, DR * 2)[..., ::2]), r"k_rope must be contiguous in its last dimension"),
    "meta device": (dict(wkv_b=torch.randn(H * (DN + DV), DC, device="meta")), r"wkv_b must be on the same device as q"),
}


# Asking for the maximum logits (docs/design.md §12) changes no check.
MAX_LOGITS = pytest.mark.parametrize("max_logits", [False, True], ids=["plain", "max-logits"])


@MAX_LOGITS
@pytest.mark.parametrize("case", list(PADDED_CASES))
def test_bad_padded_input(case, max_logits):
    replace, message = PADDED_CASES[case]
    inputs = {**padded(), **replace}
    with pytest.raises(ValueError, match=message):
        call(inputs, return_max_logits=max_logits)


def cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


PACKED_CASES = {
    "cu_seqlens int64": (dict(cu_seqlens=cu(0, 2, 5, dtype=torch.int64)), r"cu_seqlens must be int32"),
    "cu_seqlens 2-D": (dict(cu_seqlens=cu(0, 2, 5).view(1, 3)), r"cu_seqlens must be a 1-D tensor"),
    "cu_seqlens empty": (dict(cu_seqlens=cu()), r"cu_seqlens must be a 1-D tensor of shape \(B\+1,\)"),
    "cu_seqlens start": (dict(cu_seqlens=cu(1, 2, 5)), r"cu_seqlens must start at 0"),
    "cu_seqlens decreasing": (dict(cu_seqlens=cu(0, 3, 2, 5)), r"cu_seqlens must be non-decreasing"),
    "cu_seqlens end": (dict(cu_seqlens=cu(0, 2, 4)), r"cu_seqlens must end at T = 5"),
    "max_seqlen too small": (dict(cu_seqlens=cu(0, 2, 5), max_seqlen=2), r"max_seqlen \(2\) is smaller"),
    "max_seqlen negative": (dict(cu_seqlens=cu(0, 2, 5), max_seqlen=-1), r"max_seqlen must be 0 \(not given\)"),
}


# The checks run before any core: each pair, on one served case of (T = 5, H = 2) or (B, S) = (2, 5).
ANY_CASE = dict(dtypes=(FP32, BF16), dims=("small", "minicpm3"))


@pytest.mark.cases(**ANY_CASE, packed=True)
def test_bad_packed_input(core):
    """The value checks of cu_seqlens and max_seqlen: the same ValueError whichever core runs. A
    core that reads cu_seqlens on the device only (cuda, simt) gets no too-small max_seqlen here: it
    reads nothing on the host then, and its kernels assert instead (docs/design.md §3.2,
    test_hot_path.py)."""
    inputs, cu_seqlens = core.inputs(core.cases[0], seqlens=[2, 3], requires_grad=False)
    host_reads = torch.ops.torch_mla._core_host_spans(core.name)
    for case, (replace, message) in PACKED_CASES.items():
        if case == "max_seqlen too small" and not host_reads:
            continue
        kwargs = {k: v.to(core.device) if isinstance(v, torch.Tensor) else v for k, v in replace.items()}
        for max_logits in (False, True):  # asking for the maximum logits (docs/design.md §12) changes no check
            with labelled(case, "max-logits" if max_logits else "plain"), pytest.raises(ValueError, match=message):
                call(inputs, **kwargs, return_max_logits=max_logits)


@pytest.mark.cases(**ANY_CASE, packed=False)
def test_bad_max_seqlen_padded(core):
    inputs, _ = core.inputs(core.cases[0], batch=B, seqlen=S, requires_grad=False)
    for max_seqlen, message in ((S - 1, r"max_seqlen \(4\) is smaller than the longest sequence \(S = 5\)"),
                                (-3, r"max_seqlen must be 0 \(not given\)")):
        with labelled(f"max_seqlen={max_seqlen}"), pytest.raises(ValueError, match=message):
            call(inputs, max_seqlen=max_seqlen)


@pytest.mark.parametrize("max_seqlen", [0, S, S + 7])
def test_valid_max_seqlen_padded(max_seqlen):
    assert call(padded(), max_seqlen=max_seqlen).shape == (B, S, H, DV)


def test_forced_core_that_cannot_serve_names_why_and_who_can():
    with torch_mla.use_core("cuda"):
        with pytest.raises(ValueError, match=r'core "cuda" cannot serve this call: runs on CUDA tensors only\. '
                                             r"Cores that can: cpu, composed"):
            call(padded())


def test_unknown_core_is_a_clear_error(mla_env):
    with pytest.raises(ValueError, match="torch_mla.use_core: name must be 'auto' or one of"):
        with torch_mla.use_core("flash"):
            pass
    mla_env.setenv("TORCH_MLA_CORE", "flash")
    with pytest.raises(ValueError, match=r'core must be "auto" or one of .*got "flash"'):
        call(padded())


def test_packed_with_padded_shapes():
    inputs = padded()
    with pytest.raises(ValueError, match=r"q must have shape \(T, H, Dn\+Dr\) \(packed, cu_seqlens given\)"):
        call(inputs, cu_seqlens=cu(0, 5, 10))


def test_packed_token_count_mismatch():
    inputs, cu_seqlens = packed()
    inputs["k_rope"] = inputs["k_rope"][:-1]
    with pytest.raises(ValueError, match=r"k_rope .* T \(from q\) = 5"):
        call(inputs, cu_seqlens=cu_seqlens)


def test_backward_op_checks_grad_out():
    inputs = padded()
    out, lse, _ = torch.ops.torch_mla.mla_attention(*inputs.values(), 0.1, True, None, 0)
    with pytest.raises(ValueError, match=r"max_seqlen must be 0 \(not given\)"):
        torch.ops.torch_mla.mla_attention_backward(out, *inputs.values(), out, lse, 0.1, True, None, -1)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(B, S, H, Dv\)"):
        torch.ops.torch_mla.mla_attention_backward(out[..., :-1], *inputs.values(), out, lse, 0.1, True,
                                                   None, 0)
    with pytest.raises(ValueError, match=r"lse must be Float"):
        torch.ops.torch_mla.mla_attention_backward(out, *inputs.values(), out, lse.double(), 0.1, True,
                                                   None, 0)
