"""Speculative decoding's parts on stand-ins: n-gram lookup and the lookahead trie's draft
trees, the layers a layer-skip draft keeps, the verify rules (greedy and sampled, chains and
trees: the emitted tokens follow the target's distribution), the adaptive draft length and
its step-cost fit, decode attention of verify rows, and the bench's copy bounds and
settings. The engine's runs: tests/integration/test_speculative.py."""

from __future__ import annotations

import pytest
import torch

from heron.errors import InvalidRequestError
from heron.speculative.layer_skip import spread_layers
from heron.speculative.lookahead import NgramTrie, best_first_tree
from heron.speculative.ngram import lookup
from heron.speculative.speculator import AdaptiveK, StepCost
from heron.speculative.verify import accept_sampled, accept_tree


def test_ngram_lookup_takes_latest_longest_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # Suffix [2, 3] last occurred at index 6 (followed by 7, 8, 5).
    assert lookup(tokens, 3, 1, 3) == [7, 8, 5]
    assert lookup(tokens, 1, 1, 3) == [7]
    assert lookup([4, 5, 6], 3, 1, 3) == []  # no earlier occurrence
    assert lookup([5, 5], 4, 1, 3) == [5]  # overlapping match is fine


def test_spread_layers():
    assert spread_layers(30, 30, "speculative_options", "num_layers") == list(range(30))
    kept = spread_layers(30, 15, "speculative_options", "num_layers")
    assert len(kept) == 15 and kept[0] == 0 and kept[-1] == 29
    with pytest.raises(InvalidRequestError):
        spread_layers(30, 31, "speculative_options", "num_layers")


def test_accept_greedy():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 2]):
        logits[row, best] = 1.0
    assert accept_tree(logits, [3, 5, 7], None) == ([3, 5, 7, 2], [0, 1, 2])  # all + bonus
    assert accept_tree(logits, [3, 4, 7], None) == ([3, 5], [0])  # first mismatch replaced
    assert accept_tree(logits, [0, 5, 7], None) == ([3], [])


def test_accept_greedy_tree_follows_the_matching_branch():
    """Row i + 1 holds the target's logits after draft i, so the walk reads the row of each
    accepted node: root -> 3 (draft 1) -> 5 (draft 3), then the target's own 8."""
    best = {0: 3, 1: 9, 2: 5, 3: 9, 4: 8}  # row -> argmax
    logits = torch.full((5, 10), -1.0)
    for row, token in best.items():
        logits[row, token] = 1.0
    drafts, parents = [4, 3, 7, 5], [-1, -1, 1, 1]  # two branches under the root, two under 3
    assert accept_tree(logits, drafts, parents) == ([3, 5, 8], [1, 3])


@pytest.mark.parametrize("draft", ["one-hot", "distribution"])
def test_accept_sampled_is_the_target_distribution(draft):
    """The first emitted token of many verify steps is distributed as the target's p, for a
    deliberately poor draft. Chi-square over 8 categories, 20k trials: the 0.999 quantile of
    chi2(7) is 24.3, so a correct rule fails with probability 1e-3; taking the draft's token
    whenever it is proposed would give a statistic in the thousands."""
    torch.manual_seed(0)
    p = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])
    q = torch.tensor([0.02, 0.05, 0.08, 0.10, 0.10, 0.15, 0.20, 0.30])  # poor on purpose
    gen = torch.Generator().manual_seed(1)
    trials = 20_000
    counts = torch.zeros(8)
    for _ in range(trials):
        d = int(torch.multinomial(q, 1, generator=gen))
        probs = q[None] if draft == "distribution" else None
        if draft == "one-hot":
            d = 7  # always propose the least likely token
        target = torch.stack([p, p])
        if probs is None:
            out = accept_tree(target, [d], None, gen)[0]
        else:
            out = accept_sampled(target, [d], probs, gen)
        counts[out[0]] += 1
    expected = p * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (chi2, counts.tolist())


