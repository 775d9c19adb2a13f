"""PyramidKV (Cai et al.): SnapKV's selection with layer budgets that shrink from the lower
layers to the upper ones (an arithmetic schedule; the total stays the uniform budget's).

In heron's paged cache every layer shares one block table, so a sequence holds
``max(layer budgets)`` slots; a layer with a smaller budget masks its unused slots
(``KVState.layer_lens``) instead of giving memory back. The memory held is therefore the
largest layer budget, not the average: the gain over SnapKV is accuracy at an equal average
budget, not memory."""

from __future__ import annotations

from dataclasses import dataclass

from heron.kv.policy import KV_POLICIES
from heron.kv.snapkv import SnapKV


@KV_POLICIES.register("pyramidkv")
@dataclass(eq=False)
class PyramidKV(SnapKV):
    beta: int = 20  # top layer keeps budget / beta ... bottom layer 2 * budget - top

    def __post_init__(self) -> None:
        super().__post_init__()
        KV_POLICIES.check_int("beta", self.beta, 1)

    def layer_budgets(
        self, budget: int, num_layers: int, weights: list[float] | None = None
    ) -> list[int]:
        if num_layers == 1:
            return [budget]
        top = max(1, budget // self.beta)
        bottom = 2 * budget - top
        step = (bottom - top) / (num_layers - 1)
        return [max(1, round(bottom - i * step)) for i in range(num_layers)]
