"""`heron bench latency`: batch-1 time to first token and decode speed per weight format, against
transformers and llama.cpp."""

from __future__ import annotations

import argparse
from functools import partial

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import HelpFormatter, common_parent, model_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench latency`` and its flags."""
    lat = subparsers.add_parser(
        "latency",
        parents=[common_parent(), model_parent()],
        formatter_class=HelpFormatter,
        help="batch-1 time to first token and decode tok/s vs transformers and llama.cpp",
        description="One request at a time: time to first token and decode tok/s of heron "
        "in each weight format (with its perplexity on The Tempest), of transformers in "
        "unquantized heron's dtype, and of llama.cpp's llama-bench on the same GGUF (when "
        "`make bench-deps` built it), in one run; a table with ratios, optional JSON and PNG.",
    )
    lat.add_argument(
        "--quantizations", default="none,int8,int4", help="comma-separated heron weight formats"
    )
    lat.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    lat.add_argument("--output-len", type=int, default=128, help="new tokens")
    lat.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    lat.add_argument(
        "--perplexity-tokens",
        type=int,
        default=1024,
        help="tokens of The Tempest scored for perplexity; 0 = skip",
    )
    lat.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    lat.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp baseline")
    lat.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    lat.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    lat.add_argument("--png", default=None, metavar="PATH", help="bar chart (needs matplotlib)")
    lat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.latency import (
        LatencyBenchConfig,
        format_table,
        run_latency_bench,
        to_results,
        write_png,
    )
    from heron.config import EngineConfig

    quantizations = split_csv("quantizations", args.quantizations)
    for q in quantizations:  # a bad name fails before any model loads
        EngineConfig(quantization=q)
    cfg = config_from_args(LatencyBenchConfig, args, quantizations=quantizations)
    result = run_latency_bench(cfg)
    print(format_table(result))
    save_results(args, to_results(result), partial(write_png, result))
    return 0
