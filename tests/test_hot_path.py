"""What a call does besides its core (issue 25 items 3-4): how often it reads tensor data on the host
and how often it selects a core, counted by the library (docs/design.md §3.2, §10.1).

The simt core runs the cuda core's kernels and host code on the CPU: it is the CUDA path's
stand-in here. A packed call on it with max_seqlen given reads nothing on the host (no device sync
on CUDA, CUDA-graph safe); without max_seqlen it reads cu_seqlens once per forward+backward pair.
"""
import pytest
import torch
import torch.distributed as dist

import torch_mla
from torch_mla.distributed import context_parallel_mla_attention, shard_sequence
from support import (MINICPM3, SMALL, check_results, cu_seqlens_of, make_inputs, q_latent_inputs, q_latent_op,
                     run_ranks, run_with_grads)

ops = torch.ops.torch_mla
SEQLENS = [5, 9, 0, 2]


class Counted:
    """The library's counters over a `with` block: host reads of tensor data, core selections."""

    def __enter__(self):
        self._reads, self._selections = ops._host_reads(), ops._core_selections()
        return self

    def __exit__(self, *exc):
        self.reads = ops._host_reads() - self._reads
        self.selections = ops._core_selections() - self._selections


def simt_inputs():
    """bfloat16 inputs of a tuned shape (Dn+Dr, Dv) = (96, 64): the simt core serves them."""
    inputs, cu = make_inputs(MINICPM3, seqlens=SEQLENS, dtype=torch.bfloat16)
    return inputs, cu


@pytest.mark.parametrize("max_seqlen, reads", [(max(SEQLENS), 0), (max(SEQLENS) + 3, 0), (None, 1)],
                         ids=["exact", "loose", "not-given"])
def test_packed_simt_reads_cu_seqlens_only_without_max_seqlen(max_seqlen, reads):
    inputs, cu = simt_inputs()
    with torch_mla.use_core("simt"), Counted() as n:
        results = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu, max_seqlen=max_seqlen)
    assert n.reads == reads
    check_results(results, inputs, cu_seqlens=cu)


def test_simt_max_logits_read_nothing(mla_env):
    """The kernels return max_logits themselves: no host read. The shared fallback, forced, reads
    cu_seqlens and its row flags (docs/design.md §12.2)."""
    inputs, cu = simt_inputs()
    with torch_mla.use_core("simt"), torch.no_grad():
        with Counted() as n:
            torch_mla.mla_attention(**inputs, cu_seqlens=cu, max_seqlen=max(SEQLENS), return_max_logits=True)
        assert n.reads == 0
        mla_env.setenv("TORCH_MLA_MAX_LOGITS", "recompute")
        with Counted() as n:
            torch_mla.mla_attention(**inputs, cu_seqlens=cu, max_seqlen=max(SEQLENS), return_max_logits=True)
        assert n.reads == 2


@pytest.mark.parametrize("max_seqlen, reads", [(max(SEQLENS), 0), (None, 1)], ids=["given", "not-given"])
def test_packed_simt_forward_alone(max_seqlen, reads):
    """Without the autograd layer (inference_mode) the device kernel learns max_seqlen itself."""
    inputs, cu = simt_inputs()
    with torch_mla.use_core("simt"), torch.inference_mode(), Counted() as n:
        torch_mla.mla_attention(**inputs, cu_seqlens=cu, max_seqlen=max_seqlen)
    assert n.reads == reads


def test_simt_checks_values_when_it_reads_them():
    """Without max_seqlen the one read checks cu_seqlens' values (a ValueError, as on the CPU
    path); with a too-small max_seqlen, or sequences that do not start at 0 and end at T, nothing
    is read and the kernels' device assertions fail."""
    inputs, _ = simt_inputs()
    T = inputs["q"].shape[0]
    with torch_mla.use_core("simt"), torch.no_grad():
        with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
            torch_mla.mla_attention(**inputs, cu_seqlens=cu_seqlens_of([T]) + 1)
        with pytest.raises(RuntimeError, match=r"device assertion failed.*seq\.len <= p\.max_seqlen"):
            torch_mla.mla_attention(**inputs, cu_seqlens=cu_seqlens_of(SEQLENS), max_seqlen=max(SEQLENS) - 1)
        # Sequences that do not cover the T tokens exactly: the device assertion on cu_seqlens' ends.
        late_start = cu_seqlens_of(SEQLENS)
        late_start[0] = 2
        for cu in (cu_seqlens_of(SEQLENS[:-1]), late_start):
            with pytest.raises(RuntimeError, match=r"device assertion failed.*p\.cu_seqlens\[0\] == 0"):
                torch_mla.mla_attention(**inputs, cu_seqlens=cu, max_seqlen=max(SEQLENS))


@pytest.mark.parametrize("name", ["cpu", "composed"])
def test_cores_walking_sequences_read_once_per_pass(name):
    """The cpu and composed cores loop over the sequences on the host: each pass reads cu_seqlens
    (their documented sync) and checks it, max_seqlen given or not."""
    assert ops._core_host_spans(name)
    inputs, cu = make_inputs(SMALL, seqlens=SEQLENS)
    for max_seqlen in (max(SEQLENS), None):
        with torch_mla.use_core(name), Counted() as n:
            results = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu, max_seqlen=max_seqlen)
        assert n.reads == 2
        check_results(results, inputs, cu_seqlens=cu)


