"""`heron bench scaling`: inference-time scaling and decoding strategies (majority, best-of-n,
adaptive, HumanEval, CAD, entropy-adaptive)."""

from __future__ import annotations

import argparse
import logging

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import HelpFormatter, common_parent, model_parent

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench scaling`` and its flags."""
    sc = subparsers.add_parser(
        "scaling",
        parents=[common_parent(), model_parent()],
        formatter_class=HelpFormatter,
        help="decoding strategies: majority, best-of-n, adaptive, HumanEval, CAD, entropy-adaptive",
        description="Inference-time scaling and decoding strategies, one section per task "
        "in --tasks. arithmetic: word problems generated with a fixed seed (PER_LEVEL per "
        "difficulty level): accuracy of greedy decoding and of majority@k, best-of-n@k, "
        "best-of-majority@k for each k in --ks, pass@k as the ceiling, and adaptive "
        "sampling's accuracy and mean samples; tok/s; KV blocks held for n = KV_N vs n = 1 "
        "(the largest k is sampled once per problem and smaller k are scored on disjoint "
        "slices of those samples). humaneval: greedy pass@1 vs best-of-k picked by running "
        "each problem's tests (and by mean logprob). cad: context-aware decoding vs plain on "
        "counterfactual contexts (share of answers that follow the context). "
        "entropy_adaptive: accuracy and batch-1 tok/s of entropy-adaptive decoding at each "
        "threshold vs plain greedy on the first word problems. Without --model: "
        "qwen2.5-coder-0.5b-instruct when installed, else the default model.",
    )
    sc.set_defaults(model=None)
    sc.add_argument("--per-level", type=int, default=8, help="problems per difficulty level")
    sc.add_argument("--levels", default="1,2,3", help="comma-separated difficulty levels")
    sc.add_argument("--ks", default="1,4,8,16", help="comma-separated samples per problem")
    sc.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    sc.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    sc.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    sc.add_argument(
        "--threshold", type=float, default=0.3, help="best_of_majority's vote-share threshold"
    )
    sc.add_argument(
        "--agreements", default="0.5,0.75,1.0", help="adaptive's stopping agreements to try"
    )
    sc.add_argument("--kv-n", type=int, default=8, help="samples for the KV-block measurement")
    sc.add_argument(
        "--tasks",
        default="arithmetic,humaneval,cad,entropy_adaptive",
        help="comma-separated sections to run",
    )
    sc.add_argument(
        "--humaneval-problems", type=int, default=20, help="first HumanEval problems to run"
    )
    sc.add_argument("--humaneval-k", type=int, default=8, help="samples per HumanEval problem")
    sc.add_argument("--cad-alphas", default="0.5,1.0", help="comma-separated CAD alphas")
    sc.add_argument(
        "--entropy-thresholds",
        default="0.5,1.0,2.0",
        help="comma-separated entropy thresholds (nats) for entropy_adaptive",
    )
    sc.add_argument(
        "--entropy-problems",
        type=int,
        default=6,
        help="word problems for entropy_adaptive (run one at a time)",
    )
    sc.add_argument("--seed", type=int, default=0, help="seed of the problems and samples")
    sc.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    sc.add_argument(
        "--plots",
        default=None,
        metavar="PREFIX",
        help="write PREFIX_accuracy_vs_k.png and PREFIX_accuracy_vs_compute.png (matplotlib: "
        "pip install 'heron[bench]')",
    )
    sc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.scaling import (
        ScalingConfig,
        format_table,
        run_scaling,
        to_results,
        write_plots,
    )

    cfg = config_from_args(
        ScalingConfig,
        args,
        levels=tuple(split_csv("levels", args.levels, int)),
        ks=tuple(split_csv("ks", args.ks, int)),
        agreements=tuple(split_csv("agreements", args.agreements, float)),
        tasks=tuple(split_csv("tasks", args.tasks, str)),
        cad_alphas=tuple(split_csv("cad-alphas", args.cad_alphas, float)),
        entropy_thresholds=tuple(split_csv("entropy-thresholds", args.entropy_thresholds, float)),
    )
    result = run_scaling(cfg)
    print(format_table(result))
    save_results(args, to_results(result))
    if args.plots:
        for path in write_plots(result, args.plots):
            logger.info("chart written to %s", path)
    return 0
