"""KV-cache compression's engine plugin (heron.engine.plugin): each compressed sequence's
``KVState`` (by seq_id), what its rows capture and may not read, TokenSelect's decode
attention, and the compaction once a step's tokens are in the cache (``KVCompressor``).

A request compresses with its own ``kv_policy``, else the engine's (``EngineConfig``); the
settings are checked here, engine-wide ones when the engine is built. What the policy does
to the cache is told to the engine through the sequence's generic fields: a compacting
policy keeps the sequence off the prefix cache, a query-agnostic one stops a prompt chunk at
the context's end, and one that evicts while decoding bounds the context by the slots held
(so generation may go past ``max_model_len`` positions)."""

from __future__ import annotations

import torch

from heron.config import SamplingParams
from heron.engine.plugin import EngineParts, EnginePlugin, register_plugin
from heron.engine.scheduler import ScheduledBatch
from heron.engine.sequence import Request, Sequence
from heron.errors import InvalidRequestError
from heron.kv.compressor import KVCompressor, KVState
from heron.kv.registry import make_policy
from heron.kv.tokenselect import SelectedRows
from heron.layers.attention import RowsAttention
from heron.layers.kv_cache import table_slots


@register_plugin
class KVCompression(EnginePlugin):
    """Always built: any request may ask for a policy."""

    name = "kv_compression"

    def __init__(self, parts: EngineParts) -> None:
        super().__init__(parts)
        head_dim = parts.model_config.head_dim
        self.compressor = KVCompressor(parts.runner, parts.block_manager, head_dim**-0.5)
        self.states: dict[int, KVState] = {}
        config = parts.config
        if config.kv_policy is not None:
            self._check(config.kv_policy, config.kv_policy_options, config.kv_budget)

    # ------------------------------------------------------------------ settings
    def _state(self, params: SamplingParams, prompt_len: int) -> KVState | None:
        """The request's compression state: its own policy, else the engine's (or none)."""
        config = self.parts.config
        name = params.kv_policy or config.kv_policy
        options = params.kv_policy_options if params.kv_policy else config.kv_policy_options
        prefix = params.kv_prefix_tokens
        if name is None or name == "none":
            if prefix is not None:
                raise InvalidRequestError(
                    "kv_prefix_tokens: only means something with a kv_policy", "kv_prefix_tokens"
                )
            return None
        if prefix is not None and prefix >= prompt_len:
            raise InvalidRequestError(
                f"kv_prefix_tokens: must be less than the prompt ({prompt_len} tokens), got "
                f"{prefix}; leave it unset to compress the whole prompt",
                param="kv_prefix_tokens",
            )
        budget = params.kv_budget or config.kv_budget
        self._check(name, options, budget)
        return KVState(make_policy(name, options), budget, compress_at=prefix)

    def _check(self, name: str, options: dict | None, budget: float) -> None:
        parts = self.parts
        if parts.multi_token_steps:
            raise InvalidRequestError(
                "kv_policy: KV compression cannot be combined with speculative decoding",
                param="kv_policy",
            )
        if parts.runner.sliding_window is not None:
            raise InvalidRequestError(
                f"kv_policy: this {parts.model_config.architecture} model has sliding-window "
                "layers, which KV compression does not support yet",
                param="kv_policy",
            )
        if budget > parts.max_model_len:
            raise InvalidRequestError(
                f"kv_budget: {budget} tokens is more than the context ({parts.max_model_len} "
                "tokens, max_model_len)",
                param="kv_budget",
            )
        make_policy(name, options)  # unknown names and bad options raise here

    @staticmethod
    def _set_cache_rules(seq: Sequence, st: KVState) -> None:
        """What ``st``'s policy does to ``seq``'s cache, in the engine's terms."""
        seq.uses_prefix_cache = not st.policy.evicts  # compacted blocks are not their hashes'
        seq.chunk_boundary = st.compress_at  # compressed before the rest of the prompt
        seq.context_counts_slots = st.policy.evict_during_decode  # a bounded cache

    # ------------------------------------------------------------------ a sequence's life
    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        st = self._state(req.params, len(req.prompt_token_ids))
        if st is not None:
            self.states[seq.seq_id] = st
            self._set_cache_rules(seq, st)
        return []

    def forked(self, parent: Sequence, child: Sequence) -> None:
        """A sibling shares the compressed prompt and goes on from its parent's state."""
        st = self.states.get(parent.seq_id)
        if st is not None:
            self.states[child.seq_id] = st.fork()
            self._set_cache_rules(child, st)

    def preempted(self, seq: Sequence) -> None:
        st = self.states.get(seq.seq_id)
        if st is not None:  # recomputed from scratch, compressed again after its prefill
            st.reset()

    def finished(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)

    # ------------------------------------------------------------------ the step
    def attention(self, seq: Sequence, n: int) -> RowsAttention | None:
        """The rows whose queries the policy needs, the slots a smaller layer did not fill,
        and TokenSelect's attention for a decode step past the budget."""
        st = self.states.get(seq.seq_id)
        if st is None:
            return None
        capture = st.capture_offsets(seq, seq.num_computed_tokens, n)
        selected = None
        if n == 1 and st.selects_now(seq):
            bm = self.parts.block_manager
            slots = table_slots(
                seq.block_table, seq.num_kv_slots + 1, bm.block_size, self.parts.runner.device
            )
            selected = SelectedRows(st, slots)
        if not capture and st.layer_lens is None and selected is None:
            return None
        return RowsAttention(capture, st.layer_lens, st.hole_end, selected)

    def captured(self, seq: Sequence, queries: torch.Tensor, slots: list[int]) -> None:
        st = self.states.get(seq.seq_id)
        if st is not None:
            st.add_queries(queries, slots)

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        """Compress where a prompt is now in or a decoding cache went past its budget (before
        the step's tokens are sampled and ``n > 1`` samples fork)."""
        for seq in batch.seqs:
            st = self.states.get(seq.seq_id)
            if st is not None and not seq.is_finished:
                self.compressor.after_step(seq, st)

    def stats(self) -> dict[str, float]:
        return {
            "kv_tokens_evicted": self.compressor.num_evicted,
            "kv_compressions": self.compressor.num_compressions,
        }
