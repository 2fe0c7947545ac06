"""torch_mla: Multi-Head Latent Attention for training, saving only the latents for backward.

`mla_attention` is the functional op; `reference.mla_attention_reference` is the float64-capable
specification every kernel is tested against.
"""
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
torch.ops.load_library(str(_PACKAGE_DIR / "lib" / "libtorch_mla.so"))

#: Pass to CMake (``-DCMAKE_PREFIX_PATH``) to build C++ code against the library in this package.
cmake_prefix_path = str(_PACKAGE_DIR)

from .backends import explain, use_backend  # noqa: E402
from .functional import mla_attention  # noqa: E402
from . import reference  # noqa: E402
from .memory import SavedTensors  # noqa: E402
from .q_latent import mla_attention_q_latent  # noqa: E402
from .modules import MultiHeadLatentAttention  # noqa: E402
from .hf import patch_model  # noqa: E402

__all__ = ["mla_attention", "use_backend", "explain", "reference", "SavedTensors", "cmake_prefix_path",
           "mla_attention_q_latent", "MultiHeadLatentAttention", "patch_model"]
__version__ = "0.1.0"
