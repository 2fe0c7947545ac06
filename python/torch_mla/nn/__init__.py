"""torch_mla's modules: :class:`MultiHeadLatentAttention` and :class:`RMSNorm` (attention.py), the
one latent-block glue every integration runs (glue.py) and the one RoPE (rope.py)."""
from .attention import MultiHeadLatentAttention, RMSNorm

__all__ = ["MultiHeadLatentAttention", "RMSNorm"]
