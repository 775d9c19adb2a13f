"""Qwen2 / Qwen2.5 decoder: the Llama network with biases on the Q/K/V projections.

The biases are read off the checkpoint (``ModelConfig.attention_bias``). Unlike Llama,
llama.cpp stores Qwen2's Q/K weights in the Hugging Face row order, so there is nothing to
unpermute. Sliding windows, where ``use_sliding_window`` turns them on, bound the layers from
``max_window_layers`` on (or those ``layer_types`` names), as transformers' Qwen2 does."""

from __future__ import annotations

from typing import Any

import torch

from heron.errors import ModelLoadError
from heron.models.config import ModelConfig
from heron.models.llama import LlamaForCausalLM

# transformers' Qwen2Config defaults.
_SLIDING_WINDOW = 4096
_MAX_WINDOW_LAYERS = 28


class Qwen2ForCausalLM(LlamaForCausalLM):
    # End-of-turn and end-of-document, as Qwen2.5's generation_config lists them.
    end_of_generation_tokens = ("<|im_end|>", "<|endoftext|>")

    @staticmethod
    def sliding_layers(hf: dict[str, Any], num_layers: int) -> tuple[int | None, list[bool]]:
        """Layers slide only where ``use_sliding_window`` is set (Qwen2.5 configs name a window
        and leave it off)."""
        window = hf.get("sliding_window", _SLIDING_WINDOW) if hf.get("use_sliding_window") else None
        types = hf.get("layer_types")
        if types is None:
            first = hf.get("max_window_layers", _MAX_WINDOW_LAYERS)
            return window, [i >= first for i in range(num_layers)]
        if len(types) < num_layers:
            raise ModelLoadError(f"config.json: {len(types)} layer_types for {num_layers} layers")
        return window, [t == "sliding_attention" for t in types[:num_layers]]

    @staticmethod
    def gguf_tensor_fixup(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        return tensor
