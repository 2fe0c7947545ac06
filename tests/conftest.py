from dataclasses import dataclass

import pytest
import torch

import torch_mla  # noqa: F401  (loads the operator library once for every test)
from mla_testing import TENSOR_ARGS, make_inputs

# Every (device, attention core) pair a test body runs on (docs/design.md §10.2); CUDA pairs skip
# without a GPU, and a pair skips a case its core cannot serve (with the selection rule's reason).
BACKENDS = [("cpu", "cpu"), ("cpu", "composed"), ("cpu", "simt"),
            ("cuda", "cudnn"), ("cuda", "kernels"), ("cuda", "efficient"), ("cuda", "composed")]


def pytest_report_header(config):
    return f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"


@dataclass(frozen=True)
class Backend:
    device: str
    core: str

    def inputs(self, dims, **kwargs):
        """make_inputs on this device; skips the test when the core cannot serve the call."""
        inputs, cu_seqlens = make_inputs(dims, device=self.device, **kwargs)
        self.skip_unless_served(inputs, cu_seqlens)
        return inputs, cu_seqlens

    def skip_unless_served(self, inputs, cu_seqlens=None):
        choice = torch_mla.explain(*(inputs[k] for k in TENSOR_ARGS), cu_seqlens=cu_seqlens, backend="auto")
        if choice.reasons[self.core] is not None:
            pytest.skip(f"{self.core}: {choice.reasons[self.core]}")


@pytest.fixture(params=BACKENDS, ids=[f"{d}-{c}" for d, c in BACKENDS])
def backend(request):
    """A (device, core) pair; the test body runs inside torch_mla.use_backend(core)."""
    device, core = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with torch_mla.use_backend(core):
        yield Backend(device, core)
