"""`heron bench prefill`: prefill speed against transformers and llama.cpp; sparse prefill against
dense."""

from __future__ import annotations

import argparse

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import HelpFormatter, common_parent, model_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench prefill`` and its flags."""
    pf = subparsers.add_parser(
        "prefill",
        parents=[common_parent(), model_parent()],
        formatter_class=HelpFormatter,
        help="prefill speed vs transformers and llama.cpp; sparse prefill vs dense",
        description="Prefill time of a random-token prompt at each length (fastest of "
        "REPEATS) for heron (dense attention), transformers (one forward, same dtype) and "
        "llama.cpp's llama-bench on the same GGUF (when `make bench-deps` built it); with "
        "--sparse, also each sparse prefill pattern's time, fraction of key blocks computed "
        "and passkey / needle accuracy against dense; in one run.",
    )
    pf.add_argument(
        "--sparse", action="store_true", help="compare the sparse prefill patterns to dense"
    )
    pf.add_argument(
        "--lengths",
        default=None,
        help="comma-separated prompt lengths (default: 512,2048,8000; 2048,4096,8000 with "
        "--sparse)",
    )
    pf.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    pf.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp baseline")
    pf.add_argument(
        "--patterns",
        default="xattention,vertical_slash,flexprefill",
        help="comma-separated sparse patterns",
    )
    pf.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="sparse patterns' threshold: attention mass kept",
    )
    pf.add_argument(
        "--min-tokens",
        type=int,
        default=1024,
        help="sparse patterns' min_tokens: shortest prompt that uses them",
    )
    pf.add_argument("--repeats", type=int, default=1, help="timed prefills per length")
    pf.add_argument("--num-passkey", type=int, default=3, help="passkey prompts per length")
    pf.add_argument(
        "--num-needle", type=int, default=3, help="needle-in-the-essays prompts per length"
    )
    pf.add_argument("--seed", type=int, default=0, help="seed of prompts and keys")
    pf.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    pf.add_argument("--png", default=None, metavar="PATH", help="plot (needs matplotlib)")
    pf.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.prefill import (
        PrefillBenchConfig,
        format_table,
        run_prefill_bench,
        to_results,
        write_png,
    )
    from heron.sparse.patterns import SPARSE_PATTERNS

    patterns = split_csv("patterns", args.patterns) if args.sparse else []
    default_lengths = "2048,4096,8000" if args.sparse else "512,2048,8000"
    lengths = split_csv("lengths", args.lengths or default_lengths, int)
    cfg = config_from_args(PrefillBenchConfig, args, lengths=lengths, patterns=patterns)
    for p in patterns:  # bad names and options fail before any model loads
        SPARSE_PATTERNS.make(p, cfg.pattern_options)
    rows = run_prefill_bench(cfg)
    print(format_table(rows))
    save_results(args, to_results(rows, cfg), lambda path: write_png(rows, path))
    return 0
