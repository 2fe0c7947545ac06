"""What CMake needs to build C++ code against the installed torch_mla (and the torch it runs with).

    python -m torch_mla.cmake                 # -D options for cmake: CMAKE_PREFIX_PATH and, for a
                                              # CUDA torch, the CUDA toolkit root (one per line)
    python -m torch_mla.cmake --prefix-path   # torch_mla's and torch's CMake prefixes, ';'-separated
    python -m torch_mla.cmake --torch-prefix  # torch's alone (torch.utils.cmake_prefix_path)
    python -m torch_mla.cmake --cuda-root     # the CUDA toolkit root alone (nothing without nvcc)

A CUDA build of torch makes find_package(Torch) look for the whole CUDA toolkit (nvcc, and the
cudart, cuBLAS, cuFFT, cuRAND, cuSPARSE, cuSOLVER, NVRTC headers and libraries). Machines with nvcc
alone lack the libraries, but the torch wheel's own `nvidia/cu*` packages carry them, only without
the unversioned `libX.so` names CMake looks for. If the toolkit next to nvcc is complete it is
printed as is; otherwise a merged root of symlinks (nvcc's toolkit first, then the wheel's headers
and libraries) is made (in --dir, by default a per-user cache directory) and printed.

The torch_mla build runs this file as a script (`python python/torch_mla/cmake.py --cuda-root`),
before the package exists: it imports nothing of torch_mla, and imports torch only when asked for
torch's prefix.
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path


def _nvcc_root():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # /usr/local/bin/nvcc may be a wrapper script: prefer the real toolkit path when the
    # conventional /usr/local/cuda exists.
    for candidate in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (candidate / "bin" / "nvcc").exists() and (candidate / "include" / "cuda.h").exists():
            return candidate
    return None


def _is_complete(root: Path) -> bool:
    return (root / "include" / "cublas_v2.h").exists() and any(
        (root / lib / "libcublas.so").exists() for lib in ("lib64", "lib"))


def _wheel_cuda_dirs():
    """The torch wheel's CUDA packages (site-packages/nvidia/cu*), found without importing torch."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [p for base in spec.submodule_search_locations for p in sorted(Path(base).glob("cu*"))
            if (p / "include").is_dir()]


def _link_all(sources, dest: Path, add_unversioned: bool):
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not src.is_dir():
            continue
        for f in sorted(src.iterdir()):
            names = [f.name]
            if add_unversioned and ".so." in f.name:
                names.append(f.name.split(".so.")[0] + ".so")
            for name in names:
                if not (dest / name).exists():
                    (dest / name).symlink_to(f)


def _default_dir(base: Path, wheel_dirs) -> Path:
    # One merged root per (toolkit, wheel CUDA packages): several venvs never share a stale one.
    key = hashlib.sha256("\n".join(map(str, [base, *wheel_dirs])).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_mla" / f"cuda-root-{key}"


def cuda_toolkit_root(directory=None):
    """A CUDA toolkit root that find_package(Torch) accepts, or None without nvcc.

    `directory` is where a merged root is made when the toolkit next to nvcc is incomplete."""
    base = _nvcc_root()
    if base is None:
        return None
    if _is_complete(base):
        return base
    wheel_dirs = _wheel_cuda_dirs()
    merged = Path(directory) if directory is not None else _default_dir(base, wheel_dirs)
    if not _is_complete(merged):
        shutil.rmtree(merged, ignore_errors=True)
        merged.mkdir(parents=True)
        for sub in ("bin", "nvvm"):
            if (base / sub).exists():
                (merged / sub).symlink_to(base / sub)
        _link_all([base / "include"] + [d / "include" for d in wheel_dirs], merged / "include", False)
        _link_all([base / "lib64"] + [d / "lib" for d in wheel_dirs], merged / "lib64", True)
    return merged if _is_complete(merged) else base


def torch_prefix() -> str:
    import torch
    return torch.utils.cmake_prefix_path


def torch_mla_prefix() -> str:
    """The prefix of the CMake package inside the installed Python package (lib/cmake/TorchMLA)."""
    if __package__:
        from . import cmake_prefix_path
        return cmake_prefix_path
    return str(Path(__file__).resolve().parent)


def cmake_args(directory=None):
    """-D options that find_package(TorchMLA) needs: the two prefixes and, for a CUDA torch, the
    CUDA toolkit root (both spellings torch's CMake config reads)."""
    import torch
    args = [f"-DCMAKE_PREFIX_PATH={torch_mla_prefix()};{torch_prefix()}"]
    root = cuda_toolkit_root(directory) if torch.version.cuda else None
    if root is not None:
        args += [f"-DCUDAToolkit_ROOT={root}", f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m torch_mla.cmake",
        description="Print what CMake needs to build against torch_mla: with no option, the -D "
                    "options (one per line; `cmake ... $(python -m torch_mla.cmake)` when no path "
                    "has a space).")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prefix-path", action="store_true",
                      help="torch_mla's and torch's CMake prefixes, ';'-separated (CMAKE_PREFIX_PATH)")
    what.add_argument("--torch-prefix", action="store_true",
                      help="torch's CMake prefix (torch.utils.cmake_prefix_path)")
    what.add_argument("--cuda-root", action="store_true",
                      help="a CUDA toolkit root for CUDAToolkit_ROOT / CUDA_TOOLKIT_ROOT_DIR; "
                           "prints nothing without nvcc")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to make the merged CUDA toolkit root when one is needed "
                             "(default: ~/.cache/torch_mla/cuda-root-<hash>)")
    args = parser.parse_args(argv)
    if args.cuda_root:
        root = cuda_toolkit_root(args.dir)
        if root is not None:
            print(root)
    elif args.prefix_path:
        print(f"{torch_mla_prefix()};{torch_prefix()}")
    elif args.torch_prefix:
        print(torch_prefix())
    else:
        print("\n".join(cmake_args(args.dir)))
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a script: our module names must not shadow others' (torch's)
        here = Path(__file__).resolve().parent
        sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())
