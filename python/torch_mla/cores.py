"""Which attention core runs a call (docs/design.md §10.3): force one, or ask which and why.

The cores are the library's own (:func:`names`, asked of the C++ core table): ``cudnn``, ``cuda``
(our CUDA kernels), ``efficient``, ``composed``, ``cpu`` and ``simt`` (tests only). The default,
``"auto"``, lets the environment variable ``TORCH_MLA_CORE`` force one, else picks by device,
dtype, head dims, packing and determinism. The backward always runs the forward's core.

Deprecated for one release: :func:`use_backend` and ``explain(backend=...)`` (use :func:`use_core`
and ``core=``), and the core name ``"kernels"`` (now ``"cuda"``).
"""
import contextlib
import functools
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

# Per thread (not a module global): a use_core block in one thread does not change the core another
# thread's calls run on. A threading.local rather than a ContextVar: torch.compile traces its read
# and guards on the value on torch 2.11 and 2.14, while torch 2.11's Dynamo cannot trace
# ContextVar.get (fullgraph=True failed there; the GPU machine runs 2.11).
_local = threading.local()


@functools.lru_cache(maxsize=None)
def names() -> Tuple[str, ...]:
    """The attention cores of the loaded library, in the order of its core table (asked once)."""
    return tuple(torch.ops.torch_mla._core_names())


def _core_name(name: str, who: str, stacklevel: int) -> str:
    """`name`, with the deprecated alias "kernels" (our CUDA core before 0.2) replaced by "cuda"."""
    if name == "kernels":
        warnings.warn(f"{who}: the core name 'kernels' is deprecated, use 'cuda'", DeprecationWarning,
                      stacklevel=stacklevel + 1)
        name = "cuda"
    return name


def current_core() -> str:
    """The core the functional ops pass on: the innermost :func:`use_core` of this thread, else
    ``"auto"``."""
    return getattr(_local, "core", "auto")


def _use(name: str, who: str):
    name = _core_name(name, who, stacklevel=4)
    if name != "auto" and name not in names():
        raise ValueError(f"{who}: name must be 'auto' or one of {', '.join(names())}, got {name!r}")
    previous, _local.core = current_core(), name
    try:
        yield
    finally:
        _local.core = previous


