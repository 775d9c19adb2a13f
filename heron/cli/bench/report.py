"""`heron bench report`: rewrite docs/benchmarks.md's tables from the benchmark records, or
check that they match."""

from __future__ import annotations

import argparse
import sys

from heron.bench.record import RESULTS_DIR
from heron.bench.report import BEGIN, DOCS
from heron.cli.common import HelpFormatter, common_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench report`` and its flags."""
    rp = subparsers.add_parser(
        "report",
        parents=[common_parent()],
        formatter_class=HelpFormatter,
        help="generate docs/benchmarks.md's tables from the records in benchmarks/results",
        description="Reads every record under --results (written by `heron bench <name> "
        "--record`) and rewrites the section of --docs between its marker comments "
        f"({BEGIN} ... <!-- end -->): per machine, one table per bench from its latest "
        "record. Run from the repository root.",
    )
    rp.add_argument("--results", default=str(RESULTS_DIR), metavar="DIR", help="the records")
    rp.add_argument("--docs", default=str(DOCS), metavar="PATH", help="the file to rewrite")
    rp.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the file differs from what the records make",
    )
    rp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Rewrites (or checks) the docs; 1 when --check finds them out of date."""
    from pathlib import Path

    from heron.bench.report import report

    current, generated = report(args.results, args.docs)
    if args.check:
        if current != generated:
            print(
                f"{args.docs} does not match the records in {args.results}: run "
                "`heron bench report`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.docs} matches the records in {args.results}")
        return 0
    if current != generated:
        Path(args.docs).write_text(generated)
    print(f"{args.docs}: tables written from the records in {args.results}")
    return 0
