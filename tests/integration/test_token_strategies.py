"""Per-token decoding strategies the engine applies inside continuous batching, on the real
model: context-aware decoding (a context-free companion sequence in lockstep) and
entropy-adaptive decoding (a layer-skipped cheap model, the full model recomputing its
positions on the way back). Each test would fail if the strategy silently did nothing. The
switch logic on stand-in entropies: tests/unit/test_strategies.py; through the server:
tests/server/test_server_strategies.py."""

from __future__ import annotations

import pytest
import torch

from heron import SamplingParams
from heron.errors import InvalidRequestError
from heron.strategies import ContextAware, EntropyAdaptive, Majority, make_strategy
from tests.support.prompts import CAD_CONTEXT, CAD_MESSAGES, CAD_QUESTION

PROMPT = "The history of the Roman Empire spans"
NEAR_TIE = 1e-2


def greedy(max_tokens: int = 12, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


def chat_ids(llm, content: str) -> list[int]:
    _, ids = llm.get_tokenizer().encode_chat([{"role": "user", "content": content}])
    return ids


def full_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """The model's whole next-token log-distribution after ``ids`` (all of it, via logprobs)."""
    vocab = llm.engine.model_config.vocab_size
    out = llm.generate([ids], greedy(1, logprobs=vocab), use_tqdm=False)[0]
    lps = torch.full((vocab,), float("-inf"))
    for tid, lp in out.outputs[0].logprobs[0].items():
        lps[tid] = lp.logprob
    return lps


def cad_scores(llm, context: str, question: str, alpha: float):
    """The CAD score of every next token after a generated prefix."""
    with_ctx, without = chat_ids(llm, context + question), chat_ids(llm, question)

    def scores(prefix: list[int]) -> torch.Tensor:
        a, b = full_logprobs(llm, with_ctx + prefix), full_logprobs(llm, without + prefix)
        return (1 + alpha) * a - alpha * b

    return scores


def assert_same_up_to_a_near_tie(got: list[int], want: list[int], scores_at) -> None:
    """Equal token lists, or lists that first part where the two tokens score within 1e-2 of
    each other (another batch shape or chunking may flip a near tie, as in the parity tests)."""
    if got == want:
        return
    i = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), None)
    assert i is not None, f"one output is a prefix of the other: {got} vs {want}"
    s = scores_at(want[:i])
    assert abs(float(s[got[i]] - s[want[i]])) < NEAR_TIE, (i, got, want)


def assert_engine_idle(engine) -> None:
    bm = engine.block_manager
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_free_blocks == bm.num_blocks  # the companion's blocks too
    cad, ead = engine.plugins.get("context_aware"), engine.plugins.get("entropy_adaptive")
    assert not (cad.companion or cad.main or cad.pending or ead.switches or ead.rewinds)


# ---------------------------------------------------------------- context-aware decoding
def test_cad_with_alpha_zero_is_plain_decoding(llm):
    plain = llm.chat(CAD_MESSAGES, greedy(24), use_tqdm=False)[0].outputs[0]
    cad = llm.chat(
        CAD_MESSAGES,
        greedy(24, token_strategy=ContextAware(context=CAD_CONTEXT, alpha=0.0)),
        use_tqdm=False,
    )
    ids = chat_ids(llm, CAD_CONTEXT + CAD_QUESTION)
    assert_same_up_to_a_near_tie(
        cad[0].outputs[0].token_ids, plain.token_ids, lambda p: full_logprobs(llm, ids + p)
    )
    assert_engine_idle(llm.engine)


