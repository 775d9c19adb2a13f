"""What the commands share: the help formatter, the parent parsers that give several commands
the same model, sampling, engine and KV-cache flags, logging, and loading a model from them."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heron import LLM, SamplingParams
    from heron.registry import Registry


class HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" where there is a meaningful default (not for a flag that takes no
    value: ``--no-prefix-caching (default: True)`` reads as if giving it were the default);
    wraps each line of the description on its own so paragraphs and examples keep their
    shape."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            "default" in help_text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not (action.option_strings or action.nargs in ("?", "*"))
            or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))
        ):
            return help_text
        return help_text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(_fill_line(line, width, indent) for line in text.splitlines())


class OptionFlag(argparse.Action):
    """``--*-option KEY=VALUE``, repeatable: the options of a method gather into one dict
    (each value parsed as JSON where it parses: numbers, true, null...)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from heron.errors import InvalidRequestError
        from heron.registry import parse_options

        try:
            option = parse_options([values], self.dest)
        except InvalidRequestError:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {values!r}") from None
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **option})


def add_method_flags(
    parser: argparse.ArgumentParser, title: str, registry: Registry, method_help: str
) -> argparse._ArgumentGroup:
    """A method family's flags, named after its registry's parameters (so their dests are
    the EngineConfig fields): ``--kv-policy NAME`` and ``--kv-policy-option KEY=VALUE``, in a
    group (returned) whose description lists every method's options."""
    methods = "\n".join(f"  {registry.signature(name)}" for name in registry.names())
    option_flag = "--" + registry.options_param.removesuffix("s").replace("_", "-")
    g = parser.add_argument_group(
        title, f"{option_flag} KEY=VALUE sets an option of the chosen method:\n{methods}"
    )
    g.add_argument(
        "--" + registry.kind.replace("_", "-"),
        default=None,
        choices=registry.names(),
        help=method_help,
    )
    g.add_argument(
        option_flag,
        dest=registry.options_param,
        action=OptionFlag,
        default=None,
        metavar="KEY=VALUE",
        help="an option of the method (listed above); may be repeated",
    )
    return g


def _fill_line(line: str, width: int, indent: str) -> str:
    """One line of a description, wrapped; an indented line's continuation lines are indented
    two more."""
    text = line.lstrip()
    if not text:
        return ""
    lead = indent + line[: len(line) - len(text)]
    return textwrap.fill(text, width, initial_indent=lead, subsequent_indent=lead + "  ")


def common_parent() -> argparse.ArgumentParser:
    """The flags every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only log warnings and errors on stderr (no model-loading messages)",
    )
    return p


def model_parent() -> argparse.ArgumentParser:
    """Which model to load, in what precision, on what device."""
    from heron.config import DEVICES, DTYPES
    from heron.models.catalog import DEFAULT_MODEL

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help="a known model name (see `heron models`), a .gguf file, "
        "or a Hugging Face folder (config.json + *.safetensors)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weight and activation precision; auto = bfloat16 on GPUs, on CPUs with native "
        "bf16 and with --quantization, float32 otherwise",
    )
    g.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto = cuda when a GPU is visible"
    )
    return p


def sampling_parent() -> argparse.ArgumentParser:
    """The SamplingParams flags of the commands that generate text."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most new tokens per completion")
    g.add_argument(
        "-t",
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature; 0 = greedy (deterministic)",
    )
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass"
    )
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than min-p times the top token's probability; 0 = off",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeating tokens already in the prompt or output (0.01 to 100)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed for reproducible sampling (default: a fresh seed per run)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when this text is generated (not included in the output); may be repeated",
    )
    return p


def kv_parent() -> argparse.ArgumentParser:
    """KV-cache compression, for the commands that run one engine with one policy."""
    from heron.kv.registry import KV_POLICIES

    p = argparse.ArgumentParser(add_help=False)
    g = add_method_flags(
        p,
        "KV-cache compression",
        KV_POLICIES,
        "compress each sequence's KV cache with this policy (off by default)",
    )
    g.add_argument(
        "--kv-budget",
        type=float,
        default=0.2,
        help="tokens kept per layer and head: a fraction of the prompt (<= 1) or a count (> 1)",
    )
    return p


