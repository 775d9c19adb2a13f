"""The shape of a decoder-only model, read from GGUF metadata or a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from heron.layers.rope_scaling import RopeScaling


@dataclass
class ModelConfig:
    architecture: str  # registry key, e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # RoPE scaling of the model's (global) layers, from rope_scaling / rope_parameters or the
    # GGUF's rope.scaling.* and rope_freqs.
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False  # Q/K/V projections have biases (Qwen2); read off the weights
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Family-specific settings (e.g. sliding windows) that only that family's file reads.
    extra: dict[str, Any] = field(default_factory=dict)
