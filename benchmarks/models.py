"""A small decoder-only language model built from MultiHeadLatentAttention, for train_fsdp_cp.py
and the distributed tests (DeepSeek-style blocks: pre-RMSNorm, MLA, gated SiLU MLP)."""
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch_mla import MultiHeadLatentAttention
from torch_mla.nn import RMSNorm


@dataclass
class MLAConfig:
    """Sizes of the model; the attention sizes are named as Hugging Face's DeepSeek configs."""
    vocab_size: int = 64
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    q_lora_rank: Optional[int] = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    save_q_latent: bool = True
    extra: dict = field(default_factory=dict)

    def attention(self) -> MultiHeadLatentAttention:
        return MultiHeadLatentAttention(
            hidden_size=self.hidden_size, num_heads=self.num_heads, q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            rope_theta=self.rope_theta, save_q_latent=self.save_q_latent, **self.extra)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attn = config.attention()
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, cu_seqlens=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states),
                                                       cu_seqlens=cu_seqlens)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MLATransformerLM(nn.Module):
    """tokens (B, S) → logits (B, S, vocab); or packed tokens (T,) with cu_seqlens → (T, vocab)."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(tokens)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cu_seqlens=cu_seqlens)
        return self.lm_head(self.norm(hidden_states))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] (padded batches)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def periodic_sequences(batch: int, seqlen: int, vocab_size: int, generator: torch.Generator,
                       min_period: int = 3, max_period: int = 8) -> torch.Tensor:
    """A synthetic language: each sequence repeats a random motif of random length, so
    after one period every token is predictable by looking back (what attention learns)."""
    periods = torch.randint(min_period, max_period + 1, (batch, 1), generator=generator)
    motifs = torch.randint(0, vocab_size, (batch, max_period), generator=generator)
    index = torch.arange(seqlen).unsqueeze(0) % periods
    return motifs.gather(1, index)
