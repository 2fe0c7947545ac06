"""Measuring what autograd keeps for backward: the yardstick of torch_mla's memory claims."""
from typing import Dict, Tuple

import torch


class SavedTensors:
    """Records every tensor autograd saves for backward inside the ``with`` block.

    Tensors are deduplicated by storage (a view saved twice, or a parameter, costs its storage
    once), which is what the saved tensors really hold in memory::

        with SavedTensors() as saved:
            out = torch_mla.mla_attention(q, kv_latent, k_rope, wkv_b)
        saved.nbytes                      # all storages kept alive for backward
        saved.nbytes_excluding(wkv_b)     # activations only (parameters left out)
    """

    def __init__(self):
        self.storages: Dict[Tuple[torch.device, int], int] = {}
        self.dtypes: Dict[Tuple[torch.device, int], torch.dtype] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = self._key(tensor)
        self.storages[key] = tensor.untyped_storage().nbytes()
        self.dtypes.setdefault(key, tensor.dtype)
        return tensor

    @staticmethod
    def _key(tensor: torch.Tensor) -> Tuple[torch.device, int]:
        return tensor.device, tensor.untyped_storage().data_ptr()

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the storage of `tensor` is among the saved ones."""
        return self._key(tensor) in self.storages

    def nbytes_excluding(self, *tensors: torch.Tensor) -> int:
        """Saved bytes without the storages of `tensors` (e.g. the parameters)."""
        skip = {self._key(t) for t in tensors}
        return sum(n for k, n in self.storages.items() if k not in skip)

    def nbytes_by_dtype(self, *excluding: torch.Tensor) -> Dict[torch.dtype, int]:
        """Saved bytes per dtype (of the tensor saved first on each storage), without the storages
        of `excluding`."""
        skip = {self._key(t) for t in excluding}
        totals: Dict[torch.dtype, int] = {}
        for key, n in self.storages.items():
            if key not in skip:
                totals[self.dtypes[key]] = totals.get(self.dtypes[key], 0) + n
        return totals
