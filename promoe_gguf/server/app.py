"""The OpenAI-compatible HTTP API (FastAPI): /v1/models[/{id}], /v1/completions, /v1/chat/completions (stream:
true as server-sent events), /health and /metrics. Errors are OpenAI-shaped: {"error": {message, type, param,
code}}, and never echo more than 200 characters of a value.

As strict as llama-server: every route but /health needs the key when one is set (the OpenAPI schema is
then not served); request bodies must be declared JSON (415 otherwise); on loopback the Host header must
name a loopback host, so a web page whose domain resolves to 127.0.0.1 cannot drive the server (DNS
rebinding). Every error response is counted in /metrics by status.

Generation runs on the scheduler's engine thread; handlers only validate, queue and relay. A client that
disconnects (while queued, waiting or streaming) cancels its job, which stops generating at the next token.
At shutdown a running stream ends with an error event and [DONE].
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections import Counter
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import api
from ..errors import ParameterError, clip, one_line
from .metrics import CONTENT_TYPE, Usage, make_registry, render
from .scheduler import Job, QueueFull, Scheduler, ServerClosing

MAX_BODY_BYTES = 4 << 20        # a prompt is bounded by the context; bodies past this are refused (413)
DISCONNECT_POLL_S = 0.25        # how often a waiting handler checks that its client is still there
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MESSAGE_LIMIT = 1000            # an error message is ours plus clipped values; this bounds it whatever happens


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, err_type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.err_type = status, message, param, err_type
        self.code, self.headers = code, headers


class ClientGone(Exception):
    pass


def error_body(message: str, err_type: str = "invalid_request_error", param=None, code=None) -> dict:
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT] + "..."
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.err_type, e.param, e.code), status_code=e.status, headers=e.headers)


def host_name(header: str) -> str:
    """The host of a Host header, without the port: "[::1]:8080" -> "::1", "localhost:8080" -> "localhost"."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", "body")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"{clip(media) if media else 'no Content-Type'})", "Content-Type")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", "body")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise ApiError(400, f"the request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", "body")
    return body


def generation_args(body: dict) -> dict:
    """The generation keywords of a request body: sampling, max_tokens, stop, and the unsupported options
    (api refuses those unless neutral). null means the default; unknown fields are ignored, as OpenAI's."""
    names = SAMPLING_FIELDS + ("max_tokens", "stop") + tuple(api.NEUTRAL)
    args = {k: body[k] for k in names if body.get(k) is not None}
    if "max_tokens" not in args and body.get("max_completion_tokens") is not None:
        args["max_tokens"] = body["max_completion_tokens"]
    return args


