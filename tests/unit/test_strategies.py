"""Decoding strategies: answer extraction, the choices of each strategy on hand-made samples,
adaptive's early stop (with a replayed sampler), the registry's errors, entropy-adaptive
decoding's switch on stand-in entropies, the scaling benchmark's problems, scoring and
HumanEval's test runs. On the real engine: tests/integration/test_strategies_engine.py;
through the server: tests/server/test_server_strategies.py."""

from __future__ import annotations

import re

import pytest

from heron.bench.scaling import replay_adaptive, score_at_k
from heron.bench.word_problems import make_problems
from heron.errors import InvalidRequestError
from heron.outputs import CompletionOutput, Logprob
from heron.registry import parse_options
from heron.strategies import (
    Adaptive,
    AnswerExtractor,
    BestOfMajority,
    BestOfN,
    Majority,
    StrategyRun,
    make_strategy,
)
from heron.strategies.entropy_adaptive import ModelSwitch


def sample(text: str, logprobs: list[float] | None = None, index: int = 0) -> CompletionOutput:
    """A completion with one token per logprob (token ids 0, 1, 2, ...)."""
    lps = [-1.0] if logprobs is None else logprobs
    ids = list(range(len(lps)))
    return CompletionOutput(
        index=index,
        text=text,
        token_ids=ids,
        logprobs=[{t: Logprob(lp, 1)} for t, lp in zip(ids, lps, strict=True)],
        finish_reason="stop",
    )


# ---------------------------------------------------------------- answer extraction
@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("So she has 1,000 apples.", "number", "1000"),
        ("The total is 1000", "number", "1000"),
        ("It costs $3.50.", "number", "3.5"),
        ("3.0", "number", "3"),
        ("The temperature drops to -12 degrees.", "number", "-12"),
        ("It drops to \u221212.", "number", "-12"),  # unicode minus
        ("5-3 = 2", "number", "2"),  # the minus of "5-3" is not a sign
        ("Step 1: 12 + 30 = 42. So 42 is it.", "number", "42"),
        ("one, two: 1,2,3", "number", "3"),  # not a thousands separator
        ("half is 1/2", "number", "0.5"),
        ("-0", "number", "0"),
        ("about .5 of it", "number", "0.5"),
        ("1,234,567.890 in total", "number", "1234567.89"),
        ("no digits here", "number", None),
        ("We get \\boxed{1{,}000} apples", "boxed", "1000"),
        ("\\boxed{\\frac{1}{2}}", "boxed", "0.5"),
        ("\\boxed{\\dfrac{2}{3}}", "boxed", "2/3"),
        ("first \\boxed{4} then \\boxed{x = 7}", "boxed", "7"),
        ("\\boxed{\\$12.00}", "boxed", "12"),
        ("\\boxed{15\\%}", "boxed", "15"),
        ("\\boxed{42 \\text{ apples}}", "boxed", "42"),
        ("\\boxed{Paris}", "boxed", "paris"),
        ("\\boxed{x^{2}+1}", "boxed", "x^{2}+1"),  # nested braces kept whole
        ("cut off \\boxed{12", "boxed", None),
        ("The answer is 42 apples, 2 more than 40.", "auto", "42"),
        ("The answer is: **-7**. Check: 3 - 10 = -7, and 9 - 2 = 7", "auto", "-7"),
        ("Thus \\boxed{18}. Also 20.", "auto", "18"),
        ("no answer phrase, just 9 then 11", "auto", "11"),
    ],
)
def test_answer_extraction(text, kind, expected):
    assert AnswerExtractor(kind)(text) == expected


def test_answer_regex_uses_last_match_and_its_group():
    extract = AnswerExtractor(regex=r"ANSWER:\s*(\S+)")
    assert extract("ANSWER: 3,000 ... wait, ANSWER: 2,500") == "2500"
    assert extract("no marker 7") is None
    assert AnswerExtractor(regex=r"[A-D]\b")("between B and C") == "c"


def test_bad_extractor_options_name_the_field():
    with pytest.raises(InvalidRequestError, match="strategy_options.answer:") as e:
        AnswerExtractor("last")
    assert e.value.param == "strategy_options"
    with pytest.raises(InvalidRequestError, match="answer_regex: not a valid regular"):
        AnswerExtractor(regex="(unclosed")


# ---------------------------------------------------------------- choices on hand-made samples
def test_best_of_n_picks_highest_mean_logprob_not_sum():
    samples = [
        sample("short but unsure", [-2.0]),  # sum -2.0, mean -2.0
        sample("long and sure", [-0.5, -0.5, -0.5, -0.5, -0.5]),  # sum -2.5, mean -0.5
        sample("", []),  # empty: must not win
    ]
    sel = BestOfN(n=3).select(samples)
    assert sel.index == 1 and sel.score == pytest.approx(-0.5)
    assert BestOfN(n=3, scorer="sum_logprob").select(samples).index == 0
    assert BestOfN(n=3, scorer=lambda c: len(c.text)).select(samples).index == 0