def block_inputs(heads, dtype, seed=0):
    """mla_attention_block's inputs for MINICPM3's head dims, packed as SEQLENS."""
    gen = torch.Generator().manual_seed(seed)
    T, d, lq, hidden = sum(SEQLENS), MINICPM3, 48, 64

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(True)

    angles = torch.rand(T, d.rope // 2, generator=gen) * 6.28
    return dict(q_a=rand(T, lq), q_norm_weight=rand(lq), wq_b=rand(heads * (d.nope + d.rope), lq, scale=lq ** -0.5),
                kv_a=rand(T, d.latent + d.rope), kv_norm_weight=rand(d.latent),
                wkv_b=rand(heads * (d.nope + d.v), d.latent, scale=d.latent ** -0.5),
                wo=rand(hidden, heads * d.v, scale=(heads * d.v) ** -0.5), bo=None,
                cos=angles.cos().to(dtype), sin=angles.sin().to(dtype))


@pytest.mark.parametrize("max_seqlen, reads", [(max(SEQLENS), 0), (None, 1)], ids=["given", "not-given"])
def test_block_reads_once_over_its_head_groups(max_seqlen, reads):
    """Four head groups, each run forward, again in backward, and backward: one read at most, and
    the block's grads equal those of the run that learnt max_seqlen itself."""
    inputs, cu = block_inputs(heads=4, dtype=torch.bfloat16), cu_seqlens_of(SEQLENS)
    with torch_mla.use_core("simt"), Counted() as n:
        y = torch_mla.mla_attention_block(**inputs, num_heads=4, cu_seqlens=cu, max_seqlen=max_seqlen)
        grads = torch.autograd.grad(y.float().sum(), [inputs["q_a"], inputs["wkv_b"]])
    assert n.reads == reads
    with torch_mla.use_core("simt"):
        y_learnt = torch_mla.mla_attention_block(**inputs, num_heads=4, cu_seqlens=cu)
        grads_learnt = torch.autograd.grad(y_learnt.float().sum(), [inputs["q_a"], inputs["wkv_b"]])
    assert torch.equal(y, y_learnt) and all(torch.equal(a, b) for a, b in zip(grads, grads_learnt))


def test_one_selection_per_call():
    """auto selects once per forward+backward pair: not again in the device kernel, the backward,
    the block's head groups or the q-latent op's inner call; a named core is never a selection."""
    inputs, cu = make_inputs(SMALL, seqlens=SEQLENS)
    with Counted() as n:
        torch_mla.mla_attention(**inputs, cu_seqlens=cu).sum().backward()
    assert n.selections == 1
    with torch.no_grad(), Counted() as n:
        torch_mla.mla_attention(**inputs, cu_seqlens=cu)
    assert n.selections == 1
    with torch_mla.use_core("cpu"), Counted() as n:
        torch_mla.mla_attention(**inputs, cu_seqlens=cu).sum().backward()
    assert n.selections == 0
    block = block_inputs(heads=4, dtype=torch.float32)
    with Counted() as n:
        torch_mla.mla_attention_block(**block, num_heads=4, cu_seqlens=cu, head_chunks=4).sum().backward()
    assert n.selections == 1
    q_latent = {k: v.requires_grad_(True) for k, v in q_latent_inputs((sum(SEQLENS),)).items()}
    with Counted() as n:
        q_latent_op(**q_latent, rope_interleave=True, cu_seqlens=cu).sum().backward()
    assert n.selections == 1


def test_device_kernel_checks_without_the_autograd_layer():
    """In inference mode the Autograd kernel does not run: the device kernel checks on its own, and
    a checked call's token is not left for it (the same tensors, reshaped to a bad rank, raise)."""
    inputs, cu = make_inputs(SMALL, seqlens=SEQLENS, requires_grad=False)
    torch_mla.mla_attention(**inputs, cu_seqlens=cu)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"q must have shape \(T, H, Dn\+Dr\) \(packed"):
            torch_mla.mla_attention(**{**inputs, "q": inputs["q"].flatten(1)}, cu_seqlens=cu)
        with pytest.raises(ValueError, match=r"k_rope must have shape \(T, Dr\) with T \(from q\)"):
            torch_mla.mla_attention(**{**inputs, "k_rope": inputs["k_rope"][1:]}, cu_seqlens=cu)


def _cp_keeps_the_forward_core(rank, world):
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=16, seed=7)
    local = {k: (v.detach() if k == "wkv_b" else shard_sequence(v.detach())).requires_grad_(True)
             for k, v in inputs.items()}
    with Counted() as forward:
        out = context_parallel_mla_attention(**local)
    with Counted() as backward:
        out.sum().backward()
    assert (forward.selections, backward.selections) == (1, 0)
    # The forward's named core runs every part: a core forced around the forward only is kept.
    with torch_mla.use_core("composed"):
        out = context_parallel_mla_attention(**local)
    with Counted() as backward:
        out.sum().backward()
    assert backward.selections == 0
    dist.barrier()


@pytest.mark.timeout(120)
def test_context_parallel_backward_selects_no_core():
    run_ranks(_cp_keeps_the_forward_core, 2)


def test_environment_is_read_once(mla_env, monkeypatch):
    """TORCH_MLA_CORE is read once, not per call: a change is seen after the library reads it again."""
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=4, requires_grad=False)
    args = [inputs[k] for k in ("q", "kv_latent", "k_rope", "wkv_b")]
    monkeypatch.setenv("TORCH_MLA_CORE", "composed")
    assert torch_mla.explain(*args).core == "cpu"
    mla_env.setenv("TORCH_MLA_CORE", "composed")
    assert torch_mla.explain(*args).core == "composed"
