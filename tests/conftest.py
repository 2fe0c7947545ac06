"""Fixtures and hooks only (shared helpers: support.py).

A test taking the `core` fixture runs once per (device, core) pair whose served-case list
(support.served_cases) holds a case its `cases` markers ask for; the body loops over those cases.
CUDA pairs, and tests marked `cuda`, are not collected where no CUDA device is present: they are
counted and the count is printed after collection, instead of showing as skips."""
import types

import pytest
import torch

import torch_mla
from support import cores_for, cuda_capability

NOT_COLLECTED = pytest.StashKey[int]()


def pytest_configure(config):
    config.stash[NOT_COLLECTED] = 0


def pytest_report_header(config):
    return f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"


def pytest_generate_tests(metafunc):
    if "core" in metafunc.fixturenames:
        filters = [m.kwargs for m in metafunc.definition.iter_markers("cases")]
        cores = cores_for(filters, cuda_capability())
        metafunc.parametrize("core", cores, ids=[c.id for c in cores], indirect=True)


def _needs_cuda(item) -> bool:
    callspec = getattr(item, "callspec", None)
    core = callspec.params.get("core") if callspec is not None else None
    return item.get_closest_marker("cuda") is not None or getattr(core, "device", None) == "cuda"


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector, name, obj):
    items = yield
    if torch.cuda.is_available() or not isinstance(items, list):
        return items
    kept = [item for item in items if not _needs_cuda(item)]
    collector.config.stash[NOT_COLLECTED] += len(items) - len(kept)
    return kept


def pytest_report_collectionfinish(config):
    # After collection (the count is known only then), and shown under -q, unlike the header.
    if not torch.cuda.is_available():
        return f"{config.stash[NOT_COLLECTED]} CUDA cases not collected: no CUDA device"
    return None


@pytest.fixture
def core(request):
    """A support.Core (device, core name, its cases for this test); the body runs inside
    torch_mla.use_core(name)."""
    with torch_mla.use_core(request.param.name):
        yield request.param


@pytest.fixture
def mla_env(monkeypatch):
    """monkeypatch for torch_mla's environment variables, which the library reads once, not per
    call (docs/design.md §10.3): ``mla_env.setenv(name, value)`` and ``mla_env.delenv(name)`` change
    one and have the library read them again; the test's end restores them and reads again."""
    def read_again(change):
        def apply(*args):
            change(*args)
            torch.ops.torch_mla._read_environment()
        return apply

    yield types.SimpleNamespace(setenv=read_again(monkeypatch.setenv), delenv=read_again(monkeypatch.delenv))
    monkeypatch.undo()
    torch.ops.torch_mla._read_environment()
