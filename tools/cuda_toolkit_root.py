"""Print a CUDA toolkit root that torch's CMake config (find_package(Torch)) accepts.

A CUDA build of torch makes find_package(Torch) look for the whole toolkit (cudart, cuBLAS,
cuFFT, cuRAND, cuSPARSE, cuSOLVER, NVRTC headers and libraries). Machines with nvcc alone (like
our CI) lack the libraries, but the torch wheel's own `nvidia/cu13` package carries them, only
without the unversioned `libX.so` names CMake looks for. If the toolkit next to nvcc is complete
it is printed as is; otherwise a merged root of symlinks (nvcc's toolkit first, then the wheel's
headers and libraries) is made under build/cuda-root and printed. Prints nothing without nvcc.
"""
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def cuda_toolkit_root():
    base = _nvcc_root()
    if base is None:
        return None
    if _is_complete(base):
        return base
    merged = ROOT / "build" / "cuda-root"
    if not _is_complete(merged):
        shutil.rmtree(merged, ignore_errors=True)
        merged.mkdir(parents=True)
        for sub in ("bin", "nvvm"):
            if (base / sub).exists():
                (merged / sub).symlink_to(base / sub)
        wheel_dirs = _wheel_cuda_dirs()
        _link_all([base / "include"] + [d / "include" for d in wheel_dirs], merged / "include", False)
        _link_all([base / "lib64"] + [d / "lib" for d in wheel_dirs], merged / "lib64", True)
    return merged if _is_complete(merged) else base


if __name__ == "__main__":
    root = cuda_toolkit_root()
    if root is not None:
        print(root)
    sys.exit(0)
