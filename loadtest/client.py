"""One streamed request: its body, and the SSE stream read into a RequestRecord with a timestamp per text chunk.

SSE framing is read line by line: `data: {json}` events, `data: [DONE]` at the end, anything else skipped. TTFT and
ITL are stamped on chunks that carry generated text; a chat stream's first role-only chunk carries none.
"""

from __future__ import annotations

import json
import time

import httpx

from loadtest.config import LoadTestConfig
from loadtest.prompts import Prompt
from loadtest.record import RequestRecord
from loadtest.target import error_message

DONE = object()


def request_body(cfg: LoadTestConfig, prompt: Prompt) -> dict:
    body: dict = {"model": cfg.model, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        body |= {"messages": prompt.content, "max_completion_tokens": prompt.max_tokens}
    else:
        body |= {"prompt": prompt.content, "max_tokens": prompt.max_tokens}
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # every request generates max_tokens, so runs compare like for like
    return body


def parse_sse_line(line: str) -> dict | object | None:
    """A `data:` line -> its JSON object, or DONE for [DONE]; None for blank lines, comments and other fields.
    Raises ValueError on a data line that is not a JSON object."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return DONE
    event = json.loads(payload)
    if not isinstance(event, dict):
        raise ValueError(f"SSE data is not a JSON object: {payload[:80]}")
    return event


def chunk_text(event: dict) -> tuple[str, str | None]:
    """(new text, finish_reason) of a completions or chat chunk's first choice; ("", None) when it has none."""
    choices = event.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return "", None
    choice = choices[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return text or "", choice.get("finish_reason")


async def send(client: httpx.AsyncClient, path: str, body: dict, index: int) -> RequestRecord:
    """POST one streamed request and time it. Never raises for what the server or network does: that goes in
    the record's status (HTTP status, exception name, stream_error, bad_stream or incomplete_stream)."""
    record = RequestRecord(index=index, sent_at=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.fail(response.status_code, error_message(response), response.headers.get("retry-after"))
            else:
                await _read_stream(response, record)
    except httpx.HTTPError as e:
        record.fail(type(e).__name__, str(e) or type(e).__name__)
    if record.e2el is None:
        record.e2el = time.perf_counter() - record.sent_at
    return record


async def _read_stream(response: httpx.Response, record: RequestRecord) -> None:
    is_done = is_finished = False
    async for line in response.aiter_lines():
        now = time.perf_counter()
        try:
            event = parse_sse_line(line)
        except ValueError as e:
            record.fail("bad_stream", str(e))
            return
        if event is None:
            continue
        if event is DONE:
            is_done = True
            record.e2el = now - record.sent_at
            break
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            record.fail("stream_error", str(error.get("message") or error))
            return
        text, finish_reason = chunk_text(event)
        if text:
            record.chunk_offsets.append(now - record.sent_at)
        is_finished = is_finished or finish_reason is not None
        usage = event.get("usage")
        if isinstance(usage, dict):  # the last usage wins: some servers send a running count on every chunk
            record.prompt_tokens = usage.get("prompt_tokens")
            record.usage_output_tokens = usage.get("completion_tokens")
    if not (is_done or is_finished):
        record.fail("incomplete_stream", "the stream ended without a finish_reason or [DONE]")
