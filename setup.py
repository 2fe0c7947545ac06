"""Builds torch_mla's one shared library with CMake (CMakeLists.txt holds the build) and installs it
into the package as torch_mla/lib/libtorch_mla.so, loaded with torch.ops.load_library.

CUDA sources are compiled when nvcc is on PATH and the installed torch is a CUDA build
(TORCH_MLA_CUDA=0/1 in the environment overrides the detection).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from cuda_toolkit_root import cuda_toolkit_root  # noqa: E402


def _want_cuda(torch) -> bool:
    forced = os.environ.get("TORCH_MLA_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def get_ext_filename(self, ext_name):
        # The library is a plain LibTorch library (no Python.h), named as C++ users link it.
        return os.path.join(*ext_name.split(".")[:-1], "libtorch_mla.so")

    def build_extension(self, ext):
        import torch

        lib_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # cmake --install lays out lib/, include/ and the CMake package config under the Python
        # package; an editable install lays them into the source tree.
        editable = getattr(self, "editable_mode", False) or self.inplace
        package_dir = ROOT / "python" / "torch_mla" if editable else lib_path.parent.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DTORCH_MLA_CUDA={'ON' if _want_cuda(torch) else 'OFF'}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        cuda_root = cuda_toolkit_root()
        if cuda_root is not None:
            cfg += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}", f"-DCUDAToolkit_ROOT={cuda_root}"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        subprocess.check_call(["cmake", "--install", str(build_dir), "--prefix", str(package_dir)])
        if package_dir / "lib" / lib_path.name != lib_path:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package_dir / "lib" / lib_path.name, lib_path)


setup(
    ext_modules=[Extension("torch_mla.lib.torch_mla", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
