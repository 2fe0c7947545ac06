"""The selection rule (docs/design.md §10.3) as a table: described calls (no GPU needed) → core.

Each row: device, compute capability, dtype, (Dn, Dr, Dv), packed, deterministic, cuDNN version,
archs our kernels were compiled for → the core `auto` takes.
"""
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import torch_mla
from torch_mla.cores import choose_core
from support import SMALL, TENSOR_ARGS, make_inputs, run_with_grads

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
DSV3 = (128, 64, 128)
MINICPM3 = (64, 32, 64)
ALL_ARCHS = (80, 86, 89, 90)
CUDNN = 91900
# The order `auto` tries cores in (docs/design.md §10.3); simt (the emulator, tests only) is in none.
AUTO_ORDER = {"cpu": ["cpu", "composed"], "cuda": ["cudnn", "cuda", "efficient", "composed"]}

TABLE = [
    # device, cap, dtype, dims, varlen, deterministic, cudnn, archs, expected
    ("cpu", 0, BF16, DSV3, False, False, 0, (), "cpu"),
    ("cpu", 0, FP64, (4, 2, 3), True, True, 0, (), "cpu"),
    ("cuda", 90, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, "cudnn"),        # H100/H200: cuDNN first
    ("cuda", 90, FP16, MINICPM3, False, False, CUDNN, ALL_ARCHS, "cudnn"),
    ("cuda", 90, BF16, DSV3, True, False, CUDNN, ALL_ARCHS, "cuda"),       # packed: no ragged cuDNN
    ("cuda", 90, BF16, DSV3, False, True, CUDNN, ALL_ARCHS, "cuda"),       # deterministic
    ("cuda", 90, BF16, DSV3, False, False, 0, ALL_ARCHS, "cuda"),          # torch without cuDNN
    ("cuda", 90, BF16, DSV3, True, False, CUDNN, (), "efficient"),            # built without nvcc
    ("cuda", 90, FP32, DSV3, False, False, CUDNN, ALL_ARCHS, "efficient"),    # fp32
    ("cuda", 90, FP64, DSV3, False, False, CUDNN, ALL_ARCHS, "composed"),     # fp64: nothing fused
    ("cuda", 90, BF16, (124, 68, 128), True, False, CUDNN, ALL_ARCHS, "efficient"),  # Dn % 8 != 0: not ours
    ("cuda", 90, BF16, (124, 70, 128), True, False, CUDNN, ALL_ARCHS, "composed"),   # Dn+Dr = 194
    ("cuda", 90, BF16, (16, 8, 16), False, False, CUDNN, ALL_ARCHS, "cudnn"),  # small dims: cuDNN takes them
    ("cuda", 90, BF16, (16, 8, 16), True, False, CUDNN, ALL_ARCHS, "efficient"),
    ("cuda", 80, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, "cuda"),      # A100: our kernels
    ("cuda", 80, BF16, DSV3, True, True, CUDNN, ALL_ARCHS, "cuda"),
    ("cuda", 86, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, "efficient"),    # 145 KiB backward > 99 KiB
    ("cuda", 89, BF16, MINICPM3, True, False, CUDNN, ALL_ARCHS, "cuda"),   # (96, 64) fits 99 KiB
    ("cuda", 89, BF16, DSV3, False, True, CUDNN, ALL_ARCHS, "composed"),      # deterministic, too big
    ("cuda", 87, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, "cuda"),      # Orin: sm_86 SASS, 163 KiB
    ("cuda", 90, BF16, DSV3, True, False, CUDNN, (80,), "efficient"),         # sm_80 SASS does not run on sm_90
    ("cuda", 100, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, "cudnn"),       # Blackwell: cuDNN
    ("cuda", 100, BF16, DSV3, True, False, CUDNN, ALL_ARCHS, "efficient"),
    ("cuda", 75, FP16, DSV3, False, False, CUDNN, ALL_ARCHS, "efficient"),
    ("cuda", 75, FP16, DSV3, False, True, CUDNN, ALL_ARCHS, "composed"),
]


