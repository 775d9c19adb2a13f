"""Constrained decoding's engine plugin (heron.engine.plugin): a grammar matcher per
constrained sequence masks the logits before sampling and follows every accepted token.

The masks of the sequences that are decoding are filled in a worker thread while the model
runs (xgrammar releases the GIL): a matcher's state is final once the previous step's token
is accepted, so the fill starts before scheduling and ``before_sampling`` only waits for it.
Rows it did not cover (a prompt's first token, a forked sibling) are filled on the spot."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from heron import kernels
from heron.engine.plugin import EngineParts, EnginePlugin, register_plugin
from heron.errors import InvalidRequestError
from heron.structured.grammar import GrammarCompiler, xgrammar_module
from heron.structured.params import PARAM, StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

    from heron.config import SamplingParams
    from heron.engine.sequence import Request, Sequence

logger = logging.getLogger(__name__)

_fill_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heron-token-mask")


@register_plugin
class StructuredOutput(EnginePlugin):
    name = "structured_output"

    def __init__(self, parts: EngineParts) -> None:
        super().__init__(parts)
        self._compiler: GrammarCompiler | None = None  # built by the first constrained request
        self._compiler_lock = threading.Lock()
        self.grammars: dict[str, xgrammar.CompiledGrammar] = {}  # request_id -> grammar
        self.matchers: dict[int, xgrammar.GrammarMatcher] = {}  # seq_id -> its matcher
        # The masks being filled for the decoding sequences: (seq_id -> (row, tokens the
        # matcher had accepted)), the bitmask, and the job.
        self._early: tuple[dict[int, tuple[int, int]], torch.Tensor, Future] | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        with self._compiler_lock:  # the server's request threads and the engine's
            if self._compiler is None:
                p = self.parts
                self._compiler = GrammarCompiler(
                    p.tokenizer, p.model_config.vocab_size, list(p.eos_token_ids)
                )
            return self._compiler

    # ------------------------------------------------------------------ a request is added
    def prepare(self, params: SamplingParams) -> None:
        """Compiles the request's grammar (cached by the compiler, so ``add_request`` finds
        it at once); the server calls this off the engine's thread."""
        self._grammar(params)

    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        grammar = self._grammar(req.params)
        if grammar is None:
            return []
        self.grammars[req.request_id] = grammar
        self.matchers[seq.seq_id] = self.compiler.matcher(grammar)
        return []

    # ------------------------------------------------------------------ the step
    def before_schedule(self, running: list[Sequence]) -> None:
        decoding = [s for s in running if s.seq_id in self.matchers and s.num_uncomputed == 1]
        if not decoding:
            return
        xgr = xgrammar_module()
        bitmask = xgr.allocate_token_bitmask(len(decoding), self.compiler.info.vocab_size)
        matchers = [self.matchers[s.seq_id] for s in decoding]
        rows = {s.seq_id: (i, s.num_tokens) for i, s in enumerate(decoding)}
        stops = self.parts.eos_token_ids
        self._early = (rows, bitmask, _fill_pool.submit(_fill, matchers, bitmask, stops))

    def before_sampling(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        early, self._early = self._early, None
        constrained = [i for i, s in enumerate(seqs) if s.request.request_id in self.grammars]
        if early is not None:
            early[2].result()
        if not constrained:
            return seqs, logits
        xgr = xgrammar_module()
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.compiler.info.vocab_size)
        for i in constrained:
            seq = seqs[i]
            done = early[0].get(seq.seq_id) if early is not None else None
            if done is not None and done[1] == seq.num_tokens:
                bitmask[i] = early[1][done[0]]
            else:
                _fill_row(self._matcher(seq), bitmask, i, self.parts.eos_token_ids)
        vocab_size = self.compiler.info.vocab_size
        if kernels.usable(logits) and logits.dtype == torch.float32:
            kernels.apply_token_bitmask_(logits, bitmask, torch.tensor(constrained), vocab_size)
        else:
            xgr.apply_token_bitmask_inplace(
                logits, bitmask, vocab_size=vocab_size, indices=constrained
            )
        return seqs, logits

    def token_sampled(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        matcher = self.matchers.get(seq.seq_id)
        if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(token):
            logger.warning(
                "%s: token %d is outside the grammar; the constraint no longer holds",
                seq.request.request_id,
                token,
            )

    # ------------------------------------------------------------------ a sequence's life
    def finished(self, seq: Sequence) -> None:
        self.matchers.pop(seq.seq_id, None)
        req = seq.request
        if all(s.is_finished for s in req.seqs):
            self.grammars.pop(req.request_id, None)

    def _grammar(self, params: SamplingParams) -> xgrammar.CompiledGrammar | None:
        spec = params.structured_outputs
        if spec is None:
            return None
        if not isinstance(spec, StructuredOutputsParams):
            raise InvalidRequestError(
                f"{PARAM}: expected StructuredOutputsParams, got {type(spec).__name__}",
                param=PARAM,
            )
        if self.parts.multi_token_steps:
            raise InvalidRequestError(
                f"{PARAM}: constrained decoding cannot be combined with speculative decoding "
                "yet (the engine runs with a speculative method)",
                param=PARAM,
            )
        return self.compiler.compile(spec)

    def _matcher(self, seq: Sequence) -> xgrammar.GrammarMatcher:
        """The sequence's matcher; a sibling forked from the request's first sample gets its
        own, having accepted what the sibling generated."""
        matcher = self.matchers.get(seq.seq_id)
        if matcher is None:
            matcher = self.compiler.matcher(self.grammars[seq.request.request_id])
            for token in seq.output_token_ids:
                matcher.accept_token(token)
            self.matchers[seq.seq_id] = matcher
        return matcher


def _fill(
    matchers: list[xgrammar.GrammarMatcher], bitmask: torch.Tensor, stops: tuple[int, ...]
) -> None:
    for i, matcher in enumerate(matchers):
        _fill_row(matcher, bitmask, i, stops)


def _fill_row(
    matcher: xgrammar.GrammarMatcher, bitmask: torch.Tensor, row: int, stops: tuple[int, ...]
) -> None:
    """Row ``row`` of ``bitmask``: the tokens the grammar allows next; once it has ended
    (``ignore_eos`` goes on past its stop token), only the stop tokens."""
    if not matcher.is_terminated():
        matcher.fill_next_token_bitmask(bitmask, row)
        return
    bitmask[row] = 0
    for token in stops:
        bit = 1 << (token % 32)  # an int32 word: bit 31 is its sign
        bitmask[row, token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit
