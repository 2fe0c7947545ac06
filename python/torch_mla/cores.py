"""Which attention core runs a call (docs/design.md §10.3): force one, or ask which and why.

Cores: ``cudnn``, ``kernels``, ``efficient``, ``composed``, ``cpu`` and ``simt`` (tests only). The
default, ``"auto"``, lets the environment variable ``TORCH_MLA_BACKEND`` force one, else picks by
device, dtype, head dims, packing and determinism. The backward always runs the forward's core.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

CORES = ("cudnn", "kernels", "efficient", "composed", "cpu", "simt")

_forced: Optional[str] = None


def current_backend() -> str:
    """The backend the functional ops pass on: the innermost :func:`use_backend`, else ``"auto"``."""
    return _forced or "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs torch_mla's ops inside the block on the core ``name`` (or ``"auto"``).

    A core that cannot serve a call raises a ValueError naming why and which cores could. Enter it
    outside a ``torch.compile``'d function: the choice is fixed when the function is traced.
    """
    global _forced
    if name != "auto" and name not in CORES:
        raise ValueError(f"torch_mla.use_backend: name must be 'auto' or one of {', '.join(CORES)}, got {name!r}")
    previous, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = previous


@dataclass(frozen=True)
class CoreChoice:
    """The core a call takes, and for every core ``None`` (can serve) or why it cannot."""
    core: str
    reasons: Dict[str, Optional[str]]

    def __str__(self) -> str:
        lines = [f"torch_mla runs this call on the {self.core!r} core"]
        lines += [f"  {name:<10} {'yes' if why is None else 'no: ' + why}" for name, why in self.reasons.items()]
        return "\n".join(lines)


def _parse(text: str) -> CoreChoice:
    core, *lines = text.strip().split("\n")
    reasons = {}
    for line in lines:
        name, verdict = line.split(": ", 1)
        reasons[name] = None if verdict == "yes" else verdict[len("no: "):]
    return CoreChoice(core, reasons)


def explain(q: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor, wkv_b: torch.Tensor, *,
            cu_seqlens: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> CoreChoice:
    """Which core :func:`torch_mla.mla_attention` would run on these arguments, and why.

    Takes the op's tensors (shapes as :func:`torch_mla.mla_attention`); reads no data. ``backend``
    defaults to the current one (:func:`use_backend`, then ``TORCH_MLA_BACKEND``).
    """
    text = torch.ops.torch_mla._explain(q, kv_latent, k_rope, wkv_b, cu_seqlens, backend or current_backend())
    return _parse(text)


def compiled_kernel_archs() -> List[int]:
    """The archs this build compiled our CUDA kernels for (90 = sm_90); empty without them."""
    return list(torch.ops.torch_mla._kernel_archs())


def choose_core(*, device: str, capability: int = 0, dtype: torch.dtype, dim_nope: int, dim_rope: int,
                dim_v: int, varlen: bool = False, deterministic: bool = False, cudnn_version: int = 0,
                kernel_archs=(), simt_built: bool = False, backend: str = "auto") -> CoreChoice:
    """The selection rule on a described call (no tensors, no device needed): for tests and tables.

    ``capability`` is 10·major + minor (90 = sm_90), ``cudnn_version`` 10000·major + 100·minor, and
    ``kernel_archs`` the archs our CUDA kernels are compiled for (empty: not compiled).
    """
    text = torch.ops.torch_mla._choose_core(device, capability, dtype, dim_nope, dim_rope, dim_v, varlen,
                                            deterministic, cudnn_version, list(kernel_archs), simt_built, backend)
    return _parse(text)