def describe(row, core="auto"):
    device, cap, dtype, (dn, dr, dv), varlen, det, cudnn, archs, _ = row
    return choose_core(device=device, capability=cap, dtype=dtype, dim_nope=dn, dim_rope=dr, dim_v=dv,
                       varlen=varlen, deterministic=det, cudnn_version=cudnn, kernel_archs=archs, core=core)


@pytest.mark.parametrize("row", TABLE, ids=[f"{r[0]}{r[1] or ''}-{str(r[2])[6:]}-{r[3]}-{'packed' if r[4] else 'padded'}"
                                            f"{'-det' if r[5] else ''}-{r[8]}" for r in TABLE])
def test_auto_rule(row):
    choice = describe(row)
    assert choice.core == row[-1], str(choice)
    # auto takes the first core of its order that serves the call: each one before it declined.
    order = AUTO_ORDER[row[0]]
    declined = order[:order.index(choice.core)]
    assert all(choice.reasons[core] is not None for core in declined), str(choice)
    # composed serves everything.
    assert choice.reasons["composed"] is None


def test_every_declined_core_says_why():
    choice = describe(("cuda", 86, BF16, DSV3, False, True, CUDNN, ALL_ARCHS, None))
    assert "148480 B of shared memory per CTA, sm_86 allows 101376" in choice.reasons["cuda"]
    assert "deterministic" in choice.reasons["efficient"]
    assert "sm_90 and later" in choice.reasons["cudnn"]
    assert choice.reasons["cpu"] == "runs on CPU tensors only"


def test_forced_core_is_taken_or_refused_with_reasons():
    row = ("cuda", 90, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, None)
    assert describe(row, core="efficient").core == "efficient"
    with pytest.raises(ValueError, match=r'"cpu" cannot serve this call: runs on CPU tensors only\. '
                                         r"Cores that can: cudnn, cuda, efficient, composed"):
        describe(row, core="cpu")


def test_environment_variable_forces_a_core(mla_env):
    inputs, _ = make_inputs(SMALL, batch=1, seqlen=4, requires_grad=False)
    args = [inputs[k] for k in TENSOR_ARGS]
    assert torch_mla.explain(*args).core == "cpu"
    mla_env.setenv("TORCH_MLA_BACKEND", "composed")  # the older name, read for one release
    assert torch_mla.explain(*args).core == "composed"
    mla_env.setenv("TORCH_MLA_CORE", "cpu")  # the new name wins
    assert torch_mla.explain(*args).core == "cpu"
    mla_env.delenv("TORCH_MLA_BACKEND")
    mla_env.setenv("TORCH_MLA_CORE", "composed")
    assert torch_mla.explain(*args).core == "composed"
    with torch_mla.use_core("cpu"):  # an explicit choice wins over the environment
        assert torch_mla.explain(*args).core == "cpu"


def test_backward_runs_the_forward_core():
    """A core forced around the forward only still runs the backward (the Function records it):
    the grads equal, bit for bit, those of a call run wholly on that core, and differ from the
    other CPU core's (so the comparison can tell the cores apart)."""
    inputs, _ = make_inputs(SMALL, batch=2, seqlen=70, dtype=torch.float32)

    def forward_only_on(core):
        def fn(**kw):
            with torch_mla.use_core(core):
                return torch_mla.mla_attention(**kw)
        return fn

    def wholly_on(core):
        with torch_mla.use_core(core):
            return run_with_grads(torch_mla.mla_attention, inputs)

    _, split = run_with_grads(forward_only_on("composed"), inputs)
    _, composed = wholly_on("composed")
    _, cpu = wholly_on("cpu")
    assert all(torch.equal(split[k], composed[k]) for k in split)
    assert not all(torch.equal(split[k], cpu[k]) for k in split)


