"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral), one plain module.

Q/K/V and gate/up projections are fused into single matmuls at load time. RoPE scaling
(Llama 3.x's ``llama3``, YaRN...) is the rotary table's (heron.layers.rope_scaling); Mistral's
sliding window bounds every layer's attention. Qwen2 is this network with Q/K/V biases and
its own choice of sliding layers (``qwen2.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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

# transformers' MistralConfig default, for a config.json that does not set sliding_window.
_MISTRAL_SLIDING_WINDOW = 4096


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            qkv_bias=cfg.attention_bias,
            sliding=sliding,
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
    sliding_window: int | None = None  # None: every layer attends to the whole context
    end_of_generation_tokens: tuple[str, ...] = ()  # stop tokens beyond the checkpoint's EOS
    default_chat_template: str | None = None  # for checkpoints that carry none
    gguf_block_names: dict[str, str] = {}  # GGUF per-block tensor names that differ by family

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        hf = cfg.extra.get("hf_config", {})
        window, sliding = self.sliding_layers(hf, cfg.num_layers)
        if window is not None and any(sliding):
            self.sliding_window = int(window)
        else:
            sliding = [False] * cfg.num_layers
        self.embed_tokens = empty_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, s) for s in sliding)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
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

    @staticmethod
    def sliding_layers(hf: dict[str, Any], num_layers: int) -> tuple[int | None, list[bool]]:
        """The sliding window of a Hugging Face config and which layers attend within it:
        Mistral's ``sliding_window`` bounds every layer (4096 where config.json does not say,
        as transformers' MistralConfig); Llama's config has none."""
        if hf.get("model_type") != "mistral":
            return None, [False] * num_layers
        return hf.get("sliding_window", _MISTRAL_SLIDING_WINDOW), [True] * num_layers

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
