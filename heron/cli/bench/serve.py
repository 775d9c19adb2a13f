"""`heron bench serve`: online serving latency and throughput against a running server or one
it starts."""

from __future__ import annotations

import argparse

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import HelpFormatter, common_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench serve`` and its flags."""
    sv = subparsers.add_parser(
        "serve",
        parents=[common_parent()],
        formatter_class=HelpFormatter,
        help="online serving latency and throughput at several concurrency levels",
        description="Streaming /v1/completions load at each concurrency level: time to first "
        "token and time per output token (p50/p99) and generated tokens/s. Without --url a "
        "heron server is started for the run. With --compare-url the same load also runs "
        "against another OpenAI-compatible server (e.g. llama.cpp's llama-server) and the "
        "tok/s ratio is printed.",
    )
    sv.add_argument("--url", default=None, help="a running server (default: start heron)")
    sv.add_argument(
        "-m", "--model", default=None, help="model to start heron with, and the request's model"
    )
    sv.add_argument(
        "--concurrency", default="1,8,32,64", help="comma-separated numbers of parallel clients"
    )
    sv.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests per level (default: 2 x concurrency, at least 8)",
    )
    sv.add_argument("--input-len", type=int, default=128, help="prompt length in words")
    sv.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    sv.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    sv.add_argument("--compare-url", default=None, help="another server to run the same load on")
    sv.add_argument("--compare-name", default="other", help="its name in the table")
    sv.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="also start heron with N engine replicas on Ray (heron serve --data-parallel-size "
        "N; needs `pip install ray`) and run the same load on it",
    )
    sv.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    sv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.serve import ServeBenchConfig, format_table, run_serve_bench, to_results

    levels = tuple(split_csv("concurrency", args.concurrency, int))
    cfg = config_from_args(ServeBenchConfig, args, concurrency=levels)
    result = run_serve_bench(cfg)
    print(format_table(result))
    save_results(args, to_results(result))
    return 0
