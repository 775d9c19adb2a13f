"""Stop conditions (strings across token boundaries, stop token ids, EOS, max_tokens) and
incremental detokenization of multi-byte UTF-8 text."""

from __future__ import annotations

import pytest

from heron import SamplingParams
from heron.tokenizer import Detokenizer

PROMPT = "Once upon a time"
MAX = 16


@pytest.fixture(scope="module")
def greedy(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX), use_tqdm=False)
    return out[0].outputs[0]


def test_max_tokens_gives_length(greedy, llm):
    assert len(greedy.token_ids) == MAX
    assert greedy.finish_reason == "length"
    assert greedy.stop_reason is None
    assert greedy.text == llm.get_tokenizer().decode(greedy.token_ids)


def test_finished_output_carries_its_times(llm):
    """arrival <= first token <= finished: what TTFT and the decode phase are measured from."""
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    t = out.times
    assert t.arrival <= t.first_token <= t.finished
    assert t.decode_seconds == t.finished - t.first_token
    req = llm.engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=4))
    outs = [o for _ in range(4) for o in llm.engine.step() if o.request_id == req.request_id]
    assert outs[0].times.finished is None and outs[-1].times.finished is not None


def _spanning_stop(tok, ids: list[int]) -> tuple[str, int, int]:
    """A 4-char stop string made of the last 2 chars of token k and the first 2 of token k+1.
    Returns (stop, k, char offset where it starts)."""
    text = tok.decode(ids)
    ends = [len(tok.decode(ids[: j + 1])) for j in range(len(ids))]
    for k in range(2, len(ids) - 2):
        start_k = ends[k - 1]
        b = ends[k]
        if b - start_k >= 2 and ends[k + 1] - b >= 2:
            stop = text[b - 2 : b + 2]
            if text.find(stop) == b - 2 and stop.strip() == stop:
                return stop, k, b - 2
    raise AssertionError(f"no suitable token pair in {text!r}")


def test_stop_string_across_token_boundary(greedy, llm):
    tok = llm.get_tokenizer()
    stop, k, at = _spanning_stop(tok, greedy.token_ids)
    # The stop string really spans two tokens: neither token's text contains it.
    assert stop not in tok.decode([greedy.token_ids[k]])
    assert stop not in tok.decode([greedy.token_ids[k + 1]])

    params = SamplingParams(temperature=0, max_tokens=MAX, stop=["zzqx", stop])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == greedy.text[:at]
    assert out.token_ids == greedy.token_ids[: k + 2]  # up to the token that completed it


def test_streamed_text_never_shows_part_of_a_stop_string(greedy, llm):
    tok = llm.get_tokenizer()
    stop, _, at = _spanning_stop(tok, greedy.token_ids)
    params = SamplingParams(temperature=0, max_tokens=MAX, stop=stop)
    chunks = list(llm.stream(PROMPT, params))
    assert "".join(chunks) == greedy.text[:at]


def test_stop_token_ids(greedy, llm):
    ids = greedy.token_ids
    j = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])
    params = SamplingParams(temperature=0, max_tokens=MAX, stop_token_ids=[ids[j]])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == ids[j]
    assert out.token_ids == ids[: j + 1]
    assert out.text == llm.get_tokenizer().decode(ids[:j])  # the stop token is not shown


def test_eos_stops_and_ignore_eos_runs_to_max_tokens(llm):
    messages = [{"role": "user", "content": "Say just the word yes."}]
    n = 10
    natural = llm.chat(messages, SamplingParams(temperature=0, max_tokens=n), use_tqdm=False)
    natural = natural[0].outputs[0]
    eos = llm.engine.eos_token_ids
    # Precondition: the model ends this answer with EOS well before n tokens.
    assert natural.finish_reason == "stop" and natural.stop_reason is None
    assert len(natural.token_ids) < n and natural.token_ids[-1] in eos

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    forced = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) == n
    assert forced.finish_reason == "length"
    assert forced.token_ids[: len(natural.token_ids)] == natural.token_ids


# ---------------------------------------------------------------- incremental detokenization

TEXTS = [
    "北京是中国的首都。",
    "I love 🍕 and 🎉!",
    "café naïve Ærøskøbing",
    "🧑\u200d🚀 héllo 日本",
]


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_multibyte(tok, text):
    ids = tok.hf.encode(text, add_special_tokens=False)
    detok = Detokenizer(tok, [], skip_special_tokens=True)
    chunks = [detok.step(i) for i in ids]
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_detokenizer_holds_back_split_characters(tok):
    text = "I love 🍕 and 🎉!"
    ids = tok.hf.encode(text, add_special_tokens=False)
    # Precondition: some emoji is split over several tokens, each undecodable alone.
    alone = [tok.decode([i]) for i in ids]
    assert any(piece == "\ufffd" for piece in alone)
    detok = Detokenizer(tok, [], skip_special_tokens=True)
    chunks = [detok.step(i) for i in ids]
    assert "" in chunks  # bytes held back until the character is complete
    assert " 🍕" in chunks and " 🎉" in chunks


def test_detokenizer_after_prompt(tok):
    prompt = tok.encode("Translate to Chinese: Beijing is the capital.")
    gen = tok.hf.encode(" 北京是首都 🎉 ok", add_special_tokens=False)
    detok = Detokenizer(tok, prompt, skip_special_tokens=True)
    chunks = [detok.step(i) for i in gen]
    assert not any("\ufffd" in c for c in chunks)
    full = tok.decode(prompt + gen)
    assert "".join(chunks) == full[len(tok.decode(prompt)) :]
    assert "".join(chunks) == " 北京是首都 🎉 ok"
