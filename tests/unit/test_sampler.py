"""Sampler and its helpers on hand-built logits. Seeding in the engine:
tests/integration/test_sampler_engine.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from heron.config import SamplingParams
from heron.engine.sampler import Sampler, apply_penalties, filtered_probs
from heron.engine.sequence import Request, Sequence

EOS = 7
V = 10
_ids = itertools.count()


def make_seq(params: SamplingParams, prompt=(1, 2), output=(), seed: int = 0) -> Sequence:
    req = Request(f"r{next(_ids)}", None, list(prompt), params)
    gen = torch.Generator()
    gen.manual_seed(seed)
    seq = Sequence(next(_ids), req, 0, list(prompt) + list(output), gen)
    req.seqs.append(seq)
    return seq


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) if p > 0 else float("-inf") for p in probs])


def kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


# ---------------------------------------------------------------- greedy and masks


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(4)]
    out = Sampler([EOS]).sample(logits, seqs)
    assert [t for t, _ in out] == logits.argmax(dim=-1).tolist()
    assert all(lp is None for _, lp in out)


def test_top_k_1_always_picks_argmax():
    torch.manual_seed(1)
    sampler = Sampler([EOS])
    for i in range(20):
        logits = torch.randn(1, V)
        seq = make_seq(SamplingParams(temperature=5.0, top_k=1), seed=i)
        ((tok, _),) = sampler.sample(logits, [seq])
        assert tok == int(logits.argmax())


def test_temperature_below_eps_samples_the_argmax():
    """1e-300 is 0 in float32: logits / 0 gave NaN probabilities (token 0 drawn)."""
    torch.manual_seed(3)
    logits = torch.randn(8, V)
    seqs = [make_seq(SamplingParams(temperature=1e-300), seed=i) for i in range(8)]
    out = Sampler([EOS]).sample(logits, seqs)
    assert [t for t, _ in out] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_non_finite_rows_draw_nothing_and_leave_the_others(temperature):
    torch.manual_seed(4)
    logits = torch.randn(5, V)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")  # nothing left to draw
    logits[4, 0] = 1e38  # finite, but not once divided by the temperature
    params = [SamplingParams(temperature=temperature)] * 4 + [SamplingParams(temperature=1e-4)]
    out = Sampler([EOS]).sample(logits, [make_seq(p, seed=0) for p in params])
    assert out[1:] == [None] * 4
    alone = Sampler([EOS]).sample(logits[:1], [make_seq(params[0], seed=0)])
    assert out[0] == alone[0] and out[0] is not None


def test_top_k_mask_keeps_exactly_k():
    torch.manual_seed(2)
    x = torch.randn(3, V)
    params = [SamplingParams(top_k=3), SamplingParams(top_k=0), SamplingParams(top_k=V + 5)]
    probs = filtered_probs(x, params)
    assert kept(probs[0]) == set(x[0].topk(3).indices.tolist())
    assert kept(probs[1]) == set(range(V))
    assert kept(probs[2]) == set(range(V))
    assert torch.allclose(probs.sum(dim=-1), torch.ones(3))
    # Kept tokens keep their relative weights.
    top = x[0].topk(3).indices
    assert torch.allclose(probs[0, top], x[0, top].softmax(-1), atol=1e-6)


def test_top_p_keeps_smallest_set_reaching_p():
    dist = [0.05, 0.5, 0.15, 0.3] + [0.0] * (V - 4)
    x = logits_of(dist)[None].repeat(3, 1)
    params = [SamplingParams(top_p=0.45), SamplingParams(top_p=0.75), SamplingParams(top_p=0.9)]
    probs = filtered_probs(x, params)
    assert kept(probs[0]) == {1}  # 0.5 alone reaches 0.45
    assert kept(probs[1]) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(probs[2]) == {1, 3, 2}  # 0.95 >= 0.9
    assert probs[1, 1].item() == pytest.approx(0.5 / 0.8, abs=1e-5)
    assert probs[1, 3].item() == pytest.approx(0.3 / 0.8, abs=1e-5)


def test_min_p_drops_tokens_below_fraction_of_max():
    dist = [0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4)
    x = logits_of(dist)[None].repeat(2, 1)
    probs = filtered_probs(x, [SamplingParams(min_p=0.2), SamplingParams(min_p=0.5)])
    assert kept(probs[0]) == {0, 1, 2}  # threshold 0.1
    assert kept(probs[1]) == {0, 1}  # threshold 0.25
    assert probs[0, 0].item() == pytest.approx(0.5 / 0.95, abs=1e-5)


def test_temperature_sharpens_and_flattens():
    x = logits_of([0.6, 0.4] + [0.0] * (V - 2))[None].repeat(2, 1)
    probs = filtered_probs(x, [SamplingParams(temperature=0.5), SamplingParams(temperature=2.0)])
    assert probs[0, 0].item() == pytest.approx(0.36 / 0.52, abs=1e-5)  # p^2 renormalized
    s = math.sqrt(0.6) + math.sqrt(0.4)
    assert probs[1, 0].item() == pytest.approx(math.sqrt(0.6) / s, abs=1e-5)


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_scales_seen_logits_toward_zero():
    row = torch.tensor([2.0, -2.0, 3.0, -1.0, 4.0, 1.0, 0.5, 0.0, 1.0, -3.0])
    orig = row.clone()
    # prompt has 0 and 1, output has 2 and 3: all four are "seen"
    seq = make_seq(SamplingParams(repetition_penalty=2.0), prompt=(0, 1), output=(2, 3, 3))
    apply_penalties(row, seq, seq.request.params)
    assert row[0].item() == pytest.approx(1.0)  # positive: divided
    assert row[1].item() == pytest.approx(-4.0)  # negative: multiplied
    assert row[2].item() == pytest.approx(1.5)
    assert row[3].item() == pytest.approx(-2.0)  # counted once despite appearing twice
    assert torch.equal(row[4:], orig[4:])


def test_presence_and_frequency_penalties_apply_to_output_only():
    row = torch.zeros(V)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    seq = make_seq(params, prompt=(0, 1), output=(4, 5, 5, 5))
    apply_penalties(row, seq, params)
    assert row[4].item() == pytest.approx(-(0.5 + 0.25))
    assert row[5].item() == pytest.approx(-(0.5 + 3 * 0.25))
    assert row[0].item() == 0 and row[1].item() == 0  # prompt tokens untouched
    assert torch.count_nonzero(row).item() == 2


def test_negative_presence_penalty_encourages():
    row = torch.zeros(V)
    params = SamplingParams(presence_penalty=-1.0)
    seq = make_seq(params, output=(6,))
    apply_penalties(row, seq, params)
    assert row[6].item() == pytest.approx(1.0)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 4.5, 0.0, 0.0, 0.0, 0.0]])
    plain = make_seq(SamplingParams(temperature=0), output=(4,))
    penal = make_seq(SamplingParams(temperature=0, frequency_penalty=1.0), output=(4,))
    (a, _), (b, _) = Sampler([EOS]).sample(logits.repeat(2, 1), [plain, penal])
    assert (a, b) == (4, 5)


# ---------------------------------------------------------------- seeded sampling


def _draws(sampler, logits, seqs, steps):
    out = []
    for _ in range(steps):
        out.append([t for t, _ in sampler.sample(logits, seqs)])
    return out


def test_seeded_sampling_same_alone_and_in_batch():
    sampler = Sampler([EOS])
    torch.manual_seed(3)
    flat = torch.zeros(V)
    params = SamplingParams(temperature=1.0)
    alone = _draws(sampler, flat[None], [make_seq(params, seed=123)], 30)
    alone = [row[0] for row in alone]

    batch_logits = torch.stack([torch.randn(V), flat, torch.randn(V)])
    batch_seqs = [
        make_seq(SamplingParams(temperature=0.7, top_k=4), seed=5),
        make_seq(params, seed=123),
        make_seq(SamplingParams(temperature=1.3, top_p=0.8), seed=9),
    ]
    batched = [row[1] for row in _draws(sampler, batch_logits, batch_seqs, 30)]
    assert batched == alone

    other = [row[0] for row in _draws(sampler, flat[None], [make_seq(params, seed=124)], 30)]
    assert other != alone
    assert len(set(alone)) > 3  # really random over a flat distribution


def test_sampling_follows_the_distribution():
    sampler = Sampler([EOS])
    logits = logits_of([0.7, 0.2, 0.1] + [0.0] * (V - 3))[None]
    seq = make_seq(SamplingParams(temperature=1.0), seed=0)
    counts = torch.bincount(
        torch.tensor([r[0] for r in _draws(sampler, logits, [seq], 2000)]), minlength=V
    )
    assert counts[3:].sum() == 0
    assert 0.63 < counts[0] / 2000 < 0.77
    assert 0.15 < counts[1] / 2000 < 0.25


# ---------------------------------------------------------------- min_tokens and logprobs


def test_min_tokens_bans_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    logits[0, 5] = 8.0
    sampler = Sampler([EOS])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    ((tok, _),) = sampler.sample(logits, [make_seq(p, output=(1,))])
    assert tok == 5  # EOS and the stop token are banned until 2 tokens exist
    ((tok, _),) = sampler.sample(logits, [make_seq(p, output=(1, 1))])
    assert tok == EOS
    p2 = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    ((tok, _),) = sampler.sample(logits, [make_seq(p2)])
    assert tok == EOS  # ignore_eos: EOS is an ordinary token, not banned


def test_logprobs_report_chosen_token_and_top_k():
    raw = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    lsm = torch.log_softmax(raw[0], -1)
    # A strong repetition penalty on tokens 0 and 1 makes greedy pick token 2 (raw rank 3).
    p = SamplingParams(temperature=0, repetition_penalty=100.0, logprobs=2)
    seq = make_seq(p, prompt=(0, 1))
    ((tok, lp),) = Sampler([EOS]).sample(raw, [seq])
    assert tok == 2
    assert set(lp) == {0, 1, 2}
    assert lp[2].rank == 3
    assert lp[2].logprob == pytest.approx(lsm[2].item(), abs=1e-5)  # raw distribution
    assert (lp[0].rank, lp[1].rank) == (1, 2)
    assert lp[0].logprob == pytest.approx(lsm[0].item(), abs=1e-5)
    assert lp[1].logprob == pytest.approx(lsm[1].item(), abs=1e-5)


def test_logprobs_zero_gives_only_chosen_token():
    raw = torch.tensor([[1.0, 3.0] + [0.0] * (V - 2)])
    p = SamplingParams(temperature=0, logprobs=0)
    ((tok, lp),) = Sampler([EOS]).sample(raw, [make_seq(p)])
    assert tok == 1
    assert list(lp) == [1]
    assert lp[1].rank == 1
    assert lp[1].logprob == pytest.approx(torch.log_softmax(raw[0], -1)[1].item(), abs=1e-5)
