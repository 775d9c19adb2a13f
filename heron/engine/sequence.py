"""A Sequence is one stream of tokens the engine extends; a Request groups the n sequences that
answer one prompt (they share the prompt's KV blocks copy-on-write)."""

from __future__ import annotations

import enum
import itertools
import random
import time
from dataclasses import dataclass, field

import torch

from heron.config import SamplingParams
from heron.outputs import PositionLogprobs, RequestTimes
from heron.tokenizer import Detokenizer, Tokenizer


class Status(enum.Enum):
    WAITING = "waiting"  # no KV yet (new, or preempted and to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + generated
    generator: torch.Generator
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache hashes of full blocks (derived from token_ids, so kept across preemption)
    # and how many of this sequence's blocks are registered in the cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    text: str = ""  # generated text so far (stop strings cut off at finish)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    detokenizer: Detokenizer | None = None
    # Drafted tokens a plugin adds to this step, scheduled after the last real one; the draft
    # each follows when they form a tree (-1: the last real token; None: a chain,
    # ``chain_parents``), and the draft distributions they came from (None: deterministic).
    draft_token_ids: list[int] = field(default_factory=list)
    draft_parents: list[int] | None = None
    draft_probs: torch.Tensor | None = None
    # How many of the computed tokens a plugin evicted from the cache (BlockManager.compact).
    # Token i's position stays i (RoPE was applied at write time); the sequence holds
    # ``num_kv_slots`` slots, its latest tokens at the end.
    num_evicted: int = 0
    # Set by a plugin for the sequence's life. ``uses_prefix_cache``: its blocks may start
    # from and feed the prefix cache (not where a plugin rewrites them). ``chunk_boundary``:
    # a position no prefill chunk crosses (a plugin works on the cache there). And
    # ``context_counts_slots``: max_model_len bounds the slots it holds, not its positions (a
    # cache kept bounded while decoding; positions may pass the trained range).
    uses_prefix_cache: bool = True
    chunk_boundary: int | None = None
    context_counts_slots: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_slots(self) -> int:
        """Cache slots the sequence holds (its computed tokens less the evicted ones)."""
        return self.num_computed_tokens - self.num_evicted

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def set_drafts(
        self,
        tokens: list[int],
        parents: list[int] | None = None,
        probs: torch.Tensor | None = None,
    ) -> None:
        """This step's drafts; a tree keeps its parents-first order, so any prefix of it is
        a tree too (the scheduler may keep only the first few)."""
        self.draft_token_ids = tokens
        self.draft_parents = parents if tokens else None
        self.draft_probs = probs if tokens else None

    def keep_drafts(self, n: int) -> None:
        """Keep the first ``n`` drafts."""
        parents = self.draft_parents[:n] if self.draft_parents is not None else None
        probs = self.draft_probs[:n] if self.draft_probs is not None else None
        self.set_drafts(self.draft_token_ids[:n], parents, probs)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prompt_phase(self) -> bool:
        """True until the prompt's last token has been computed once."""
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # set when complete
    prompt_logprobs_parts: list[PositionLogprobs] = field(default_factory=list)
    # Set once the prompt's last position has been sampled; that is when the n-1 sibling
    # samples fork from seqs[0].
    forked: bool = False
    # What the engine's plugins spent on the request (heron.engine.plugin), as reported.
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.forked and all(s.is_finished for s in self.seqs)


class SequenceFactory:
    """Numbers and seeds new sequences: a seeded request's sample i always gets the same
    generator, an unseeded one a draw from the engine's seed. Plugins make sequences through
    it too (heron.engine.plugin), without a reference back to the engine."""

    def __init__(self, tokenizer: Tokenizer, device: torch.device, seed: int) -> None:
        self.tokenizer, self.device = tokenizer, device
        self._ids = itertools.count()
        self._rng = random.Random(seed)

    def new(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        """Sample ``index`` of ``req``, starting from ``token_ids``; added to ``req.seqs``."""
        seed = req.params.seed
        seed = self._rng.getrandbits(63) if seed is None else (seed * 1_000_003 + index) % 2**63
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        seq = Sequence(next(self._ids), req, index, token_ids, gen)
        seq.detokenizer = self.tokenizer.detokenizer(
            req.prompt_token_ids, req.params.skip_special_tokens
        )
        req.seqs.append(seq)
        return seq


def chain_parents(n: int) -> list[int]:
    """The parents of ``n`` drafts that form a chain (``Sequence.draft_parents`` None)."""
    return list(range(-1, n - 1))


def wants_prompt_logprobs(req: Request) -> bool:
    """Prompt logprobs were asked for and are not complete yet."""
    return req.params.prompt_logprobs is not None and req.prompt_logprobs is None
