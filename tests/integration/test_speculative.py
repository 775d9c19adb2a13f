"""Speculative decoding is lossless, in the engine on the real model: greedy outputs are
identical with and without each proposer, sampled tokens follow the target's distribution,
and the paged cache after rejected drafts holds exactly what a plain run computes; drafts
share a step's row budget; bad settings fail; `heron bench spec` stays lossless. The parts
on stand-ins: tests/unit/test_speculative_parts.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

from heron import LLM, SamplingParams, kernels
from heron.config import EngineConfig
from heron.errors import InvalidRequestError

PROMPTS = [
    # Copy-heavy: lookup drafts are mostly accepted.
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
    "Repeat: apple, banana,",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):",
    # Open-ended: drafts are mostly rejected.
    "Write a short poem about the sea.",
    "Quelle est la capitale de l'Italie ?",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40)


def _pinned_fit_engine(
    heron_runner: Callable[..., LLM], a: float, b: float, rows: tuple[int, ...]
) -> tuple[LLM, list[int]]:
    """An ngram engine whose step-time fit is pinned at ``a`` + ``b`` seconds a row (seen at
    ``rows``), and the list its steps' drafted rows are recorded into."""
    llm = heron_runner(speculative_method="ngram", num_speculative_tokens=5)
    spec = llm.engine.plugins.get("speculative")
    for n in rows:
        spec.cost.observe(n, a + b * n)
    spec.observe = lambda *args: None  # keep the fit
    drafted: list[int] = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch, *args: (
        drafted.append(sum(len(s.draft_token_ids) for s in batch.seqs)),
        execute(batch, *args),
    )[1]
    return llm, drafted


def test_drafts_share_a_row_budget(heron_runner):
    """With rows priced dear (the step-time fit pinned), a batch's drafts together stay
    within the rows that add a quarter to the step's time."""
    llm, drafted = _pinned_fit_engine(heron_runner, 0.010, 0.001, (1, 9, 17))  # 10 ms + 1 ms a row
    budget = int(
        llm.engine.plugins.get("speculative").cost.draft_rows(len(PROMPTS[:2]), 0.25)
    )  # 3 rows
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert all(o.outputs[0].token_ids for o in outs)
    assert max(drafted) == budget, drafted  # drafting happened, never past the budget


def test_rows_priced_out_still_get_a_probe_now_and_then(heron_runner):
    """Where the fit prices a row above the step's share (budget < 1 row), no draft would run
    and the fit would never see another verify step: one draft row every _PAUSE_STEPS
    steps keeps measuring."""
    from heron.speculative import speculator

    llm, drafted = _pinned_fit_engine(heron_runner, 0.004, 0.010, (1, 5, 9))  # 4 ms + 10 ms a row
    assert llm.engine.plugins.get("speculative").cost.draft_rows(1, 0.25) < 1
    params = SamplingParams(temperature=0, max_tokens=3 * speculator._PAUSE_STEPS, ignore_eos=True)
    llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert max(drafted) == 1, drafted  # probes of one row, never more
    assert sum(drafted) <= 3, drafted  # one per _PAUSE_STEPS steps at most


def test_bad_settings(heron_runner):
    """Names and options fail before the model loads (LLM checks them through the registry);
    what needs the model's engine fails when it is built."""
    with pytest.raises(InvalidRequestError, match="speculative_method"):
        LLM(speculative_method="telepathy")
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(InvalidRequestError, match="ngram_max"):
        LLM(speculative_method="ngram", speculative_options={"ngram_min": 3, "ngram_max": 2})
    with pytest.raises(InvalidRequestError, match="speculative_options.model: required"):
        LLM(speculative_method="draft")
    with pytest.raises(InvalidRequestError, match="speculative_options.depth"):
        LLM(speculative_method="lookahead", speculative_options={"depth": 0})
    with pytest.raises(InvalidRequestError, match="KIVI"):
        heron_runner(speculative_method="lookahead", kv_cache_dtype="int4")
    for method, k_max in (("lookahead", 16), ("ngram", 4)):
        llm = heron_runner(speculative_method=method, kv_cache_memory=16 * 2**20)
        assert llm.engine.plugins.get("speculative").k_max == k_max


def test_draft_model_with_another_tokenizer_is_refused(heron_runner, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="a").save_pretrained(tmp_path)
    with pytest.raises(InvalidRequestError, match="another tokenizer"):
        heron_runner(speculative_method="draft", speculative_options={"model": str(tmp_path)})


# ---------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def reference(llm):
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
    return [o.outputs[0].token_ids for o in alone]


