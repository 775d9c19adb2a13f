"""Engine: the step loop every front end shares (``LLM`` offline, the HTTP server, the CLI).

``add_request`` validates and queues; each ``step`` schedules one batch, runs the model,
samples, detokenizes, applies stop conditions and returns the requests that changed."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace

import torch

from heron.config import EngineConfig, SamplingParams
from heron.engine.block_manager import BlockManager
from heron.engine.plugin import EngineParts, Plugins
from heron.engine.runner import ModelRunner
from heron.engine.sampler import Sampler, finite_rows, top_logprobs
from heron.engine.scheduler import Scheduler
from heron.engine.sequence import Request, Sequence, SequenceFactory, wants_prompt_logprobs
from heron.errors import InvalidRequestError
from heron.layers.attention import RowsAttention
from heron.models.catalog import resolve_model_path
from heron.models.loader import Checkpoint, build_model
from heron.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from heron.platform import free_memory_bytes, resolve_device, resolve_dtype
from heron.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, config.quantization != "none")
        path = resolve_model_path(config.model)
        self.model_path = path
        ckpt = Checkpoint(path, self.dtype)
        self.model_config = ckpt.config
        self.tokenizer = Tokenizer(path)
        model = build_model(ckpt, self.device, self.dtype, config.quantization)
        del ckpt
        family = type(model)
        if not self.tokenizer.hf.chat_template and family.default_chat_template:
            # e.g. a GGUF of a Gemma 3 base model: the family's format still applies.
            self.tokenizer.hf.chat_template = family.default_chat_template

        cfg = self.model_config
        self.max_model_len = min(
            config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        # Plugins hold parts of the engine, never the engine: no reference cycle keeps a
        # dropped engine's KV cache and weights alive until the next garbage collection.
        self.sequences = SequenceFactory(self.tokenizer, self.device, config.seed)
        self.runner = ModelRunner(
            model,
            cfg,
            num_blocks,
            config.block_size,
            self.device,
            self.dtype,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        if self.runner.kivi is not None:
            self.block_manager.on_release = self.runner.kivi.release
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        # Turn ends (<end_of_turn>, <|im_end|>) that GGUF metadata does not list as EOS.
        for text in family.end_of_generation_tokens:
            token_id = self.tokenizer.backend.token_to_id(text)
            if token_id is not None:
                eos.add(token_id)
        self.eos_token_ids = sorted(eos)
        self.sampler = Sampler(self.eos_token_ids)
        self.plugins = Plugins(
            EngineParts(
                config,
                cfg,
                self.tokenizer,
                self.runner,
                self.block_manager,
                self.scheduler,
                self.max_model_len,
                self.sequences.new,
                eos_token_ids=tuple(self.eos_token_ids),
            )
        )
        self.requests: dict[str, Request] = {}
        self._request_ids = itertools.count()
        logger.info(
            "loaded %s (%s, %d layers) on %s in %s%s in %.1fs; KV cache: %d blocks of %d tokens%s",
            path.name,
            cfg.architecture,
            cfg.num_layers,
            self.device,
            self.dtype,
            "" if config.quantization == "none" else f", {config.quantization} weights",
            time.perf_counter() - t0,
            num_blocks,
            config.block_size,
            "" if config.kv_cache_dtype == "auto" else f" ({config.kv_cache_dtype})",
        )

    # ------------------------------------------------------------------ set-up
    def _num_kv_blocks(self) -> int:
        cfg, c = self.model_config, self.config
        per_block = ModelRunner.bytes_per_block(cfg, c.block_size, self.dtype, c.kv_cache_dtype)
        budget = c.kv_cache_memory
        budget = budget if budget > 1 else budget * free_memory_bytes(self.device)
        num_blocks = int(budget // per_block)
        # More than every running sequence at full length can never be used.
        useful = c.max_num_seqs * -(-self.max_model_len // c.block_size)
        num_blocks = min(num_blocks, useful)
        needed = -(-self.max_model_len // c.block_size)
        if num_blocks < needed:
            if c.max_model_len is not None:
                raise InvalidRequestError(
                    f"kv_cache_memory: {int(budget)} bytes hold {num_blocks * c.block_size} "
                    f"tokens, fewer than max_model_len={self.max_model_len}; raise "
                    "kv_cache_memory or lower max_model_len",
                    param="kv_cache_memory",
                )
            self.max_model_len = num_blocks * c.block_size
            if self.max_model_len < c.block_size:
                raise InvalidRequestError(
                    f"kv_cache_memory: {int(budget)} bytes do not hold one KV block "
                    f"({per_block} bytes); raise kv_cache_memory",
                    param="kv_cache_memory",
                )
            logger.warning(
                "KV cache holds %d tokens; max_model_len lowered to that", self.max_model_len
            )
        return num_blocks

    # ------------------------------------------------------------------ requests
    def prepare_request(self, params: SamplingParams) -> None:
        """The slow part of checking and setting up ``params`` (a grammar to compile), safe to
        call from another thread before ``add_request``: the server does, so that a request
        being added never holds the running ones."""
        self.plugins.prepare(params)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty", param="prompt")
            text, ids = prompt, self.tokenizer.encode(prompt, self.max_model_len)
        else:
            text, ids = None, [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"prompt: token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt"
                )
        if not ids:
            raise InvalidRequestError("prompt: must not be empty", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt: {len(ids)} tokens, but the context is {self.max_model_len} tokens "
                "(max_model_len) and at least one must be left to generate; shorten the prompt",
                param="prompt",
            )
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already running", "request_id")
        req = Request(request_id, text, ids, params)
        if params.prompt_logprobs is not None and len(ids) == 1:
            req.prompt_logprobs = [None]  # nothing precedes the only token
        seq = self.sequences.new(req, 0, list(ids))
        try:
            extra = self.plugins.add_request(req, seq)
        except BaseException:
            self.plugins.finished(seq)  # a plugin that accepted it drops its state
            raise
        self.requests[request_id] = req
        self.scheduler.add(seq)
        for other in extra:
            self.scheduler.add(other)
        return req

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        stats = {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
        }
        stats.update(self.plugins.stats())
        return stats

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        self.plugins.before_schedule(self.scheduler.running)
        batch = self.scheduler.schedule()
        for seq in batch.preempted:  # its recomputation starts from nothing
            self.plugins.preempted(seq)
        if batch.empty:
            return []
        need_prompt = {s.seq_id for s in batch.seqs if wants_prompt_logprobs(s.request)}
        partial: dict[int, list[int]] = {}  # seq_id -> the layers its decode row runs
        plans: dict[int, RowsAttention] = {}  # seq_id -> how its rows attend, where it differs
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            layers = self.plugins.layers(seq, n)
            if layers is not None:
                partial[seq.seq_id] = layers
            plan = self.plugins.attention(seq, n)
            if plan is not None:
                plans[seq.seq_id] = plan
        started = time.perf_counter()
        result = self.runner.execute(batch, need_prompt, partial, plans)
        seconds = time.perf_counter() - started
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.seq_id not in result.spec_logits:  # settled after verification below
                seq.num_computed_tokens += n
                # Blocks a plugin rewrites, or its partial model wrote, are not what their
                # hashes name.
                if seq.uses_prefix_cache and self.plugins.blocks_exact(seq):
                    self.block_manager.register_full_blocks(seq)
            if seq.seq_id in result.captured:
                self.plugins.captured(seq, *result.captured[seq.seq_id])
        self.plugins.after_forward(batch, seconds)
        for seq in batch.seqs:
            if seq.seq_id in result.prompt_logits:
                first, logits = result.prompt_logits[seq.seq_id]
                self._add_prompt_logprobs(seq.request, first, logits)

        # Expand each prompt-final row into its request's n samples (copy-on-write siblings).
        sample_seqs: list[Sequence] = []
        rows: list[int] = []
        for row, seq in enumerate(result.sample_seqs):
            req = seq.request
            sample_seqs.append(seq)
            rows.append(row)
            if not req.forked:
                req.forked = True
                req.times.first_token = time.monotonic()
                for i in range(1, req.params.n):
                    child = self.sequences.new(req, i, list(req.prompt_token_ids))
                    self.block_manager.fork(seq, child)
                    child.block_hashes = list(seq.block_hashes)
                    self.plugins.forked(seq, child)
                    self.scheduler.add_running(child)
                    sample_seqs.append(child)
                    rows.append(row)
        logits = result.sample_logits
        if len(rows) != len(logits):  # n > 1 requests repeat their first row
            logits = logits[rows]
        sample_seqs, logits = self.plugins.before_sampling(sample_seqs, logits)
        samples = self.sampler.sample(logits, sample_seqs)

        touched: dict[str, Request] = {}
        for row, (seq, sample) in enumerate(zip(sample_seqs, samples, strict=True)):
            touched[seq.request.request_id] = seq.request
            if sample is None:
                self._fail(seq)
                continue
            token, logprobs = sample
            self.plugins.token_sampled(seq, token, logits[row])
            self._append_token(seq, token, logprobs)
        for seq in batch.seqs:
            if seq.seq_id in result.spec_logits:
                self._settle_drafts(seq, result.spec_logits[seq.seq_id])
        for seq in batch.seqs:  # prefill chunks that sampled nothing still report progress
            touched.setdefault(seq.request.request_id, seq.request)
        outputs = []
        for req in touched.values():
            if req.finished:
                req.times.finished = time.monotonic()
                self.requests.pop(req.request_id, None)
            outputs.append(self._request_output(req))
        return outputs

    def _settle_drafts(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Keep the verified drafts: their K/V are already in the cache (a tree's accepted
        branch is moved up to follow the last real token); the rejected ones' blocks go back,
        and their stale slots are overwritten by later steps."""
        if not bool(finite_rows(logits).all()):
            return self._fail(seq)
        first = seq.num_computed_tokens + 1  # the first draft's slot
        tokens, path = self.plugins.settle_drafts(seq, logits)
        moves = [(first + i, first + j) for j, i in enumerate(path) if i != j]
        if moves:
            self.runner.move_slots(seq.block_table, moves)
        seq.num_computed_tokens += len(tokens)  # the last real token and the accepted drafts
        self.block_manager.truncate(seq, seq.num_computed_tokens)
        for token, logprobs in tokens:
            self._append_token(seq, token, logprobs)
            if seq.is_finished:
                return
        self.block_manager.register_full_blocks(seq)

    def _add_prompt_logprobs(self, req: Request, first: int, logits: torch.Tensor) -> None:
        k = req.params.prompt_logprobs or 0
        lsm = torch.log_softmax(logits.float(), dim=-1)
        parts = req.prompt_logprobs_parts  # parts[i] is prompt position i + 1
        for j in range(lsm.shape[0]):
            if first + j - 1 < len(parts):  # already done before a preemption
                continue
            parts.append(self._decoded(top_logprobs(lsm[j], req.prompt_token_ids[first + j], k)))
        if len(parts) == len(req.prompt_token_ids) - 1:
            req.prompt_logprobs = [None, *parts]

    def _decoded(self, lp: PositionLogprobs) -> PositionLogprobs:
        for tid, entry in lp.items():
            entry.decoded_token = self.tokenizer.id_to_piece(tid)
        return lp

    def _append_token(self, seq: Sequence, token: int, logprobs: PositionLogprobs | None) -> None:
        p = seq.request.params
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(self._decoded(logprobs))
        num_out = len(seq.output_token_ids)
        if token in self.eos_token_ids and not p.ignore_eos:
            return self._finish(seq, "stop", None)
        if token in p.stop_token_ids:
            return self._finish(seq, "stop", token)
        new_text = seq.detokenizer.step(token)
        seq.text += new_text
        if p.stop_strings and new_text and num_out >= p.min_tokens:
            start = max(0, len(seq.text) - len(new_text) - max(map(len, p.stop_strings)) + 1)
            hits = [(i, s) for s in p.stop_strings if (i := seq.text.find(s, start)) >= 0]
            if hits:
                idx, stop = min(hits)
                seq.text = seq.text[:idx]
                return self._finish(seq, "stop", stop)
        max_tokens = p.max_tokens or self.max_model_len
        context = seq.num_tokens
        if seq.context_counts_slots:
            context -= seq.num_evicted  # a bounded cache: what it holds is the limit
        if num_out >= max_tokens or context >= self.max_model_len:
            return self._finish(seq, "length", None)
        return None

    def _fail(self, seq: Sequence) -> None:
        """Non-finite logits: this sample ends with finish_reason "error" (the front end
        reports it); the rest of the batch, its siblings included, goes on."""
        logger.warning(
            "%s: sample %d ended: its logits are NaN or infinite after %d generated tokens",
            seq.request.request_id,
            seq.index,
            len(seq.output_token_ids),
        )
        self._finish(seq, "error", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.plugins.finished(seq)

    def _request_output(self, req: Request) -> RequestOutput:
        holdback = max(map(len, req.params.stop_strings), default=1) - 1
        outs = []
        for s in req.seqs:
            text = s.text
            if holdback and not s.is_finished:  # may be the start of a stop string
                text = text[: max(0, len(text) - holdback)]
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=list(s.output_token_ids),
                    logprobs=list(s.logprobs) if req.params.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            prompt_logprobs=req.prompt_logprobs,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            metrics=dict(req.metrics),
            times=replace(req.times),  # a snapshot: the request's own go on changing
        )
