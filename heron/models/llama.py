"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA), one plain module.

Q/K/V and gate/up projections are fused into single matmuls at load time. Qwen2 is this
network with Q/K/V biases (``qwen2.py``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from heron import kernels
from heron.layers.attention import AttentionMetadata
from heron.layers.mlp import GatedMLP
from heron.layers.norm import RMSNorm
from heron.layers.quantized_linear import GEMV_MAX_ROWS, decode_spec
from heron.layers.rotary import RotaryEmbedding
from heron.layers.self_attention import SelfAttention
from heron.models.config import ModelConfig
from heron.models.weights import load_fused_weights


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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Decode steps through heron's C++ layer loop where it applies (``_decode_loop``);
        # off: always the Python layers (the loop's tests compare the two).
        self.decode_loop_enabled = True
        # (the loop, the most rows it takes), built on first use; False: not possible here
        self._decode_layers: tuple[object, int] | Literal[False] | None = None

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
        loop = self._decode_loop(x, kv_caches, meta)
        if loop is not None:
            keys, values = zip(*kv_caches, strict=True)
            x = loop.forward(
                x,
                *cos_sin,
                keys,
                values,
                meta.slot_mapping,
                meta.decode_blocks,
                meta.decode_lens,
                meta.decode_visible,
                meta.block_size,
                list(which),
            )
        else:
            for i in which:
                x = self.layers[i](x, cos_sin, kv_caches[i], meta)
        return self.norm(x)

    def _decode_loop(
        self,
        x: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> object | None:
        """heron's C++ loop over the layers (``kernels.DecodeLayers``, the same ops as the
        layers' forward, without Python between them) where it applies: a step of plain
        decode rows on CPU with a plain KV cache, at most ``GEMV_MAX_ROWS`` of them with
        quantized weights (more take the dequantizing path); built on the first such step.
        None: run the layers in Python."""
        if not (
            self.decode_loop_enabled
            and meta.plain_decodes(x.shape[0])
            and isinstance(kv_caches[0][0], torch.Tensor)
            and kernels.usable(x)
        ):
            return None
        if self._decode_layers is None:
            self._decode_layers = _build_decode_layers(self) or False
        if not self._decode_layers:
            return None
        loop, max_rows = self._decode_layers
        return loop if x.shape[0] <= max_rows else None

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


def _build_decode_layers(model: LlamaForCausalLM) -> tuple[object, int] | None:
    """The C++ decode loop over ``model``'s layers and the most rows it takes, or None where a
    layer holds something it does not replay (a linear of another kind, an activation other
    than SiLU, a norm with a weight offset)."""
    cfg = model.config
    layers, kinds = [], set()
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        specs = [decode_spec(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj)]
        specs.append(decode_spec(mlp.down_proj))
        if (
            None in specs
            or mlp.act is not F.silu
            or attn.q_norm is not None
            or any(n.offset or n.eps != cfg.rms_norm_eps for n in norms)
        ):
            return None
        kinds.update(spec[0] for spec in specs)
        qkv, o, gate_up, down = (kernels.decode_linear(*spec) for spec in specs)
        layers.append(kernels.decode_layer(norms[0].weight, qkv, o, norms[1].weight, gate_up, down))
    scale = model.layers[0].self_attn.scale
    loop = kernels.decode_layers(
        layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, scale
    )
    return loop, GEMV_MAX_ROWS if kinds & {"int8", "int4"} else sys.maxsize


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
