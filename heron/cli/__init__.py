"""The ``heron`` command line: generate, chat, models, serve, bench, kernels.

One module per command (``heron.cli.generate``, ..., ``heron.cli.bench.kv``), each with its
``add_parser(subparsers)`` and ``run(args)``; ``heron.cli.common`` holds the flags they share.

User errors (``HeronError``: a bad flag value, a missing model, a prompt too long...) print one
``error: ...`` line on stderr and exit with status 2; Ctrl-C exits with 130. Model-loading logs
go to stderr, generated text to stdout, so ``heron generate ... > out.txt`` holds only text."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from heron.cli import bench, chat, generate, kernels, models, serve
from heron.cli.common import HelpFormatter, setup_logging
from heron.errors import HeronError

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """``heron`` and its commands, in the order ``heron --help`` lists them."""
    from heron import __version__

    parser = argparse.ArgumentParser(
        prog="heron",
        description="heron: an LLM inference engine (paged KV cache, continuous batching).",
        epilog="Run `heron COMMAND --help` for the flags of each command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"heron {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (generate, chat, models, serve, bench, kernels):
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; a user error or Ctrl-C ends it with a line on stderr, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except HeronError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `heron generate ... | head`: the reader went away
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
