"""`heron serve`: the OpenAI-compatible HTTP server, on one engine or on engine replicas on Ray."""

from __future__ import annotations

import argparse
import logging

from heron.cli.common import (
    HelpFormatter,
    add_replica_args,
    common_parent,
    engine_kwargs,
    engine_parent,
    kv_parent,
    model_parent,
)
from heron.errors import InvalidRequestError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``serve`` and its flags."""
    serve = subparsers.add_parser(
        "serve",
        parents=[common_parent(), model_parent(), engine_parent(), kv_parent()],
        formatter_class=HelpFormatter,
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
    add_replica_args(
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
    serve.set_defaults(func=run)


def _list_flag(values: list[str] | None) -> tuple[str, ...]:
    """A flag given comma-separated, repeated, or both (``--allowed-origins a,b --allowed-origins
    c``), as one tuple."""
    return tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())


def run(args: argparse.Namespace) -> int:
    """Checks the server flags before the model loads, then serves until SIGTERM or Ctrl-C."""
    import os
    from pathlib import Path

    from heron.config import DataParallelConfig, EngineConfig
    from heron.engine.engine import Engine
    from heron.methods import check_engine_methods
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
    engine = engine_kwargs(args)
    if scale.data_parallel_size > 1 or args.ray_address is not None:
        from heron.scaleout.router import serve_replicas

        served = serve_replicas(engine, scale, args.max_waiting)
    else:
        config = EngineConfig(**engine)
        check_engine_methods(config)  # before the model loads
        served = ServedModel.local(Engine(config), args.max_waiting)
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
