"""Continuous batching under a per-step token budget (chunked prefill, SARATHI style).

Each step: running decodes first (one token each, plus its drafted tokens under speculative
decoding), then running prefills continue their next chunk, then waiting sequences are
admitted while budget, ``max_num_seqs`` and KV blocks allow. When a running sequence cannot
get a block, the most recently arrived running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed (prefix caching usually makes
that cheap). Nothing is ever dropped."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from heron.config import EngineConfig
from heron.engine.block_manager import BlockManager
from heron.engine.sequence import Sequence, Status, wants_prompt_logprobs


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new_tokens[i]`` tokens of ``seqs[i]``; decodes come first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies
    # Sequences preempted while this batch was scheduled (the engine tells its plugins).
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order = priority order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling: its prompt KV is already shared, so it starts out running."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        seq.status = Status.FINISHED
        self.bm.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        decodes = [s for s in self.running if s.num_uncomputed == 1]
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = _cap(seq, min(seq.num_uncomputed + len(seq.draft_token_ids), budget))
            if seq.draft_token_ids and not self.bm.can_append(seq, n):
                n = 1  # drafts are optional: never preempt anyone for them
            seq.keep_drafts(n - 1)
            if not self._make_room(seq, n, scheduled, batch):
                continue
            batch.copies += self.bm.append_slots(seq, n)
            batch.add(seq, n)
            scheduled.add(seq.seq_id)
            budget -= n

        # Admit waiting sequences, oldest first, unless this step already had to preempt.
        while (
            self.waiting
            and budget > 0
            and not batch.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            # Prompt logprobs need logits at every prompt position: no prefix may be skipped.
            # A sequence whose blocks a plugin rewrites neither reads nor feeds the cache.
            use_cache = not wants_prompt_logprobs(seq.request) and seq.uses_prefix_cache
            cached = self.bm.allocate_cached_prefix(seq) if use_cache else 0
            seq.num_computed_tokens = cached
            seq.num_cached_tokens = max(seq.num_cached_tokens, min(cached, seq.num_prompt_tokens))
            n = _cap(seq, min(seq.num_uncomputed, budget))
            if not self.bm.can_append(seq, n):
                self.bm.free(seq)  # give back the cached blocks; try again next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            batch.copies += self.bm.append_slots(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, n: int, scheduled: set[int], batch: ScheduledBatch) -> bool:
        """Preempt lower-priority sequences until ``seq`` fits; False if seq itself was."""
        while not self.bm.can_append(seq, n):
            victim = next(
                (s for s in reversed(self.running) if s is not seq and s.seq_id not in scheduled),
                None,
            )
            self._preempt(victim or seq)
            batch.preempted.append(victim or seq)
            if victim is None:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.set_drafts([])
        seq.num_computed_tokens = 0
        seq.num_evicted = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _cap(seq: Sequence, n: int) -> int:
    """``n`` tokens, or fewer where the chunk would cross the sequence's ``chunk_boundary``."""
    stop = seq.chunk_boundary
    if stop is None or seq.num_computed_tokens >= stop:
        return n
    return min(n, stop - seq.num_computed_tokens)
