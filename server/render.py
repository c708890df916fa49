"""The output end of the shared path: accumulated choices and TokenEvents -> OpenAI objects and stream chunks.

Completions use the completions logprobs layout (tokens, token_logprobs, top_logprobs, text_offset); chat uses
the chat layout (content: [{token, logprob, bytes, top_logprobs}]).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from engine.api import TokenLogprob
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.queue import JobGroup
from server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from server.responses import TokenLogprob as ChatTokenLogprob
from server.serving import Choice, ServerContext, usage_counts


def _usage(choices: list[Choice]) -> Usage:
    prompt_tokens, completion_tokens = usage_counts(choices)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _chunk_head(ctx: ServerContext, request_id: str) -> dict:
    """Fields every chunk of one stream repeats unchanged."""
    created = int(time.time())
    return {"id": request_id, "created": created, "model": ctx.model_name, "system_fingerprint": ctx.fingerprint}


# --- completions ---


def _echo_text(ctx: ServerContext, choice: Choice) -> str:
    prompt = choice.prompt
    return prompt.text if prompt.text is not None else ctx.engine.tokenizer.decode(prompt.ids)


def _echo_items(choice: Choice) -> list[tuple[int, TokenLogprob | None]]:
    prompt_logprobs = choice.prompt_logprobs or (None,) * len(choice.prompt.ids)
    return list(zip(choice.prompt.ids, prompt_logprobs, strict=True))


def _completion_logprobs(
    ctx: ServerContext, items: Iterable[tuple[int, TokenLogprob | None]], offset: int
) -> tuple[CompletionLogprobs, int]:
    """Logprobs for (token id, its logprob or None) items; offsets run on from `offset`. As OpenAI does, the
    chosen token is always in top_logprobs, so it may hold k + 1 entries."""
    out = CompletionLogprobs()
    for token_id, entry in items:
        token = ctx.token_text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {ctx.token_text(t): logprob for t, logprob in entry.top}
        top.setdefault(token, entry.logprob)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append(top)
    return out, offset


def completion_response(
    ctx: ServerContext, body: CompletionRequest, request_id: str, choices: list[Choice]
) -> CompletionResponse:
    out = []
    for i, choice in enumerate(choices):
        text, logprobs = choice.text, None
        if body.echo:
            text = _echo_text(ctx, choice) + text
        if body.logprobs is not None:
            items = (_echo_items(choice) if body.echo else []) + [(e.token_id, e) for e in choice.logprobs]
            logprobs, _ = _completion_logprobs(ctx, items, 0)
        out.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=choice.finish_reason))
    return CompletionResponse(
        id=request_id, model=ctx.model_name, system_fingerprint=ctx.fingerprint, choices=out, usage=_usage(choices)
    )


async def completion_chunks(
    ctx: ServerContext, body: CompletionRequest, request_id: str, group: JobGroup, choices: list[Choice]
) -> AsyncIterator[CompletionResponse]:
    head = _chunk_head(ctx, request_id)
    offsets = [0] * len(choices)
    is_started = [False] * len(choices)

    def chunk(choices_: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(**head, choices=choices_, usage=usage)

    async for i, event in group.events():
        choice = choices[i]
        choice.add(event)
        text, items = event.text, [(event.token_id, event.logprob)] if event.logprob is not None else []
        if not is_started[i]:
            is_started[i] = True
            if body.echo:
                text = _echo_text(ctx, choice) + text
                items = _echo_items(choice) + items
        logprobs = None
        if body.logprobs is not None and items:
            logprobs, offsets[i] = _completion_logprobs(ctx, items, offsets[i])
        if text or logprobs is not None or event.finish_reason is not None:
            yield chunk([CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=choice.finish_reason)])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(choices))


# --- chat ---


def _chat_logprob(ctx: ServerContext, entry: TokenLogprob) -> ChatTokenLogprob:
    def top(token_id: int, logprob: float) -> TopLogprob:
        token = ctx.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    chosen = top(entry.token_id, entry.logprob)
    return ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[top(t, lp) for t, lp in entry.top])


def chat_response(
    ctx: ServerContext, body: ChatCompletionRequest, request_id: str, choices: list[Choice]
) -> ChatCompletionResponse:
    out = []
    for i, choice in enumerate(choices):
        logprobs = ChatLogprobs(content=[_chat_logprob(ctx, e) for e in choice.logprobs]) if body.logprobs else None
        message = ChatMessageOut(content=choice.text)
        out.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=choice.finish_reason))
    return ChatCompletionResponse(
        id=request_id, model=ctx.model_name, system_fingerprint=ctx.fingerprint, choices=out, usage=_usage(choices)
    )


async def chat_chunks(
    ctx: ServerContext, body: ChatCompletionRequest, request_id: str, group: JobGroup, choices: list[Choice]
) -> AsyncIterator[ChatCompletionChunk]:
    head = _chunk_head(ctx, request_id)

    def chunk(choices_: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**head, choices=choices_, usage=usage)

    for i in range(len(choices)):  # OpenAI's first chunk of each choice carries only the role
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    async for i, event in group.events():
        choice = choices[i]
        choice.add(event)
        logprobs = None
        if body.logprobs and event.logprob is not None:
            logprobs = ChatLogprobs(content=[_chat_logprob(ctx, event.logprob)])
        if event.text or logprobs is not None:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=event.text), logprobs=logprobs)])
        if choice.finish_reason is not None:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=choice.finish_reason)])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(choices))