def build_app(engine, model_id: str | None = None, api_key: str | None = None, max_queue: int = 8,
              close_engine: bool = True, loopback: bool = True) -> FastAPI:
    """The app serving `engine`. Its shutdown stops the engine thread and (close_engine) closes the engine.
    `loopback`: the server listens on a loopback address only, so requests must name a loopback Host."""
    model_id = model_id or os.path.basename(str(engine.model_path))
    served_names = {model_id, os.path.basename(str(engine.model_path)), str(engine.model_path)}
    scheduler = Scheduler(max_queue)
    usage = Usage()
    errors: Counter = Counter()          # error responses by HTTP status
    registry = make_registry(engine, scheduler, usage, model_id, errors)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            scheduler.close()
            if close_engine:
                engine.close()

    def check_host(request: Request) -> None:
        if loopback and host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
            raise ApiError(400, f"Host {clip(request.headers.get('host', ''))} is not this server's: it listens on "
                                "loopback only, for clients on this machine (a DNS rebinding guard)", "Host")

    app = FastAPI(title="promoe-gguf", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if api_key else "/openapi.json", dependencies=[Depends(check_host)])
    app.state.engine, app.state.scheduler, app.state.errors = engine, scheduler, errors

    def counted(response: JSONResponse) -> JSONResponse:
        errors[response.status_code] += 1
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return counted(error_response(e))

    @app.exception_handler(ParameterError)
    async def _invalid(request, e: ParameterError):
        return counted(error_response(ApiError(400, str(e), e.param)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return counted(JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                                    headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return counted(JSONResponse(error_body(f"internal error: {type(e).__name__}: {one_line(e, 200)}",
                                               "server_error"), status_code=500))

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           err_type="authentication_error", code="invalid_api_key")

    router = APIRouter(dependencies=[Depends(require_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/metrics")
    async def metrics():
        return Response(render(registry), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        cfg = engine.config
        return {"id": model_id, "object": "model", "created": created, "owned_by": "promoe-gguf",
                "meta": {"arch": cfg.arch, "n_ctx": engine.n_ctx, "n_vocab": cfg.n_vocab, "n_layers": cfg.n_layers,
                         "n_experts": cfg.n_experts, "n_experts_used": cfg.n_experts_used,
                         "device": str(engine.device)}}

    @router.get("/v1/models")
    @router.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{name:path}")
    @router.get("/models/{name:path}")
    async def model(name: str):
        if name not in served_names:
            raise ApiError(404, f"model {clip(name)} is not served here; this server serves {model_id!r}", "model",
                           code="model_not_found")
        return model_card()

    def check_common(body: dict) -> tuple[bool, bool]:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {type(model).__name__}", "model")
        if model is not None and model not in served_names:
            raise ApiError(400, f"model {clip(model)} is not served here; this server serves {model_id!r}", "model",
                           code="model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {clip(stream)}", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        return stream, bool(options.get("include_usage")) and stream

    @router.post("/v1/completions")
    @router.post("/completions")
    async def completions(request: Request):
        return await generate(request, "prompt", api.prepare_completion, api.completion_chunks,
                              api.completion_response)

    @router.post("/v1/chat/completions")
    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "messages", api.prepare_chat, api.chat_chunks, api.chat_response)

    async def generate(request: Request, input_field: str, prepare, chunks, response):
        body = await read_json(request)
        stream, include_usage = check_common(body)
        if input_field not in body:
            raise ApiError(400, f"{input_field} is required", input_field)
        gen = prepare(engine, body[input_field], model=model_id, **generation_args(body))
        return await run(request, gen, stream, include_usage, chunks, response)

    async def run(request: Request, gen: api.Generation, stream: bool, include_usage: bool, chunks, response):
        def work():
            if not stream:
                yield response(gen)
                return
            last = None
            for last in chunks(gen):
                yield last
            if include_usage:  # OpenAI's stream_options.include_usage: one more chunk, no choices
                yield {**{k: last[k] for k in ("id", "object", "created", "model")}, "choices": [],
                       "usage": gen.usage}

        job = Job(work, asyncio.get_running_loop(), cancel=gen.cancel, on_done=lambda: usage.add(gen.usage))
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), err_type="server_busy", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ServerClosing as e:
            raise ApiError(503, str(e), err_type="server_closing") from None
        try:
            kind, value = await next_event(job, request)
        except ClientGone:  # while queued or running: nobody will read the answer
            job.cancel.set()
            errors[499] += 1                # nginx's "client closed request"
            return Response(status_code=499)
        except BaseException:  # the handler itself was cancelled
            job.cancel.set()
            raise
        if kind == "error":
            raise ApiError(503 if isinstance(value, ServerClosing) else 500, str(value), err_type="server_error")
        if kind == "end":  # cancelled before it produced anything (server closing)
            raise ApiError(503, "the request was cancelled", err_type="server_error")
        if not stream:
            return JSONResponse(value)
        return StreamingResponse(events(job, request, value), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(job: Job, request: Request, first):
        try:
            yield f"data: {json.dumps(first)}\n\n"
            while True:
                kind, value = await next_event(job, request)
                if kind == "item":
                    yield f"data: {json.dumps(value)}\n\n"
                elif kind == "end":
                    yield "data: [DONE]\n\n"
                    return
                else:               # failed, or the server is shutting down: say so, then end the stream
                    yield f"data: {json.dumps(error_body(str(value), 'server_error'))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        except ClientGone:
            return
        finally:  # finished, failed, or the client went away (starlette cancels this generator)
            job.cancel.set()

    app.include_router(router)
    return app


async def next_event(job: Job, request: Request):
    """The job's next event; raises ClientGone when the client disconnects first."""
    while True:
        try:
            return await asyncio.wait_for(job.items.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None
