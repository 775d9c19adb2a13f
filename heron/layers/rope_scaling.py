"""RoPE scaling: how a checkpoint stretches its rotary frequencies past its training length.

Each scaling type a Hugging Face config names (``rope_type``) is one function here,
registered by name: from the base ``theta`` and the rotated dimension it gives the inverse
frequencies and the factor cos / sin are multiplied by (YaRN's and LongRoPE's attention
factor). heron.layers.rotary builds its tables from them. The math follows transformers'
``modeling_rope_utils`` op for op, so the tables hold the same bits.

Two types depend on the sequence's length: ``dynamic`` (NTK) raises the base once a sequence
is longer than the training length, and ``longrope`` switches from its short to its long
factors there. transformers recomputes them from the longest position of each forward pass,
so a token at position ``p`` written during generation is rotated for length ``p + 1``, and
prompt tokens for the prompt's length. heron's prompts never exceed ``max_position_embeddings``
(the engine's context), so for ``dynamic`` (whose threshold is that length) every token is
rotated for ``max(p + 1, threshold)``: a function of the position, which a paged cache that
rotates keys once can hold. ``longrope``'s threshold is below the context in every real
checkpoint, where the rotation of a prompt depends on its length; the loader refuses those
(heron.models.rope_config)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RopeScaling:
    """One checkpoint's RoPE scaling: its type and that type's parameters, as named in a
    Hugging Face config (``rope_scaling`` / ``rope_parameters``)."""

    rope_type: str = "default"
    factor: float = 1.0
    # The training length the scaling stretches (``original_max_position_embeddings``; for
    # ``dynamic``, ``max_position_embeddings``); None for types that do not use it.
    original_max_positions: int | None = None
    # The type's other parameters (``low_freq_factor``, ``beta_fast``, ``long_factor``...).
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rope_type not in SCALING_TYPES:
            raise ValueError(f"unknown RoPE scaling type {self.rope_type!r}")

    @property
    def length_threshold(self) -> int | None:
        """Positions from which the frequencies depend on the sequence's length (``dynamic``,
        ``longrope``); None: they never do."""
        if self.rope_type in _LENGTH_DEPENDENT:
            return self.original_max_positions
        return None

    def frequencies(
        self, theta: float, dim: int, seq_len: int | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, float]:
        """The inverse frequencies [dim / 2] (float32) and the factor for cos and sin, for a
        sequence of ``seq_len`` tokens (None: within the training length)."""
        return SCALING_TYPES[self.rope_type](self, theta, dim, seq_len, torch.device(device))


ScalingFunction = Callable[
    [RopeScaling, float, int, "int | None", torch.device], tuple[torch.Tensor, float]
]
SCALING_TYPES: dict[str, ScalingFunction] = {}
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _register(name: str) -> Callable[[ScalingFunction], ScalingFunction]:
    def add(fn: ScalingFunction) -> ScalingFunction:
        SCALING_TYPES[name] = fn
        return fn

    return add


def base_inverse_frequencies(
    theta: float | torch.Tensor, dim: int, device: torch.device
) -> torch.Tensor:
    """Plain RoPE: ``theta ** (-2i / dim)``."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (theta ** (exponents / dim))


@_register("default")
def _default(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    return base_inverse_frequencies(theta, dim, device), 1.0


@_register("linear")
def _linear(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Positions divided by ``factor`` (position interpolation)."""
    inv_freq = base_inverse_frequencies(theta, dim, device)
    inv_freq /= s.factor
    return inv_freq, 1.0


@_register("dynamic")
def _dynamic(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    """NTK-aware: past the training length the base grows with the sequence's length."""
    trained = s.original_max_positions
    # transformers takes a given length from the positions, an int64 tensor, so the base is
    # computed in float32 then; at the training length it is the base itself.
    length = trained if seq_len is None else torch.tensor(max(seq_len, trained), device=device)
    base = theta * ((s.factor * length / trained) - (s.factor - 1)) ** (dim / (dim - 2))
    return base_inverse_frequencies(base, dim, device), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, ``0.1 * mscale * ln(scale) + 1`` (1 for no scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@_register("yarn")
def _yarn(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    """High frequencies kept, low frequencies interpolated by ``factor``, a linear ramp
    between (``beta_fast`` / ``beta_slow`` rotations over the training length), and cos / sin
    scaled by the attention factor."""
    o = s.options
    factor, trained = s.factor, s.original_max_positions
    attention_factor = o.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = o.get("mscale"), o.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = o.get("beta_fast") or 32, o.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(trained / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if o.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    extrapolation = 1 - torch.clamp(ramp, 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1 - extrapolation) + extrapolated * extrapolation
    return inv_freq, float(attention_factor)


@_register("longrope")
def _longrope(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Per-frequency divisors: ``short_factor`` within the training length, ``long_factor``
    past it; cos / sin scaled by the attention factor."""
    o, trained = s.options, s.original_max_positions
    attention_factor = o.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if s.factor <= 1.0 else math.sqrt(1 + math.log(s.factor) / math.log(trained))
        )
    long = seq_len is not None and seq_len > trained
    factors = o["long_factor" if long else "short_factor"]
    factors = torch.tensor(factors, dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (factors * theta**exponents), float(attention_factor)


@_register("llama3")
def _llama3(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Llama 3.1's: wavelengths shorter than ``trained / high_freq_factor`` kept, longer than
    ``trained / low_freq_factor`` divided by ``factor``, smoothly interpolated between."""
    o, factor, trained = s.options, s.factor, s.original_max_positions
    low_freq_factor, high_freq_factor = o["low_freq_factor"], o["high_freq_factor"]
    inv_freq = base_inverse_frequencies(theta, dim, device)
    low_freq_wavelen = trained / low_freq_factor
    high_freq_wavelen = trained / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (trained / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


@_register("freq_factors")
def _freq_factors(
    s: RopeScaling, theta: float, dim: int, seq_len: int | None, device: torch.device
) -> tuple[torch.Tensor, float]:
    """llama.cpp's ``rope_freqs`` tensor (Llama 3.x GGUFs): a divisor per frequency, the
    ``llama3`` scaling computed ahead by the converter."""
    divisors = torch.tensor(s.options["factors"], dtype=torch.float32, device=device)
    return base_inverse_frequencies(theta, dim, device) / divisors, 1.0