@pytest.mark.parametrize("method", ["ngram", "lookahead"])
def test_bf16_greedy_identical_where_the_products_are_row_independent(heron_runner, method):
    """In bf16 a verify step's rows reproduce plain steps' tokens where every product of a
    few rows is heron's bf16 GEMV (each row summed alone; oneDNN's GEMM sums by the call's
    shape, so near-ties could part there)."""
    if not kernels.bf16_gemv_runs():
        pytest.skip("needs AVX512_BF16")
    plain = heron_runner(dtype="bfloat16")
    spec = heron_runner(dtype="bfloat16", speculative_method=method, num_speculative_tokens=6)
    for prompt in PROMPTS:
        want = plain.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert spec.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    assert spec.engine.stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize(
    "spec",
    [
        {"speculative_method": "ngram", "num_speculative_tokens": 5},
        {"speculative_method": "lookahead", "num_speculative_tokens": 12},
        {
            "speculative_method": "layer_skip",
            "speculative_options": {"num_layers": 26},
            "num_speculative_tokens": 2,
        },
        # The default model's first 20 layers as a second model with its own cache.
        {
            "speculative_method": "draft",
            "speculative_options": {"model": "smollm2-135m-instruct", "num_layers": 20},
            "num_speculative_tokens": 3,
        },
    ],
    ids=["ngram", "lookahead", "layer_skip", "draft"],
)
def test_greedy_identical_alone_and_batched(heron_runner, reference, spec, monkeypatch):
    llm = heron_runner(**spec)
    kernel_rows: list[int] = []  # rows per compiled decode-kernel call (or C++ decode loop)
    if kernels.available():
        original = kernels.paged_decode
        monkeypatch.setattr(
            kernels, "paged_decode", lambda q, *a: kernel_rows.append(q.shape[0]) or original(q, *a)
        )
        loop = llm.engine.runner.model.decode_loop
        applies = loop.applies

        def spy(x, *a):
            found = applies(x, *a)
            if found:
                kernel_rows.append(x.shape[0])
            return found

        monkeypatch.setattr(loop, "applies", spy)
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
    for i, out in enumerate(alone):
        assert out.outputs[0].token_ids == reference[i], f"prompt {i} alone"
    alone_rows = list(kernel_rows)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference[i], f"prompt {i} batched"
    stats = llm.engine.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["spec_verify_steps"] > 0
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # some of each
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]  # nothing leaked
    if spec["speculative_method"] == "draft":  # its own cache is given back too
        draft_blocks = llm.engine.plugins.get("speculative").proposer.block_manager
        assert draft_blocks.num_free_blocks == draft_blocks.num_blocks
    if spec["speculative_method"] == "ngram":
        # The copy prompt is easy to draft. Alone: in the batch, where a drafted row costs
        # more, the step-time budget may leave it no drafts on a slow CPU.
        copy = alone[0].metrics
        assert copy["spec_acceptance_rate"] > 0.3, copy
        # A chain's verify rows attend as plain decode rows: alone, a kernel call (or a C++
        # loop step) of several rows can only be one sequence's drafts.
        assert not kernels.available() or max(alone_rows) > 1


@pytest.mark.parametrize(
    "spec, prompt",
    [
        (
            dict(
                speculative_method="layer_skip",
                speculative_options={"num_layers": 26},
                num_speculative_tokens=4,
            ),
            PROMPTS[2],
        ),
        # Tree drafts: an accepted branch that is not the first is moved up in the cache.
        ({"speculative_method": "lookahead", "num_speculative_tokens": 12}, PROMPTS[1]),
    ],
    ids=["layer_skip", "lookahead"],
)
def test_cache_after_rejections_equals_plain_run(llm, heron_runner, spec, prompt):
    """Positions computed so far hold the same K/V with a speculative run (drafts partly
    accepted, partly rolled back) as without one."""
    spec = heron_runner(**spec)
    branch_rows = 0  # decode rows (compiled kernel or C++ loop) skipping a sibling's slot
    forward = spec.engine.runner._forward

    def counting(ids, positions, meta, layers=None):
        nonlocal branch_rows
        visible = meta.decode_visible
        if visible is not None:
            chain = (1 << (meta.decode_lens - visible[:, 0])) - 1  # every slot from `from` on
            branch_rows += int((visible[:, 1] != chain).sum())
        return forward(ids, positions, meta, layers)

    spec.engine.runner._forward = counting
    moves = []
    move_slots = spec.engine.runner.move_slots
    spec.engine.runner.move_slots = lambda table, m: (moves.append(m), move_slots(table, m))
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    caches = []
    for engine in (llm.engine, spec.engine):
        req = engine.add_request(prompt, params)
        seq = req.seqs[0]
        while len(seq.output_token_ids) < 30:
            assert not seq.is_finished, "finished before 30 tokens"
            engine.step()
        n, bs = seq.num_computed_tokens, engine.block_manager.block_size
        slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(n)])
        caches.append((seq.token_ids[:n], engine.runner.kv_cache[:, :, slots].clone()))
        engine.abort_request(req.request_id)
    (tok_a, kv_a), (tok_b, kv_b) = caches
    m = min(len(tok_a), len(tok_b))
    assert m > 30 and tok_a[:m] == tok_b[:m]
    stats = spec.engine.stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # rejections happened
    torch.testing.assert_close(kv_a[:, :, :m], kv_b[:, :, :m], atol=1e-4, rtol=1e-4)
    if spec.engine.config.speculative_method == "lookahead":
        assert moves, "no accepted branch needed moving: the test did not exercise it"
        # Draft trees verify through the kernel too, each branch's rows skipping the others.
        assert not kernels.available() or branch_rows > 0


