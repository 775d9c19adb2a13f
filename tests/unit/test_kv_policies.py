"""KV-cache compression policies (heron.kv): each policy's choice on hand-built tensors run
through the real compaction machinery (block manager, sequences, compressor), the attention
plans plugins combine, and the registry's and budgets' errors. In the engine:
tests/integration/test_kv_compression.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.engine.block_manager import BlockManager
from heron.engine.sequence import Request, Sequence
from heron.errors import InvalidRequestError
from heron.kv.compressor import KVCompressor, KVState
from heron.kv.registry import KV_POLICIES, make_policy
from heron.kv.tokenselect import SelectedRows
from heron.layers.attention import RowsAttention
from heron.layers.kv_cache import ContextKV

BS = 4  # block size of the hand-built caches
D = 8  # head dim


def _runner(cache: torch.Tensor) -> SimpleNamespace:
    """What the compressor needs of a ModelRunner, over a plain [L, 2, slots, Hkv, D] cache."""
    layers = [(cache[i, 0], cache[i, 1]) for i in range(cache.shape[0])]
    return SimpleNamespace(kv_caches=layers, device=cache.device, kivi=None)


def _compress(policy, keys, queries=None, budget=8, layers=1, decode_queries=None):
    """Run the real machinery on a hand-built cache of one sequence.

    keys: [S, Hkv, D]; queries: [n, H, D] at the prompt's last n positions. Each token's
    value vector is filled with its index, so the compacted cache tells which tokens each
    head kept. Returns (kept token ids per layer and head, the sequence, its KVState, the
    block manager)."""
    held, num_kv_heads, _ = keys.shape
    num_blocks = 64
    cache = torch.zeros(layers, 2, num_blocks * BS, num_kv_heads, D)
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=False)
    req = Request("r", None, list(range(held)), SamplingParams())
    seq = Sequence(0, req, 0, list(range(held)), torch.Generator())
    st = KVState(policy, budget)
    bm.append_slots(seq, held)
    seq.num_computed_tokens = held
    slots = torch.tensor([seq.block_table[i // BS] * BS + i % BS for i in range(held)])
    values = torch.arange(held, dtype=torch.float32)[:, None, None].expand(held, num_kv_heads, D)
    for layer in range(layers):
        cache[layer, 0, slots] = keys
        cache[layer, 1, slots] = values
    if queries is not None:
        q = queries.unsqueeze(0).expand(layers, *queries.shape)
        st.add_queries(q, list(range(held - queries.shape[0], held)))
    comp = KVCompressor(_runner(cache), bm, D**-0.5)
    comp.after_step(seq, st)
    if decode_queries is not None:  # one more held token per decode query
        for q in decode_queries:
            st.add_queries(q[None, None].expand(layers, 1, *q.shape), [0])
            comp.after_step(seq, st)
    kept = []
    n = seq.num_kv_slots
    dst = torch.tensor([seq.block_table[i // BS] * BS + i % BS for i in range(n)])
    for layer in range(layers):
        vals = cache[layer, 1, dst, :, 0]  # [n, Hkv]
        lens = st.layer_lens
        width = n if lens is None else int(lens[layer])
        kept.append([set(vals[:width, h].long().tolist()) for h in range(num_kv_heads)])
    return kept, seq, st, bm


def _focus_query(key_dirs: torch.Tensor, strength: float = 30.0) -> torch.Tensor:
    """A query that attends (almost) only to keys along ``key_dirs`` [D]."""
    return strength * key_dirs


def _keys(held: int, num_kv_heads: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(held, num_kv_heads, D, generator=g)


def test_streaming_llm_keeps_sinks_and_recent_window():
    kept, seq, _, bm = _compress(make_policy("streaming_llm"), _keys(40, 2), budget=12)
    for head in kept[0]:
        assert head == {0, 1, 2, 3, *range(32, 40)}
    assert seq.num_kv_slots == 12 and seq.num_evicted == 28
    assert len(seq.block_table) == 3  # 40 tokens held 10 blocks; 7 went back
    assert bm.num_free_blocks == 64 - 3


def test_snapkv_keeps_each_heads_pooled_window_winners():
    held, window = 48, 4
    keys = _keys(held, 2)
    keys[10, 0] = torch.eye(D)[0]  # head 0's needle
    keys[25, 1] = torch.eye(D)[1]  # head 1's needle
    q = torch.zeros(window, 2, D)  # 2 query heads, 2 KV heads (group 1)
    q[:, 0] = _focus_query(torch.eye(D)[0])
    q[:, 1] = _focus_query(torch.eye(D)[1])
    policy = make_policy("snapkv", {"window": window, "kernel": 3})
    kept, seq, _, _ = _compress(policy, keys, q, budget=window + 3)
    window_ids = set(range(held - window, held))
    assert kept[0][0] == window_ids | {9, 10, 11}  # the winner and its pooled neighbours
    assert kept[0][1] == window_ids | {24, 25, 26}
    assert seq.num_kv_slots == window + 3


def test_snapkv_gqa_reduction_mean_vs_max():
    """Two query heads share one KV head; only one of them looks at the needle."""
    held, window = 48, 4
    keys = _keys(held, 1)
    keys[10, 0] = torch.eye(D)[0]
    q = 0.1 * torch.randn(window, 2, D, generator=torch.Generator().manual_seed(1))
    q[:, 0] = _focus_query(torch.eye(D)[0])
    for gqa in ("mean", "max"):
        policy = make_policy("snapkv", {"window": window, "kernel": 1, "gqa": gqa})
        kept, _, _, _ = _compress(policy, keys, q, budget=window + 1)
        assert 10 in kept[0][0]  # a strong single-head vote survives both reductions


def test_defensivekv_keeps_the_max_aggregated_token():
    """Token 7 gets all of one query's attention; token 15 gets a little of every query's:
    the mean (SnapKV) prefers 15, the max (DefensiveKV) keeps 7."""
    held, window = 40, 8
    keys = torch.zeros(held, 1, D)
    keys[7, 0] = torch.eye(D)[0]
    keys[15, 0] = torch.eye(D)[1]
    q = torch.zeros(window, 1, D)
    q[0, 0] = _focus_query(torch.eye(D)[0], 40.0)
    q[1:, 0] = _focus_query(torch.eye(D)[1], 9.0)
    snap, _, _, _ = _compress(
        make_policy("snapkv", {"window": window, "kernel": 1}), keys, q, window + 1
    )
    defensive, _, _, _ = _compress(
        make_policy("defensivekv", {"window": window, "kernel": 1}), keys, q, window + 1
    )
    assert 15 in snap[0][0] and 7 not in snap[0][0]
    assert 7 in defensive[0][0] and 15 not in defensive[0][0]


def test_h2o_scores_by_attention_summed_over_queries():
    policy = make_policy("h2o")
    held = 20
    acc = policy.accumulate(None, torch.full((1, 1, 3, held), 1 / held))
    attn = torch.zeros(1, 1, 2, held)
    attn[..., 5] = 1.0
    acc = policy.accumulate(acc, attn)
    assert int(policy.score(0, None, torch.zeros(1, held, D), None, acc).argmax()) == 5


def test_h2o_evicts_while_decoding_and_keeps_the_decode_heavy_hitter():
    held, window = 36, 4
    keys = _keys(held + 3 * BS, 1)
    keys[5, 0] = torch.eye(D)[0]
    q = torch.zeros(window, 1, D)  # the prompt's window looks nowhere in particular
    heavy = _focus_query(torch.eye(D)[0])[None]  # every decode query wants token 5
    policy = make_policy("h2o", {"window": window, "recent_ratio": 0.25})
    kept, seq, st = _decode_run(policy, keys, q, held, heavy, steps=3 * BS, target=8)
    assert 5 in kept
    assert seq.num_kv_slots < 8 + BS and st.num_compressions >= 2
    # Without the decode queries' votes token 5 is gone: the statistics did the keeping.
    kept, _, _ = _decode_run(policy, keys, q, held, torch.zeros(1, D), steps=3 * BS, target=8)
    assert 5 not in kept


def _decode_run(policy, keys, q, held, heavy, steps, target):
    """Prefill ``held`` tokens (nothing evicted), then decode ``steps`` tokens whose queries
    are ``heavy`` with a budget of ``target`` tokens. Returns (the tokens held, the sequence,
    its KVState)."""
    total = keys.shape[0]
    cache = torch.zeros(1, 2, 64 * BS, 1, D)
    bm = BlockManager(64, BS, enable_prefix_caching=False)
    req = Request("r", None, list(range(held)), SamplingParams())
    seq = Sequence(0, req, 0, list(range(held)), torch.Generator())
    st = KVState(policy, held)
    comp = KVCompressor(_runner(cache), bm, D**-0.5)

    def write(token):
        slot = seq.num_kv_slots
        bm.append_slots(seq, 1)
        s = seq.block_table[slot // BS] * BS + slot % BS
        cache[0, 0, s] = keys[token]
        cache[0, 1, s] = float(token)
        seq.num_computed_tokens += 1
        return slot

    for t in range(held):
        write(t)
    st.add_queries(q[None], list(range(held - q.shape[0], held)))
    comp.after_step(seq, st)
    assert seq.num_evicted == 0 and st.acc is not None  # statistics kept, none evicted
    st.target = target
    for t in range(held, min(total, held + steps)):
        seq.token_ids.append(t)
        slot = write(t)
        st.add_queries(heavy[None, None], [slot])
        comp.after_step(seq, st)
    n = seq.num_kv_slots
    dst = torch.tensor([seq.block_table[i // BS] * BS + i % BS for i in range(n)])
    return set(cache[0, 1, dst, 0, 0].long().tolist()), seq, st


def test_scissorhands_counts_above_uniform_attention():
    policy = make_policy("scissorhands")
    attn = torch.full((1, 1, 4, 10), 0.05)
    attn[..., 3] = 0.55  # above 1/10 for every query
    acc = policy.accumulate(None, attn)
    assert acc[0, 3] == 4 and acc[0, 0] == 0
    assert int(policy.score(0, None, torch.zeros(1, 10, D), None, acc).argmax()) == 3


def test_pyramidkv_layer_budgets_shrink_and_mask_their_unused_slots():
    policy = make_policy("pyramidkv", {"window": 4, "kernel": 1})
    budgets = policy.layer_budgets(20, 4)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 20 > budgets[-1]
    assert abs(sum(budgets) - 80) <= 4
    keys = _keys(60, 1)
    q = torch.randn(4, 1, D, generator=torch.Generator().manual_seed(2))
    kept, seq, st, _ = _compress(policy, keys, q, budget=20, layers=4)
    sizes = [len(k[0]) for k in kept]
    assert sizes == [min(b, 60) for b in budgets]
    assert seq.num_kv_slots == max(sizes)  # slots for the largest layer budget
    assert st.layer_lens.tolist() == sizes


def test_d2o_merges_similar_evicted_tokens_into_kept_ones():
    """Kept: e0, e1. Evicted: e0 again (similarity 1), -e0 (best 0: never merged), a token
    between e0 and e1 (0.71 to both; the first wins the tie) and e2 (0). The threshold is
    the evicted tokens' mean best similarity (0.43), so tokens 2 and 4 merge into token 0."""
    e = torch.eye(4)
    keys = torch.stack([e[0], e[1], e[0], -e[0], (e[0] + e[1]) / 2**0.5, e[2]])[None]
    values = torch.arange(6.0)[None, :, None].expand(1, 6, 4)
    k, v = make_policy("d2o").merge(keys, values, torch.tensor([[0, 1]]), torch.ones(6, dtype=bool))
    w = 2**-0.5
    assert v[0, 0, 0].item() == pytest.approx((0 + 1 * 2 + w * 4) / (1 + 1 + w))
    assert v[0, 1, 0].item() == 1.0  # nothing merged into token 1
    torch.testing.assert_close(k[0, 1], e[1])
    expected_k0 = (e[0] + e[0] + w * (e[0] + e[1]) / 2**0.5) / (2 + w)
    torch.testing.assert_close(k[0, 0], expected_k0)


