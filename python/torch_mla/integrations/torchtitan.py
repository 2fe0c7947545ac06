"""torchtitan's DeepSeek-V3 attention on torch_mla (docs/design.md §14).

One line in a torchtitan model registry (``converters=[TorchMLAConverter.Config()]``) swaps every
DeepSeek-V3 ``Attention.Config`` for :class:`TorchMLAAttention.Config`: the same parameters, the
same state-dict keys, the same numbers, but attention runs in ``torch_mla.mla_attention`` (or
``mla_attention_q_latent`` when ``q_lora_rank > 0``), which saves the latents for backward instead
of per-head K/V. :class:`TorchMLASelectiveAC` is torchtitan's selective activation checkpointing
with our ops on its save list, so the recompute in backward does not run our forward again.

Importing this module imports torchtitan (``pip install torchtitan``).
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

try:
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.models.common.attention import FlexAttention, VarlenAttention, VarlenMetadata
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.rope import ComplexRoPE
    from torchtitan.models.deepseek_v3.model import Attention
    from torchtitan.protocols.model import ModelConfigConverter
    from torchtitan.protocols.module import Module
except ImportError as e:  # the package does not depend on torchtitan; this module does
    raise ImportError("torch_mla.integrations.torchtitan needs torchtitan "
                      "(pip install torchtitan==0.3.0)") from e

from ..nn.glue import MlaGlue, Projections, latent_attention

__all__ = ["TorchMLAAttention", "TorchMLAConverter", "TorchMLASelectiveAC", "torch_mla_save_ops"]


def _unsupported(setting: str, why: str) -> NotImplementedError:
    return NotImplementedError(f"torch_mla: DeepSeek-V3 attention on torch_mla does not support "
                               f"{setting}: {why}")


class TorchMLAAttention(Attention):
    """torchtitan's DeepSeek-V3 MLA ``Attention`` with its core in torch_mla (docs/design.md §14).

    Built from the stock config, so parameters (``wq`` or ``wq_a``/``q_norm``/``wq_b``, ``wkv_a``,
    ``kv_norm``, ``wkv_b``, ``wo``), buffers and state-dict keys are the stock module's. The
    projections run as the stock ones; ``wkv_b`` (rows per head ``[k_nope | v]``) and, with
    q LoRA, ``wq_b`` are handed to the op as weights, so K, V (and q) are expanded inside it and
    only the latents are saved. RoPE rotates with the cos/sin of torchtitan's own complex cache
    (its real and imaginary parts), adjacent pairs as ``ComplexRoPE`` does.

    forward(x (B, S, dim), attention_masks: None (causal over each row) | VarlenMetadata (causal
    within each document, torchtitan's ``create_varlen_metadata_for_document``), positions
    (B|1, S) | None) → (B, S, dim).

    Under tensor parallelism (torchtitan's DeepSeek-V3 plan, ``spmd_types`` backend) the module
    sees the local shards of ``wq``/``wq_b``, ``wkv_b`` and ``wo`` and runs the op on its local
    heads. Context parallelism raises: torchtitan wires CP into ``inner_attention``, which this
    module does not call.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Attention.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        if not isinstance(self.rope, ComplexRoPE):
            raise _unsupported(f"rope={type(self.rope).__name__}",
                               "only ComplexRoPE (adjacent-pair rotation, DeepSeek-V3's) is wired")
        if isinstance(self.inner_attention, VarlenAttention) and \
                tuple(self.inner_attention.window_size) != (-1, 0):
            raise _unsupported(f"inner_attention.window_size={tuple(self.inner_attention.window_size)}",
                               "sliding windows are not implemented; only (-1, 0), causal")
        weights = {"wkv_b": self.wkv_b} | ({"wq_b": self.wq_b} if self.q_lora_rank > 0 else {})
        for name, linear in weights.items():
            if type(linear) is not Linear:  # a LoRA or quantized linear has more than .weight
                raise _unsupported(f"{name}={type(linear).__name__}",
                                   "the op reads the plain weight; apply TorchMLAConverter to a "
                                   "model whose wkv_b (and wq_b) are torchtitan Linear")
            if linear.bias is not None:
                raise _unsupported(f"{name} with bias", "the op's up-projections have no bias")
        # DeepSeek-V3's glue (docs/design.md §15): ComplexRoPE pairs adjacent dimensions.
        self.glue = MlaGlue(qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                            v_head_dim=self.v_head_dim, rope_layout="interleaved", softmax_scale=self.softmax_scale)

    def parallelize(self, parallel_dims) -> None:
        if parallel_dims.cp_enabled:
            raise _unsupported(f"context parallelism (cp={parallel_dims.cp})",
                               "torchtitan applies CP inside inner_attention, which torch_mla's "
                               "fused attention bypasses; torch_mla.distributed has a latent "
                               "all-gather CP that is not wired into torchtitan")
        if parallel_dims.tp_enabled and parallel_dims.spmd_backend != "spmd_types":
            raise _unsupported(f"tensor parallelism with spmd_backend={parallel_dims.spmd_backend!r}",
                               "use parallelism.spmd_backend='spmd_types' (torchtitan's default), "
                               "where the module sees its local weight shards")
        super().parallelize(parallel_dims)

    def _cos_sin(self, positions: Optional[torch.Tensor], batch: int, seqlen: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, S, Dr/2) float32: the real and imaginary parts of the complex cache
        ``cos + i·sin`` at the positions (arange(S) when None), as ComplexRoPE reads it."""
        cache = torch.view_as_real(self.rope.cache)  # (max_seq_len, Dr/2, 2)
        if positions is None:
            table = cache[:seqlen].unsqueeze(0)
        else:
            if positions.dim() != 2 or positions.shape[-1] != seqlen:
                raise ValueError(f"torch_mla: positions must be (B or 1, {seqlen}), got "
                                 f"{tuple(positions.shape)}")
            table = cache[positions]
        table = table.expand(batch, seqlen, *table.shape[2:])
        return table[..., 0], table[..., 1]

    def _sequences(self, attention_masks):
        """(cu_seqlens, max_seqlen) of the documents, or (None, None) for causal padded rows. The
        op checks cu_seqlens against the B·S packed tokens (docs/design.md §3.2)."""
        if attention_masks is None:
            return None, None
        if isinstance(attention_masks, VarlenMetadata):
            m = attention_masks
            if m.cu_seq_q is not m.cu_seq_k and not torch.equal(m.cu_seq_q, m.cu_seq_k):
                raise _unsupported("VarlenMetadata with cu_seq_q != cu_seq_k",
                                   "queries and keys must share their documents")
            return m.cu_seq_q.to(torch.int32), max(m.max_q, m.max_k)
        raise _unsupported(f"attention_masks of type {type(attention_masks).__name__}",
                           "torch_mla takes None (causal) or VarlenMetadata (causal documents); "
                           "TorchMLAConverter switches inner_attention to varlen so that the "
                           "model builds the latter from positions")

    def forward(self, x: torch.Tensor, attention_masks, positions: Optional[torch.Tensor] = None):
        if "forward" in vars(self.inner_attention) and not self.inner_attention._parallelized:
            # Only torchtitan's CP (apply_cp_to_forward) rewraps inner_attention outside parallelize().
            raise _unsupported("context parallelism", "inner_attention's forward was wrapped "
                               "(torchtitan's apply_cp_to_forward); this module does not call it")
        batch, seqlen, _ = x.shape
        cu_seqlens, max_seqlen = self._sequences(attention_masks)
        cos, sin = self._cos_sin(positions, batch, seqlen)
        if cu_seqlens is not None:  # packed documents: (B, S, ...) → (T, ...), the op's varlen layout
            x, cos, sin = (t.reshape(batch * seqlen, t.shape[-1]) for t in (x, cos, sin))
        # The one glue, on torchtitan's submodules; under tensor parallelism (spmd_types) they hold
        # this rank's shards as plain tensors, so the op runs the local heads.
        out, _, _ = latent_attention(self, x, cos, sin, glue=self.glue,
                                     save="q" if self.q_lora_rank == 0 else "q_latent",
                                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, projections=self._projections())
        return out.view(batch, seqlen, -1)

    def _projections(self) -> Projections:
        """torchtitan's submodules under Hugging Face's roles (``wq`` is q_proj, ``wq_a``/``q_norm``/
        ``wq_b`` q_a_proj/q_a_layernorm/q_b_proj, ``wkv_a``/``kv_norm``/``wkv_b``
        kv_a_proj_with_mqa/kv_a_layernorm/kv_b_proj, ``wo`` o_proj)."""
        if self.q_lora_rank == 0:
            q = dict(q_a_proj=None, q_norm=None, q_proj=self.wq, q_name="wq")
        else:
            q = dict(q_a_proj=self.wq_a, q_norm=self.q_norm, q_proj=self.wq_b, q_name="wq_b")
        return Projections(**q, kv_a_proj=self.wkv_a, kv_norm=self.kv_norm, kv_b_proj=self.wkv_b, o_proj=self.wo)


class TorchMLAConverter(ModelConfigConverter):
    """Swaps every DeepSeek-V3 ``Attention.Config`` of a model config for
    :class:`TorchMLAAttention.Config` (docs/design.md §14)::

        model_registry("16B", converters=[TorchMLAConverter.Config()])

    A FlexAttention inner attention becomes VarlenAttention: both mean causal attention within
    the documents that ``positions`` delimit, and the varlen metadata (document offsets) is what
    the op takes, so no BlockMask is built. Raises if the tree has no DeepSeek-V3 attention.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        pass

    def __init__(self, config: Config, **kwargs):
        self.config = config

    def convert(self, model_config: Module.Config) -> Module.Config:
        converted = 0
        for fqn, cfg, parent, attr in list(model_config.traverse(Attention.Config, recurse=True)):
            if isinstance(cfg, TorchMLAAttention.Config):
                continue
            if type(cfg) is not Attention.Config:
                raise _unsupported(f"{fqn}: {type(cfg).__qualname__}",
                                   "only torchtitan's stock DeepSeek-V3 Attention is converted")
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
            if isinstance(fields["inner_attention"], FlexAttention.Config):
                fields["inner_attention"] = VarlenAttention.Config()
            new_cfg = TorchMLAAttention.Config(**fields)
            if parent is None:
                model_config = new_cfg
            elif isinstance(parent, list):
                parent[attr] = new_cfg
            else:
                setattr(parent, attr, new_cfg)
            converted += 1
        if converted == 0 and not any(True for _ in model_config.traverse(TorchMLAAttention.Config,
                                                                          recurse=True)):
            raise ValueError("torch_mla: TorchMLAConverter found no DeepSeek-V3 Attention.Config "
                             "in the model config")
        return model_config


def torch_mla_save_ops() -> set:
    """torch_mla's forward ops, for a selective-AC save list: under SAC their outputs (out, lse)
    are kept, so the backward's recompute does not run the attention forward again."""
    return {torch.ops.torch_mla.mla_attention.default,
            torch.ops.torch_mla.mla_attention_q_latent.default}


class TorchMLASelectiveAC(SelectiveAC):
    """torchtitan's ``SelectiveAC`` with :func:`torch_mla_save_ops` added to its save list::

        Trainer.Config(activation_checkpoint=TorchMLASelectiveAC.Config(), ...)
    """

    @dataclass(kw_only=True, slots=True)
    class Config(SelectiveAC.Config):
        pass

    def get_save_ops(self) -> set:
        return super().get_save_ops() | torch_mla_save_ops()