def test_cad_draws_from_the_contrasted_logits(llm):
    """Each greedy CAD token is the argmax of (1 + a) * logp(with context) - a * logp(without),
    computed here from two separate plain runs; and it changes the answer."""
    alpha = 1.0
    params = greedy(3, token_strategy=ContextAware(context=CAD_CONTEXT, alpha=alpha))
    out = llm.chat(CAD_MESSAGES, params, use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    assert out.metrics["cad_context_free_prompt_tokens"] == len(chat_ids(llm, CAD_QUESTION))
    scores = cad_scores(llm, CAD_CONTEXT, CAD_QUESTION, alpha)
    for i, token in enumerate(tokens):
        mixed = scores(tokens[:i])
        best = int(mixed.argmax())
        assert token == best or mixed[best] - mixed[token] < NEAR_TIE, (i, token, best)
    plain = llm.chat(CAD_MESSAGES, greedy(3), use_tqdm=False)[0].outputs[0].token_ids
    assert tokens != plain
    assert "Lyon" in llm.get_tokenizer().decode(tokens)


def test_cad_in_a_batch_with_small_chunks_and_preemption_equals_alone(llm, heron_runner):
    """Pairs whose halves finish their prompts in different steps (16-token chunks) and get
    preempted (a tiny KV cache) produce what each produces alone."""
    contexts = [CAD_CONTEXT, "In this story, water boils at 40 degrees. ", "Bob is 7 feet tall. "]
    questions = [CAD_QUESTION, "At what temperature does water boil?", "How tall is Bob?"]
    params = [greedy(16, token_strategy=ContextAware(context=c, alpha=0.5)) for c in contexts]
    prompts = [
        {"prompt_token_ids": chat_ids(llm, c + q)} for c, q in zip(contexts, questions, strict=True)
    ]
    alone = [llm.generate([p], s, use_tqdm=False)[0].outputs[0].token_ids
             for p, s in zip(prompts, params, strict=True)]  # fmt: skip
    per_block = llm.engine.runner.bytes_per_block(llm.engine.model_config, 16, torch.float32)
    chunked = heron_runner(max_num_batched_tokens=16)
    tiny = heron_runner(kv_cache_memory=14 * per_block, max_model_len=160)
    mixed = prompts + [{"prompt": "Once upon a time"}]
    for engine_llm in (chunked, tiny):
        outs = engine_llm.generate(mixed, [*params, greedy(16)], use_tqdm=False)
        for c, q, out, want in zip(contexts, questions, outs, alone, strict=False):
            got = out.outputs[0].token_ids
            assert_same_up_to_a_near_tie(got, want, cad_scores(llm, c, q, 0.5))
        assert_engine_idle(engine_llm.engine)
    assert tiny.engine.stats()["num_preemptions"] > 0


def test_cad_abort_frees_the_companion(llm):
    engine = llm.engine
    req = engine.add_request(
        chat_ids(llm, CAD_CONTEXT + CAD_QUESTION),
        greedy(50, token_strategy=ContextAware(context=CAD_CONTEXT)),
    )
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 2  # the request and its context-free companion
    engine.abort_request(req.request_id)
    assert_engine_idle(engine)


def test_cad_bad_input(llm, heron_runner):
    lyon = ContextAware(context="Lyon")
    with pytest.raises(InvalidRequestError, match="context: the context text does not occur") as e:
        llm.generate("Hello there", greedy(token_strategy=lyon), use_tqdm=False)
    assert e.value.param == "strategy_options"
    with pytest.raises(InvalidRequestError, match="without its context is empty"):
        llm.generate("Lyon", greedy(token_strategy=lyon), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="draws one sample") as e:
        SamplingParams(n=2, token_strategy=ContextAware(context="x"))
    assert e.value.param == "n"
    # One per-token strategy per request (two cannot be combined: one field holds it), and
    # only a per-token one.
    with pytest.raises(InvalidRequestError, match="per-token strategy") as e:
        SamplingParams(token_strategy=Majority(n=1))
    assert e.value.param == "token_strategy"
    # e's traceback holds this frame: left bound, that cycle would keep the engine built below
    # (and its KV cache) alive after the test, until a garbage collection.
    del e
    with pytest.raises(InvalidRequestError, match="strategy_options.context"):
        make_strategy("cad", 1, {})
    with pytest.raises(InvalidRequestError, match="leave n at 1"):
        make_strategy("cad", 4, {"context": "x"})
    with pytest.raises(InvalidRequestError, match="strategy_options.alpha"):
        ContextAware(context="x", alpha=-1)
    spec = heron_runner(speculative_method="ngram")
    with pytest.raises(InvalidRequestError, match="speculative decoding"):
        spec.generate(
            CAD_CONTEXT + CAD_QUESTION,
            greedy(token_strategy=ContextAware(context=CAD_CONTEXT)),
            use_tqdm=False,
        )


# ---------------------------------------------------------------- entropy-adaptive decoding
def test_entropy_adaptive_with_an_always_full_threshold_is_plain_decoding(llm):
    plain = llm.generate(PROMPT, greedy(32), use_tqdm=False)[0].outputs[0]
    out = llm.generate(
        PROMPT, greedy(32, token_strategy=EntropyAdaptive(threshold=0.0)), use_tqdm=False
    )[0]
    assert out.outputs[0].token_ids == plain.token_ids
    assert out.metrics["ead_cheap_tokens"] == 0 and out.metrics["ead_full_tokens"] == 32


def test_entropy_adaptive_switches_and_the_full_model_sees_a_full_cache(llm):
    """With a threshold near the median entropy the sequence switches both ways. Every token
    the full model drew after a cheap stretch is the full model's greedy choice given the
    text so far (checked teacher-forced): the cheap positions were recomputed. The cheap
    model's own tokens are not all the full model's choices (it does run fewer layers)."""
    engine = llm.engine
    ids = llm.get_tokenizer().encode(PROMPT)
    params = greedy(64, token_strategy=EntropyAdaptive(threshold=2.0, min_span=4), ignore_eos=True)
    req = engine.add_request(ids, params)
    seq = req.seqs[0]
    sw = engine.plugins.get("entropy_adaptive").switches[seq.seq_id]
    while not req.finished:
        engine.step()
    out = seq.output_token_ids
    assert sw.num_switches >= 4 and sw.num_recomputed_tokens > 0 and sw.num_cheap_tokens > 8
    check = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    forced = llm.generate([ids + out], check, use_tqdm=False)[0].prompt_logprobs[len(ids) :]
    after_cheap = [i for i in range(1, len(out)) if not sw.modes[i] and sw.modes[i - 1]]
    assert after_cheap
    for i, pos in enumerate(forced):
        top = max(lp.logprob for lp in pos.values())
        gap = top - pos[out[i]].logprob
        if not sw.modes[i]:  # drawn by the full model
            assert gap < NEAR_TIE, (i, gap)
    cheap_misses = [i for i, pos in enumerate(forced) if sw.modes[i] and pos[out[i]].rank > 1]
    assert cheap_misses
    assert_engine_idle(engine)


def test_entropy_adaptive_strategy_and_bad_input(llm):
    out = llm.generate(
        PROMPT,
        greedy(24),
        use_tqdm=False,
        strategy=EntropyAdaptive(threshold=100.0, min_span=2, cheap_layers=20),
    )[0]
    report = out.strategy
    assert report.strategy == "entropy_adaptive" and report.num_samples == 1
    assert report.metrics["ead_cheap_tokens"] == 22 and report.metrics["ead_full_tokens"] == 2
    with pytest.raises(InvalidRequestError, match="strategy_options.threshold"):
        EntropyAdaptive(threshold=-1)
    with pytest.raises(InvalidRequestError, match="cheap_layers"):
        llm.generate(
            PROMPT, greedy(token_strategy=EntropyAdaptive(cheap_layers=99)), use_tqdm=False
        )
    with pytest.raises(InvalidRequestError, match="KV compression"):
        llm.generate(
            PROMPT, greedy(token_strategy=EntropyAdaptive(), kv_policy="snapkv"), use_tqdm=False
        )


# ---------------------------------------------------------------- heron bench scaling parts
def test_counterfactual_scoring_and_run(llm):
    from heron.bench.counterfactual import CASES, run_counterfactual

    lyon = CASES[0]
    assert lyon.follows("The capital is Lyon.") == (True, False)
    assert lyon.follows("Paris, of course") == (False, True)
    week = next(c for c in CASES if "week" in c.question)
    assert week.follows("A week has 9 days, not 7.") == (True, True)
    assert week.follows("19 days") == (False, False)  # whole numbers only
    r = run_counterfactual(llm, alphas=(1.0,), max_tokens=6, cases=CASES[:2])
    plain, cad = r["rows"]
    assert (plain["method"], cad["method"], cad["alpha"]) == ("plain", "cad", 1.0)
    assert cad["prompt_tokens"] > plain["prompt_tokens"]  # the context-free companions
    assert len(cad["answers"]) == 2 and cad["answers"] != plain["answers"]


def test_humaneval_and_entropy_sections_on_the_engine(llm):
    from heron.bench.entropy_adaptive import run_entropy_adaptive
    from heron.bench.humaneval import run_humaneval

    he = run_humaneval(llm, num_problems=2, k=2, max_tokens=24)
    assert he["num_problems"] == 2 and 0 <= he["greedy_pass_at_1"] <= 1
    assert he["best_of_n_by_tests"] >= max(he["best_of_n_by_logprob"], he["sampled_pass_at_1"])
    ead = run_entropy_adaptive(llm, [PROMPT], ["0"], thresholds=(0.0, 100.0), max_tokens=16,
                               min_span=2)  # fmt: skip
    plain, never, always = ead["rows"]
    assert never["cheap_share"] == 0 and never["tokens"] == plain["tokens"]
    assert always["cheap_share"] > 0.5 and always["switches"] == 1