# The sparse forms (docs/design.md §16.4): cpu and composed have one; on CPU auto takes cpu for every
# dtype, on CUDA composed.
SPARSE_TABLE = [
    ("cpu", 0, FP32, DSV3, False, False, 0, (), "cpu"),
    ("cpu", 0, BF16, DSV3, True, True, 0, (), "cpu"),
    ("cpu", 0, FP16, MINICPM3, False, False, 0, (), "cpu"),
    ("cpu", 0, FP64, (4, 2, 3), True, False, 0, (), "cpu"),
    ("cuda", 90, BF16, DSV3, False, False, CUDNN, ALL_ARCHS, "composed"),
    ("cuda", 80, FP32, DSV3, True, True, CUDNN, ALL_ARCHS, "composed"),
]


@pytest.mark.parametrize("row", SPARSE_TABLE, ids=[f"{r[0]}-{str(r[2])[6:]}-{r[8]}" for r in SPARSE_TABLE])
def test_sparse_auto_rule(row):
    device, cap, dtype, (dn, dr, dv), varlen, det, cudnn, archs, expected = row
    choice = choose_core(device=device, capability=cap, dtype=dtype, dim_nope=dn, dim_rope=dr, dim_v=dv,
                         varlen=varlen, deterministic=det, cudnn_version=cudnn, kernel_archs=archs, sparse=True)
    assert choice.sparse and choice.core == expected, str(choice)
    assert tuple(choice.reasons) == torch_mla.cores.names()
    for core in ("cudnn", "cuda", "efficient", "simt"):
        assert choice.reasons[core] == "has no sparse form", str(choice)
    assert choice.reasons["composed"] is None
    assert choice.reasons["cpu"] == (None if device == "cpu" else "runs on CPU tensors only")


def test_forced_sparse_core_is_taken_or_refused_with_reasons():
    def sparse_choice(device, core):
        return choose_core(device=device, capability=90 if device == "cuda" else 0, dtype=BF16, dim_nope=128,
                           dim_rope=64, dim_v=128, cudnn_version=CUDNN, kernel_archs=ALL_ARCHS, core=core,
                           sparse=True)

    assert sparse_choice("cpu", "composed").core == "composed"
    with pytest.raises(ValueError, match=r'^torch_mla.mla_sparse_attention: core "cpu" cannot serve this call: '
                                         r"runs on CPU tensors only\. Cores that can: composed$"):
        sparse_choice("cuda", "cpu")
    with pytest.raises(ValueError, match=r'core "cudnn" has no sparse form; a sparse call takes one of: '
                                         r"auto, cpu, composed"):
        sparse_choice("cuda", "cudnn")


def test_python_names_come_from_the_core_table():
    assert torch_mla.cores.names() == tuple(torch.ops.torch_mla._core_names())
    assert set(torch_mla.cores.names()) == {"cudnn", "cuda", "efficient", "cpu", "composed", "simt"}
    choice = describe(("cpu", 0, torch.float32, DSV3, False, False, 0, (), None))
    assert tuple(choice.reasons) == torch_mla.cores.names()  # explain lists every core, in table order


def test_use_core_is_per_thread():
    seen = {}

    def other_thread():
        seen["core"] = torch_mla.cores.current_core()

    with torch_mla.use_core("composed"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert torch_mla.cores.current_core() == "composed"
    assert seen["core"] == "auto"


def test_old_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="use_backend is deprecated"):
        with torch_mla.use_backend("cpu"):
            assert torch_mla.cores.current_core() == "cpu"
    with pytest.warns(DeprecationWarning, match="'kernels' is deprecated"):
        with torch_mla.use_core("kernels"):
            assert torch_mla.cores.current_core() == "cuda"


def test_tuned_shape_files_are_generated_from_the_one_list():
    script = Path(__file__).resolve().parent.parent / "csrc/torch_mla/cores/cuda/generate_kernels.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