@contextlib.contextmanager
def use_core(name: str) -> Iterator[None]:
    """Runs torch_mla's ops inside the block on the core ``name`` (or ``"auto"``), in this thread
    only.

    A core that cannot serve a call raises a ValueError naming why and which cores could. Enter it
    outside a ``torch.compile``'d function: the choice is fixed when the function is traced.
    """
    yield from _use(name, "torch_mla.use_core")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Deprecated alias of :func:`use_core`."""
    warnings.warn("torch_mla.use_backend is deprecated, use torch_mla.use_core", DeprecationWarning, stacklevel=3)
    yield from _use(name, "torch_mla.use_backend")


#: The first thing ``auto`` tries for a sparse call on CPU tensors (docs/design.md §16.5): running it
#: as dense causal attention where every row selects its whole causal prefix.
DENSE_SHORTCUT = "dense shortcut"


@dataclass(frozen=True)
class CoreChoice:
    """The core a call takes, and for every core ``None`` (can serve) or why it cannot.

    For a sparse call (``sparse``: :func:`explain` with ``topk_indices``, or :func:`choose_core` with
    ``sparse=True``) the reasons are about each core's sparse form, and :func:`explain`'s answer
    starts with :data:`DENSE_SHORTCUT`: ``None`` where the call runs as dense causal attention
    (``core`` is then the core :func:`torch_mla.mla_attention` takes), else why not.
    """
    core: str
    reasons: Dict[str, Optional[str]]
    sparse: bool = False

    @property
    def dense_shortcut(self) -> bool:
        """Whether the call runs as dense causal attention (docs/design.md §16.5)."""
        return DENSE_SHORTCUT in self.reasons and self.reasons[DENSE_SHORTCUT] is None

    def __str__(self) -> str:
        if self.dense_shortcut:
            head = f"torch_mla runs this sparse call as dense causal attention on the {self.core!r} core"
        else:
            head = f"torch_mla runs this {'sparse ' if self.sparse else ''}call on the {self.core!r} core"
        width = max(10, *(len(name) for name in self.reasons))
        lines = [head] + [f"  {name:<{width}} {'yes' if why is None else 'no: ' + why}"
                          for name, why in self.reasons.items()]
        return "\n".join(lines)


def _parse(text: str, sparse: bool = False) -> CoreChoice:
    core, *lines = text.strip().split("\n")
    reasons = {}
    for line in lines:
        name, verdict = line.split(": ", 1)
        reasons[name] = None if verdict == "yes" else verdict[len("no: "):]
    return CoreChoice(core, reasons, sparse)


def _requested(core: Optional[str], backend: Optional[str], who: str) -> str:
    """The core asked for by ``core=`` or the deprecated ``backend=``, else the current one."""
    if backend is not None:
        warnings.warn(f"{who}: backend= is deprecated, use core=", DeprecationWarning, stacklevel=3)
        if core is not None:
            raise TypeError(f"{who}: give core= or backend=, not both")
        core = backend
    return current_core() if core is None else _core_name(core, who, stacklevel=3)


def explain(q: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor, wkv_b: torch.Tensor, *,
            topk_indices: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
            core: Optional[str] = None, backend: Optional[str] = None) -> CoreChoice:
    """Which core :func:`torch_mla.mla_attention` would run on these arguments, and why; with
    ``topk_indices``, which :func:`torch_mla.mla_sparse_attention` would run (its sparse core, or
    the dense shortcut and the dense core it takes, docs/design.md §16.5).

    Takes the op's tensors (shapes as the op); reads no data but the indices of a sparse call, which
    it checks as the call does on CPU tensors. ``core`` defaults to the current one
    (:func:`use_core`, then ``TORCH_MLA_CORE``); ``backend`` is its deprecated name.
    """
    requested = _requested(core, backend, "torch_mla.explain")
    if topk_indices is not None:
        return _parse(torch.ops.torch_mla._explain_sparse(q, kv_latent, k_rope, wkv_b, topk_indices, cu_seqlens,
                                                          requested), sparse=True)
    return _parse(torch.ops.torch_mla._explain(q, kv_latent, k_rope, wkv_b, cu_seqlens, requested))


def compiled_kernel_archs() -> List[int]:
    """The archs this build compiled our CUDA kernels for (90 = sm_90); empty without them."""
    return list(torch.ops.torch_mla._kernel_archs())


def choose_core(*, device: str, capability: int = 0, dtype: torch.dtype, dim_nope: int, dim_rope: int,
                dim_v: int, varlen: bool = False, deterministic: bool = False, cudnn_version: int = 0,
                kernel_archs=(), simt_built: bool = False, core: str = "auto",
                backend: Optional[str] = None, sparse: bool = False) -> CoreChoice:
    """The selection rule on a described call (no tensors, no device needed): for tests and tables.

    ``capability`` is 10·major + minor (90 = sm_90), ``cudnn_version`` 10000·major + 100·minor, and
    ``kernel_archs`` the archs our CUDA kernels are compiled for (empty: not compiled). ``core``:
    the requested core (``backend`` is its deprecated name). ``sparse``: the rule over the cores'
    sparse forms (a sparse call's dense shortcut depends on its indices: :func:`explain` tells).
    """
    requested = _requested(None if backend is not None else core, backend, "torch_mla.cores.choose_core")
    text = torch.ops.torch_mla._choose_core(device, capability, dtype, dim_nope, dim_rope, dim_v, varlen,
                                            deterministic, cudnn_version, list(kernel_archs), simt_built,
                                            requested, sparse)
    return _parse(text, sparse)


#: The orders of our kernels' CTAs (docs/design.md §10.2): the default first.
GRID_ORDERS = ("query_fastest", "head_fastest")


@contextlib.contextmanager
def grid_order(order: str) -> Iterator[None]:
    """Our kernels' grids in ``order`` (one of :data:`GRID_ORDERS`) inside the block, process-wide,
    the previous order restored after: the A/B of the benchmarks and the emulator tests."""
    previous = torch.ops.torch_mla._set_grid_order(order)
    try:
        yield
    finally:
        torch.ops.torch_mla._set_grid_order(previous)
