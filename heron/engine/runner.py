"""ModelRunner: owns the model and the paged KV cache; turns a ScheduledBatch into one flat,
unpadded batch (ids, positions, slot mapping, attention metadata), runs the model and
returns the logits of the rows that need sampling (and of prompt rows for prompt logprobs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from heron import kernels
from heron.engine.scheduler import ScheduledBatch
from heron.engine.sequence import chain_parents
from heron.layers.attention import AttentionMetadata, RowsAttention, RowSpan
from heron.layers.chunk_attention import block_kernel_runs
from heron.layers.kivi import KIVI_BITS, KiviCache
from heron.layers.kv_cache import Int8Slots, block_bytes
from heron.layers.rotary import RotaryEmbedding
from heron.layers.self_attention import SelfAttention
from heron.models.config import ModelConfig
from heron.platform import lazy_zeros

logger = logging.getLogger(__name__)

# A prompt's first chunk attends through the block kernel from this many tokens (bf16): from
# there the kernel beats SDPA's causal flash attention, with AMX or without; below it SDPA is
# faster (`heron bench prefill` measures both).
_KERNEL_MIN_FIRST_CHUNK = 256


@dataclass
class StepLogits:
    """Logits of one step: ``sample_logits[i]`` belongs to ``sample_seqs[i]``; a sequence
    verifying drafts has all its rows (``1 + drafts``) in ``spec_logits`` instead."""

    sample_seqs: list
    sample_logits: torch.Tensor  # [S, V] float32
    spec_logits: dict[int, torch.Tensor]  # seq_id -> [1 + drafts, V]
    # seq -> (first prompt position predicted, [rows, V] logits) for prompt logprobs
    prompt_logits: dict[int, tuple[int, torch.Tensor]]
    # seq_id -> (the queries [L, n, H, D] of the rows a plugin asked to capture, their slots)
    captured: dict[int, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.dtype = dtype  # what the model and attention compute in
        self.cfg = model_config
        self.block_size = block_size
        self.device = device
        # Tokens a sliding-window layer sees (itself included); None: the model has none.
        self.sliding_window: int | None = model.sliding_window
        # Plain decode rows attend through heron's compiled kernel, straight from the cache.
        self.decode_kernel = device.type == "cpu" and kernels.available()
        # Prefill chunks attend causally through the block kernel (``_span``).
        self.chunk_kernel = block_kernel_runs(device, dtype)
        slots = num_blocks * block_size
        shape = (
            model_config.num_layers,
            2,
            slots,
            model_config.num_kv_heads,
            model_config.head_dim,
        )
        # Attention reads whole blocks and masks the slots past a sequence's end; masked slots
        # get weight 0, and 0 * NaN from uninitialised memory would still be NaN: start zeroed.
        self.kv_scales: torch.Tensor | None = None  # int8: [L, 2, slots, Hkv]
        self.kivi: KiviCache | None = None  # int4 / int2
        self.kv_cache: torch.Tensor | None = None
        if kv_cache_dtype in KIVI_BITS:
            num_layers, _, _, heads, dim = shape
            self.kivi = KiviCache(
                kv_cache_dtype, num_layers, num_blocks, block_size, heads, dim, dtype, device
            )
            self.kv_caches = [self.kivi.layer(i) for i in range(num_layers)]
        elif kv_cache_dtype == "int8":
            self.kv_cache = lazy_zeros(shape, torch.int8, device)
            self.kv_scales = lazy_zeros(shape[:-1], torch.float32, device)
            self.kv_caches = [
                tuple(Int8Slots(d, s, dtype) for d, s in zip(data, scales, strict=True))
                for data, scales in zip(self.kv_cache, self.kv_scales, strict=True)
            ]
        else:
            self.kv_cache = lazy_zeros(shape, dtype, device)
            self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
        for i, attn in enumerate(attns):
            attn.layer_idx = i
        self.rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]

    @staticmethod
    def bytes_per_block(
        cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
    ) -> int:
        return block_bytes(
            kv_cache_dtype, cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, dtype
        )

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        needs_prompt_logits: set[int],
        partial: dict[int, list[int]] | None = None,
        plans: dict[int, RowsAttention] | None = None,
    ) -> StepLogits:
        """``partial``: seq_id -> the only layers that sequence's decode row goes through
        (an engine plugin's cheaper model); ``plans``: seq_id -> how its rows attend where a
        plugin changes it (heron.engine.plugin)."""
        partial = partial or {}
        plans = plans or {}
        if batch.copies:
            self.copy_blocks(batch.copies)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs = []
        spec_rows: dict[int, tuple[int, int]] = {}
        prompt_rows: dict[int, tuple[int, int, int]] = {}
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        decode_trees: list[list[int] | None] = []  # a verifying sequence's draft tree
        decode_visible: list[tuple[int, int] | None] = []  # a draft-tree row's (from, bits)
        spans: list[RowSpan] = []
        capture: list[int] = []  # rows whose queries a plugin asked for
        capture_of: dict[int, tuple[int, int, list[int]]] = {}  # seq_id -> (from, to, slots)
        holes: list[tuple[int, torch.Tensor, int]] = []  # (decode row, hole starts, hole end)

        # Decode rows through fewer layers run apart, grouped by their layers.
        work = list(zip(batch.seqs, batch.num_new_tokens, strict=True))
        for seq, n in work:
            if seq.seq_id in partial and not _is_decode(seq, n):
                raise ValueError(f"only a decode row may skip layers (sequence {seq.seq_id})")
        partial_seqs = [seq for seq, _ in work if seq.seq_id in partial]
        # Attention batches decode steps together (one query each, or the last real token and
        # its drafts when verifying), so they go first in the flat batch; decode rows with
        # their own attention (a plugin's) attend apart, as spans, after the dense ones.
        items = sorted(
            (item for item in work if item[0].seq_id not in partial),
            key=lambda item: (not _is_decode(*item), _attends_apart(plans, item[0])),
        )
        for seq, n in items:
            plan = plans.get(seq.seq_id)
            start = seq.num_computed_tokens
            row = len(ids)
            ids.extend((seq.token_ids + seq.draft_token_ids)[start : start + n])
            pos = range(start, start + n)  # the slots; a draft tree's positions are its depths
            tree = None
            if seq.draft_token_ids:
                tree = seq.draft_parents or chain_parents(len(seq.draft_token_ids))
            positions.extend(pos if tree is None else _tree_positions(start, tree))
            table = seq.block_table
            ev = seq.num_evicted  # slot = position - evicted tokens (0 where none were)
            slots.extend(table[(p - ev) // bs] * bs + (p - ev) % bs for p in pos)
            if plan is not None and plan.capture:
                a = len(capture)
                capture.extend(row + o for o in plan.capture)
                capture_of[seq.seq_id] = (a, len(capture), [start - ev + o for o in plan.capture])
            if seq.draft_token_ids:  # verify: every row predicts the token after it
                spec_rows[seq.seq_id] = (row, row + n)
            elif start + n == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)
            if seq.seq_id in needs_prompt_logits and start < seq.num_prompt_tokens - 1:
                last = min(start + n, seq.num_prompt_tokens - 1)  # rows predicting prompt tokens
                prompt_rows[seq.seq_id] = (start + 1, row, row + last - start)
            if _is_decode(seq, n) and not _attends_apart(plans, seq):
                plain = plan is None  # no holes to mask, no queries to capture
                if tree is not None and plain and _rows_as_decodes(tree, self.sliding_window):
                    # Row i of a draft tree sees the context, its ancestors and itself, all
                    # at slots up to its own (parents precede children): a decode row of its
                    # own length that skips the other drafts' slots (a chain skips none), so
                    # it takes the compiled kernel as plain decode steps do.
                    for i, sees in enumerate(_tree_mask(tree, torch.device("cpu")).tolist()):
                        decode_tables.append(table)
                        decode_lens.append(start + i + 1)
                        decode_trees.append(None)
                        bits = sum(1 << j for j, seen in enumerate(sees) if seen)
                        decode_visible.append((start, bits))
                else:
                    if plan is not None and plan.hole_start is not None:
                        holes.append((len(decode_lens), plan.hole_start, plan.hole_end))
                    decode_tables.append(table)
                    decode_lens.append(start - ev + n)
                    decode_trees.append(tree)
                    decode_visible.append(None)
            else:
                span = self._span(row, start - ev, n, table)
                if plan is not None:
                    span.attend = plan.attend
                    if plan.hole_start is not None:  # e.g. a chunk after a compressed context
                        width = len(span.context_blocks) * bs
                        causal = _context_mask(start - ev, n, width, self.device)
                        starts = plan.hole_start.to(self.device)
                        hole = _hole(starts, plan.hole_end, causal.shape[-1])
                        span.layer_masks = causal[None] & ~hole[:, None, :]
                spans.append(span)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_size=bs,
            num_decodes=len(decode_lens),
            spans=spans,
        )
        if decode_lens:
            self._decode_tables(meta, decode_tables, decode_lens, decode_trees, decode_visible)
            if holes:
                meta.decode_layer_masks = _hole_masks(meta.decode_mask, holes)
        meta.make_masks_additive(self.dtype)
        if capture:
            meta.capture_rows = torch.tensor(capture, dtype=torch.long, device=dev)
        if positions:
            top = max(positions)
            for rotary in self.rotaries:  # a cache kept bounded may outlive the trained range
                if top >= rotary.cos.shape[0]:
                    rotary.max_positions = 2 * top
                    rotary.reset_buffers(rotary.cos.device)
        sample_logits = None
        spec_logits: dict[int, torch.Tensor] = {}
        if ids:
            hidden = self._forward(ids, positions, meta)
            # One LM-head pass for the sampled rows and every verifying sequence's rows.
            spec_index = [r for a, b in spec_rows.values() for r in range(a, b)]
            logits = self.model.compute_logits(hidden[sample_rows + spec_index])
            sample_logits = logits[: len(sample_rows)]
            sizes = [b - a for a, b in spec_rows.values()]
            spec_logits = dict(zip(spec_rows, logits[len(sample_rows) :].split(sizes), strict=True))
        if partial_seqs:
            sample_seqs += partial_seqs
            partial_logits = self._partial_logits(partial_seqs, partial)
            sample_logits = (
                partial_logits
                if sample_logits is None
                else torch.cat([sample_logits, partial_logits])
            )
        prompt_logits = {
            sid: (first, self.model.compute_logits(hidden[a:b]))
            for sid, (first, a, b) in prompt_rows.items()
        }
        captured = {}
        if capture:
            queries = torch.stack(meta.captured)  # [L, R, H, D]
            captured = {sid: (queries[:, a:b], qs) for sid, (a, b, qs) in capture_of.items()}
        return StepLogits(sample_seqs, sample_logits, spec_logits, prompt_logits, captured)

    @torch.inference_mode()
    def decode_logits(
        self,
        seqs: list,
        token_ids: list[int],
        positions: list[int],
        layers: list[int] | None = None,
    ) -> torch.Tensor:
        """One token per sequence at the given positions (blocks already allocated), through
        ``layers`` only; the K/V of those layers are written at those positions. Returns
        [B, V] logits. Model proposers draft with it outside the scheduled step."""
        bs, dev = self.block_size, self.device
        tables = [seq.block_table for seq in seqs]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_size=bs,
            num_decodes=len(seqs),
        )
        self._decode_tables(meta, tables, [p + 1 for p in positions])
        meta.make_masks_additive(self.dtype)
        return self.model.compute_logits(self._forward(token_ids, positions, meta, layers))

    def _forward(
        self,
        ids: list[int],
        positions: list[int],
        meta: AttentionMetadata,
        layers: list[int] | None = None,
    ) -> torch.Tensor:
        """The model over one flat batch; a KIVI cache stages the blocks it writes."""
        if self.kivi is not None:
            self.kivi.prepare(meta.slot_mapping)
        dev = self.device
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
            layers,
        )
        if self.kivi is not None:
            self.kivi.finish()
        return hidden

    def _partial_logits(self, seqs: list, partial: dict[int, list[int]]) -> torch.Tensor:
        """One decode step for each sequence through its own layers (grouped by layer
        set)."""
        rows: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(tuple(partial[seq.seq_id]), []).append(i)
        for layers, idx in groups.items():
            group = [seqs[i] for i in idx]
            logits = self.decode_logits(
                group,
                [s.token_ids[s.num_computed_tokens] for s in group],
                [s.num_computed_tokens for s in group],
                list(layers),
            )
            for j, i in enumerate(idx):
                rows[i] = logits[j]
        return torch.stack(rows)

    def _span(self, row: int, start: int, n: int, table: list[int]) -> RowSpan:
        dev, window = self.device, self.sliding_window
        q_pos = torch.arange(start, start + n, device=dev)
        if start == 0:
            # Causal over the chunk itself; sliding layers need a mask only past the window.
            window_mask = None
            if window is not None and n > window:
                window_mask = _context_mask(0, n, n, dev) & _in_window(q_pos, q_pos, window)
            kernel = self.chunk_kernel and n >= _KERNEL_MIN_FIRST_CHUNK
            return RowSpan(row, row + n, None, None, window_mask, causal_chunk=kernel)
        bs = self.block_size
        width = -(-(start + n) // bs)
        blocks = torch.tensor(table[:width], dtype=torch.long, device=dev)
        windowed = window is not None and start + n > window
        # SDPA with the chunk's mask computes every masked score, and building and converting
        # the mask is a visible share of a prefill: on a CPU only sliding-window layers need it.
        split = self.chunk_kernel or dev.type == "cpu"
        causal = None
        if windowed or not split:
            causal = _context_mask(start, n, width * bs, dev)
        window_mask = None
        if windowed:
            pos = torch.arange(width * bs, device=dev)
            window_mask = causal & _in_window(q_pos, pos, window)
        mask = None if split else causal
        return RowSpan(row, row + n, blocks, mask, window_mask, q_start=start, causal_chunk=split)

    def _decode_tables(
        self,
        meta: AttentionMetadata,
        tables: list[list[int]],
        lens: list[int],
        trees: list[list[int] | None] | None = None,
        visible: list[tuple[int, int] | None] | None = None,
    ) -> None:
        """The decode rows' padded block tables and masks (valid slots; the sliding-window one
        where the window hides something). ``lens``: slots each sequence holds after this
        step; a sequence with a draft tree (``trees[i]``) has 1 + len(tree) query rows, which
        see the slots before them and their own ancestors (``decode_rows``). ``visible[i]``
        = (from, bits): row i sees slot from + j only where bit j is set (a draft tree's row
        laid out as a decode row of its own)."""
        bs, dev, window = self.block_size, self.device, self.sliding_window
        max_len = max(lens)
        width = -(-max_len // bs)
        padded = torch.zeros((len(tables), width), dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, : len(t[:width])] = torch.tensor(t[:width], dtype=torch.long)
        meta.decode_blocks = padded.to(dev)
        pos = torch.arange(width * bs)
        trees = trees or [None] * len(tables)
        counts = [1 + len(t) if t is not None else 1 for t in trees]
        m = max(counts)
        q_pos = torch.tensor(lens)[:, None] - 1
        mask = (pos[None, :] < q_pos + 1)[:, None]  # [B, 1, slots]
        tree_rows = [(i, v) for i, v in enumerate(visible or []) if v is not None]
        for i, (start, bits) in tree_rows:
            hidden = [start + j for j in range(lens[i] - start) if not (bits >> j) & 1]
            mask[i, 0, hidden] = False
        if m > 1:
            mask, q_pos, rows, valid = _verify_rows(lens, trees, counts, m, pos)
            group = self.cfg.num_heads // self.cfg.num_kv_heads
            meta.decode_rows, meta.decode_valid = rows.to(dev), valid.to(dev)
        window_mask = None
        if window is not None and max_len > window:
            window_mask = mask & (pos > q_pos[..., None] - window)
        if m > 1:  # one query per (row, head of the KV group), row-major
            mask = mask.repeat_interleave(group, dim=1)
            window_mask = None if window_mask is None else window_mask.repeat_interleave(group, 1)
        meta.decode_mask = mask[:, None].to(dev)
        meta.decode_window_mask = None if window_mask is None else window_mask[:, None].to(dev)
        if m == 1 and self.decode_kernel:
            meta.decode_lens = torch.tensor(lens, dtype=torch.long)
            meta.sliding_window = window or 0
            if tree_rows:  # other rows: (their length, no bits), every slot seen
                rows = [(n, 0) if v is None else v for v, n in zip(visible, lens, strict=True)]
                meta.decode_visible = torch.tensor(rows, dtype=torch.long)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if self.kivi is not None:
            for src, dst in copies:
                self.kivi.copy(src, dst)
            return
        bs = self.block_size
        offs = torch.arange(bs, device=self.device)
        src = torch.cat([offs + s * bs for s, _ in copies])
        dst = torch.cat([offs + d * bs for _, d in copies])
        self._copy_slots(src, dst)

    def move_slots(self, table: list[int], moves: list[tuple[int, int]]) -> None:
        """Copy the K/V at token positions ``src`` to ``dst`` in every layer, for each
        ``(src, dst)`` of ``moves`` (a verified draft tree's accepted branch; float and int8
        caches, the ones draft trees run on)."""
        bs = self.block_size
        src, dst = (
            torch.tensor([table[p // bs] * bs + p % bs for p in side], device=self.device)
            for side in zip(*moves, strict=True)
        )
        self._copy_slots(src, dst)

    def _copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        if self.kv_scales is not None:
            self.kv_scales[:, :, dst] = self.kv_scales[:, :, src]


def _tree_positions(start: int, parents: list[int]) -> list[int]:
    """Positions of the last real token (at ``start``) and of each draft below it."""
    positions = [start]
    for parent in parents:
        positions.append(positions[parent + 1] + 1)
    return positions


def _verify_rows(
    lens: list[int], trees: list[list[int] | None], counts: list[int], m: int, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode rows padded to ``m`` per sequence: masks [B, m, slots], positions [B, m], the
    flat batch row of each [B, m] (padding repeats the sequence's first) and the indices of
    the real ones in B * m, in flat-batch order."""
    b = len(lens)
    mask = torch.zeros((b, m, pos.numel()), dtype=torch.bool)
    q_pos = torch.empty((b, m), dtype=torch.long)
    rows = torch.empty((b, m), dtype=torch.long)
    valid: list[int] = []
    first = 0
    for i, (tree, n, end) in enumerate(zip(trees, counts, lens, strict=True)):
        start = end - n  # the last real token's slot
        mask[i, :, :start] = True
        mask[i, :n, start:end] = _tree_mask(tree or [], pos.device)
        mask[i, n:, start] = True
        q_pos[i, :n] = torch.tensor(_tree_positions(start, tree or []))
        q_pos[i, n:] = start
        rows[i] = first
        rows[i, :n] += torch.arange(n)
        valid.extend(range(i * m, i * m + n))
        first += n
    return mask, q_pos, rows, torch.tensor(valid)


