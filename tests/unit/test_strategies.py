"""Decoding strategies: answer extraction, the choices of each strategy on hand-made samples,
adaptive's early stop (with a replayed sampler), the scaling benchmark's problems and scoring,
and end to end on the real engine: the samples really share the prompt's KV blocks, the CLI
and the server take a strategy."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from heron import SamplingParams
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
from tests.support.cli import heron


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


# ---------------------------------------------------------------- the real engine
def test_strategy_end_to_end_on_the_engine(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8)
    prompts = ["Two plus two is", "The capital of France is"]
    plain = llm.generate(prompts, params, use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False, strategy="majority")
    for p, out in zip(plain, outs, strict=True):
        r = out.strategy
        assert r is not None and r.strategy == "majority"
        assert len(out.outputs) == 1 and out.outputs[0].index == 0
        # Round 0 uses the request's own seed: the same samples as plain n = 4 sampling.
        assert [s.text for s in r.samples] == [c.text for c in p.outputs]
        assert out.outputs[0].text == r.samples[r.chosen].text
        assert (r.num_samples, r.rounds) == (4, 1)
        assert r.num_tokens == sum(len(c.token_ids) for c in p.outputs)
        # one prefill step (the first token of every sample), then one step per token
        assert r.model_calls == max(len(c.token_ids) for c in p.outputs)


def test_adaptive_on_the_engine_spends_more_when_samples_disagree(llm):
    """With the whole text as the answer, greedy samples always agree (one round) and hot
    random samples almost never do, so adaptive draws further rounds, with new seeds."""
    prompt = "Pick a random number between 1 and 1000:"
    strategy = Adaptive(n=8, initial=2, agreement=1.0, answer_regex=r"(?s).+")
    agree = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False, strategy=strategy
    )[0].strategy
    assert (agree.num_samples, agree.rounds) == (2, 1)
    hot = SamplingParams(temperature=1.5, seed=0, max_tokens=6)
    spread = llm.generate(prompt, hot, use_tqdm=False, strategy=strategy)[0].strategy
    assert spread.rounds >= 2 and spread.num_samples in (4, 8)
    texts = [s.text for s in spread.samples]
    assert len(set(texts)) > 2, "later rounds must not replay the first round's seeds"


def test_best_of_n_returns_the_most_likely_sample_on_the_engine(llm):
    params = SamplingParams(n=4, temperature=1.2, seed=5, max_tokens=6, logprobs=2)
    out = llm.generate("Once upon a time", params, use_tqdm=False, strategy="best_of_n")[0]
    r = out.strategy
    means = [sum(p[t].logprob for t, p in zip(s.token_ids, s.logprobs, strict=True)) / 6
             for s in r.samples]  # fmt: skip
    assert all(len(s.token_ids) == 6 for s in r.samples)
    assert r.chosen == max(range(4), key=means.__getitem__)
    assert r.score == pytest.approx(max(means))
    assert all(len(p) >= 2 for p in out.outputs[0].logprobs)  # the user's top-2 kept


def test_samples_share_the_prompt_kv_blocks(llm):
    """n = 4 forks at prompt end: during decoding every full prompt block has ref count 4
    and the group holds far fewer blocks than four separate requests would."""
    engine = llm.engine
    bm = engine.block_manager
    prompt = list(range(100, 100 + 5 * bm.block_size + 3))  # 5 full blocks + 3 tokens

    def run(n: int) -> tuple[int, list[list[int]]]:
        params = SamplingParams(n=n, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
        req = engine.add_request(prompt, params)
        held, refs = 0, []
        while not req.finished:
            engine.step()
            if req.forked and not req.finished:
                held = max(held, bm.num_blocks - bm.num_free_blocks)
                refs = [[bm.blocks[b].ref_count for b in s.block_table] for s in req.seqs]
        return held, refs

    held_1, _ = run(1)
    held_4, refs = run(4)
    assert all(r[:5] == [4] * 5 for r in refs), refs  # the full prompt blocks: shared by 4
    assert all(r[5] == 1 for r in refs), refs  # the partial block: copied on first write
    assert held_1 == 6 and held_4 == 5 + 4  # vs 24 without sharing


def test_cli_generate_with_a_strategy():
    proc = heron(
        "generate", "Two plus two is", "--no-chat", "-q",
        "--strategy", "best_of_majority", "--n", "3", "--strategy-option", "threshold=0.5",
        "--max-tokens", "4", "--seed", "1", "--dtype", "float32", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "===" not in proc.stdout and proc.stdout.strip()  # one completion, the chosen one
    assert re.search(r"best_of_majority: sample [123]/3, .* tokens, \d+ engine steps", proc.stderr)


# ---------------------------------------------------------------- the server
def test_server_strategy_in_the_body(server):
    body = {
        "prompt": "Q: What is 2 + 3?\nA:",
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
        "strategy": "majority",
        "strategy_options": {"answer": "number"},
    }
    url = server.url + "/v1/completions"
    r = httpx.post(url, json=body, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["choices"]) == 1 and data["choices"][0]["index"] == 0
    report = data["choices"][0]["strategy"]
    assert report["strategy"] == "majority" and report["num_samples"] == 3
    assert "samples" not in report
    assert data["usage"]["completion_tokens"] == report["num_tokens"]
    # The plain n = 3 samples with the same seed contain the chosen text.
    plain_body = {k: v for k, v in body.items() if not k.startswith("strategy")}
    plain = httpx.post(url, json=plain_body, timeout=300).json()
    assert data["choices"][0]["text"] in [c["text"] for c in plain["choices"]]

    # Streaming sends the chosen completion once it is decided, then [DONE].
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == data["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["strategy"]["answer"] == report["answer"]

    bad = httpx.post(url, json={**body, "strategy": "vote"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
    bad = httpx.post(url, json={**body, "strategy_options": {"threshold": 2}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy_options"


def test_server_chat_with_adaptive(server):
    body = {
        "messages": [{"role": "user", "content": "What is 6 times 7? Answer with a number."}],
        "max_tokens": 6,
        "temperature": 0,
        "n": 8,
        "strategy": "adaptive",
        "strategy_options": {"answer_regex": "(?s).+"},  # the whole text is the answer
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    report = choice["strategy"]
    assert (report["num_samples"], report["rounds"]) == (4, 1)  # greedy samples agree at once
    assert choice["message"]["role"] == "assistant" and report["model_calls"] >= 1
