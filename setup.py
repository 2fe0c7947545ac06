"""torch_mla's one build is CMakeLists.txt, run by scikit-build-core: pip uses scikit-build-core's
own PEP 517 backend (pyproject.toml), which also keeps a persistent build directory for editable
installs. This file runs the same CMake build through scikit-build-core's setuptools integration,
for tools that still call setup.py (`python setup.py bdist_wheel`; needs scikit-build-core and
setuptools, and always builds from scratch). Either way the wheel holds torch_mla/ with
lib/libtorch_mla.so (loaded with torch.ops.load_library), include/ and lib/cmake/TorchMLA.

CUDA sources are compiled when the torch found is a CUDA build (TORCH_MLA_CUDA=0/1 in the
environment overrides the detection; TORCH_MLA_CUDA_ARCHS="80;90" chooses the architectures).
"""
from setuptools import setup

setup(
    packages=["torch_mla"],
    package_dir={"": "python"},
    cmake_source_dir=".",
    cmake_install_dir="torch_mla",
)