def test_d2o_layer_budgets_follow_attention_spread():
    policy = make_policy("d2o")
    assert policy.layer_budgets(20, 3) == [20, 20, 20]
    # peaky layer 0 (high variance, low weight) gets less; spread layers get more
    budgets = policy.layer_budgets(20, 3, [1.0, 4.0, 4.0])
    assert budgets[0] < 20 < budgets[1] == budgets[2] and all(10 <= b <= 40 for b in budgets)
    # Through the real compaction (every layer sees the same attention: equal budgets); the
    # values are merged averages of token ids now, so only the slots are checked.
    keys = _keys(60, 1)
    q = torch.randn(4, 1, D, generator=torch.Generator().manual_seed(3))
    policy = make_policy("d2o", {"window": 4, "budget_from_attention": True})
    kept, seq, st, _ = _compress(policy, keys, q, budget=20, layers=3)
    assert seq.num_kv_slots == 20 and seq.num_evicted == 40 and st.layer_lens is None
    assert all(len(k[0]) > 1 for k in kept)


def _selected(policy, keys, q, budget, layer=0):
    """One TokenSelect decode step on a hand-built cache (keys [S, Hkv, D], values = token
    index): (the step's attention output [H, D], its KVState)."""
    held, num_kv_heads, _ = keys.shape
    values = torch.arange(held, dtype=torch.float32)[:, None, None].expand(held, num_kv_heads, D)
    st = KVState(policy, budget, target=budget, prefilled=True)
    ctx = ContextKV(keys, values.contiguous(), held)
    return SelectedRows(st, torch.arange(held)).attend(q[None], ctx, layer, D**-0.5)[0], st


