"""`heron generate`: one prompt's completion on stdout, streamed, sampled n times, or picked
by a decoding strategy."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from heron.cli.common import (
    HelpFormatter,
    add_method_flags,
    chat_ids,
    common_parent,
    engine_parent,
    has_chat_template,
    kv_parent,
    load_llm,
    model_parent,
    sampling_params,
    sampling_parent,
    write,
)
from heron.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``generate`` and its flags."""
    gen = subparsers.add_parser(
        "generate",
        parents=[common_parent(), model_parent(), sampling_parent(), engine_parent(), kv_parent()],
        formatter_class=HelpFormatter,
        help="generate a completion for one prompt",
        description="Generate a completion for PROMPT and print it on stdout.\n\n"
        "With a chat model the prompt is sent as a user message through the model's chat "
        "template (--no-chat sends it as raw text).\n\n"
        'example: heron generate "Write a haiku about herons" --max-tokens 64',
    )
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument(
        "-n", "--n", type=int, default=1, help="number of completions to sample for the prompt"
    )
    gen.add_argument(
        "--system",
        default=None,
        help="system message to put before the prompt (chat mode only)",
    )
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the model's chat template to the prompt (default: on when the model has a "
        "chat template)",
    )
    gen.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print tokens as they are generated (default: on when --n is 1 and no --strategy)",
    )
    from heron.strategies import STRATEGIES

    add_method_flags(
        gen,
        "decoding strategy",
        STRATEGIES,
        "draw --n samples and print the one this decoding strategy picks: best_of_n "
        "(highest mean token logprob), majority (most frequent final answer), "
        "best_of_majority (best-scored among popular answers), adaptive (samples in rounds "
        "of 4, 8, ... up to --n, stops once the answers agree); or decode one sample token by "
        "token with cad (context-aware decoding; needs context=TEXT) or entropy_adaptive "
        "(layer-skipped model while the entropy is low); a report goes to stderr",
    )
    constraint = gen.add_argument_group(
        "constrained output (one of)",
        "Generate only text that follows a JSON schema, a regular expression, a list of "
        "choices or a grammar (heron.structured, through xgrammar).",
    ).add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE_OR_JSON",
        help="a JSON schema: a file holding it, or the JSON itself",
    )
    constraint.add_argument(
        "--json-object", action="store_true", help="any JSON object (JSON mode)"
    )
    constraint.add_argument("--regex", default=None, metavar="RE", help="a regular expression")
    constraint.add_argument(
        "--choice",
        default=None,
        metavar="A,B,C",
        help="exactly one of these comma-separated strings",
    )
    constraint.add_argument(
        "--grammar",
        default=None,
        metavar="FILE_OR_EBNF",
        help="an EBNF grammar (xgrammar's GBNF dialect, rule root): a file or the text itself",
    )
    gen.set_defaults(func=run)


def structured_outputs(args: argparse.Namespace):
    """The constraint flags as StructuredOutputsParams, or None."""
    from heron.structured import StructuredOutputsParams

    if args.json_schema is not None:
        return StructuredOutputsParams(json=_file_or_text(args.json_schema))
    if args.json_object:
        return StructuredOutputsParams(json_object=True)
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex)
    if args.choice is not None:
        return StructuredOutputsParams(choice=[c for c in args.choice.split(",") if c])
    if args.grammar is not None:
        return StructuredOutputsParams(grammar=_file_or_text(args.grammar))
    return None


def _file_or_text(value: str) -> str:
    """The contents of the file ``value`` names, else ``value`` itself."""
    path = Path(value)
    try:
        return path.read_text() if path.is_file() else value
    except OSError:
        return value


def run(args: argparse.Namespace) -> int:
    """Generates, prints the text on stdout and a summary (tokens, speed, a strategy's report)
    on stderr."""
    if not args.prompt.strip():
        raise InvalidRequestError("prompt: must not be empty", param="prompt")
    from heron.strategies import make_strategy

    params = sampling_params(args, n=args.n)  # bad values fail before the model loads
    params.structured_outputs = structured_outputs(args)
    strategy = None
    if args.strategy is not None:
        strategy = make_strategy(args.strategy, args.n, args.strategy_options)
    elif args.strategy_options:
        raise InvalidRequestError("--strategy-option needs --strategy")
    # A per-token strategy (cad, entropy_adaptive) streams like a plain request.
    picks = strategy is not None and not strategy.per_token
    stream = args.stream if args.stream is not None else args.n == 1 and not picks
    if stream and picks:
        raise InvalidRequestError(
            "--stream: a strategy picks its completion after drawing all samples; drop --stream"
        )
    if stream and args.n > 1:
        raise InvalidRequestError("--stream prints one completion; use --no-stream with --n > 1")
    llm = load_llm(args)
    chat = args.chat if args.chat is not None else has_chat_template(llm)
    if args.system is not None and not chat:
        raise InvalidRequestError("--system needs the chat template (drop --no-chat)")
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})

    t0 = time.perf_counter()
    if stream:
        prompt = chat_ids(llm, messages) if chat else args.prompt
        last = ""
        if strategy is not None:
            params = strategy.request_params(params)
        for piece in llm.stream(prompt, params):
            write(piece)
            last = piece or last
        if not last.endswith("\n"):
            write("\n")
        logger.info("done in %.1fs", time.perf_counter() - t0)
        return 0

    if chat:
        out = llm.chat(messages, params, use_tqdm=False, strategy=strategy)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False, strategy=strategy)[0]
    for comp in out.outputs:
        if len(out.outputs) > 1:
            write(f"=== completion {comp.index + 1}/{len(out.outputs)} ===\n")
        write(comp.text if comp.text.endswith("\n") else comp.text + "\n")
    num_tokens = sum(len(c.token_ids) for c in out.outputs)
    if out.strategy is not None and not picks:
        r = out.strategy
        spent = ", ".join(f"{k} {v:g}" for k, v in r.metrics.items())
        print(f"{r.strategy}: {r.num_tokens} tokens; {spent}", file=sys.stderr)
    elif out.strategy is not None:
        r = out.strategy
        num_tokens = r.num_tokens
        share = f"{r.vote_share:.0%} of votes" if r.vote_share is not None else "no vote"
        print(
            f"{r.strategy}: sample {r.chosen + 1}/{r.num_samples}, answer {r.answer} ({share}), "
            f"score {r.score}; {r.num_tokens} tokens, {r.model_calls} engine steps in "
            f"{r.rounds} round(s)",
            file=sys.stderr,
        )
    secs = time.perf_counter() - t0
    logger.info(
        "%d tokens in %.1fs (%.1f tok/s); finish: %s",
        num_tokens,
        secs,
        num_tokens / secs if secs > 0 else 0.0,
        ", ".join(str(c.finish_reason) for c in out.outputs),
    )
    return 0
