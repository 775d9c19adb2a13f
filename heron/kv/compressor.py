"""The one machinery behind every KV policy: gather the statistics a policy needs, let it score
the held tokens, keep each KV head's best, compact the paged cache and give blocks back.

How per-head selection fits one block table shared by all heads and layers: every head of a
layer keeps the same *number* of tokens, and each head's winners are written, in their
original order, into the sequence's first slots — independently per layer and head, so slot
``j`` may hold token 5 for one head and token 900 for another. Keys were rotated at their
true positions when first written, so a slot needs no position: attention reads every held
slot. The sequence's position counter keeps advancing from the uncompressed length
(``Sequence.num_computed_tokens``) while its slot count (``num_kv_slots``) is what it holds;
new tokens go after the held slots. A policy with layer-varying budgets (PyramidKV) makes the
sequence hold its largest layer budget; each smaller layer masks the slots it did not fill
(``KVState.layer_lens`` .. ``hole_end``) in every later decode step.

Statistics: the runner captures the rotated queries of the rows a policy asked for (the
prompt's last ``window`` positions, across chunk boundaries; each decode query for H2O-like
policies); attention probabilities are computed here, once per eviction, only for those
queries — never whole attention matrices.

Rules with the rest of the engine:

* prefix caching: a compressed sequence neither reads nor registers prefix-cache blocks (a
  compacted block is not the block its token hash names); other requests keep using the
  cache;
* ``n > 1``: the prompt is compressed before the samples fork, so they share the compacted
  blocks; a later decode-time eviction swaps shared blocks for fresh ones (never writes into
  a sibling's block);
* preemption: the sequence is recomputed from scratch (prompt and generated tokens) and
  compressed again once that prefill ends, with the budget of its prompt;
* speculative decoding and sliding-window models (Gemma3) are refused;
* a policy that does not evict (TokenSelect) leaves the cache, and prefix caching, as they are;
* quantized caches (int8, KIVI int4/int2): K/V are read through ``gather_blocks`` and the kept
  ones written back through ``write_slots``, so they are requantized where they land (a KIVI
  block is unpacked into its staging row first and packed again once complete).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from heron.kv.policy import KVPolicy, resolve_budget
from heron.layers.kv_cache import gather_blocks, table_slots, write_slots


@dataclass(eq=False)
class KVState:
    """One sequence's compression state."""

    policy: KVPolicy
    budget: float  # as given: a fraction of the prompt (or context), or tokens
    compress_at: int | None = None  # query-agnostic: prompt tokens compressed (the context)
    target: int = 0  # tokens kept per layer and head, set when the prompt is in
    prefilled: bool = False
    queries: list[torch.Tensor] = field(default_factory=list)  # [L, n, H, D] chunks
    query_slots: list[int] = field(default_factory=list)  # the slot each query was at
    acc: torch.Tensor | None = None  # [L, Hkv, S] the policy's running statistics
    layer_lens: torch.Tensor | None = None  # [L] tokens each layer kept (if they differ)
    hole_end: int = 0  # slots layer l does not read: layer_lens[l] .. hole_end
    num_compressions: int = 0
    # TokenSelect: each layer's last choice (heron.kv.tokenselect.Selection), and how often
    # a step chose anew or reused the last choice.
    selection: dict = field(default_factory=dict)
    num_selections: int = 0
    num_reused: int = 0

    def context_end(self, seq) -> int:
        """Prompt tokens the first compression covers: all, or the context's."""
        return self.compress_at or seq.num_prompt_tokens

    def capture_offsets(self, seq, start: int, n: int) -> list[int]:
        """Rows (offsets in this step's chunk) whose queries this sequence's policy needs."""
        if not self.prefilled:
            end = min(start + n, self.context_end(seq))
            first = max(start, self.context_end(seq) - self.policy.window)
            return list(range(first - start, end - start)) if first < end else []
        return list(range(n)) if self.policy.needs_decode_queries else []

    def add_queries(self, queries: torch.Tensor, slots: list[int]) -> None:
        """Captured queries [L, n, H, D] and the slots they were at, kept until the next
        compression."""
        self.queries.append(queries)
        self.query_slots.extend(slots)

    def reset(self) -> None:
        """The sequence was preempted: everything is recomputed."""
        self.prefilled = False
        self.queries, self.query_slots = [], []
        self.acc = self.layer_lens = None
        self.hole_end = 0
        self.selection = {}

    def fork(self) -> KVState:
        return KVState(
            self.policy,
            self.budget,
            self.compress_at,
            self.target,
            self.prefilled,
            list(self.queries),
            list(self.query_slots),
            None if self.acc is None else self.acc.clone(),
            self.layer_lens,
            self.hole_end,
            self.num_compressions,
            dict(self.selection),
        )

    def selects_now(self, seq) -> bool:
        """This decode step attends to a chosen subset of the cache (TokenSelect): the
        sequence holds more than its budget."""
        return self.policy.selects and self.prefilled and seq.num_kv_slots >= self.target


