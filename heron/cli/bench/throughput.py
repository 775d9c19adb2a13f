"""`heron bench throughput`: offline batch throughput of heron against transformers and
llama.cpp (and heron's engine replicas on Ray)."""

from __future__ import annotations

import argparse
from functools import partial

from heron.cli.bench.common import config_from_args, save_results
from heron.cli.common import HelpFormatter, add_replica_args, common_parent, model_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench throughput`` and its flags."""
    tp = subparsers.add_parser(
        "throughput",
        parents=[common_parent(), model_parent()],
        formatter_class=HelpFormatter,
        help="offline batch throughput of heron vs. transformers and llama.cpp",
        description="Offline throughput: NUM_PROMPTS prompts of exactly INPUT_LEN random token "
        "ids (fixed seed), OUTPUT_LEN new tokens each (greedy, EOS ignored), all submitted to "
        "heron's LLM.generate at once; then the same work through transformers' generate() on "
        "the same model and dtype, in batches of HF_BATCH_SIZE with left padding; then "
        "llama.cpp's llama-batched-bench on the same GGUF (all prompts in one batch, its own "
        "weight format), when `make bench-deps` built it. Each is timed after a short "
        "warm-up. tok/s = generated tokens / wall time (prefill included).",
    )
    tp.add_argument("--num-prompts", type=int, default=64, help="number of requests")
    tp.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    tp.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    tp.add_argument(
        "--hf-batch-size", type=int, default=64, help="batch size of the transformers baseline"
    )
    tp.add_argument(
        "--skip-hf", action="store_true", help="run heron only, not the transformers baseline"
    )
    tp.add_argument(
        "--skip-llama-cpp",
        action="store_true",
        help="no llama.cpp baseline (llama-batched-bench, when `make bench-deps` built it)",
    )
    from heron.layers.quantized_linear import QUANTIZATIONS

    tp.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="heron's weight format (the baselines run the model file as it is)",
    )
    tp.add_argument("--png", default=None, metavar="PATH", help="bar chart (needs matplotlib)")
    tp.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="heron: most sequences in one batch (default: the engine's)",
    )
    tp.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="heron: most tokens in one step (default: the engine's)",
    )
    tp.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    add_replica_args(
        tp,
        "also time N heron engine replicas on Ray (heron.scaleout.DataParallelLLM; needs "
        "`pip install ray`) with the same work, and print their speed over the single engine",
    )
    tp.add_argument(
        "--json", default=None, metavar="PATH", help="also write the results and machine info here"
    )
    tp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.throughput import (
        ThroughputConfig,
        format_table,
        run_throughput,
        to_results,
        write_png,
    )

    engine_kwargs = {"quantization": args.quantization}
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    cfg = config_from_args(ThroughputConfig, args, engine_kwargs=engine_kwargs)
    result = run_throughput(cfg)
    print(format_table(result))
    save_results(args, to_results(result), partial(write_png, result))
    return 0