def test_majority_votes_on_normalised_answers():
    samples = [
        sample("The answer is 1,000."),
        sample("I think 7"),
        sample("so \\boxed{1000}"),
        sample("no idea"),
        sample("1000.00 in all"),
    ]
    sel = Majority(n=5).select(samples)
    assert sel.answer == "1000"
    assert sel.votes == {"1000": 3, "7": 1}
    assert sel.vote_share == pytest.approx(3 / 5)  # the answerless sample counts in the total
    assert sel.index == 0


def test_majority_tie_goes_to_first_seen_and_no_answer_is_share_zero():
    assert Majority(n=4).select([sample("5"), sample("6"), sample("6"), sample("5")]).answer == "5"
    sel = Majority(n=2).select([sample("none"), sample("nothing")])
    assert (sel.answer, sel.vote_share, sel.index) == (None, 0.0, 0)


def test_best_of_majority_filters_rare_answers_then_scores():
    samples = [
        sample("answer 3", [-0.1]),  # the most confident sample, but a lone answer
        sample("answer 5", [-1.0]),
        sample("answer 5", [-0.8]),
        sample("answer 5", [-1.2]),
        sample("answer 8", [-0.6]),
        sample("answer 8", [-0.3]),
    ]
    assert BestOfN(n=6).select(samples).index == 0  # best-of-n takes the outlier
    sel = BestOfMajority(n=6, threshold=0.3).select(samples)  # 5 (50%) and 8 (33%) qualify
    assert (sel.index, sel.answer) == (5, "8")  # ... and 8 has the best-scored sample
    assert sel.vote_share == pytest.approx(2 / 6) and sel.score == pytest.approx(-0.3)
    strict = BestOfMajority(n=6, threshold=0.5).select(samples)  # only 5 qualifies
    assert (strict.index, strict.answer) == (2, "5")


def test_best_of_majority_falls_back_to_the_top_answer_then_to_all():
    samples = [sample("1", [-0.1]), sample("2", [-2.0]), sample("2", [-1.0]), sample("3", [-0.2])]
    sel = BestOfMajority(n=4, threshold=0.9).select(samples)  # nothing has 90%: the top answer
    assert (sel.index, sel.answer) == (2, "2")
    none = BestOfMajority(n=2).select([sample("a", [-1.0]), sample("b", [-0.5])])
    assert (none.index, none.answer) == (1, None)  # no answers at all: plain best-of-n


# ---------------------------------------------------------------- adaptive, replayed sampler
def replay(strategy, pool: list[str]) -> StrategyRun:
    """Drive a strategy from a fixed pool of sample texts, in order, as the engine would."""
    run = StrategyRun(strategy)
    while k := run.wanted():
        taken = len(run.samples)
        run.add([sample(t) for t in pool[taken : taken + k]], model_calls=10)
    return run


def test_adaptive_stops_after_first_round_when_answers_agree():
    run = replay(Adaptive(n=16, initial=4), ["12", "12", "12", "13"] + ["99"] * 12)
    report = run.report()
    assert (report.num_samples, report.rounds, report.model_calls) == (4, 1, 10)
    assert report.answer == "12" and report.vote_share == pytest.approx(0.75)


def test_adaptive_doubles_while_answers_disagree():
    pool = ["1", "2", "3", "4", "5", "5", "5", "5"] + ["5"] * 8
    report = replay(Adaptive(n=16, initial=4), pool).report()
    # 4 disagree -> 8 drawn (5 has 4/8 < 0.75) -> 16 drawn (5 has 12/16 = 0.75): stop at n.
    assert (report.num_samples, report.rounds) == (16, 3)
    assert report.answer == "5" and [s.index for s in report.samples] == list(range(16))
    assert report.num_tokens == 16 and report.model_calls == 30
    assert replay(Adaptive(n=6, initial=4), pool).report().num_samples == 6  # capped at n


def test_static_strategies_draw_n_in_one_round():
    report = replay(Majority(n=5), [str(i % 2) for i in range(10)]).report()
    assert (report.num_samples, report.rounds, report.answer) == (5, 1, "0")


