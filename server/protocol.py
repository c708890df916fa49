"""Pydantic models of the OpenAI requests we accept, and the one place each becomes SamplingParams.

Fields follow the OpenAI API reference order; our extensions (vLLM's names) come after
`# --- extensions ---`. Unknown fields are ignored and logged at debug. Every number must be finite and every
string valid Unicode (Python's JSON reader accepts NaN and lone surrogates). Responses are in server/responses.py.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from engine.api import MAX_LOGPROBS, SamplingParams
from server import errors

log = logging.getLogger("hymba.protocol")
MAX_N = 16  # choices per request: each is a full generation at batch size 1
MAX_STOP = 16

Prompt = str | list[str] | list[int] | list[list[int]]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1)]  # -1 (vLLM) and 0 both mean off
MinP = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(ge=1)]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # OpenAI's int64; torch seeds take 64 bits
RepetitionPenalty = Annotated[float, Field(ge=0.01)]  # seen tokens' logits are divided by it: tinier overflows fp32
_SURROGATE = re.compile("[\ud800-\udfff]")


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_text_and_log_unknown_fields(self) -> OpenAIModel:
        for name, value in self:  # fields and unknown fields; nested models have checked their own
            if _SURROGATE.search(name):  # an unknown field's name: report the object that holds it
                path: tuple[str | int, ...] = ()
            elif (inside := _lone_surrogate(value)) is not None:
                path = (name, *inside)
            else:
                continue
            message = "Input should be valid Unicode text, without lone surrogates"
            raise PydanticCustomError("lone_surrogate", message, {"path": path})
        if self.model_extra:
            log.debug("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


def _lone_surrogate(value: Any) -> tuple[str | int, ...] | None:
    """Where in a plain value (str, list, dict) a string holds a lone UTF-16 surrogate, which cannot be tokenized or
    sent back as UTF-8; None if nowhere. A dict key that holds one is reported as its dict."""
    if isinstance(value, str):
        return () if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return ()
        if (where := _lone_surrogate(item)) is not None:
            return (key, *where)
    return None


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class CompletionRequest(OpenAIModel):
    # https://platform.openai.com/docs/api-reference/completions/create
    model: str | None = None
    prompt: Prompt
    best_of: Positive | None = None
    echo: bool = False
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: NumLogprobs | None = None
    max_tokens: Positive | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None
    # --- extensions ---
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0

    def check_supported(self) -> None:
        if self.suffix:
            raise errors.invalid_request("suffix is not supported.", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise errors.invalid_request("best_of must equal n; best_of > n is not supported.", param="best_of")
        _check_common(self)

    def to_sampling_params(self, defaults: dict, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        return _sampling_params(
            self,
            defaults,
            requested_max_tokens=self.max_tokens,
            openai_max_tokens=16,
            num_prompt_tokens=num_prompt_tokens,
            max_model_len=max_model_len,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None,
            prompt_param="prompt",
        )


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template(self, i: int) -> dict[str, Any]:
        """The plain dict a chat template expects: string content; `developer` is OpenAI's new `system`."""
        content = self.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    message = f"Only text content parts are supported, got type {part.type!r}."
                    raise errors.invalid_request(message, param=f"messages[{i}].content[{j}]")
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        extras = {"name": self.name, "tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id}
        return message | {k: v for k, v in extras.items() if v is not None}


class ResponseFormat(OpenAIModel):
    type: str


class ChatCompletionRequest(OpenAIModel):
    # https://platform.openai.com/docs/api-reference/chat/create
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool = False
    max_completion_tokens: Positive | None = None
    max_tokens: Positive | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: NumLogprobs | None = None
    top_p: TopP | None = None
    user: str | None = None
    # --- extensions ---
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        if self.response_format is not None and self.response_format.type != "text":
            message = f"response_format type {self.response_format.type!r} is not supported; only 'text' is."
            raise errors.invalid_request(message, param="response_format")
        if self.tool_choice not in (None, "none", "auto"):
            message = "tool_choice must be 'none' or 'auto': tool calls are returned as plain text."
            raise errors.invalid_request(message, param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise errors.invalid_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
        _check_common(self)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    def to_sampling_params(self, defaults: dict, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        return _sampling_params(
            self,
            defaults,
            requested_max_tokens=self.max_completion_tokens or self.max_tokens,
            openai_max_tokens=max_model_len - num_prompt_tokens,  # chat: until the context is full
            num_prompt_tokens=num_prompt_tokens,
            max_model_len=max_model_len,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            prompt_logprobs=None,
            prompt_param="messages",
        )


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


def _check_common(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise errors.invalid_request("stream_options is only allowed when stream is true.", param="stream_options")
    for key in req.logit_bias or {}:
        if not re.fullmatch(r"-?[0-9]+", key):  # not str.isdigit(): it is true for "²", which int() refuses
            raise errors.invalid_request(f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias")


def _sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    defaults: dict,
    *,
    requested_max_tokens: int | None,
    openai_max_tokens: int,
    num_prompt_tokens: int,
    max_model_len: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    prompt_param: str,
) -> SamplingParams:
    def pick(name: str, requested: Any, openai_default: Any) -> Any:
        # Priority: request -> the checkpoint's generation_config.json -> OpenAI default
        if requested is not None:
            return requested
        return defaults.get(name, openai_default)

    max_tokens = pick("max_tokens", requested_max_tokens, openai_max_tokens)
    if max_tokens < 1 or num_prompt_tokens + max_tokens > max_model_len:
        raise errors.context_too_long(max_model_len, num_prompt_tokens, max(max_tokens, 1), prompt_param)
    if req.min_tokens > max_tokens:
        raise errors.invalid_request(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens}).", "min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", req.temperature, 1.0),  # below GREEDY_BELOW the engine samples greedily
        top_p=pick("top_p", req.top_p, 1.0),
        top_k=max(0, pick("top_k", req.top_k, 0)),
        min_p=pick("min_p", req.min_p, 0.0),
        seed=req.seed,
        repetition_penalty=pick("repetition_penalty", req.repetition_penalty, 1.0),
        presence_penalty=pick("presence_penalty", req.presence_penalty, 0.0),
        frequency_penalty=pick("frequency_penalty", req.frequency_penalty, 0.0),
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        stop=tuple(s for s in stop if s),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
    )
