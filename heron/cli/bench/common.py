"""What the bench commands share: comma-separated flag values, a bench config built from the
flags of the same names, and writing the results where the user asked."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

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


def save_results(
    args: argparse.Namespace,
    write_json: Callable[[str], object],
    write_png: Callable[[str], object] | None = None,
) -> None:
    """Write the --json results and the --png chart where the user asked for them (a missing
    matplotlib is reported by the chart writer, which then returns a false value)."""
    if args.json:
        write_json(args.json)
        logger.info("results written to %s", args.json)
    if write_png is not None and args.png and write_png(args.png):
        logger.info("chart written to %s", args.png)
