"""scripts/kernel_resources.py, the resource gate of our CUDA kernels (docs/design.md §10.2), without
nvcc: its parsing of ptxas -v lines (a sample in the format CUDA 13's ptxas prints, as nvcc and a
ninja build log carry it), its verdicts against a table, and the checked-in table's coverage of
every kernel instantiated from generate_kernels.py's SHAPES. The compiling half runs in
scripts/test_cpp.sh where nvcc exists."""
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kr = load("kernel_resources", ROOT / "scripts" / "kernel_resources.py")
generate_kernels = load("generate_kernels", ROOT / "csrc" / "torch_mla" / "cores" / "cuda" / "generate_kernels.py")

pytestmark = pytest.mark.skipif(shutil.which("cu++filt") is None and shutil.which("c++filt") is None,
                                reason="no demangler (cu++filt or c++filt)")

FWD = "_ZN9torch_mla4cuda18mla_forward_kernelI13__nv_bfloat16NS0_13ForwardTraitsILi192ELi128EEEEEvNS0_9MlaParamsE"
BWD = ("_ZN9torch_mla4cuda19mla_backward_kernelI13__nv_bfloat16NS0_14BackwardTraitsILi192ELi128EEELb1EEEv"
       "NS0_9MlaParamsE")
PRE = "_ZN9torch_mla4cuda30mla_backward_preprocess_kernelI6__halfEEvNS0_9MlaParamsEi"


def entry(name, arch, registers, stack, stores, loads, callee=None):
    """One entry function's lines as ptxas -v prints them; `callee`: a non-inlined device function
    whose own properties come before and after the kernel's (they must not be taken for them)."""
    callee_lines = [f"ptxas info    : Function properties for {callee}",
                    "    96 bytes stack frame, 64 bytes spill stores, 64 bytes spill loads"] if callee else []
    return "\n".join([f"ptxas info    : Compiling entry function '{name}' for '{arch}'", *callee_lines,
                      f"ptxas info    : Function properties for {name}",
                      f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads",
                      *callee_lines,
                      f"ptxas info    : Used {registers} registers, used 1 barriers, {stack} bytes cumulative stack "
                      "size",
                      "ptxas info    : Compile time = 674.848 ms"])


def log(*entries):
    # As a build log carries them: other output around, the gmem line first.
    return "\n".join(["[3/9] Building CUDA object mla_forward_bf16.cu.o", "ptxas info    : 190 bytes gmem",
                      *entries, "[4/9] Linking CXX shared library libtorch_mla.so"])


SAMPLE = log(entry(FWD, "sm_90", 203, 0, 0, 0), entry(BWD, "sm_90", 255, 24, 20, 20, callee="_Z9helperv"),
             entry(PRE, "sm_80", 32, 0, 0, 0))
NAMES = {"fwd": "mla_forward<bf16,192,128>", "bwd": "mla_backward<bf16,192,128,atomic_dq>",
         "pre": "mla_backward_preprocess<fp16>"}


def test_parses_each_kernel_and_not_its_callee():
    table = kr.readable(kr.parse_ptxas(SAMPLE))
    assert table == {
        ("sm_90", NAMES["fwd"]): kr.Usage(registers=203, spill_stores=0, spill_loads=0, stack=0),
        ("sm_90", NAMES["bwd"]): kr.Usage(registers=255, spill_stores=20, spill_loads=20, stack=24),
        ("sm_80", NAMES["pre"]): kr.Usage(registers=32, spill_stores=0, spill_loads=0, stack=0),
    }


def test_short_names_of_every_kernel_template():
    assert kr.short_name("void torch_mla::cuda::mla_backward_kernel<__half, torch_mla::cuda::BackwardTraits<96, 64>, "
                         "false>(torch_mla::cuda::MlaParams)") == "mla_backward<fp16,96,64,deterministic>"
    assert kr.short_name("void torch_mla::cuda::mla_backward_dq_kernel<__nv_bfloat16, torch_mla::cuda::DqTraits<192, "
                         "128> >(torch_mla::cuda::MlaParams)") == "mla_backward_dq<bf16,192,128>"


def table_of(text):
    return kr.readable(kr.parse_ptxas(text))


def test_a_spill_or_stack_above_the_table_fails_by_name():
    table = table_of(SAMPLE)
    worse = table_of(log(entry(FWD, "sm_90", 203, 8, 4, 0), entry(BWD, "sm_90", 255, 24, 20, 28),
                         entry(PRE, "sm_80", 32, 0, 0, 0)))
    failures, warnings = kr.compare(worse, table, ["sm_80", "sm_90"])
    assert warnings == []
    assert len(failures) == 3
    assert any(NAMES["fwd"] in f and "spill stores" in f for f in failures)
    assert any(NAMES["fwd"] in f and "stack frame" in f for f in failures)
    assert any(NAMES["bwd"] in f and "28 bytes of spill loads" in f for f in failures)


def test_fewer_spills_pass_and_more_registers_only_warn():
    table = table_of(SAMPLE)
    better = table_of(log(entry(FWD, "sm_90", 210, 0, 0, 0), entry(BWD, "sm_90", 240, 0, 0, 0),
                          entry(PRE, "sm_80", 32, 0, 0, 0)))
    failures, warnings = kr.compare(better, table, ["sm_80", "sm_90"])
    assert failures == []
    assert len(warnings) == 1 and NAMES["fwd"] in warnings[0] and "210 registers" in warnings[0]


def test_a_kernel_new_or_missing_fails_asking_for_update():
    table = table_of(SAMPLE)
    fewer = table_of(log(entry(FWD, "sm_90", 203, 0, 0, 0), entry(PRE, "sm_80", 32, 0, 0, 0)))
    failures, _ = kr.compare(fewer, table, ["sm_80", "sm_90"])
    assert len(failures) == 1 and NAMES["bwd"] in failures[0] and "--update" in failures[0]
    failures, _ = kr.compare(table, {k: v for k, v in table.items() if k[1] != NAMES["pre"]}, ["sm_80", "sm_90"])
    assert len(failures) == 1 and NAMES["pre"] in failures[0] and "--update" in failures[0]
    # An arch outside the ones checked (a log of one arch) is not asked for.
    failures, _ = kr.compare(fewer, table, ["sm_80"])
    assert failures == []


def test_from_log_check_exit_status(tmp_path, capsys):
    table = tmp_path / "table.txt"
    table.write_text(kr.TABLE_HEADER + kr.format_table(table_of(SAMPLE)))
    same, worse = tmp_path / "same.log", tmp_path / "worse.log"
    same.write_text(SAMPLE)
    worse.write_text(SAMPLE.replace("20 bytes spill stores", "36 bytes spill stores"))
    assert kr.main(["--from-log", str(same), "--check", "--table", str(table)]) == 0
    capsys.readouterr()
    assert kr.main(["--from-log", str(worse), "--check", "--table", str(table)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL: {NAMES['bwd']} on sm_90: 36 bytes of spill stores, the table has 20" in out


def test_the_checked_in_table_has_every_instantiated_kernel_on_both_archs():
    expected = set()
    for dtype in generate_kernels.DTYPES:
        expected.add(f"mla_backward_preprocess<{dtype}>")
        for qk, v in generate_kernels.SHAPES:
            shape = f"{dtype},{qk},{v}"
            expected |= {f"mla_forward<{shape}>", f"mla_backward<{shape},atomic_dq>",
                         f"mla_backward<{shape},deterministic>", f"mla_backward_dq<{shape}>"}
    table = kr.read_table(kr.TABLE)
    for arch in kr.ARCHS:
        assert {k for a, k in table if a == arch} == expected, arch