def test_accept_tree_sampling_is_the_target_distribution():
    """Three candidate first tokens (the least likely ones, one with a child) tried in turn:
    the first emitted token still follows p (chi-square as above; keeping a candidate
    whenever it is proposed would put a third of the mass on each)."""
    p = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])
    gen = torch.Generator().manual_seed(2)
    trials = 20_000
    counts = torch.zeros(8)
    drafts, parents = [7, 6, 0, 5], [-1, -1, 1, -1]
    target = p.expand(5, 8)
    for _ in range(trials):
        tokens, path = accept_tree(target, drafts, parents, gen)
        assert [drafts[i] for i in path] == tokens[: len(path)]
        counts[tokens[0]] += 1
    expected = p * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (chi2, counts.tolist())


def test_adaptive_k_shrinks_pauses_and_grows():
    a = AdaptiveK(k_max=8, k=8)
    for _ in range(10):
        a.update(a.k, 0, price=0.1)  # everything rejected
        if a.paused:
            break
    assert a.paused and a.k == 1
    assert [a.next() for _ in range(a.paused)][-1] == 0 and a.next() == 1  # resumes at k=1
    for _ in range(10):
        a.update(a.k, a.k, price=0.1)  # everything accepted
    assert a.k == 8
    for _ in range(10):
        a.update(a.k, 1, price=0.01)  # 1 of 8 accepted pays where rows are cheap
    assert a.k == 8 and not a.paused
    for _ in range(10):
        a.update(a.k, 1, price=0.3)  # ... and not where they are dear: narrower drafts
    assert a.k < 8


def test_step_cost_prices_a_drafted_row():
    cost = StepCost()
    assert cost.row_price(1, 1) == 0.0  # nothing seen: no price
    for rows in (1, 5, 17, 1, 9, 17):
        cost.observe(rows, 0.050 + 0.001 * rows)  # a = 50 ms, b = 1 ms per row
    assert cost.row_price(1, 17) == pytest.approx(0.001 / 0.067)
    assert cost.row_price(8, 40) == pytest.approx(8 * 0.001 / 0.090)
    assert cost.draft_rows(8, share=0.25) == pytest.approx(0.25 * 0.058 / 0.001)


def test_trie_drafts_a_tree_of_continuations():
    trie = NgramTrie(width=4)
    text = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2, 4, 6]
    trie.extend(text[:5])
    trie.extend(text[5:])  # growing windows continue across calls
    node = trie.find([1, 2])
    assert {t: c.count for t, c in node.children.items()} == {3: 1, 4: 2}
    assert trie.find([2, 4, 5]).count == 1 and trie.find([9, 1, 2, 4]) is not None
    assert trie.find([2, 4, 5, 1, 2]) is None  # longer than the window
    # After "1 2": 4 (twice) first, its continuations, then 3.
    tokens, parents = best_first_tree([(2, node)], k=10, depth=2)
    assert tokens == [4, 6, 5, 3, 9] and parents == [-1, 0, 0, -1, 3]
    assert best_first_tree([(2, node)], k=2, depth=2) == ([4, 6], [-1, 0])
    assert best_first_tree([(2, node)], k=10, depth=1) == ([4, 3], [-1, -1])
    # A shorter match adds only what the longer one lacks; shared paths are one branch.
    tokens, parents = best_first_tree([(2, node), (1, trie.find([2]))], k=10, depth=1)
    assert tokens == [4, 3] and parents == [-1, -1]


