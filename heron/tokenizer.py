"""Tokenizer, chat template and incremental detokenizer, from the model's own files.

GGUF files carry their vocabulary and chat template in metadata; transformers converts them to
a fast tokenizer (slow: seconds for a large vocabulary), so the result is cached on disk, keyed
by the file's path, size and mtime. Hugging Face folders load their tokenizer.json directly."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from tokenizers.decoders import DecodeStream

from heron.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("HERON_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "heron"
    )
    return Path(root)


def unicode_error(text: str) -> str | None:
    """Why ``text`` is not valid Unicode, else None. JSON's "\\ud800" escapes and Python strings
    can hold lone surrogates, which have no UTF-8 form: the tokenizer and any response that
    quoted them would fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate ({text[e.start]!r}) at character {e.start} is not valid Unicode"
    return None


def _check_unicode(text: str, field: str, param: str) -> None:
    why = unicode_error(text)
    if why is not None:
        raise InvalidRequestError(f"{field}: {why}", param=param)


class Tokenizer:
    """Wraps a transformers fast tokenizer: encode, decode, chat template, special ids."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        try:
            if path.is_dir():
                self.hf = AutoTokenizer.from_pretrained(str(path))
            else:
                self.hf = _load_gguf_tokenizer(path)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"could not load the tokenizer of {path}: {e}") from None
        self.backend = self.hf.backend_tokenizer
        self.vocab_size = len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in the vocabulary's own characters (one per byte, for
        byte-level BPE)."""
        pieces = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
        return max(len(p or "") for p in pieces)

    def check_fits(self, text: str, max_tokens: int, param: str) -> None:
        """Refuses, before tokenizing it (seconds for megabytes), a text that could not fit
        in ``max_tokens`` tokens whatever it says."""
        # A token matches at most max_token_chars characters, or bytes, of normalized text, and
        # normalization composes at most 4 characters into one (NFC: α + ◌̓ + ◌́ + ◌ͅ = ᾅ).
        limit = 4 * max_tokens * self.max_token_chars
        if len(text) > limit:
            raise InvalidRequestError(
                f"{param}: {len(text)} characters cannot fit in the context of {max_tokens} "
                "tokens (max_model_len), however they tokenize; shorten the prompt",
                param=param,
            )

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """``max_tokens``: refuse a text that cannot fit in it before tokenizing."""
        _check_unicode(text, "prompt", "prompt")
        if max_tokens is not None:
            self.check_fits(text, max_tokens, "prompt")
        return self.hf.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token alone (for logprob listings)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """``tools``: OpenAI's function entries, for a template that renders them
        (heron.tools.chat decides)."""
        import jinja2

        if not self.hf.chat_template:
            raise InvalidRequestError(
                "this model has no chat template; use generate() with a plain prompt",
                param="messages",
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError(
                    f"messages[{i}] must be a dict with 'role' and 'content'", param="messages"
                )
            if isinstance(m["content"], str):
                _check_unicode(m["content"], f"messages[{i}].content", "messages")
        try:
            return self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as e:  # the template refuses the conversation
            raise InvalidRequestError(
                f"messages: the model's chat template refused them: {e}", param="messages"
            ) from None

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        max_tokens: int | None = None,
        tools: list[dict] | None = None,
    ) -> tuple[str, list[int]]:
        """The chat template applied to ``messages`` (and ``tools``), as text and token ids;
        ``max_tokens`` as for ``encode``."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        if max_tokens is not None:
            self.check_fits(text, max_tokens, "messages")
        # The template already holds the special tokens; do not add a BOS again.
        return text, self.hf.encode(text, add_special_tokens=False)

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> Detokenizer:
        return Detokenizer(self, prompt_ids, skip_special_tokens)


class Detokenizer:
    """Turns generated ids into text one token at a time.

    A token may end inside a multi-byte UTF-8 character; DecodeStream holds such bytes back
    until the character is complete, so no replacement characters leak into streamed text.
    The prompt's last tokens prime the stream so spacing rules see the right context."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self._backend = tokenizer.backend
        self._stream = DecodeStream(ids=prompt_ids[-4:], skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


def _load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir() / "tokenizers" / key[:16]
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    logger.info("converting the GGUF tokenizer of %s (cached afterwards)", path.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(
            f"could not read the tokenizer from {path} (corrupt or unsupported GGUF?): {e}"
        ) from None
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError as e:  # a read-only home is not fatal
        logger.warning("could not cache the tokenizer in %s: %s", cached, e)
    return tok
