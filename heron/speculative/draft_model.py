"""Draft-model speculation: a second, smaller model with the same tokenizer drafts k tokens.

The draft has its own runner and its own paged KV cache (as many blocks as the target's, each
holding the same number of tokens), and a shadow of every speculating sequence: the tokens
whose K/V it holds. Each step it first catches up on the tokens the target accepted since
the last step (one batched prefill over all sequences, whose last row also yields the first
draft), then decodes the rest of the drafts one batched step at a time. Rejected drafts are
rolled back by trimming the shadow to the longest prefix it shares with the target's tokens.
A shadow is freed when its sequence finishes or is aborted, or (preempted) stops running."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from heron.engine.block_manager import BlockManager
from heron.engine.runner import ModelRunner
from heron.engine.scheduler import ScheduledBatch
from heron.engine.sequence import Sequence
from heron.models.catalog import resolve_model_path
from heron.models.loader import Checkpoint, build_model
from heron.speculative.proposer import (
    PROPOSERS,
    Draft,
    Proposer,
    draw_draft_token,
    stack_probs,
)
from heron.tokenizer import Tokenizer

if TYPE_CHECKING:
    from heron.engine.plugin import EngineParts

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DraftSequence:
    """What the draft's block manager and runner need of a sequence."""

    seq_id: int
    token_ids: list[int]  # the tokens whose K/V the draft holds, then the ones to compute
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    # Read by the runner; a draft never speculates or compresses its own cache.
    draft_token_ids: list[int] = field(default_factory=list)
    num_evicted: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_slots(self) -> int:
        return self.num_computed_tokens


@PROPOSERS.register("draft")
@dataclass(eq=False)
class DraftModelProposer(Proposer):
    model: str  # the draft model: a path or a known model name
    num_layers: int | None = None  # keep only the draft model's first this many layers

    def __post_init__(self) -> None:
        PROPOSERS.check(
            isinstance(self.model, str) and self.model != "",
            "model",
            f"a path or known model name; got {self.model!r}",
        )
        if self.num_layers is not None:
            PROPOSERS.check_int("num_layers", self.num_layers, 1)

    def start(self, parts: EngineParts) -> None:
        """Loads the draft, with a paged cache of as many blocks as the target's."""
        path = resolve_model_path(self.model)
        tokenizer = Tokenizer(path)
        PROPOSERS.check(
            tokenizer.backend.get_vocab() == parts.tokenizer.backend.get_vocab(),
            "model",
            f"{path.name} uses another tokenizer than the target model; a draft must share "
            "the target's vocabulary",
        )
        device, dtype = parts.runner.device, parts.runner.dtype
        ckpt = Checkpoint(path, dtype)
        if self.num_layers is not None:
            ckpt.keep_first_layers(self.num_layers)
        cfg = ckpt.config
        model_module = build_model(ckpt, device, dtype)
        del ckpt
        num_blocks, block_size = parts.block_manager.num_blocks, parts.config.block_size
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model_module, cfg, num_blocks, block_size, device, dtype)
        self.shadows: dict[int, DraftSequence] = {}
        logger.info("draft %s: %d layers, %d KV blocks", path.name, cfg.num_layers, num_blocks)

    def release(self, seq_id: int) -> None:
        shadow = self.shadows.pop(seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)

    def retain(self, seq_ids: set[int]) -> None:
        for seq_id in set(self.shadows) - seq_ids:
            self.release(seq_id)

    def propose(self, seq: Sequence, k: int) -> Draft:
        return self.propose_batch([seq], [k])[0]

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        batch, active = ScheduledBatch(), []
        for seq, k in zip(seqs, ks, strict=True):
            shadow = self._sync(seq)
            # Room for the tokens to catch up on and the k - 1 drafts fed back in.
            n_new = shadow.num_tokens - shadow.num_computed_tokens
            if not self.block_manager.can_append(shadow, n_new + k - 1):
                continue
            self.block_manager.append_slots(shadow, n_new + k - 1)
            batch.add(shadow, n_new)
            active.append((seq, shadow, k))
        drafts: dict[int, tuple[list[int], list]] = {seq.seq_id: ([], []) for seq in seqs}
        if not active:
            return [Draft([]) for _ in seqs]

        out = self.runner.execute(batch, set())
        row_of = {s.seq_id: i for i, s in enumerate(out.sample_seqs)}  # decodes come first
        for seq, shadow, _ in active:
            shadow.num_computed_tokens = shadow.num_tokens
            self._append(drafts, seq, shadow, out.sample_logits[row_of[seq.seq_id]])
        for j in range(1, max(k for *_, k in active)):
            step = [(seq, shadow) for seq, shadow, k in active if k > j]
            shadows = [shadow for _, shadow in step]
            logits = self.runner.decode_logits(
                shadows,
                [s.token_ids[-1] for s in shadows],
                [s.num_tokens - 1 for s in shadows],
            )
            for row, (seq, shadow) in enumerate(step):
                shadow.num_computed_tokens += 1
                self._append(drafts, seq, shadow, logits[row])
        return [Draft(t, stack_probs(d)) for t, d in (drafts[s.seq_id] for s in seqs)]

    def _sync(self, seq: Sequence) -> DraftSequence:
        """The sequence's shadow, trimmed to the K/V that still match the target's tokens."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = DraftSequence(seq.seq_id, [], seq.num_prompt_tokens)
            self.shadows[seq.seq_id] = shadow
        keep = 0
        limit = min(shadow.num_computed_tokens, seq.num_tokens - 1)
        while keep < limit and shadow.token_ids[keep] == seq.token_ids[keep]:
            keep += 1
        shadow.num_computed_tokens = keep
        shadow.token_ids = list(seq.token_ids)
        self.block_manager.truncate(shadow, keep)
        return shadow

    @staticmethod
    def _append(drafts: dict, seq: Sequence, shadow: DraftSequence, logits) -> None:
        token, probs = draw_draft_token(logits, seq)
        tokens, dists = drafts[seq.seq_id]
        tokens.append(token)
        dists.append(probs)
        shadow.token_ids.append(token)
