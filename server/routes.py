"""The HTTP endpoints: thin functions that validate, submit, and return JSON or an SSE stream.

`sse()` is the only writer of `data: ...` events and of the closing `data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server import __version__, errors, render, serving
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.queue import CancelReason, JobGroup
from server.responses import (
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from server.serving import ServerContext

log = logging.getLogger("hymba.routes")


async def get_ctx(request: Request) -> ServerContext:  # async: no thread-pool hop (server/app.py's dependencies)
    return request.app.state.ctx


async def sse(chunks: AsyncIterator[BaseModel], group: JobGroup, ctx: ServerContext) -> AsyncIterator[str]:
    """Frame chunks as server-sent events. An error after the stream began becomes one error event; the stream
    always ends with [DONE]. However it ends (client gone included), the jobs are cancelled within one token."""
    try:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except errors.APIError as e:
            ctx.metrics.errors.labels(e.type).inc()
            yield f"data: {e.json()}\n\n"
        except Exception:
            log.exception("stream failed")
            ctx.metrics.errors.labels("server_error").inc()
            yield f"data: {errors.internal().json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        group.cancel(CancelReason.CLIENT_GONE)  # no-op for jobs that finished


def _stream(chunks: AsyncIterator[BaseModel], group: JobGroup, ctx: ServerContext) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(sse(chunks, group, ctx), media_type="text/event-stream", headers=headers)


Ctx = Annotated[ServerContext, Depends(get_ctx)]
v1 = APIRouter(prefix="/v1")  # these two need the API key when one is set
utility = APIRouter()
public = APIRouter()  # probes and scrapers: open by default, behind the key once dropped from --public-routes


@v1.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, ctx: Ctx):
    ctx.check_model(body.model)
    request_id = serving.new_id("cmpl")
    group, choices = serving.submit(ctx, body, serving.completion_prompts(ctx, body), request_id)
    if body.stream:
        return _stream(render.completion_chunks(ctx, body, request_id, group, choices), group, ctx)
    await serving.collect(group, choices, request.receive)
    return render.completion_response(ctx, body, request_id, choices)


@v1.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, ctx: Ctx):
    ctx.check_model(body.model)
    request_id = serving.new_id("chatcmpl")
    group, choices = serving.submit(ctx, body, [serving.chat_prompt(ctx, body)], request_id)
    if body.stream:
        return _stream(render.chat_chunks(ctx, body, request_id, group, choices), group, ctx)
    await serving.collect(group, choices, request.receive)
    return render.chat_response(ctx, body, request_id, choices)


def _model_card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, max_model_len=ctx.max_model_len)


@v1.get("/models")
async def list_models(ctx: Ctx) -> ModelList:
    return ModelList(data=[_model_card(ctx)])


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, ctx: Ctx) -> ModelCard:
    ctx.check_model(model_id)
    return _model_card(ctx)


@utility.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: Ctx) -> TokenizeResponse:
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise errors.invalid_request("Give exactly one of prompt or messages.", param="prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt)
        ids = serving.chat_prompt(ctx, chat).ids
    else:
        try:
            ids = ctx.engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise errors.invalid_request(str(e), param="prompt") from None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids)


@utility.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: Ctx) -> DetokenizeResponse:
    ctx.check_model(body.model)
    serving.check_token_ids(body.tokens, ctx.engine.config.vocab_size, "tokens")
    return DetokenizeResponse(prompt=ctx.engine.tokenizer.decode(body.tokens))


@public.get("/health")
async def health(ctx: Ctx) -> HealthResponse:
    if ctx.queue.phase != "ready":
        raise errors.unavailable(ctx.queue.phase)
    return HealthResponse()


@public.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@public.get("/metrics", include_in_schema=False)
async def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
