"""The KV-policy interface (kvpress style): a policy scores the cached tokens of one layer,
per KV head; the machinery (``heron.kv.compressor``) keeps each head's top-scoring tokens up
to the budget and compacts the paged cache.

When a policy runs:

* ``after_prefill``: once the whole prompt is in the cache (after the last chunk), with the
  queries of the prompt's last ``window`` positions (the observation window) — SnapKV,
  PyramidKV, DefensiveKV, and the first eviction of every other policy.
* ``evict_during_decode``: while generating, whenever the sequence holds a block more than its
  budget, so the cache stays at ``budget .. budget + block_size`` tokens — StreamingLLM, H2O,
  Scissorhands. Their decode queries are kept (``needs_decode_queries``) until the next
  eviction, when their attention over the then-held keys is computed once: that equals the
  attention they saw when they ran, because keys are only appended in between.
* ``selects`` (TokenSelect): nothing is evicted; every decode step's attention scores the
  cache itself and reads the chosen tokens (``heron.kv.tokenselect``).

Scores come in as ``attn``: softmax attention of the captured queries over the held slots,
``[Hkv, group, n, S]`` (the query heads of a GQA group kept apart, float32, causal), or
``None`` for a policy that needs no queries. ``keys``/``values`` are ``[Hkv, S, D]``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from heron.registry import Registry

# KV policies by name, as ``EngineConfig.kv_policy``/``kv_policy_options``, the same fields of
# ``SamplingParams``, the CLI's ``--kv-policy``/``--kv-policy-option`` and the server body.
KV_POLICIES: Registry[KVPolicy] = Registry("kv_policy", "heron.kv")


@dataclass(eq=False)
class KVPolicy:
    """A policy's options are its fields; the class-level traits below tell the machinery
    (``heron.kv.compressor``) when it runs and what it needs."""

    name: ClassVar[str] = ""
    # Prompt queries captured at the end of the prefill (0: none); a policy that scores with
    # them has it as an option.
    window: ClassVar[int] = 0
    protect_window: ClassVar[bool] = True  # the observation window's own keys are always kept
    evict_during_decode: ClassVar[bool] = False
    needs_decode_queries: ClassVar[bool] = False
    accumulates: ClassVar[bool] = False  # keeps running statistics (``accumulate``)
    # Layer budgets from the window attention (``layer_weight`` per layer, D2O).
    budget_from_attention: ClassVar[bool] = False
    evicts: ClassVar[bool] = True  # False: the cache is kept whole (TokenSelect)
    selects: ClassVar[bool] = False  # each decode step attends to a chosen subset (TokenSelect)

    sinks: int = 0  # first slots always kept
    recent: int = 0  # last slots always kept (besides the observation window)

    def __post_init__(self) -> None:
        KV_POLICIES.check_int("sinks", self.sinks, 0)
        KV_POLICIES.check_int("recent", self.recent, 0)

    # ------------------------------------------------------------------ the interface
    def score(
        self,
        layer: int,
        attn: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        acc: torch.Tensor | None,
    ) -> torch.Tensor:
        """Importance of each held token, ``[Hkv, S]``; the highest are kept."""
        raise NotImplementedError

    def accumulate(self, acc: torch.Tensor | None, attn: torch.Tensor) -> torch.Tensor | None:
        """Running per-token statistics ``[Hkv, S]`` carried across evictions (H2O's summed
        attention, Scissorhands' counts); None: the policy keeps none."""
        return None

    def layer_budgets(
        self, budget: int, num_layers: int, weights: list[float] | None = None
    ) -> list[int]:
        """Tokens each layer keeps; every layer the same unless a policy says otherwise.
        ``weights``: each layer's ``layer_weight`` when ``budget_from_attention``."""
        return [budget] * num_layers

    def layer_weight(self, attn: torch.Tensor) -> float:
        """How much of the budget a layer deserves, from its window attention."""
        return 1.0

    def merge(
        self, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept tokens' keys and values ``[Hkv, b, D]`` to write, given ``kept`` token
        indices ``[Hkv, b]`` (``valid`` [S]: the held slots a layer really reads); None:
        the kept tokens as they are (every policy but D2O)."""
        return None


# ---------------------------------------------------------------------- scoring helpers
def window_scores(attn: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Aggregate the observation window: ``[Hkv, G, n, S] -> [Hkv, G, S]``."""
    return attn.amax(dim=2) if reduce == "max" else attn.sum(dim=2)


def group_reduce(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One score per KV head from its query heads: ``[Hkv, G, S] -> [Hkv, S]``."""
    return scores.amax(dim=1) if how == "max" else scores.mean(dim=1)


def pool1d(scores: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """Smooth ``[..., S]`` along the tokens (SnapKV's clustering), same length out."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    pad = kernel // 2
    if how == "max":
        x = F.max_pool1d(x, kernel, stride=1, padding=pad)
    else:
        x = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    return x[..., : shape[-1]].reshape(shape)


def resolve_budget(budget: float, num_tokens: int) -> int:
    """A fraction in (0, 1] of ``num_tokens``, or an absolute token count (> 1)."""
    if budget <= 1:
        return max(1, math.ceil(budget * num_tokens))
    return int(budget)