# ---------------------------------------------------------------- registry and options
def test_registry_and_option_errors():
    s = make_strategy("best_of_majority", 8, {"threshold": 0.5, "answer": "boxed"})
    assert isinstance(s, BestOfMajority) and (s.n, s.threshold) == (8, 0.5)
    with pytest.raises(InvalidRequestError, match="unknown strategy 'vote'") as e:
        make_strategy("vote", 4)
    assert e.value.param == "strategy"
    with pytest.raises(InvalidRequestError, match="threshold: the vote share"):
        make_strategy("best_of_majority", 4, {"threshold": "high"})
    with pytest.raises(InvalidRequestError, match="temperature not an option of majority"):
        make_strategy("majority", 4, {"temperature": 1})
    with pytest.raises(InvalidRequestError, match="scorer: must be one of"):
        make_strategy("best_of_n", 4, {"scorer": "reward_model"})
    with pytest.raises(InvalidRequestError, match="n: the strategy draws its own n=4"):
        make_strategy(Majority(n=4), 8)
    with pytest.raises(InvalidRequestError) as e:
        make_strategy("adaptive", 0)
    assert e.value.param == "n"
    assert parse_options(["threshold=0.4", "answer=boxed", "initial=2"], "strategy_options") == {
        "threshold": 0.4,
        "answer": "boxed",
        "initial": 2,
    }


# ---------------------------------------------------------------- the scaling benchmark
def _solve(question: str) -> int:
    """Reads a word problem the way a careful student would, sentence by sentence."""
    value = 0
    for sentence in question.split(". "):
        if m := re.search(r"buys (\d+) bags with (\d+)", sentence):
            value += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r" has (\d+) \w+$", sentence):
            value = int(m.group(1))
        elif m := re.search(r"gives (\d+)", sentence):
            value -= int(m.group(1))
        elif m := re.search(r"(\d+) more", sentence):
            value += int(m.group(1))
        elif "half" in sentence:
            value //= 2
        elif "doubles" in sentence:
            value *= 2
    return value


def test_word_problems_are_seeded_and_their_answers_follow_from_the_text():
    problems = make_problems(20, (1, 2, 3, 4), seed=3)
    assert problems == make_problems(20, (1, 2, 3, 4), seed=3)
    assert problems != make_problems(20, (1, 2, 3, 4), seed=4)
    for p in problems:
        assert p.question.count(".") == p.level + 1  # the start, then one sentence per step
        assert p.answer > 0 and _solve(p.question) == p.answer, p.question
    assert any("bags" in p.question for p in problems if p.level == 2)
    assert any("half" in p.question or "doubles" in p.question for p in problems)


def test_scaling_scores_slices_and_replays_adaptive():
    problems = make_problems(1, (1, 2), seed=0)
    truth = [str(p.answer) for p in problems]
    right, wrong = truth[0], "999"
    pools = [
        # problem 1: a confident wrong outlier first, then the right answer three times
        [sample(wrong, [-0.1]), sample(right, [-1.0]), sample(right, [-0.9]), sample(right)],
        # problem 2: never right
        [sample(wrong), sample("1"), sample(wrong), sample("2")],
    ]
    at = lambda m, k: score_at_k(m, k, pools, truth, problems, AnswerExtractor(), 0.3)  # noqa: E731
    assert at("majority", 4)["accuracy"] == 0.5  # right on problem 1 only
    assert at("majority", 2)["accuracy_by_level"] == {"1": 0.5, "2": 0.0}  # slices: 1:1 tie, 2:0
    assert at("majority", 1)["accuracy"] == pytest.approx(0.75 / 2)  # 3 of 4 singles, 0 of 4
    assert at("best_of_n", 4)["accuracy"] == 0.0  # the outlier wins on score
    assert at("pass", 1)["accuracy"] == pytest.approx(0.75 / 2)
    assert at("pass", 4)["mean_tokens"] == 4
    adaptive = replay_adaptive(pools, truth, problems, agreement=0.75, initial=2)
    # problem 1: 2 samples split -> 4 drawn; problem 2: split too -> 4 drawn
    assert adaptive["mean_samples"] == 4 and adaptive["accuracy"] == 0.5


# ---------------------------------------------------------------- entropy-adaptive switching
def test_model_switch_follows_the_rolling_entropy():
    sw = ModelSwitch([0, 1], threshold=1.0, window=2, min_span=2)
    # full: low entropy, but min_span first
    assert [sw.observe(e) for e in (0.2, 0.2)] == [False, True]
    assert sw.cheap
    # cheap: the mean of the last 2 crosses 1.0 only at the 2nd high value ...
    assert [sw.observe(e) for e in (0.5, 1.4, 1.6)] == [False, False, True]
    assert not sw.cheap and sw.modes == [False, False, True, True, True]
    assert (sw.num_cheap_tokens, sw.num_full_tokens, sw.num_switches) == (3, 2, 2)
    always_full = ModelSwitch([0], threshold=0.0, window=1, min_span=1)
    assert not any(always_full.observe(e) for e in (0.0, 0.0, 3.0))


# ---------------------------------------------------------------- heron bench scaling parts
def test_humaneval_runs_the_problems_own_tests():
    from heron.bench.humaneval import load_problems, passes

    problem = load_problems(1)[0]
    assert passes(problem, problem["canonical_solution"])
    assert not passes(problem, "    return not True\n")
    assert not passes(problem, "    while True:\n        pass\n", timeout=2.0)
