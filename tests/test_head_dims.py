"""Head dims beyond DeepSeek's (docs/design.md §15): no RoPE part (Dr = 0, GLM-5.3's NoPE MLA; an
empty k_rope (..., 0)) and q·k / v widths of 256 (GLM-4.7-Flash and GLM-5: (192 + 64, 256);
GLM-5.3: (256 + 0, 256)) against the float64 reference on every CPU core that accepts them,
through the op, the q-latent op and the module's three save= paths; `explain` and the selection
rule say which core serves which shape, and why the others decline."""
import pytest
import torch

import torch_mla
from torch_mla.cores import choose_core
from torch_mla.nn import MultiHeadLatentAttention
from torch_mla.reference import mla_attention_reference
from support import BF16, FP32, FP64, HeadDims, OpCounter, assert_matches_reference, make_inputs, max_rel_err

NO_ROPE = HeadDims(heads=2, nope=32, rope=0, v=32, latent=48)
NO_ROPE_256 = HeadDims(heads=2, nope=256, rope=0, v=256, latent=64)      # GLM-5.3
WIDE_256 = HeadDims(heads=2, nope=192, rope=64, v=256, latent=64)         # GLM-4.7-Flash, GLM-5
NO_ROPE_TUNED = HeadDims(heads=2, nope=192, rope=0, v=128, latent=64)     # a tuned (192, 128) shape, Dr = 0
SHAPES = {"dr0": NO_ROPE, "dr0-256x256": NO_ROPE_256, "192+64x256": WIDE_256, "dr0-192x128": NO_ROPE_TUNED}


