"""Checkpoint settings that change a model's math, and the values heron implements: a
checkpoint with any other value is refused (ModelLoadError naming the field), never run
wrong. One table per format for every family; RoPE scaling types are checked where they are
read (heron.models.rope_config), sliding windows by the families that implement them.

A field transformers' class for the same family ignores is harmless and stays off the table,
except where it is listed as harmless to say that it was considered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from heron.errors import ModelLoadError

Accepts = Callable[[Any], bool]


def _off(value: Any) -> bool:
    return value in (None, False, 0, "", {}, [])


def _any(value: Any) -> bool:
    return True


def _one_of(*allowed: Any) -> Accepts:
    return lambda value: value is None or value in allowed


_MOE = {"*": _off}  # heron has no Mixture-of-Experts family yet

# config.json field -> what each family accepts ("*": the families not named).
HF_FIELDS: dict[str, dict[str, Accepts]] = {
    "hidden_act": {"gemma3": _any, "*": _one_of("silu")},
    "hidden_activation": {"gemma3": _one_of("gelu_pytorch_tanh"), "*": _any},
    "attention_bias": {"*": _off},  # biases on q, k, v and o; Qwen2's q/k/v ones have no field
    "mlp_bias": {"*": _off},
    "partial_rotary_factor": {"*": _one_of(1, 1.0)},
    "final_logit_softcapping": {"gemma3": _any, "*": _off},
    "attn_logit_softcapping": {"gemma3": _any, "*": _off},  # transformers' Gemma3 ignores it
    "use_bidirectional_attention": {"*": _off},
    "use_qk_norm": {"*": _off},
    "qk_layernorm": {"*": _off},
    "quantization_config": {"*": _off},  # pre-quantized weights (GPTQ, AWQ, bitsandbytes...)
    "num_local_experts": _MOE,
    "num_experts": _MOE,
    "n_routed_experts": _MOE,
    "num_experts_per_tok": _MOE,
    "moe_intermediate_size": _MOE,
    "shared_expert_intermediate_size": _MOE,
    # Harmless: a matmul split that computes the same; dropout, off at inference.
    "pretraining_tp": {"*": _any},
    "attention_dropout": {"*": _any},
}

# GGUF metadata key (after "{arch}.") -> what each family accepts.
GGUF_KEYS: dict[str, dict[str, Accepts]] = {
    "expert_count": _MOE,
    "expert_used_count": _MOE,
    "final_logit_softcapping": {"gemma3": _any, "*": _off},
    "attn_logit_softcapping": {"gemma3": _any, "*": _off},
    "attention.sliding_window": {"gemma3": _any, "*": _off},
}
# GGUF tensors that are not weights of the network and that heron may skip: old converters'
# copies of the rotary inverse frequencies.
HARMLESS_GGUF_TENSORS = ("attn_rot_embd",)


def check_hf_config(family: str, hf: dict[str, Any]) -> None:
    """Refuses a Hugging Face config with a math-changing field ``family`` does not implement."""
    for name, accepts in HF_FIELDS.items():
        if name in hf and not _rule(accepts, family)(hf[name]):
            raise ModelLoadError(
                f"config.json: {name}={hf[name]!r} is not supported for {family} models"
            )
    params = hf.get("rope_parameters") or {}
    if family != "gemma3" and any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(
            f"config.json: rope_parameters per layer type is not supported for {family} models"
        )


def check_gguf_metadata(family: str, meta: dict[str, Any], head_dim: int) -> None:
    """Refuses GGUF metadata with a math-changing key ``family`` does not implement."""
    for name, accepts in GGUF_KEYS.items():
        key = f"{family}.{name}"
        if key in meta and not _rule(accepts, family)(meta[key]):
            raise ModelLoadError(f"GGUF metadata {key}={meta[key]!r} is not supported")
    rotary = meta.get(f"{family}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ModelLoadError(
            f"GGUF metadata {family}.rope.dimension_count={rotary} rotates part of each "
            f"{head_dim}-dimension head (partial rotary), which heron does not implement"
        )


def _rule(accepts: dict[str, Accepts], family: str) -> Accepts:
    return accepts.get(family) or accepts["*"]
