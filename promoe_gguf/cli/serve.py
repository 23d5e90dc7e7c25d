"""`promoe serve [MODEL] --host 127.0.0.1 --port 8080 [--api-key-file F] [cache flags]`.

The port is bound before the model loads (a port in use or a bad host fails at once, as one line), the
key comes from --api-key, --api-key-file or $PROMOE_API_KEY (a key on the command line shows in `ps`), and
SIGTERM/SIGINT end running streams with an error event and [DONE] before the server exits.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

from ..errors import ModelError, ParameterError, clip
from .flags import add_cache_flags, engine_from_args, setting

KEY_ENV = "PROMOE_API_KEY"


def api_key(args) -> str | None:
    """The key from exactly one of --api-key, --api-key-file, $PROMOE_API_KEY (None: no key)."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ModelError("--api-key and --api-key-file both give the key: use one")
    if args.api_key_file is not None:
        with open(args.api_key_file, encoding="utf-8") as f:       # OSError names the file
            key, where = f.read().strip(), f"--api-key-file {args.api_key_file}"
    elif args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif os.environ.get(KEY_ENV) is not None:
        key, where = os.environ[KEY_ENV], f"${KEY_ENV}"
    else:
        return None
    if not key or any(c.isspace() for c in key):
        raise ModelError(f"{where}: the key is empty or contains whitespace")
    return key


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts with the server); one-line errors name both."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ParameterError("host", f"{clip(host)} is not an address to listen on ({getattr(e, 'strerror', e)})") \
            from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as uvicorn: restart without waiting
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ModelError(f"cannot listen on {host} port {port}: {e.strerror}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"


def serve(args) -> int:
    import uvicorn

    from ..server import build_app
    from ..server.app import LOOPBACK_HOSTS
    key = api_key(args)
    loopback = args.host in LOOPBACK_HOSTS
    sock = listen(args.host, args.port)
    if not loopback and not key:
        print(f"promoe serve: warning: listening on {args.host} without an API key: anyone who can reach it can "
              "use it", file=sys.stderr)
    try:
        engine = engine_from_args(args)
        try:
            app = build_app(engine, model_id=args.alias, api_key=key, max_queue=args.max_queue, loopback=loopback)
        except BaseException:
            engine.close()
            raise
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=2, lifespan="on")
        server = graceful_server(config, app.state.scheduler)
        print(f"promoe serve: {engine.model_path} (n_ctx {engine.n_ctx}, {engine.device}) on {_url(sock)}",
              file=sys.stderr, flush=True)
        # the app's lifespan stops the engine thread and closes the engine when uvicorn shuts down
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT/SIGTERM it shut down on: a clean stop
            pass
    finally:
        sock.close()
    if not server.started:
        print("promoe: internal error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


def graceful_server(config, scheduler):
    """A uvicorn.Server that, on SIGTERM/SIGINT, first ends the running generation (its stream gets an
    error event and [DONE]), so uvicorn's wait for open connections is short and nothing is cancelled."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.begin_close()
            super().handle_exit(sig, frame)
    return GracefulServer(config)


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                     "/v1/models, /health, /metrics)")
    s.add_argument("model", nargs="?", default=None, help="GGUF file or cache directory (default: embedded model)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (loopback: only clients on this machine, which must send a loopback "
                        "Host header)")
    s.add_argument("--port", type=setting("port"), default=8080, help="port, 0 to 65535 (0: any free port)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but /health (visible in `ps`: "
                        f"prefer --api-key-file or ${KEY_ENV})")
    s.add_argument("--api-key-file", default=None, help="read the key from this file (one line)")
    s.add_argument("--max-queue", type=setting("max_queue"), default=8,
                   help="requests that may wait for the engine, 1 to 4096; more are refused with 503 and Retry-After")
    s.add_argument("--alias", default=None, help="model id clients use (default: the model's file name)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_cache_flags(s)
    s.set_defaults(func=serve)