def op_on(core):
    def run(**kwargs):
        with torch_mla.use_core(core):
            return torch_mla.mla_attention(**kwargs)
    return run


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("core_name", ["cpu", "composed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_op_matches_reference(shape, core_name, dtype, packed):
    """The op's out and every input's grad (an empty k_rope's grad is empty) against float64."""
    dims = SHAPES[shape]
    inputs, cu = make_inputs(dims, seqlens=(9, 14) if packed else None, seqlen=13, dtype=dtype)
    assert torch_mla.explain(*inputs.values(), cu_seqlens=cu).reasons[core_name] is None
    with OpCounter() as ops:
        assert_matches_reference(op_on(core_name), inputs, cu_seqlens=cu)
    assert ops.counts["mla_attention"] == 1


@pytest.mark.parametrize("shape", list(SHAPES))
def test_simt_serves_tuned_shapes_and_declines_the_others(shape):
    """The emulator of our CUDA kernels (simt) runs Dr = 0 at a tuned (Dn+Dr, Dv) against the
    float64 reference (bf16 rule); for (256, 256) it declines, with the reason, and a forced
    simt call raises it."""
    dims = SHAPES[shape]
    inputs, _ = make_inputs(dims, seqlen=40, dtype=BF16)
    reason = torch_mla.explain(*inputs.values()).reasons["simt"]
    if (dims.nope + dims.rope, dims.v) in ((192, 128), (96, 64)):
        assert reason is None
        assert_matches_reference(op_on("simt"), inputs)
    else:
        qk = dims.nope + dims.rope
        assert reason == f"tuned for (Dn+Dr, Dv) = (192, 128) or (96, 64), got ({qk}, {dims.v})"
        with pytest.raises(ValueError, match=r'core "simt" cannot serve this call: tuned for'):
            op_on("simt")(**inputs)


@pytest.mark.parametrize("interleave", [True, False])
def test_q_latent_op_without_rope(interleave):
    """mla_attention_q_latent with Dr = 0: cos, sin and k_rope of width 0; q = c_q · wq_bᵀ."""
    dims, q_rank = NO_ROPE, 24
    inputs, _ = make_inputs(dims, seqlen=11, dtype=FP64)
    gen = torch.Generator().manual_seed(5)
    q_latent = torch.randn(2, 11, q_rank, generator=gen, dtype=FP64, requires_grad=True)
    wq_b = (torch.randn(dims.heads * dims.nope, q_rank, generator=gen, dtype=FP64) * q_rank ** -0.5).requires_grad_()
    empty = torch.empty(2, 11, 0, dtype=FP32)
    kv, k_rope, wkv_b = inputs["kv_latent"], inputs["k_rope"], inputs["wkv_b"]
    leaves = [q_latent, wq_b, kv, k_rope, wkv_b]
    out = torch_mla.mla_attention_q_latent(q_latent, wq_b, empty, empty, kv, k_rope, wkv_b, num_heads=dims.heads,
                                           rope_interleave=interleave)
    grads = torch.autograd.grad(out.sin().sum(), leaves)
    q = (q_latent @ wq_b.t()).unflatten(-1, (dims.heads, -1))
    ref = mla_attention_reference(q, kv, k_rope, wkv_b)
    ref_grads = torch.autograd.grad(ref.sin().sum(), leaves)
    assert max_rel_err(out, ref) <= 1e-10
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and max_rel_err(g, r) <= 1e-10


@pytest.mark.parametrize("rope_dim,rope_layout", [(0, "interleaved"), (0, "none"), (8, "none")])
def test_module_without_rope_every_save(rope_dim, rope_layout):
    """MultiHeadLatentAttention with qk_rope_head_dim = 0, or with k_rope and q_rope left
    unrotated (rope_layout="none", Kimi Linear's MLA), each save= path (the latent-only block
    included), against the block computed in float64 from its parameters."""
    torch.manual_seed(0)
    module = MultiHeadLatentAttention(hidden_size=48, num_heads=3, q_lora_rank=24, kv_lora_rank=32,
                                      qk_nope_head_dim=16, qk_rope_head_dim=rope_dim, v_head_dim=16,
                                      rope_layout=rope_layout)
    x = torch.randn(2, 13, 48)
    p = {k: v.detach().double() for k, v in module.named_parameters()}

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    xd = x.double()
    q = rms(xd @ p["q_a_proj.weight"].t(), p["q_a_layernorm.weight"]) @ p["q_b_proj.weight"].t()
    kv, k_rope = (xd @ p["kv_a_proj_with_mqa.weight"].t()).split([32, rope_dim], dim=-1)
    out = mla_attention_reference(q.unflatten(-1, (3, -1)), rms(kv, p["kv_a_layernorm.weight"]), k_rope,
                                  p["kv_b_proj.weight"])
    ref = out.flatten(-2) @ p["o_proj.weight"].t()
    for save in ("q", "q_latent", "latent"):
        module.save = save
        with OpCounter() as ops:
            y = module(x)
        assert ops.attention_calls() == 1
        assert max_rel_err(y.detach(), ref) <= 1e-5, save


def test_rope_layout_is_checked():
    with pytest.raises(ValueError, match="rope_layout must be one of"):
        MultiHeadLatentAttention(hidden_size=48, num_heads=3, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                                 qk_rope_head_dim=8, v_head_dim=16, rope_layout="rotate_half")
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MultiHeadLatentAttention(hidden_size=48, num_heads=3, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                                 qk_rope_head_dim=7, v_head_dim=16)


CUDNN, ARCHS = 91900, (80, 86, 89, 90)


@pytest.mark.parametrize("dims,cap,varlen,expected,declined", [
    ((192, 64, 256), 90, False, "cudnn", {}),
    ((256, 0, 256), 90, True, "efficient", {"cuda": "tuned for (Dn+Dr, Dv) = (192, 128) or (96, 64), got (256, 256)"}),
    ((256, 0, 256), 80, False, "efficient", {"cudnn": "chosen on sm_90 and later only"}),
    ((192, 0, 128), 90, True, "cuda", {}),
    ((320, 0, 256), 90, False, "efficient", {"cudnn": "needs head dims multiples of 8 and at most 256, got (320, 256)"}),
], ids=["glm5-sm90", "glm5.3-packed-sm90", "glm5.3-sm80", "dr0-tuned-packed", "qk320"])
def test_selection_says_which_core_serves_which_shape(dims, cap, varlen, expected, declined):
    """Described CUDA calls (no GPU needed): the core auto takes for these head dims, and the
    reason each core before it gives."""
    dn, dr, dv = dims
    choice = choose_core(device="cuda", capability=cap, dtype=BF16, dim_nope=dn, dim_rope=dr, dim_v=dv, varlen=varlen,
                         deterministic=False, cudnn_version=CUDNN, kernel_archs=ARCHS)
    assert choice.core == expected, str(choice)
    for core, why in declined.items():
        assert choice.reasons[core].startswith(why), str(choice)
