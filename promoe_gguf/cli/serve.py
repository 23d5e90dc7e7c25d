"""`promoe serve [MODEL] --host 127.0.0.1 --port 8080 [--api-key KEY] [cache flags]`."""
from __future__ import annotations

import logging
import sys

from ..errors import ModelError
from .run import add_cache_flags, engine_from_args


def serve(args) -> int:
    import uvicorn

    from ..server import build_app
    if args.max_queue < 1:
        raise ModelError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"promoe serve: warning: listening on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    engine = engine_from_args(args)
    try:
        app = build_app(engine, model_id=args.alias, api_key=args.api_key, max_queue=args.max_queue)
    except BaseException:
        engine.close()
        raise
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=3, lifespan="on")
    server = uvicorn.Server(config)
    print(f"promoe serve: {engine.model_path} (n_ctx {engine.n_ctx}, {engine.device}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # the app's lifespan stops the engine thread and closes the engine when uvicorn shuts down
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT/SIGTERM it shut down on: a clean stop
        pass
    return 0 if server.started else 1


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                     "/v1/models, /health, /metrics)")
    s.add_argument("model", nargs="?", default=None, help="GGUF file or cache directory (default: embedded model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request but /health")
    s.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait for the engine; more are refused with 503 and Retry-After")
    s.add_argument("--alias", default=None, help="model id clients use (default: the model's file name)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_cache_flags(s)
    s.set_defaults(func=serve)
