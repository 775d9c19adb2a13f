"""A checkpoint's RoPE scaling (heron.layers.rope_scaling.RopeScaling), read from a Hugging
Face config or from GGUF metadata. A scaling heron cannot compute exactly is refused here,
naming the field."""

from __future__ import annotations

from typing import Any

from heron.errors import ModelLoadError
from heron.layers.rope_scaling import SCALING_TYPES, RopeScaling

# Parameters each type cannot do without, as transformers requires them.
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (),  # factor defaults to max_position_embeddings / original_max_position_embeddings
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
# Types that stretch a training length given as original_max_position_embeddings.
_STRETCHING = ("yarn", "longrope", "llama3")
# Names that mean "no scaling".
_PLAIN = (None, "default", "none")
# Layer types of configs that nest RoPE settings per layer type (transformers >= 5).
LAYER_TYPES = ("full_attention", "sliding_attention")


def hf_rope_parameters(hf: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE settings of a Hugging Face config for ``layer_type``'s layers: ``rope_scaling``
    (transformers < 5) or ``rope_parameters``, flat or nested per layer type."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(key in LAYER_TYPES for key in params):
        return params.get(layer_type) or {}
    return params


def rope_from_hf(params: dict[str, Any], hf: dict[str, Any]) -> RopeScaling:
    """``params``: one flat RoPE settings dict (:func:`hf_rope_parameters`); ``hf``: the whole
    config, for ``max_position_embeddings`` and a top-level
    ``original_max_position_embeddings`` (Phi-3's, which transformers prefers)."""
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in _PLAIN:
        return RopeScaling()
    field = "rope_scaling" if "rope_scaling" in hf else "rope_parameters"
    if rope_type not in SCALING_TYPES or rope_type == "freq_factors":
        raise ModelLoadError(
            f"config.json: {field}.rope_type {rope_type!r} is not supported; heron implements "
            f"{', '.join(t for t in SCALING_TYPES if t != 'freq_factors')}"
        )
    for name in ("partial_rotary_factor", "mrope_section"):
        if params.get(name) not in (None, 1, 1.0):
            raise ModelLoadError(f"config.json: {field}.{name} is not supported")
    for name in _REQUIRED[rope_type]:
        if params.get(name) is None:
            raise ModelLoadError(f"config.json: {rope_type} RoPE scaling needs {field}.{name}")
    max_positions = int(hf.get("max_position_embeddings", 2048))
    original = None
    if rope_type == "dynamic":
        original = max_positions
    elif rope_type in _STRETCHING:
        original = int(
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or max_positions
        )
    factor = params.get("factor")
    if factor is None:  # yarn and longrope: the stretch from the training length
        factor = max_positions / original
    options = {k: v for k, v in params.items() if k not in ("factor", "type", "rope_type")}
    scaling = RopeScaling(rope_type, float(factor), original, options)
    _check_exact(scaling, max_positions, field)
    return scaling


def rope_from_gguf(
    meta: dict[str, Any], arch: str, freq_factors: list[float] | None
) -> RopeScaling:
    """From ``{arch}.rope.scaling.*`` and the ``rope_freqs`` tensor (``freq_factors``), which
    llama.cpp's converter writes for Llama 3.x instead of a scaling type."""
    prefix = f"{arch}.rope.scaling."
    known = {"type", "factor", "original_context_length", "finetuned"}
    known |= {"yarn_beta_fast", "yarn_beta_slow"}
    for key in meta:
        if key.startswith(prefix) and key.removeprefix(prefix) not in known:
            raise ModelLoadError(f"GGUF metadata {key} is not supported")
    rope_type = meta.get(prefix + "type", "none")
    factor = meta.get(prefix + "factor", meta.get(f"{arch}.rope.scale_linear"))
    if rope_type == "none" and factor not in (None, 1, 1.0):
        rope_type = "linear"  # the older key, rope.scale_linear
    if freq_factors is not None:
        if rope_type != "none":
            raise ModelLoadError(f"GGUF has both rope_freqs and {prefix}type {rope_type!r}")
        return RopeScaling("freq_factors", options={"factors": freq_factors})
    if rope_type == "none":
        return RopeScaling()
    if rope_type == "linear":
        return RopeScaling("linear", float(factor))
    if rope_type == "yarn":
        original = meta.get(prefix + "original_context_length")
        if factor is None or original is None:
            raise ModelLoadError(
                f"GGUF yarn scaling needs {prefix}factor and {prefix}original_context_length"
            )
        options = {
            "beta_fast": meta.get(prefix + "yarn_beta_fast"),
            "beta_slow": meta.get(prefix + "yarn_beta_slow"),
        }
        return RopeScaling("yarn", float(factor), int(original), options)
    raise ModelLoadError(f"GGUF metadata {prefix}type {rope_type!r} is not supported")


def context_length(scaling: RopeScaling, max_positions: int) -> int:
    """The longest sequence a checkpoint supports: YaRN's training length times its factor
    where that is longer than ``max_position_embeddings`` (Qwen2.5's long-context recipe adds
    YaRN and leaves that at the training length), else ``max_position_embeddings``. YaRN's
    frequencies do not depend on the length, so any position within it is exact."""
    if scaling.rope_type == "yarn":
        return max(max_positions, int(scaling.original_max_positions * scaling.factor))
    return max_positions


def _check_exact(scaling: RopeScaling, max_positions: int, field: str) -> None:
    """LongRoPE switches factors for a whole prompt longer than its training length, which a
    cache that rotates each key once, for its position, cannot follow
    (heron.layers.rope_scaling); within that length it is exact."""
    if scaling.rope_type == "longrope" and scaling.original_max_positions < max_positions:
        raise ModelLoadError(
            f"config.json: longrope RoPE scaling ({field}) switches to its long factors for "
            f"prompts longer than original_max_position_embeddings="
            f"{scaling.original_max_positions}, which heron does not implement yet; "
            f"max_position_embeddings={max_positions} would allow them"
        )
