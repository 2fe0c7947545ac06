"""The wheel as a C++ user gets it (issue 13): built with `pip wheel`, installed into a scratch
directory outside the repository, then a consumer built there against it, as the README says
(`python -m torch_mla.cmake` for the CMake options, find_package(TorchMLA), TorchMLA::torch_mla)
and run, with libtorch_mla first on the link line and with Torch first.

Slow but part of `make test` (deselect with -m "not slow"): the first run builds the wheel
(CPU kernels only, TORCH_MLA_CUDA=0; the library still links torch's CUDA libraries when torch is
a CUDA build, which is what a RUNPATH must resolve) in build/test-packaging/wheel, which persists so
that later runs rebuild only what changed; the consumer compiles one LibTorch program.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WHEEL_BUILD_DIR = ROOT / "build" / "test-packaging" / "wheel"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _tool(name):
    """A tool of this venv (pip's cmake and ninja) before the system's."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get("PATH", "")]))


CMAKE = _tool("cmake")
NINJA = _tool("ninja")
CXX = shutil.which(os.environ.get("CXX", "c++"))
READELF = shutil.which("readelf")
if CMAKE is None or CXX is None:
    pytest.skip("needs cmake and a C++ compiler", allow_module_level=True)
if torch.version.cuda and shutil.which("nvcc") is None:
    # torch's own CMake config enables the CUDA language for a CUDA build of torch
    pytest.skip("a CUDA build of torch needs nvcc to be found by CMake", allow_module_level=True)


def run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (f"{cmd} exited {result.returncode}\n--- stdout\n"
                                    f"{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result.stdout


def clean_env(**extra):
    """The environment without anything that would find libraries for a program (LD_LIBRARY_PATH)
    or a torch_mla for Python (PYTHONPATH) behind our back."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    env.update(extra)
    return env


def dynamic_section(path):
    return run([READELF, "-d", path])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site-packages of the scratch directory holding the installed wheel, and the venv's torch
    (linked, not a second copy) beside it as in any site-packages."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheelhouse = tmp / "wheelhouse"
    jobs = os.environ.get("MAX_JOBS", "2")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--no-build-isolation", "--no-deps", "-w", wheelhouse,
         "-C", f"build-dir={WHEEL_BUILD_DIR}", ROOT],
        env=clean_env(TORCH_MLA_CUDA="0", TORCH_MLA_BUILD_TESTS="OFF", CMAKE_BUILD_PARALLEL_LEVEL=jobs), cwd=tmp)
    (wheel,) = wheelhouse.glob("torch_mla-*.whl")
    site = tmp / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--target", site, wheel], env=clean_env(), cwd=tmp)
    torch_site = Path(torch.__file__).resolve().parent.parent
    for name in ("torch", "nvidia"):   # nvidia/: the CUDA libraries of a CUDA torch
        if (torch_site / name).exists():
            (site / name).symlink_to(torch_site / name)
    return site


def scratch_python(site, *args, cwd):
    """The venv's python seeing the scratch install first: -S, so that no .pth file (the editable
    install's import hook) runs, and torch's own dependencies from the venv after it."""
    pythonpath = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    return run([sys.executable, "-S", *args], env=clean_env(PYTHONPATH=pythonpath), cwd=cwd)


def test_wheel_layout_and_runpath(site):
    package = site / "torch_mla"
    for path in ("lib/libtorch_mla.so", "include/torch_mla/torch_mla.h",
                 "lib/cmake/TorchMLA/TorchMLAConfig.cmake", "cmake.py", "integrations/torchtitan.py"):
        assert (package / path).is_file(), path
    # The public headers only: the layer stages, the cores and the kernels are internal.
    include = package / "include" / "torch_mla"
    assert sorted(p.name for p in include.iterdir()) == ["api", "ops", "torch_mla.h"]
    # LibTorch has no stable ABI: the wheel requires the torch release it was built against.
    (metadata,) = site.glob("torch_mla-*.dist-info/METADATA")
    requires = [line for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires == [f"Requires-Dist: torch=={torch.__version__.split('+')[0]}"], requires
    if READELF is None:
        pytest.skip("no readelf")
    section = dynamic_section(package / "lib" / "libtorch_mla.so")
    print(section)
    runpath = re.search(r"\(RUNPATH\)\s+Library runpath: \[(.*)\]", section)
    assert runpath and runpath.group(1).split(":") == ["$ORIGIN/../../torch/lib"], section
    assert "(RPATH)" not in section


def test_library_finds_its_torch_libraries_by_itself(site, tmp_path):
    """dlopen in a process that loaded nothing of torch before (no `import torch`, no
    LD_LIBRARY_PATH): every NEEDED torch library must come from libtorch_mla's own RUNPATH."""
    lib = site / "torch_mla" / "lib" / "libtorch_mla.so"
    out = run([sys.executable, "-S", "-c", f"import ctypes; ctypes.CDLL({str(lib)!r}); print('loaded')"],
              env=clean_env(), cwd=tmp_path)
    assert out.strip() == "loaded"


def test_cmake_module_prints_the_installed_prefix(site, tmp_path):
    args = scratch_python(site, "-m", "torch_mla.cmake", "--dir", tmp_path / "cuda-root",
                          cwd=tmp_path).split("\n")
    prefix_path = args[0].removeprefix("-DCMAKE_PREFIX_PATH=").split(";")
    assert Path(prefix_path[0]) == (site / "torch_mla").resolve()
    assert Path(prefix_path[1], "Torch", "TorchConfig.cmake").is_file()
    if torch.version.cuda and shutil.which("nvcc"):
        assert any(a.startswith("-DCUDAToolkit_ROOT=") for a in args), args


def test_consumer_runs_with_torch_mla_or_torch_first_on_the_link_line(site, tmp_path):
    source = tmp_path / "consumer"   # the consumer's own project, outside the repository
    shutil.copytree(ROOT / "tests" / "cpp" / "consumer", source)
    cmake_args = scratch_python(site, "-m", "torch_mla.cmake", "--dir", tmp_path / "cuda-root",
                                cwd=tmp_path).split()
    build = tmp_path / "build"
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}"] if NINJA else []
    run([CMAKE, "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DWITH_README_APP=ON",
         *generator, *cmake_args], env=clean_env(), cwd=tmp_path)
    run([CMAKE, "--build", build, "-j", os.environ.get("MAX_JOBS", "2")], env=clean_env(), cwd=tmp_path)

    for app, torch_mla_first in [("readme_app_torch_mla_first", True),
                                 ("readme_app_torch_first", False)]:
        if READELF is not None:   # the link order is the one the test is about
            needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", dynamic_section(build / app))
            torch_libs = [n for n in needed if n.startswith(("libtorch", "libc10")) and n != "libtorch_mla.so"]
            assert (needed.index("libtorch_mla.so") < needed.index(torch_libs[0])) == torch_mla_first, (app, needed)
            print(f"{app}: NEEDED {needed}")
        out = run([build / app], env=clean_env(), cwd=tmp_path)
        print(f"{app}: {out.strip()}")
        assert "grads finite" in out
    out = run([build / "dispatcher_only"], env=clean_env(), cwd=tmp_path)
    print(out.strip())
    assert "found and ran" in out


def test_find_package_refuses_another_torch_version(site, tmp_path):
    """A Torch whose version differs from the one libtorch_mla was built against is refused at
    find_package time, with the reason (a stand-in TorchConfig.cmake of version 2.0.0)."""
    fake = tmp_path / "fake-torch" / "Torch"
    fake.mkdir(parents=True)
    (fake / "TorchConfig.cmake").write_text('set(TORCH_LIBRARIES "")\nset(Torch_FOUND TRUE)\n')
    (fake / "TorchConfigVersion.cmake").write_text(
        'set(PACKAGE_VERSION "2.0.0")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n')
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(p LANGUAGES CXX)\n"
        "find_package(TorchMLA REQUIRED)\n")
    result = subprocess.run(
        [CMAKE, "-S", project, "-B", tmp_path / "build",
         f"-DCMAKE_PREFIX_PATH={site / 'torch_mla'};{fake.parent}"],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path)
    assert result.returncode != 0
    message = re.sub(r"\s+", " ", result.stderr)
    assert f"was built against Torch {torch.__version__.split('+')[0]}, but the Torch found is 2.0.0" in message, result.stderr