PROMPT = "My favourite colour is"
TOP_K = 4
SAMPLES = 800
CHI2_CRITICAL = 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def exact_two_token_distribution(llm) -> dict[tuple[int, int], float]:
    """The target's p(t1, t2) under temperature 1 and top-k 4, from its raw logprobs."""

    def top(prompt_ids: list[int]) -> dict[int, float]:
        params = SamplingParams(temperature=0, max_tokens=1, logprobs=TOP_K)
        pos = llm.generate([prompt_ids], params, use_tqdm=False)[0].outputs[0].logprobs[0]
        probs = {t: float(torch.tensor(lp.logprob).exp()) for t, lp in pos.items()}
        best = sorted(probs, key=probs.get, reverse=True)[:TOP_K]
        total = sum(probs[t] for t in best)
        return {t: probs[t] / total for t in best}

    ids = llm.get_tokenizer().encode(PROMPT)
    return {(t1, t2): p1 * p2 for t1, p1 in top(ids).items() for t2, p2 in top(ids + [t1]).items()}


def chi_square_of_spec_samples(
    heron_runner: Callable[..., LLM], exact: dict, **spec
) -> tuple[float, dict]:
    """Chi-square of the (t1, t2) pairs sampled with speculation against ``exact`` (infinite
    if a pair the target cannot produce shows up); t2 always comes out of draft-and-verify
    (t1 is sampled after the prefill)."""
    llm = heron_runner(**spec)
    counts: Counter = Counter()
    for r in range(SAMPLES // 100):
        params = SamplingParams(n=100, temperature=1.0, top_k=TOP_K, max_tokens=3, seed=r)
        out = llm.generate([PROMPT], params, use_tqdm=False)[0]
        counts.update(tuple(o.token_ids[:2]) for o in out.outputs)
    if not set(counts) <= set(exact):
        return float("inf"), llm.engine.stats()
    chi2 = sum((counts[k] - SAMPLES * p) ** 2 / (SAMPLES * p) for k, p in exact.items())
    return chi2, llm.engine.stats()


def test_sampling_distribution_unchanged(llm, heron_runner, monkeypatch):
    """With a poor layer-skip draft (20 of 30 layers: drafts often rejected) the sampled pairs
    follow the target's exact distribution; the same test catches a verifier that keeps
    every draft."""
    exact = exact_two_token_distribution(llm)
    assert len(exact) == TOP_K * TOP_K and abs(sum(exact.values()) - 1) < 1e-5
    spec = {
        "speculative_method": "layer_skip",
        "speculative_options": {"num_layers": 20},
        "num_speculative_tokens": 2,
    }
    chi2, stats = chi_square_of_spec_samples(heron_runner, exact, **spec)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert chi2 < CHI2_CRITICAL, chi2

    def keep_every_draft(target_probs, drafts, draft_probs, generator):
        return [*drafts, int(torch.multinomial(target_probs[-1], 1, generator=generator))]

    monkeypatch.setattr("heron.speculative.speculator.accept_sampled", keep_every_draft)
    broken, _ = chi_square_of_spec_samples(heron_runner, exact, **spec)
    assert broken > CHI2_CRITICAL, broken


def test_bench_spec_runs_and_stays_lossless(tmp_path):
    """A tiny `heron bench spec`: every speculative output equals plain decoding's, the
    baseline and the proposer are timed in the same run, and the JSON/PNG are written."""
    from heron.bench.record import make_record, write_record
    from heron.bench.spec import SpecBenchConfig, format_table, run_spec_bench, to_results

    cfg = SpecBenchConfig(
        tasks=("code_edit",), methods=("ngram",), batch_size=2, batch1_prompts=1, max_tokens=24
    )
    cfg.engine_kwargs["kv_cache_memory"] = 128 * 2**20
    result = run_spec_bench(cfg)
    runs = result["runs"]
    assert [(r["method"], r["batch"]) for r in runs] == [
        ("none", 1),
        ("none", 2),
        ("ngram", 1),
        ("ngram", 2),
    ]
    for r in runs:  # every output's first token is left out of the decode phase
        assert r["decode_tokens"] == r["generated_tokens"] - r["requests"] * cfg.repeats
        # summed over requests: one at a time within the run's time, at once overlapping
        bound = r["seconds"] * (1 if r["batch"] == 1 else r["requests"])
        assert 0 < r["decode_seconds"] < bound
    for r in runs[2:]:
        assert r["identical"] == r["requests"] and r["speedup"] > 0 and r["decode_speedup"] > 0
        assert r["draft_tokens"] > 0  # code edits copy their input: lookup drafts happen
    assert "ngram" in format_table(result)
    write_record(make_record(to_results(result)), tmp_path / "spec.json")
    assert (tmp_path / "spec.json").stat().st_size > 0
