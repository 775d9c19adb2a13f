"""Gemma 3 text decoder (gemma-3-270m, and the text part of the larger Gemma 3 models).

What differs from Llama, all of it here:
- token embeddings scaled by sqrt(hidden_size);
- RMSNorms with the (1 + w) weight convention, four per layer ("sandwich": before and after
  both attention and MLP), plus one per query/key head before rotary;
- attention scale ``query_pre_attn_scalar ** -0.5``;
- GELU-tanh gated MLP;
- interleaved local and global layers: local layers attend within a sliding window and use
  RoPE base 10 000, global layers see everything and use ``rope_theta`` (optionally with
  RoPE scaling, heron.layers.rope_scaling);
- final logit soft-capping when the config has one (none of the released Gemma 3 models do).
The per-head attention-logit soft-capping field of the config is ignored, as transformers'
Gemma3 ignores it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heron.errors import ModelLoadError
from heron.layers.attention import AttentionMetadata
from heron.layers.mlp import GatedMLP, gelu_tanh
from heron.layers.norm import RMSNorm
from heron.layers.rope_scaling import RopeScaling
from heron.layers.rotary import RotaryEmbedding
from heron.layers.self_attention import SelfAttention
from heron.models.config import ModelConfig
from heron.models.decode_loop import DecodeLoop
from heron.models.rope_config import LAYER_TYPES, rope_from_hf
from heron.models.weights import empty_embedding, load_fused_weights

# Every sixth layer is global, the others local (transformers' and llama.cpp's default).
_SLIDING_WINDOW_PATTERN = 6
_LOCAL_ROPE_THETA = 10_000.0

# Gemma 3's chat format (the instruction-tuned models'; GGUFs of base models carry no
# template). A system message becomes the start of the first user turn; "assistant" is
# called "model".
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


@dataclass(frozen=True)
class Gemma3Settings:
    """The Gemma3-only part of a checkpoint's config."""

    sliding_window: int
    sliding_layers: tuple[bool, ...]
    local_rope_theta: float
    local_rope_scaling: RopeScaling  # the global layers' is ModelConfig.rope_scaling
    global_rope_theta: float
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Gemma3Settings:
        if "hf_config" in cfg.extra:
            return cls._from_hf(cfg, cfg.extra["hf_config"])
        return cls._from_gguf(cfg, cfg.extra.get("gguf_metadata", {}))

    @classmethod
    def _from_gguf(cls, cfg: ModelConfig, meta: dict[str, Any]) -> Gemma3Settings:
        window = meta.get("gemma3.attention.sliding_window")
        if window is None:
            raise ModelLoadError("GGUF metadata lacks gemma3.attention.sliding_window")
        # llama.cpp's rule: the 27B model (62 layers) scales by hidden / heads, others by
        # head_dim (its config's query_pre_attn_scalar, which GGUF does not store).
        scalar = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
        return cls(
            sliding_window=int(window),
            sliding_layers=_pattern(cfg.num_layers, _SLIDING_WINDOW_PATTERN),
            local_rope_theta=_LOCAL_ROPE_THETA,
            local_rope_scaling=RopeScaling(),
            global_rope_theta=cfg.rope_theta,
            query_pre_attn_scalar=float(scalar),
            final_logit_softcapping=meta.get("gemma3.final_logit_softcapping"),
        )

    @classmethod
    def _from_hf(cls, cfg: ModelConfig, hf: dict[str, Any]) -> Gemma3Settings:
        types = hf.get("layer_types")
        if types is not None:
            sliding = tuple(t == "sliding_attention" for t in types)
        else:
            every = hf.get("sliding_window_pattern", _SLIDING_WINDOW_PATTERN)
            sliding = _pattern(cfg.num_layers, every)
        # transformers >= 5 nests RoPE settings per layer type; in older configs rope_scaling
        # is the global layers' and the local layers' is plain.
        params = hf.get("rope_parameters") or {}
        nested = any(key in LAYER_TYPES for key in params)
        local = (params.get("sliding_attention") or {}) if nested else {}
        full = (params.get("full_attention") or {}) if nested else {}
        return cls(
            sliding_window=int(hf["sliding_window"]),
            sliding_layers=sliding,
            local_rope_theta=float(
                local.get("rope_theta") or hf.get("rope_local_base_freq") or _LOCAL_ROPE_THETA
            ),
            local_rope_scaling=rope_from_hf(local, hf),
            global_rope_theta=float(full.get("rope_theta") or hf.get("rope_theta") or 1e6),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
        )


def _pattern(num_layers: int, every: int) -> tuple[bool, ...]:
    """True (local) for every layer but each ``every``-th."""
    return tuple((i + 1) % every != 0 for i in range(num_layers))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, settings: Gemma3Settings, sliding: bool) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = sliding
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.self_attn = SelfAttention(
            h,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            scale=settings.query_pre_attn_scalar**-0.5,
            qkv_bias=cfg.attention_bias,
            qk_norm=(eps, 1.0),
            sliding=sliding,
        )
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.mlp = GatedMLP(h, cfg.intermediate_size, gelu_tanh)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)

    def forward(self, x, cos_sin, kv_cache, meta) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        x = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(m)


class Gemma3ForCausalLM(nn.Module):
    """Takes a flat batch of tokens (no padding) and the step's attention metadata."""

    # llama.cpp names Gemma's pre-MLP norm like Llama's post-attention norm.
    gguf_block_names = {"ffn_norm": "pre_feedforward_layernorm"}
    end_of_generation_tokens = ("<end_of_turn>",)
    default_chat_template = GEMMA3_CHAT_TEMPLATE

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        s = self.settings = Gemma3Settings.from_config(cfg)
        if len(s.sliding_layers) != cfg.num_layers:
            raise ModelLoadError(
                f"gemma3: {len(s.sliding_layers)} layer types for {cfg.num_layers} layers"
            )
        self.sliding_window = s.sliding_window
        self.embed_scale = cfg.hidden_size**0.5
        self.embed_tokens = empty_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, s, sliding) for sliding in s.sliding_layers
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary_global = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, s.global_rope_theta, cfg.rope_scaling
        )
        self.rotary_local = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, s.local_rope_theta, s.local_rope_scaling
        )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Decode steps run the layers in one C++ loop where they may (heron.models.decode_loop).
        self.decode_loop = DecodeLoop(self.layers, "gelu_tanh")

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
        # The scale is rounded to float32 and then to the model's dtype, as in transformers.
        x = x * torch.tensor(self.embed_scale).to(x.dtype)
        local = self.rotary_local(positions, x.dtype)
        glob = self.rotary_global(positions, x.dtype)
        which = range(len(self.layers)) if layers is None else layers
        if self.decode_loop.applies(x, kv_caches, meta):
            return self.norm(self.decode_loop.run(x, (*glob, *local), kv_caches, meta, which))
        for i in which:
            layer = self.layers[i]
            x = layer(x, local if layer.sliding else glob, kv_caches[i], meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.settings.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @staticmethod
    def gguf_tensor_fixup(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """llama.cpp stores Gemma's norm weights as (1 + w); heron keeps w, as HF does."""
        return tensor - 1.0 if name.endswith("norm.weight") else tensor

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_fused_weights(self, weights, self.config)
