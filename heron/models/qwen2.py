"""Qwen2 / Qwen2.5 decoder: the Llama network with biases on the Q/K/V projections.

The biases are read off the checkpoint (``ModelConfig.attention_bias``). Unlike Llama,
llama.cpp stores Qwen2's Q/K weights in the Hugging Face row order, so there is nothing to
unpermute."""

from __future__ import annotations

import torch

from heron.models.config import ModelConfig
from heron.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    # End-of-turn and end-of-document, as Qwen2.5's generation_config lists them.
    end_of_generation_tokens = ("<|im_end|>", "<|endoftext|>")

    @staticmethod
    def gguf_tensor_fixup(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        return tensor
