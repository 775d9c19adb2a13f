"""`heron bench`: one module per benchmark, each with its ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse

from heron.cli.bench import (
    kv,
    latency,
    prefill,
    report,
    scaling,
    serve,
    spec,
    structured,
    throughput,
)
from heron.cli.bench.common import add_record_flag
from heron.cli.common import HelpFormatter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench`` and its benchmarks, in the order its help lists them."""
    bench = subparsers.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="benchmarks",
        description="Benchmarks. `heron bench throughput --help` for details.",
    )
    benchmarks = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for benchmark in (throughput, scaling, serve, spec, prefill, latency, kv, structured):
        benchmark.add_parser(benchmarks)
    for parser in benchmarks.choices.values():
        add_record_flag(parser)
    report.add_parser(benchmarks)
