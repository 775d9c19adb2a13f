"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA), one plain module.

Q/K/V and gate/up projections are fused into single matmuls at load time. Qwen2 is this
network with Q/K/V biases (``qwen2.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heron.layers.attention import AttentionMetadata
from heron.layers.mlp import GatedMLP
from heron.layers.norm import RMSNorm
from heron.layers.rotary import RotaryEmbedding
from heron.layers.self_attention import SelfAttention
from heron.models.config import ModelConfig
from heron.models.decode_loop import DecodeLoop
from heron.models.weights import empty_embedding, load_fused_weights


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            qkv_bias=cfg.attention_bias,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, F.silu)

    def forward(self, x, cos_sin, kv_cache, meta) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        x, h = self.post_attention_layernorm.add_and_norm(h, x)
        return x + self.mlp(h)


class LlamaForCausalLM(nn.Module):
    """Takes a flat batch of tokens (no padding) and the step's attention metadata."""

    # What the engine and the loader ask of every family (Gemma3 sets them all):
    sliding_window: int | None = None  # every layer attends to the whole context
    end_of_generation_tokens: tuple[str, ...] = ()  # stop tokens beyond the checkpoint's EOS
    default_chat_template: str | None = None  # for checkpoints that carry none
    gguf_block_names: dict[str, str] = {}  # GGUF per-block tensor names that differ by family

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = empty_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Decode steps run the layers in one C++ loop where they may (heron.models.decode_loop).
        self.decode_loop = DecodeLoop(self.layers, "silu")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (normed), one row per input token.
        ``layers``: run only these layers (a self-speculative draft); None runs all."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, x.dtype)
        which = range(len(self.layers)) if layers is None else layers
        if self.decode_loop.applies(x, kv_caches, meta):
            x = self.decode_loop.run(x, cos_sin, kv_caches, meta, which)
        else:
            for i in which:
                x = self.layers[i](x, cos_sin, kv_caches[i], meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @staticmethod
    def gguf_tensor_fixup(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """llama.cpp stores Q/K rows interleaved for its RoPE; undo that to the HF layout."""
        if name.endswith("self_attn.q_proj.weight"):
            return _unpermute(tensor, cfg.num_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return _unpermute(tensor, cfg.num_kv_heads)
        return tensor

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_fused_weights(self, weights, self.config)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
