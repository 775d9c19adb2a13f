"""The seam between the engine and the method families that change how a request is decoded.

A method family (context-aware decoding, entropy-adaptive decoding, ...) is an
``EnginePlugin``: the engine calls its hooks at the points of a request's life and of a step
that it already has, and never names the method. A plugin keeps its per-sequence state
itself, keyed by ``Sequence.seq_id``, so ``Sequence`` carries only what every sequence has.
Every hook has a do-nothing default: a plugin overrides the few it needs. What a method spent
on a request goes into ``Request.metrics`` (reported in ``RequestOutput.metrics``).

Plugins register with ``@register_plugin``; ``heron.plugins`` imports the modules that hold
them, and each engine builds one instance of each enabled one (``Plugins``). Plugins get
``EngineParts``, never the engine itself: no reference cycle keeps a dropped engine alive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from heron.layers.attention import RowsAttention

if TYPE_CHECKING:
    from heron.config import EngineConfig, SamplingParams
    from heron.engine.block_manager import BlockManager
    from heron.engine.runner import ModelRunner
    from heron.engine.scheduler import ScheduledBatch, Scheduler
    from heron.engine.sequence import Request, Sequence
    from heron.models.config import ModelConfig
    from heron.outputs import PositionLogprobs
    from heron.tokenizer import Tokenizer


@dataclass
class EngineParts:
    """What a plugin may use of the engine it is built for."""

    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    runner: ModelRunner
    block_manager: BlockManager
    scheduler: Scheduler
    max_model_len: int
    # A new sequence of ``request`` (index, token ids), seeded as the engine seeds its own
    # (heron.engine.sequence.SequenceFactory.new).
    new_sequence: Callable[[Request, int, list[int]], Sequence]
    # Whether a plugin of this engine lets a step append several tokens to one sequence.
    multi_token_steps: bool = False
    # The tokens that end a sequence (the model's EOS and end-of-turn tokens).
    eos_token_ids: tuple[int, ...] = ()


class EnginePlugin:
    """One method family's hooks, in the order the engine calls them."""

    name: ClassVar[str]
    # A step may append several tokens to one sequence (speculative decoding): per-token
    # methods, which decide each token from the one before, and methods that evict from the
    # cache, which would verify drafts against an evicted cache, refuse to run beside it.
    multi_token_steps: ClassVar[bool] = False

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts

    @classmethod
    def enabled(cls, config: EngineConfig) -> bool:
        """Whether an engine built with ``config`` runs this plugin (per-request methods are
        always there and act on the requests that ask for them)."""
        return True

    # ------------------------------------------------------------------ a request is added
    def prepare(self, params: SamplingParams) -> None:
        """Slow work a request's settings need before it is added (compiling its grammar),
        which a front end runs off the engine's thread so that the running requests do not
        wait: thread-safe; raises ``InvalidRequestError`` for settings this method refuses.
        ``add_request`` must still work where it was not called (then it does the work)."""
        return None

    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        """``req`` and its first sequence are being added: validate the request's settings
        for this method (raise ``InvalidRequestError``), set up state, and return any extra
        sequences the engine must schedule for it (they finish with ``seq``)."""
        return []

    # ------------------------------------------------------------------ the step
    def before_schedule(self, running: list[Sequence]) -> None:
        """A step begins; ``running`` are the sequences that hold KV blocks."""
        return None

    def layers(self, seq: Sequence, n: int) -> list[int] | None:
        """The layers ``seq``'s ``n`` scheduled rows go through this step (None: all of
        them). Only a decode row (``n == 1`` after a computed context) may skip layers."""
        return None

    def attention(self, seq: Sequence, n: int) -> RowsAttention | None:
        """How ``seq``'s ``n`` scheduled rows attend where this plugin changes it (queries to
        capture, slots a layer must not read, the rows' own attention); None: as usual."""
        return None

    def blocks_exact(self, seq: Sequence) -> bool:
        """Whether the K/V the model wrote for ``seq`` are those its tokens name, so its full
        blocks may enter the prefix cache."""
        return True

    def before_sampling(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        """The rows about to be sampled (row i for ``seqs[i]``): a plugin may hold rows back
        or replace them."""
        return seqs, logits

    def captured(self, seq: Sequence, queries: torch.Tensor, slots: list[int]) -> None:
        """The rotated queries [L, n, H, D] of the rows this step captured for ``seq``
        (``RowsAttention.capture``) and the cache slots those rows were written to."""
        return None

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        """The model ran ``batch`` in ``seconds``; its rows are counted as computed (those
        verifying drafts settle later), its samples not drawn yet."""
        return None

    def settle_drafts(
        self, seq: Sequence, logits: torch.Tensor
    ) -> tuple[list[tuple[int, PositionLogprobs | None]], list[int]] | None:
        """``seq`` verified its drafts (``logits`` [1 + drafts, V]): the plugin that drafted
        returns the tokens to append (with logprobs where asked) and the accepted drafts'
        indices; the engine keeps their K/V and gives the rest back."""
        return None

    def token_sampled(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        """``token`` was drawn for ``seq`` from ``logits`` [V]; the engine appends it (and
        checks the stop conditions) next."""
        return None

    # ------------------------------------------------------------------ a sequence's life
    def forked(self, parent: Sequence, child: Sequence) -> None:
        """``child``, a sibling sample of ``parent``'s request (``n > 1``), was just forked
        from it once its prompt was in: it shares ``parent``'s blocks copy-on-write."""
        return None

    def preempted(self, seq: Sequence) -> None:
        """``seq`` lost its KV blocks and will be recomputed from its first token."""
        return None

    def finished(self, seq: Sequence) -> None:
        """``seq`` finished or was aborted; its blocks are free."""
        return None

    def stats(self) -> dict[str, float]:
        """Engine-wide counters, for ``Engine.stats()`` and the server's /metrics."""
        return {}


PLUGINS: dict[str, type[EnginePlugin]] = {}

P = TypeVar("P", bound=type[EnginePlugin])


def register_plugin(cls: P) -> P:
    """Class decorator: the engine builds this plugin (once per engine)."""
    if cls.name in PLUGINS:
        raise ValueError(f"engine plugin {cls.name!r} registered twice")
    PLUGINS[cls.name] = cls
    return cls


class Plugins:
    """Every registered plugin of one engine, each hook called on all of them in turn."""

    def __init__(self, parts: EngineParts) -> None:
        classes = [cls for cls in PLUGINS.values() if cls.enabled(parts.config)]
        parts.multi_token_steps = any(cls.multi_token_steps for cls in classes)
        self.multi_token_steps = parts.multi_token_steps
        self.all = [cls(parts) for cls in classes]

    def get(self, name: str) -> Any:
        """The plugin registered as ``name``, or None where this engine does not run it."""
        return next((p for p in self.all if p.name == name), None)

    def prepare(self, params: SamplingParams) -> None:
        for p in self.all:
            p.prepare(params)

    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        return [extra for p in self.all for extra in p.add_request(req, seq)]

    def before_schedule(self, running: list[Sequence]) -> None:
        for p in self.all:
            p.before_schedule(running)

    def layers(self, seq: Sequence, n: int) -> list[int] | None:
        return next((ls for p in self.all if (ls := p.layers(seq, n)) is not None), None)

    def attention(self, seq: Sequence, n: int) -> RowsAttention | None:
        plans = [a for p in self.all if (a := p.attention(seq, n)) is not None]
        if len(plans) > 1:
            return RowsAttention.combine(plans)
        return plans[0] if plans else None

    def blocks_exact(self, seq: Sequence) -> bool:
        return all(p.blocks_exact(seq) for p in self.all)

    def before_sampling(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        for p in self.all:
            seqs, logits = p.before_sampling(seqs, logits)
        return seqs, logits

    def captured(self, seq: Sequence, queries: torch.Tensor, slots: list[int]) -> None:
        for p in self.all:
            p.captured(seq, queries, slots)

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        for p in self.all:
            p.after_forward(batch, seconds)

    def settle_drafts(
        self, seq: Sequence, logits: torch.Tensor
    ) -> tuple[list[tuple[int, PositionLogprobs | None]], list[int]]:
        for p in self.all:
            settled = p.settle_drafts(seq, logits)
            if settled is not None:
                return settled
        raise RuntimeError(f"sequence {seq.seq_id} verified drafts no plugin settles")

    def token_sampled(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        for p in self.all:
            p.token_sampled(seq, token, logits)

    def forked(self, parent: Sequence, child: Sequence) -> None:
        for p in self.all:
            p.forked(parent, child)

    def preempted(self, seq: Sequence) -> None:
        for p in self.all:
            p.preempted(seq)

    def finished(self, seq: Sequence) -> None:
        for p in self.all:
            p.finished(seq)

    def stats(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for p in self.all:
            stats.update(p.stats())
        return stats