def engine_parent() -> argparse.ArgumentParser:
    """The EngineConfig flags: weight format, KV cache, batching, speculative decoding, sparse
    prefill."""
    from heron.layers.kv_cache import KV_CACHE_DTYPES
    from heron.layers.quantized_linear import QUANTIZATIONS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="weight-only quantization of the linear layers, kept packed: int8 (per channel) "
        "or int4 (groups of 32; the LM head stays int8); speeds up small-batch decode on CPU",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=0.25,
        help="KV-cache size: bytes (> 1) or a fraction of the free memory (<= 1)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="auto: K/V in the model's dtype; int8: one byte per value plus a scale per token "
        "and head (2-4x the tokens in the same --kv-cache-memory); int4/int2: KIVI, keys "
        "per channel and values per token, 4 or 2 bits (3-11x), each sequence's newest block in "
        "full precision",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per KV-cache block (default: 16; 32 with an int4/int2 KV cache)",
    )
    g.add_argument("--max-num-seqs", type=int, default=128, help="most sequences in one batch")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens in one step (long prompts are prefilled in chunks of this)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model's, or what the KV cache holds)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="do not reuse the KV blocks of earlier prompts with the same prefix",
    )
    from heron.sparse.patterns import SPARSE_PATTERNS
    from heron.speculative.registry import PROPOSERS

    spec = add_method_flags(
        p,
        "speculative decoding",
        PROPOSERS,
        "speculative decoding proposer (lossless; off by default); draft's model option is "
        "a path or known name with the same tokenizer as --model",
    )
    spec.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most drafted tokens per step (default: 4; lookahead: 16, the nodes of its tree)",
    )
    add_method_flags(
        p,
        "sparse prefill",
        SPARSE_PATTERNS,
        "sparse prefill attention pattern for long prompts (off by default); threshold: the "
        "attention mass kept, min_tokens: the shortest prompt that uses it",
    )
    return p


def add_replica_args(parser: argparse._ActionsContainer, size_help: str) -> None:
    """--data-parallel-size and --cpus-per-replica (heron.scaleout, on Ray)."""
    parser.add_argument("--data-parallel-size", type=int, default=1, metavar="N", help=size_help)
    parser.add_argument(
        "--cpus-per-replica",
        type=int,
        default=None,
        metavar="C",
        help="CPUs (and torch threads) per replica (default: the Ray cluster's CPUs / N)",
    )


# EngineConfig fields no flag sets: a command's --seed seeds its sampling or prompts.
_NOT_ENGINE_FLAGS = frozenset({"seed"})


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields among this command's flags (argparse dest == field name), so a
    new engine flag needs no list kept beside the dataclass; the others keep their defaults."""
    from heron.config import EngineConfig

    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EngineConfig)
        if f.name not in _NOT_ENGINE_FLAGS and hasattr(args, f.name)
    }


def setup_logging(quiet: bool) -> None:
    """Logs to stderr, so stdout holds only a command's output; -q keeps warnings and errors."""
    log = logging.getLogger("heron")
    if not any(getattr(h, "_heron_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._heron_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if quiet:  # transformers' own progress bars and notices
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def sampling_params(args: argparse.Namespace, n: int = 1) -> SamplingParams:
    """The sampling flags as SamplingParams (built before the model loads, so bad values fail
    fast)."""
    from heron import SamplingParams

    return SamplingParams(
        n=n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
    )


def load_llm(args: argparse.Namespace) -> LLM:
    """The model and engine the flags ask for."""
    from heron import LLM

    return LLM(**engine_kwargs(args))


def has_chat_template(llm: LLM) -> bool:
    """Whether prompts can go through the model's chat template (base models have none)."""
    return bool(getattr(llm.get_tokenizer().hf, "chat_template", None))


def chat_ids(llm: LLM, messages: list[dict]) -> list[int]:
    """The chat template applied to ``messages``, ready to generate the assistant's turn."""
    return llm.get_tokenizer().encode_chat(messages)[1]


def write(text: str) -> None:
    """Prints generated text at once (streamed tokens must not wait in stdout's buffer)."""
    sys.stdout.write(text)
    sys.stdout.flush()
