"""`heron bench structured`: JSON-schema-constrained generation against free generation."""

from __future__ import annotations

import argparse

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import HelpFormatter, common_parent, model_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench structured`` and its flags."""
    sb = subparsers.add_parser(
        "structured",
        parents=[common_parent(), model_parent()],
        formatter_class=HelpFormatter,
        help="JSON-schema-constrained vs free generation: tok/s, valid rate, compile time",
        description="The same prompts, lengths and seeds generated free and constrained to "
        "a JSON schema at each batch size (fastest of REPEATS, alternating), the share of "
        "constrained outputs that validate, and the schema's compile time cold and cached; "
        "in one run.",
    )
    sb.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    sb.add_argument("--output-len", type=int, default=64, help="new tokens per request")
    sb.add_argument(
        "--valid-samples", type=int, default=16, help="constrained samples checked for validity"
    )
    sb.add_argument("--repeats", type=int, default=2, help="timed runs; the fastest is kept")
    sb.add_argument("--seed", type=int, default=0, help="sampling seed of the first request")
    sb.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    sb.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.structured import (
        StructuredBenchConfig,
        format_table,
        run_structured_bench,
        to_results,
    )

    batch_sizes = split_csv("batch-sizes", args.batch_sizes, int)
    cfg = config_from_args(StructuredBenchConfig, args, batch_sizes=batch_sizes)
    result = run_structured_bench(cfg)
    print(format_table(result))
    save_results(args, to_results(result))
    return 0
