"""build_app: the FastAPI application around a set of engines (one per device, same checkpoint), given at once or
handed over by serve_engines once they have loaded in the background: until then /health and /v1/* answer 503.

Owns the lifespan (workers start and stop with the app), API-key auth, CORS, the body-size limit, per-request
metrics, and the one mapping of every failure to OpenAI's error JSON: 400 for validation (never 422), 401, 404,
405, 413, 429, 499, 500 (without internals), 503, 504.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__, errors, routes
from server.metrics import Metrics
from server.queue import RequestQueue
from server.serving import ServerContext
from server.settings import Settings

if TYPE_CHECKING:
    from engine.generate import Engine

log = logging.getLogger("hymba.app")


def build_app(settings: Settings, engines: Sequence[Engine] = ()) -> FastAPI:
    """With `engines`, the workers start with the app; without, the app answers 503 "loading" until serve_engines."""
    metrics = Metrics()
    ctx = ServerContext(settings, [], RequestQueue(settings.max_queue, metrics), metrics)
    if engines:
        _add_engines(ctx, engines)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ctx.engines:
            ctx.queue.start(ctx.engines)
        yield
        await ctx.queue.stop()

    app = FastAPI(title="hymba-serve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    needs_key, needs_engines = Depends(require_api_key), Depends(require_engines)
    app.include_router(routes.v1, dependencies=[needs_key, needs_engines])
    app.include_router(routes.utility, dependencies=[needs_key, needs_engines])
    app.include_router(routes.public, dependencies=[needs_key])  # unless listed in --public-routes (the default)

    app.add_exception_handler(errors.APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)

    # Added last = outermost: metrics see every status, including 413s and CORS rejections.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def serve_engines(app: FastAPI, engines: Sequence[Engine]) -> None:
    """On the app's event loop, once the engines have loaded: one worker each starts and /health turns 200. A no-op
    when SIGTERM came first (the app is draining)."""
    ctx = app.state.ctx
    if ctx.queue.is_draining:
        return
    _add_engines(ctx, engines)
    ctx.queue.start(engines)


def _add_engines(ctx: ServerContext, engines: Sequence[Engine]) -> None:
    ctx.engines = list(engines)
    for engine in engines:
        ctx.metrics.state_bytes.labels(engine.device).set(engine.state_nbytes)
    ctx.metrics.load_seconds.set(max(engine.load_seconds for engine in engines))
    devices = ",".join(engine.device for engine in engines)
    ctx.metrics.info.info({"model": ctx.model_name, "version": __version__, "devices": devices})


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
# pool, a thread hop per dependency per request (three of them cost ~1 ms of a request's time to first token).


async def require_engines(request: Request) -> None:
    """Every route but the probes needs a loaded engine (its tokenizer, its limits, a worker to run on)."""
    if request.app.state.ctx.queue.phase == "loading":
        raise errors.unavailable("loading")


async def require_api_key(request: Request) -> None:
    settings = request.app.state.ctx.settings
    key = settings.api_key
    if key is None or request.scope["route"].path in settings.public_routes:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise errors.unauthorized()


def error_response(e: errors.APIError, metrics: Metrics) -> JSONResponse:
    """The one place an APIError becomes an HTTP response."""
    metrics.errors.labels(e.type).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _on_api_error(request: Request, e: errors.APIError) -> JSONResponse:
    return error_response(e, request.app.state.ctx.metrics)


async def _on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    found = e.errors()
    first = found[0]
    # One field failing every member of a union (prompt: str | list[int] | ...) reports an error per member,
    # each loc ending in the member's name: the field is their common prefix.
    loc = list(first.get("loc", ()))
    for other in found[1:]:
        other_loc = list(other.get("loc", ()))
        if other_loc[:2] == loc[:2]:
            loc = [a for a, _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(loc, other_loc, strict=False))]
    if first.get("type") == "lone_surrogate":  # raised by the object holding the string, which names its path
        loc = [*loc, *first["ctx"]["path"]]
    loc = [part for part in loc if part != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = _union_message([other for other in found if other.get("loc", ())[:2] == first.get("loc", ())[:2]])
    if first.get("type") == "json_invalid":
        param, message = None, f"The body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
    elif param:
        message = f"{param}: {message}"
    return await _on_api_error(request, errors.invalid_request(message, param=param))


def _union_message(members: list[dict]) -> str:
    """One message for a field's errors: the member of a union whose type matched says what is wrong (stop: too many
    strings); when none matched, the types it could have been."""
    specific = [m["msg"] for m in members if not m.get("type", "").endswith(("_type", "_parsing"))]
    if specific or len(members) == 1:
        return (specific or [members[0]["msg"]])[0]
    kinds = dict.fromkeys(m["msg"].removeprefix("Input should be ").split(",")[0] for m in members)
    return "Input should be " + " or ".join(kinds)


async def _on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    if e.status_code == 400 and e.__cause__ is not None:  # FastAPI could not read the body: say why
        reason = str(e.__cause__).splitlines()[0] if str(e.__cause__) else type(e.__cause__).__name__
        return await _on_api_error(request, errors.invalid_request(f"The body is not valid JSON: {reason}"))
    if e.status_code == 404:
        api_error = errors.not_found(f"No route {request.method} {request.url.path}.")
    elif e.status_code == 405:
        api_error = errors.method_not_allowed(request.method, request.url.path)
    else:
        api_error = errors.APIError(e.status_code, str(e.detail))
    return await _on_api_error(request, api_error)


async def _on_unexpected_error(request: Request, e: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
    # Starlette re-raises after this response and uvicorn then closes the connection: say so, or the client sends
    # its next request on a connection about to close, and that request is reset.
    error = errors.internal("The server failed to handle the request.")
    error.headers["Connection"] = "close"
    return await _on_api_error(request, error)


class BodyLimit:
    """413 for a body over the limit, whether it declares its length or streams it in chunks."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.limit:
                return await self._reject(scope, receive, send)
        replay: list[Message] = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replayed() -> Message:  # the body once, then the client's own events (disconnect)
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(errors.body_too_large(self.limit), self.metrics)(scope, receive, send)


class RequestMetrics:
    """Counts every response by endpoint (the route's path template, or "other") and status code.

    A response is counted as its last body message goes out, before the client can have all of it: a scrape made
    after a client's response ended always includes it (the app itself may return later, tidying up). A response
    that never ends (an exception, or one before it started: 500) is counted when the app returns."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception before the response started
        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(_endpoint(scope), str(status)).inc()

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            count()


def _endpoint(scope: Scope) -> str:
    """The matched route's template (routing records it in the scope); "other" keeps label values bounded."""
    return getattr(scope.get("route"), "path_format", None) or "other"