class KVCompressor:
    def __init__(self, runner, block_manager, scale: float) -> None:
        self.runner = runner
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.scale = scale
        self.num_evicted = 0  # tokens evicted over the engine's life
        self.num_compressions = 0

    def after_step(self, seq, st: KVState) -> None:
        """Called once the step's tokens are counted as computed (and its captured queries
        added to ``st``), before sampled tokens are appended and before ``n > 1`` samples
        fork."""
        if not st.prefilled:
            if seq.num_computed_tokens < st.context_end(seq):
                return  # more prompt chunks to come
            st.prefilled = True
            st.target = resolve_budget(st.budget, st.context_end(seq))
            if st.policy.evicts:
                self.compress(seq, st, prompt=True)
        elif st.policy.evict_during_decode and seq.num_kv_slots >= st.target + self.block_size:
            self.compress(seq, st, prompt=False)

    # ------------------------------------------------------------------ the compaction
    @torch.inference_mode()
    def compress(self, seq, st: KVState, prompt: bool) -> None:
        policy = st.policy
        caches = self.runner.kv_caches  # per layer (K, V): plain, int8 or KIVI storage
        dev = self.runner.device
        num_layers = len(caches)
        held = seq.num_kv_slots
        if held <= st.target and st.layer_lens is None and not policy.accumulates:
            st.queries, st.query_slots = [], []  # nothing to decide, nothing to carry
            return
        bs = self.block_size
        table = seq.block_table
        blocks = torch.tensor(table[: -(-held // bs)], dtype=torch.long, device=dev)
        keys = torch.stack(
            [gather_blocks(k, blocks, bs)[:held] for k, _ in caches]
        )  # [L, S, Hkv, D]
        values = torch.stack([gather_blocks(v, blocks, bs)[:held] for _, v in caches])
        queries = torch.cat(st.queries, dim=1) if st.queries else None  # [L, n, H, D]
        q_slots = torch.tensor(st.query_slots, device=dev)
        num_kv_heads = keys.shape[2]
        valid = torch.ones(num_layers, held, dtype=torch.bool, device=dev)
        if st.layer_lens is not None:
            pos = torch.arange(held, device=dev)
            lens = st.layer_lens.to(dev)[:, None]
            valid &= ~((pos[None, :] >= lens) & (pos[None, :] < st.hole_end))
        weights = None
        if policy.budget_from_attention and queries is not None:
            weights = [
                policy.layer_weight(
                    self._attention(queries[i], q_slots, keys[i].transpose(0, 1).float(), valid[i])
                )
                for i in range(num_layers)
            ]
        budgets = [min(b, held) for b in policy.layer_budgets(st.target, num_layers, weights)]
        keep = max(budgets)
        evict = keep < held or (st.layer_lens is not None and prompt)
        if not evict and not policy.accumulates:
            st.queries, st.query_slots = [], []
            return
        protect = self._protected(policy, held, keep, prompt).to(dev)

        new_acc = []
        kept_idx = []
        merged: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for layer in range(num_layers):
            k_l = keys[layer].transpose(0, 1).float()  # [Hkv, S, D]
            v_l = values[layer].transpose(0, 1).float()
            attn = None
            if queries is not None:
                attn = self._attention(queries[layer], q_slots, k_l, valid[layer])
            acc = None
            if st.acc is not None:
                acc = st.acc[layer]
                if acc.shape[-1] < held:  # slots appended since the last eviction
                    acc = F.pad(acc, (0, held - acc.shape[-1]))
            if attn is not None and policy.accumulates:
                acc = policy.accumulate(acc, attn)
            if not evict:
                if acc is not None:
                    new_acc.append(acc)
                continue
            score = policy.score(layer, attn, k_l, v_l, acc).float().clone()
            score[:, protect] = torch.finfo(torch.float32).max / 2
            score[:, ~valid[layer]] = -torch.inf
            # ties (protected slots, equal scores): prefer the later token
            score = score + torch.arange(held, device=score.device) * 1e-12
            idx = score.topk(budgets[layer], dim=-1).indices.sort(dim=-1).values  # [Hkv, b]
            kept_idx.append(idx)
            merged.append(policy.merge(k_l, v_l, idx, valid[layer]))
            if acc is not None:
                new_acc.append(F.pad(acc.gather(1, idx), (0, keep - idx.shape[1])))
        st.queries, st.query_slots = [], []
        if not evict:
            if new_acc:
                st.acc = torch.stack(new_acc)
            return
        if not self.bm.compact(seq, keep):
            return  # no fresh block for a shared one: try again at the next eviction
        dst = table_slots(seq.block_table, keep, bs, dev)
        heads = torch.arange(num_kv_heads, device=dev)[:, None]
        kivi = self.runner.kivi
        if kivi is not None:  # unpack the blocks first: a smaller layer leaves slots unwritten
            kivi.prepare(dst, refill=True)
        for layer, idx in enumerate(kept_idx):
            b = idx.shape[1]
            # keys[layer]: [S, Hkv, D]; token idx[h, j] of head h goes to slot j
            for kv, src in ((0, keys), (1, values)):
                if merged[layer] is not None:  # [Hkv, b, D] with evicted tokens merged in
                    picked = merged[layer][kv].to(keys.dtype)
                else:
                    picked = src[layer][idx, heads]  # [Hkv, b, D]
                write_slots(caches[layer][kv], dst[:b], picked.transpose(0, 1).contiguous())
        if kivi is not None:
            kivi.finish()
        lens = torch.tensor([idx.shape[1] for idx in kept_idx])
        if bool((lens < keep).any()):
            st.layer_lens, st.hole_end = lens, keep
        else:
            st.layer_lens, st.hole_end = None, 0
        st.acc = torch.stack(new_acc) if new_acc else None
        seq.num_evicted += held - keep
        st.num_compressions += 1
        self.num_evicted += held - keep
        self.num_compressions += 1

    def _attention(
        self, q: torch.Tensor, q_slots: torch.Tensor, k: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Softmax attention of captured queries ``q`` [n, H, D] over held keys ``k``
        [Hkv, S, D]: ``[Hkv, G, n, S]``, causal (a query sees the slots up to its own)."""
        n, num_heads, d = q.shape
        num_kv_heads, held = k.shape[0], k.shape[1]
        qg = q.float().view(n, num_kv_heads, num_heads // num_kv_heads, d)
        logits = torch.einsum("nhgd,hsd->hgns", qg, k) * self.scale
        pos = torch.arange(held, device=k.device)
        see = (pos[None, :] <= q_slots[:, None]) & valid[None, :]  # [n, S]
        logits = logits.masked_fill(~see, -torch.inf)
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def _protected(self, policy: KVPolicy, held: int, keep: int, prompt: bool) -> torch.Tensor:
        mask = torch.zeros(held, dtype=torch.bool)
        mask[: policy.sinks] = True
        recent = policy.recent
        ratio = getattr(policy, "recent_ratio", None)
        if ratio is not None:
            recent = max(recent, int(keep * ratio))
        if prompt and policy.protect_window:
            recent = max(recent, policy.window)
        if recent:
            mask[max(0, held - recent) :] = True
        return mask