def _tree_mask(parents: list[int], device: torch.device) -> torch.Tensor:
    """[1 + D, 1 + D] bool: row i (0 = the last real token, i = draft i - 1) sees itself and
    its ancestors."""
    n = len(parents) + 1
    mask = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents, start=1):
        mask[i] |= mask[parent + 1]
    return mask.to(device)


def _hole_masks(mask: torch.Tensor, holes: list[tuple[int, torch.Tensor, int]]) -> torch.Tensor:
    """Per-layer decode masks: row ``r``'s layer ``l`` does not see slots ``lens[l] ..
    end`` (a layer that kept fewer tokens than the sequence holds slots for)."""
    num_layers = holes[0][1].shape[0]
    masks = mask.unsqueeze(0).repeat(num_layers, 1, 1, 1, 1)  # [L, B, 1, 1, W * bs]
    for row, lens, end in holes:
        masks[:, row, 0, 0] &= ~_hole(lens.to(mask.device), end, mask.shape[-1])
    return masks


def _hole(lens: torch.Tensor, end: int, width: int) -> torch.Tensor:
    """[L, width] bool: the slots ``lens[l] .. end`` that layer ``l`` does not read."""
    pos = torch.arange(width, device=lens.device)
    return (pos[None, :] >= lens[:, None]) & (pos[None, :] < end)


