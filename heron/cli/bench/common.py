"""What the bench commands share: comma-separated flag values, a bench config built from the
flags of the same names, and writing the results where the user asked."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from collections.abc import Callable
from typing import Any, TypeVar

from heron.bench.record import RESULTS_DIR, Results, make_record, record_path, write_record
from heron.errors import InvalidRequestError

logger = logging.getLogger(__name__)

Config = TypeVar("Config")


def split_csv(flag: str, text: str, kind: type = str) -> list:
    """A comma-separated flag value as a list (empty items skipped); a clear error if an item
    is not a ``kind``."""
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(
            f"--{flag}: comma-separated {kind.__name__} values, got {text!r}"
        ) from None


def config_from_args(cls: type[Config], args: argparse.Namespace, **given: Any) -> Config:
    """A bench's config dataclass: each field from the flag of the same name (argparse dest ==
    field name), unless ``given`` (values parsed from the flag, such as comma-separated
    lists); fields without a flag keep their defaults."""
    from_flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if hasattr(args, f.name)
    }
    return cls(**{**from_flags, **given})


# Flags that say where the output goes, not what is measured: not a record's settings.
_OUTPUT_FLAGS = {"json", "png", "plots", "record", "quiet", "func", "bench_parser", "command",
                 "bench_command"}  # fmt: skip


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    """``--record [DIR]``, and the parser itself as a default, which :func:`save_results`
    compares the flags with to write the command into the record."""
    parser.add_argument(
        "--record",
        nargs="?",
        const=str(RESULTS_DIR),
        default=None,
        metavar="DIR",
        help=f"also write the results as a benchmark record to DIR/<machine>/<bench>-<UTC "
        f"date>.json (DIR: {RESULTS_DIR}, from the repository root), for `heron bench report`",
    )
    parser.set_defaults(bench_parser=parser)


def save_results(
    args: argparse.Namespace,
    results: Results,
    write_png: Callable[[str], object] | None = None,
) -> None:
    """Write the results as a record (the results in the envelope every bench shares) to
    --json and under --record, and the --png chart, where the user asked for them (a missing
    matplotlib is reported by the chart writer, which then returns a false value)."""
    if args.json or args.record:
        record = make_record(results, settings(args), command_line(args))
        if args.json:
            logger.info("results written to %s", write_record(record, args.json))
        if args.record:
            path = write_record(record, record_path(args.record, record))
            logger.info("record written to %s", path)
    if write_png is not None and args.png and write_png(args.png):
        logger.info("chart written to %s", args.png)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' values that bear on what was measured (JSON types only)."""
    plain = (str, int, float, bool, type(None), list, tuple)
    return {
        k: v
        for k, v in sorted(vars(args).items())
        if k not in _OUTPUT_FLAGS and isinstance(v, plain)
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that reruns the bench: its flags that differ from their defaults."""
    parser = getattr(args, "bench_parser", None)
    if parser is None:
        return ""
    words = parser.prog.split()
    for action in parser._actions:  # argparse lists a parser's options nowhere public
        if not action.option_strings or action.dest in _OUTPUT_FLAGS:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        words.append(max(action.option_strings, key=len))
        if action.nargs != 0:
            words.append(str(value))
    return shlex.join(words)