def test_verify_rows_see_their_context_and_ancestors_only():
    """Decode attention over one plain decode and one sequence verifying a draft tree (on a
    global and on a sliding-window layer) equals attention computed row by row: each draft
    sees the cached context, the last real token and its own ancestors, at its depth."""
    from types import SimpleNamespace

    from heron.engine.runner import ModelRunner, _tree_positions
    from heron.layers.attention import AttentionMetadata, paged_attention

    torch.manual_seed(0)
    bs, hkv, group, d, window = 4, 2, 3, 8, 5
    runner = object.__new__(ModelRunner)  # just the metadata builder
    runner.block_size, runner.device, runner.sliding_window = bs, torch.device("cpu"), window
    runner.cfg = SimpleNamespace(num_heads=hkv * group, num_kv_heads=hkv)
    tables = [[3, 0], [1, 4, 2]]
    tree = [-1, -1, 1, 2]  # two drafts under the last real token, a chain of two under the 2nd
    plain_len, start = 6, 7  # sequence 1's last real token sits at slot 7, its drafts after
    rows = 1 + 1 + len(tree)

    def slot(table: list[int], p: int) -> int:
        return table[p // bs] * bs + p % bs

    slots = [slot(tables[0], plain_len - 1)] + [slot(tables[1], start + i) for i in range(5)]
    meta = AttentionMetadata(torch.tensor(slots), bs, num_decodes=2)
    runner._decode_tables(meta, tables, [plain_len, start + 5], [None, tree])
    meta.make_masks_additive(torch.float32)
    q = torch.randn(rows, hkv * group, d)
    k, v = torch.randn(rows, hkv, d), torch.randn(rows, hkv, d)
    cache_k, cache_v = torch.randn(5 * bs, hkv, d), torch.randn(5 * bs, hkv, d)
    q_pos = [plain_len - 1, *_tree_positions(start, tree)]
    lineage = [{0}]  # row of sequence 1 (0 = its last real token) -> itself and its ancestors
    for i, parent in enumerate(tree, start=1):
        lineage.append(lineage[parent + 1] | {i})
    for sliding in (False, True):
        kc, vc = cache_k.clone(), cache_v.clone()
        out = paged_attention(q, k, v, kc, vc, meta, d**-0.5, sliding=sliding)
        for r in range(rows):
            if r == 0:
                keys = [(slot(tables[0], p), p) for p in range(plain_len)]
            else:
                tree_keys = [(slot(tables[1], start + a), q_pos[1 + a]) for a in lineage[r - 1]]
                keys = [(slot(tables[1], p), p) for p in range(start)] + tree_keys
            if sliding:
                keys = [(s, p) for s, p in keys if p > q_pos[r] - window]
            idx = torch.tensor([s for s, _ in keys])
            for h in range(hkv * group):
                weights = torch.softmax(kc[idx, h // group] @ q[r, h] * d**-0.5, dim=0)
                want = weights @ vc[idx, h // group]
                torch.testing.assert_close(out[r, h], want, atol=1e-5, rtol=1e-5)


def test_copy_bound_steps():
    """A perfect lookup copies the longest earlier span each step, then adds one token."""
    from heron.bench.spec import copy_bound_steps

    # [1 2 3] copied + 9; then [4] copied (the last token is always the target's) + 5
    assert copy_bound_steps([1, 2, 3, 4, 5], [1, 2, 3, 9, 4, 5]) == 2
    # nothing to copy: one token per step
    assert copy_bound_steps([1, 2], [7, 8, 9]) == 3
    # the output's own earlier tokens count: [5 6] repeats [5 6] from the output
    assert copy_bound_steps([1], [5, 6, 5, 6, 0]) == 3
    # a span must lie wholly before the step: after [1], [1 1 1 1] takes 1 copied + 1, then
    # 1 copied (capped: the last token is the target's) + 1
    assert copy_bound_steps([1], [1, 1, 1, 1]) == 2


def test_lookup_bound_steps_need_the_last_token_matched():
    """Anchored, a span counts only where it follows an earlier occurrence of the last token,
    so the first token of each copied span costs a step of its own."""
    from heron.bench.spec import copy_bound_steps

    # 1 (5 was never seen before), then [2 3] after the earlier 1 + 9, 9 alone, then 4 + 5
    assert copy_bound_steps([1, 2, 3, 4, 5], [1, 2, 3, 9, 4, 5], anchored=True) == 4
    # 5, 6, then 5 again: [6] follows the earlier 5 + 0
    assert copy_bound_steps([1], [5, 6, 5, 6, 0], anchored=True) == 4
    assert copy_bound_steps([1, 2], [7, 8, 9], anchored=True) == 3


def test_bench_spec_bad_settings():
    from heron.bench.spec import SpecBenchConfig

    with pytest.raises(InvalidRequestError, match="--methods"):
        SpecBenchConfig(methods=("bogus",)).validate()
    with pytest.raises(InvalidRequestError, match="--draft-model"):
        SpecBenchConfig(methods=("draft",)).validate()
    with pytest.raises(InvalidRequestError, match="--tasks"):
        SpecBenchConfig(tasks=("poetry",)).validate()
    with pytest.raises(InvalidRequestError, match="--repeats"):
        SpecBenchConfig(repeats=0).validate()