def test_tokenselect_attends_to_the_voted_tokens_sinks_and_recent_window():
    held = 64
    keys = _keys(held, 2)
    keys[20] = torch.eye(D)[0]  # both KV heads' needle
    q = torch.zeros(4, D)  # 4 query heads, 2 KV heads: a GQA group of 2
    q[0] = q[2] = _focus_query(torch.eye(D)[0])  # one head of each group votes for it
    policy = make_policy("tokenselect", {"sinks": 2, "recent": 4})
    out, st = _selected(policy, keys, q, budget=2 + 4 + 1)
    chosen = st.selection[0].middle.tolist()
    assert chosen == [20]
    # The output is attention over exactly sinks + token 20 + the recent window ...
    idx = torch.tensor([0, 1, 20, 60, 61, 62, 63])
    vals = torch.arange(held, dtype=torch.float32)[idx]
    for h in range(4):
        probs = torch.softmax(keys[idx, h // 2] @ q[h] * D**-0.5, dim=0)
        assert out[h, 0].item() == pytest.approx((probs * vals).sum().item(), abs=1e-4)
    # ... which is not the full cache's: the unfocused heads spread over all 64 tokens.
    full = torch.softmax(keys[:, 1] @ q[1] * D**-0.5, dim=0) @ torch.arange(held).float()
    assert abs(out[1, 0].item() - full.item()) > 1.0


def test_tokenselect_reuses_its_choice_for_a_similar_query_only():
    held = 64
    keys = _keys(held, 1)
    keys[20, 0], keys[40, 0] = torch.eye(D)[0], torch.eye(D)[1]
    q = torch.zeros(1, D)
    q[0] = _focus_query(torch.eye(D)[0])
    policy = make_policy("tokenselect", {"sinks": 2, "recent": 4})
    _, st = _selected(policy, keys, q, budget=7)
    sel = SelectedRows(st, torch.arange(held))
    ctx = ContextKV(keys, torch.zeros(held, 1, D), held)
    near = q + 0.05 * torch.randn(1, D, generator=torch.Generator().manual_seed(0))
    sel.attend(near[None], ctx, 0, D**-0.5)
    assert (st.num_selections, st.num_reused) == (1, 1)
    far = torch.zeros(1, D)
    far[0] = _focus_query(torch.eye(D)[1])
    sel.attend(far[None], ctx, 0, D**-0.5)
    assert (st.num_selections, st.num_reused) == (2, 1)
    assert st.selection[0].middle.tolist() == [40]


def test_attention_plans_of_two_plugins_combine_unless_they_clash():
    """One plugin's captured rows and holes and another's own attention for the same rows make
    one plan; two plugins setting the same part is an error, not a silent pick."""
    holes = RowsAttention([3, 4], torch.tensor([5, 8]), 8)
    st = KVState(make_policy("tokenselect"), 8)
    own = RowsAttention(attend=SelectedRows(st, torch.arange(8)))
    plan = RowsAttention.combine([holes, own])
    assert plan.capture == [3, 4] and plan.hole_start.tolist() == [5, 8] and plan.hole_end == 8
    assert plan.attend is own.attend
    with pytest.raises(ValueError, match="same part"):
        RowsAttention.combine([holes, RowsAttention(capture=[0])])


def test_registry_and_budget_errors():
    assert {"streaming_llm", "snapkv", "h2o", "pyramidkv", "defensivekv", "d2o"} <= set(
        KV_POLICIES.names()
    )
    with pytest.raises(InvalidRequestError, match="kv_policy"):
        make_policy("nope")
    with pytest.raises(InvalidRequestError, match="kv_policy"):
        LLM(kv_policy="nope")
    with pytest.raises(InvalidRequestError, match="kv_budget"):
        EngineConfig(kv_policy="snapkv", kv_budget=0)
    with pytest.raises(InvalidRequestError, match="kv_budget"):
        SamplingParams(kv_policy="snapkv", kv_budget=-1)
    with pytest.raises(InvalidRequestError, match="speculative"):
        EngineConfig(kv_policy="snapkv", speculative_method="ngram")
    SamplingParams(kv_policy="none")  # the full cache for one request
