"""torch_mla: Multi-Head Latent Attention for training, saving only the latents for backward.

`mla_attention` is the functional op (ops.py, with its q-latent and block forms); `nn` holds the
module and the one latent-block glue, `integrations` the Hugging Face and torchtitan adapters,
`cores` the attention-core choice; `reference.mla_attention_reference` is the float64-capable
specification every kernel is tested against.
"""
from pathlib import Path

import torch


def _package_prefix() -> Path:
    # The directory of this package that holds lib/libtorch_mla.so (and include/, lib/cmake/): this
    # file's own in a wheel install; in an editable install (scikit-build-core) the built files
    # are in site-packages while the Python files stay in the source tree, and __path__ names both.
    for entry in __path__:
        if (Path(entry) / "lib" / "libtorch_mla.so").is_file():
            return Path(entry).resolve()
    raise ImportError(f"torch_mla: lib/libtorch_mla.so is in none of {list(__path__)}: "
                      "the package is not built (pip install . builds it)")


_PACKAGE_DIR = _package_prefix()
torch.ops.load_library(str(_PACKAGE_DIR / "lib" / "libtorch_mla.so"))

#: Pass to CMake (``-DCMAKE_PREFIX_PATH``) to build C++ code against the library in this package
#: (``python -m torch_mla.cmake`` prints everything CMake needs).
cmake_prefix_path = str(_PACKAGE_DIR)

from . import cores, reference  # noqa: E402
from .cores import explain, use_backend, use_core  # noqa: E402
from .ops import mla_attention, mla_attention_block, mla_attention_q_latent, rms_norm  # noqa: E402
from .ops import dsa_indexer_loss, dsa_indexer_topk, mla_sparse_attention  # noqa: E402
from .memory import SavedTensors  # noqa: E402
from .nn import MultiHeadLatentAttention  # noqa: E402
from .integrations.hf import patch_model  # noqa: E402

__all__ = ["mla_attention", "mla_attention_q_latent", "mla_attention_block", "rms_norm", "use_core", "explain",
           "reference", "SavedTensors", "cmake_prefix_path", "MultiHeadLatentAttention", "patch_model",
           "use_backend", "dsa_indexer_topk", "mla_sparse_attention", "dsa_indexer_loss"]
__version__ = "0.2.0"
