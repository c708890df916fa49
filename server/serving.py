"""The generation path both endpoints share: prompt ids in, merged TokenEvents per choice out.

Completions and chat differ only at the two ends: how the prompt becomes token ids (here, `*_prompts`) and how
events become OpenAI objects (server/render.py). Submission, n > 1, usage and cancellation are common.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.api import GenerationRequest, TokenEvent, TokenLogprob
from server import __version__, errors
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.queue import CancelReason, JobGroup, RequestQueue
from server.settings import BUNDLED_MODEL, BUNDLED_MODEL_NAME, Settings

if TYPE_CHECKING:
    from engine.generate import Engine


@dataclass
class ServerContext:
    """What every route needs, built once by build_app. All engines serve the same checkpoint; `engines` stays empty
    until they have loaded (the routes that need one answer 503 until then)."""

    settings: Settings
    engines: Sequence[Engine]
    queue: RequestQueue
    metrics: Metrics

    @property
    def engine(self) -> Engine:
        return self.engines[0]

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        # the folder's name, as Engine.model_name has it, known before the engines have loaded
        return BUNDLED_MODEL_NAME if self.settings.model == BUNDLED_MODEL else Path(self.settings.model).resolve().name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def fingerprint(self) -> str:
        return f"hymba-serve-{__version__}"

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise errors.not_found(f"The model '{model}' does not exist.", param="model", code="model_not_found")

    @functools.cached_property
    def token_text(self) -> Callable[[int], str]:
        """A token's own text (special tokens included), as logprobs report it."""
        return functools.lru_cache(maxsize=65536)(lambda i: self.engine.tokenizer.decode([i], False))


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # the text the user sent, when they sent text (echo returns it as sent)


@dataclass
class Choice:
    """One choice's events, accumulated."""

    prompt: Prompt
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_tokens: int = 0
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.texts.append(event.text)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.token_id is not None:
            self.num_tokens += 1
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason.value

    @property
    def text(self) -> str:
        return "".join(self.texts)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_prompts(ctx: ServerContext, body: CompletionRequest) -> list[Prompt]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise errors.invalid_request("prompt must not be empty.", param="prompt")
    if isinstance(prompts[0], int):
        prompts = [prompts]
    return [Prompt(_encode(ctx, p), p) if isinstance(p, str) else Prompt(list(p)) for p in prompts]


def chat_prompt(ctx: ServerContext, body: ChatCompletionRequest) -> Prompt:
    messages = body.template_messages()
    try:
        ids = ctx.engine.tokenizer.encode_chat(messages, body.add_generation_prompt, tools=body.tools)
    except ValueError as e:  # ChatTemplateError: a one-line message naming the template
        raise errors.invalid_request(str(e), param="messages") from None
    return Prompt(ids)


def _encode(ctx: ServerContext, text: str) -> list[int]:
    try:
        return ctx.engine.tokenizer.encode(text)
    except ValueError as e:
        raise errors.invalid_request(str(e), param="prompt") from None


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise errors.invalid_request(f"Token id {bad} is outside the vocabulary [0, {vocab_size}).", param=param)


def submit(
    ctx: ServerContext, body: CompletionRequest | ChatCompletionRequest, prompts: list[Prompt], request_id: str
) -> tuple[JobGroup, list[Choice]]:
    """Validate against the model, then admit prompts x n generations at once (choice i*n + j).
    Raises APIError: 400 (bad ids, context too long), 429 (queue full), 503 (loading, draining)."""
    body.check_supported()
    vocab_size = ctx.engine.config.vocab_size
    param = "prompt" if isinstance(body, CompletionRequest) else "messages"
    check_token_ids([int(k) for k in body.logit_bias or {}], vocab_size, "logit_bias")
    check_token_ids(body.stop_token_ids or (), vocab_size, "stop_token_ids")
    requests, choices = [], []
    for prompt in prompts:
        if not prompt.ids:
            raise errors.invalid_request("The prompt must hold at least one token.", param=param)
        check_token_ids(prompt.ids, vocab_size, param)
        params = body.to_sampling_params(ctx.engine.defaults, len(prompt.ids), ctx.max_model_len)
        for j in range(body.n):
            if params.seed is not None and j > 0:
                params_j = dataclasses.replace(params, seed=params.seed + j)  # distinct but reproducible choices
            else:
                params_j = params
            requests.append(GenerationRequest(tuple(prompt.ids), params_j, f"{request_id}-{len(requests)}"))
            choices.append(Choice(prompt))
    group = ctx.queue.submit(requests, timeout=ctx.settings.request_timeout)
    return group, choices


async def collect(group: JobGroup, choices: list[Choice], receive: Callable[[], Awaitable[dict]]) -> list[Choice]:
    """Run a non-streaming request to its end; the client leaving cancels it within one token."""
    async with cancel_on_disconnect(group, receive):
        async for index, event in group.events():
            choices[index].add(event)
    return choices


@contextlib.asynccontextmanager
async def cancel_on_disconnect(group: JobGroup, receive: Callable[[], Awaitable[dict]]) -> AsyncIterator[None]:
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        group.cancel(CancelReason.CLIENT_GONE)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def usage_counts(choices: list[Choice]) -> tuple[int, int]:
    """(prompt tokens, completion tokens): each distinct prompt counted once, however many choices share it."""
    prompts = {id(c.prompt): len(c.prompt.ids) for c in choices}
    return sum(prompts.values()), sum(c.num_tokens for c in choices)
