#!/usr/bin/env python3
"""The resource gate of our CUDA kernels (docs/design.md §10.2): ptxas's report of every kernel.

Compiles each instantiation file (csrc/torch_mla/cores/cuda/mla_{forward,backward}_{bf16,fp16}.cu)
as the build does, with its compile command from CMake (a configure of its own in
build/resources, CUDA on, exporting compile_commands.json), as a device-only cubin per arch
(sm_80, sm_90) with `-Xptxas -v`, and reads each kernel's registers, spill stores / loads (bytes)
and stack frame (bytes).

    python scripts/kernel_resources.py            # print the table
    python scripts/kernel_resources.py --check    # exit 1 on more spills or stack than the table
    python scripts/kernel_resources.py --update   # rewrite the table
    python scripts/kernel_resources.py --from-log build.log   # the table of any build log's
                                                              # ptxas -v lines (no compiling)

--check fails, naming the kernel, on a spill or stack frame above the checked-in table
(csrc/torch_mla/cores/cuda/kernel_resources.txt) and on a kernel missing from it or new to it;
more registers is a warning (occupancy is a choice, a spill is not). With --from-log it checks
only the archs the log has.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "torch_mla" / "cores" / "cuda"
TABLE = CUDA_DIR / "kernel_resources.txt"
SOURCES = [f"mla_{p}_{t}.cu" for p in ("forward", "backward") for t in ("bf16", "fp16")]
ARCHS = ("sm_80", "sm_90")


class Usage(NamedTuple):
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int


Key = Tuple[str, str]  # (arch, kernel's short name)

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPERTIES = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> Dict[Tuple[str, str], Usage]:
    """{(arch, mangled name): Usage} of every entry function in `log`'s ptxas -v lines. The lines
    of one entry come in order (entry, its properties, its frame line, its registers); properties
    of a non-inlined device function inside it name another function and are skipped."""
    found: Dict[Tuple[str, str], Usage] = {}
    entry: Optional[Tuple[str, str]] = None
    props: Optional[str] = None
    frame = (0, 0, 0)
    for line in log.splitlines():
        if m := ENTRY.search(line):
            entry, props, frame = (m.group(2), m.group(1)), None, (0, 0, 0)
        elif m := PROPERTIES.search(line):
            props = m.group(1)
        elif (m := FRAME.search(line)) and entry is not None and props == entry[1]:
            frame = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := REGISTERS.search(line)) and entry is not None:
            stack, stores, loads = frame
            found[entry] = Usage(int(m.group(1)), stores, loads, stack)
            entry = None
    return found


def demangler() -> List[str]:
    for tool in ("cu++filt", "c++filt"):
        if path := shutil.which(tool):
            return [path]
    sys.exit("kernel_resources: no demangler (cu++filt from the CUDA toolkit, or c++filt from binutils)")


def demangle(names: Iterable[str]) -> Dict[str, str]:
    names = sorted(set(names))
    if not names:
        return {}
    out = subprocess.run(demangler(), input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def short_name(demangled: str) -> str:
    """torch_mla::cuda::mla_backward_kernel<__nv_bfloat16, torch_mla::cuda::BackwardTraits<192, 128>,
    true>(torch_mla::cuda::MlaParams) -> mla_backward<bf16,192,128,atomic_dq>."""
    s = demangled.split("(")[0].removeprefix("void ")
    s = re.sub(r"\b\w+::", "", s)
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    s = re.sub(r"\w+Traits<([^<>]*)>", r"\1", s)
    s = s.replace("_kernel<", "<").replace(" ", "")
    # mla_backward_kernel's bool is kAtomicDq: false is the deterministic path's dK/dV kernel.
    if s.startswith("mla_backward<"):
        s = s.replace(",true>", ",atomic_dq>").replace(",false>", ",deterministic>")
    return s


def readable(found: Dict[Tuple[str, str], Usage]) -> Dict[Key, Usage]:
    names = demangle(name for _, name in found)
    table: Dict[Key, Usage] = {}
    for (arch, name), usage in found.items():
        key = (arch, short_name(names[name]))
        if key in table and table[key] != usage:
            sys.exit(f"kernel_resources: two kernels read as {key[1]} on {arch}: the short names need "
                     "another rule (scripts/kernel_resources.py short_name)")
        table[key] = usage
    return table


def format_table(table: Dict[Key, Usage]) -> str:
    width = max([len(k) for _, k in table] + [len("kernel")])
    lines = [f"{'arch':<6} {'kernel':<{width}} {'registers':>9} {'spill_st':>8} {'spill_ld':>8} {'stack':>5}"]
    for (arch, kernel), u in sorted(table.items()):
        lines.append(f"{arch:<6} {kernel:<{width}} {u.registers:>9} {u.spill_stores:>8} {u.spill_loads:>8} "
                     f"{u.stack:>5}")
    return "\n".join(lines) + "\n"


TABLE_HEADER = """\
# ptxas -v of every kernel of cores/cuda, per arch: registers, spill stores and loads (bytes),
# stack frame (bytes). Written by `python scripts/kernel_resources.py --update`; `make test` runs
# --check where nvcc exists, which fails on more spills or stack than this, or on a kernel missing
# or new (docs/design.md §10.2).
"""


def read_table(path: Path) -> Dict[Key, Usage]:
    table: Dict[Key, Usage] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("arch "):
            continue
        arch, kernel, *numbers = line.split()
        table[(arch, kernel)] = Usage(*map(int, numbers))
    return table


def compare(measured: Dict[Key, Usage], table: Dict[Key, Usage], archs: Iterable[str]) -> Tuple[List[str], List[str]]:
    """(failures, warnings) of `measured` against `table`, on `archs` only."""
    archs = set(archs)
    failures, warnings = [], []
    expected = {k: v for k, v in table.items() if k[0] in archs}
    measured = {k: v for k, v in measured.items() if k[0] in archs}
    for key in sorted(set(expected) | set(measured)):
        arch, kernel = key
        if key not in expected:
            failures.append(f"{kernel} on {arch}: new, not in the table (run scripts/kernel_resources.py --update)")
            continue
        if key not in measured:
            failures.append(f"{kernel} on {arch}: in the table, not compiled (run scripts/kernel_resources.py "
                            "--update)")
            continue
        now, then = measured[key], expected[key]
        for field, what in (("spill_stores", "spill stores"), ("spill_loads", "spill loads"), ("stack", "stack frame")):
            if getattr(now, field) > getattr(then, field):
                failures.append(f"{kernel} on {arch}: {getattr(now, field)} bytes of {what}, the table has "
                                f"{getattr(then, field)}")
        if now.registers > then.registers:
            warnings.append(f"{kernel} on {arch}: {now.registers} registers, the table has {then.registers}")
    return failures, warnings


# ---- compiling -------------------------------------------------------------------------------

def find_nvcc(given: Optional[str]) -> str:
    for candidate in (given, shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                   "bin", "nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("kernel_resources: no nvcc (give --nvcc, put it on PATH or set CUDA_HOME)")


def compile_commands(build: Path, nvcc: str) -> Dict[str, dict]:
    """The build's compile command of each instantiation file, from a CUDA configure of this tree
    in `build` (re-run when CMakeLists.txt is newer than it)."""
    db = build / "compile_commands.json"
    if not db.exists() or db.stat().st_mtime < (ROOT / "CMakeLists.txt").stat().st_mtime:
        import torch  # only for its CMake prefix, as scripts/test_cpp.sh finds it
        cmd = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DTORCH_MLA_CUDA=ON",
               "-DTORCH_MLA_CUDA_ARCHS=80;90", "-DTORCH_MLA_SIMT=OFF", "-DTORCH_MLA_BUILD_TESTS=OFF",
               "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"kernel_resources: the CMake configure failed:\n{done.stdout}{done.stderr}")
    commands = {Path(e["file"]).name: e for e in json.loads(db.read_text())}
    missing = [s for s in SOURCES if s not in commands]
    if missing:
        sys.exit(f"kernel_resources: {build}/compile_commands.json has no command for {missing}")
    return {s: commands[s] for s in SOURCES}


def cubin_command(entry: dict, nvcc: str, arch: str, out: Path) -> List[str]:
    """The build's command with its outputs replaced: a device-only cubin of `arch`, ptxas -v."""
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    kept, skip = [nvcc], False
    for a in args[1:]:
        if skip:
            skip = False
        elif a in ("-c", "-o", "-gencode", "-arch", "--generate-code", "-MD", "-MT", "-MF"):
            skip = a not in ("-c", "-MD")
        elif not a.startswith(("-gencode=", "--generate-code=", "-arch=", "--gpu-architecture=")):
            kept.append(a)
    return kept + ["-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(out)]


def compile_all(build: Path, nvcc: str, jobs: int) -> str:
    commands = compile_commands(build, nvcc)
    with tempfile.TemporaryDirectory() as tmp:
        def run(item):
            (source, entry), arch = item
            cmd = cubin_command(entry, nvcc, arch, Path(tmp) / f"{source}.{arch}.cubin")
            done = subprocess.run(cmd, cwd=entry["directory"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{source} for {arch} does not compile:\n{shlex.join(cmd)}\n{done.stdout}"
                                   f"{done.stderr}")
            return done.stdout + done.stderr
        items = [(c, a) for c in commands.items() for a in ARCHS]
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            try:
                return "\n".join(pool.map(run, items))
            except RuntimeError as e:
                sys.exit(f"kernel_resources: {e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare with the table; exit 1 on more spills/stack")
    mode.add_argument("--update", action="store_true", help="rewrite the table")
    parser.add_argument("--from-log", type=Path, help="parse this build log instead of compiling")
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "resources")
    parser.add_argument("--nvcc")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.update and args.from_log:
        parser.error("--update compiles every arch itself: not with --from-log")

    start = time.monotonic()
    if args.from_log:
        log = args.from_log.read_text(errors="replace")
    else:
        log = compile_all(args.build_dir, find_nvcc(args.nvcc), max(1, args.jobs))
    measured = readable(parse_ptxas(log))
    if not measured:
        print(f"kernel_resources: no ptxas -v lines in {args.from_log or 'the compiler output'}", file=sys.stderr)
        return 1
    archs = sorted({a for a, _ in measured}) if args.from_log else list(ARCHS)
    print(format_table(measured), end="")
    seconds = time.monotonic() - start

    if args.update:
        args.table.write_text(TABLE_HEADER + format_table(measured))
        print(f"kernel_resources: wrote {args.table} ({len(measured)} kernels, {seconds:.0f} s)")
    elif args.check:
        failures, warnings = compare(measured, read_table(args.table), archs)
        for w in warnings:
            print(f"kernel_resources: warning: {w}")
        for f in failures:
            print(f"kernel_resources: FAIL: {f}")
        verdict = "FAILED" if failures else "passed"
        print(f"kernel_resources: check {verdict} ({len(measured)} kernels on {', '.join(archs)}, {seconds:.0f} s)")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