def _rows_as_decodes(tree: list[int], sliding_window: int | None) -> bool:
    """Whether a verifying sequence's rows (attending as usual) can attend as independent
    decode rows: the tree fits the kernel's 63-bit visibility mask and, where the model has
    sliding windows (measured from a row's slot, which for a branch is past its position),
    the drafts form a chain."""
    if len(tree) >= 63:
        return False
    return sliding_window is None or tree == chain_parents(len(tree))


def _attends_apart(plans: dict[int, RowsAttention], seq) -> bool:
    """A plugin gave the sequence's rows their own attention (they go in a span)."""
    plan = plans.get(seq.seq_id)
    return plan is not None and plan.attend is not None


def _is_decode(seq, n: int) -> bool:
    """One new token (and the drafts it is verifying, if any) after a computed context."""
    return n == 1 + len(seq.draft_token_ids) and seq.num_computed_tokens > 0


def _context_mask(
    start: int, n: int, slots: int, device: torch.device | None = None
) -> torch.Tensor:
    """[n, slots] bool: the chunk's query at position ``start + i`` sees slots ``<= start + i``
    (which also hides the slots past the context)."""
    q_pos = torch.arange(start, start + n, device=device)
    return torch.arange(slots, device=device)[None, :] <= q_pos[:, None]


def _in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Q, K] bool: key position is one of the ``window`` latest positions up to the query's
    (the causal upper bound is the caller's mask)."""
    return k_pos[None, :] > q_pos[:, None] - window
