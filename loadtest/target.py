"""The server under test, outside the measured requests: its models, its /tokenize, its queue gauges in /metrics.

Works with any OpenAI-compatible server; /tokenize and /metrics are used when present (ours and vLLM's have both).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from loadtest.config import LoadTestError

# Prometheus gauges of requests waiting for / holding a slot, by server (summed over their labels)
WAITING_GAUGES = ("hymba_requests_waiting", "vllm:num_requests_waiting", "sglang:num_queue_reqs")
RUNNING_GAUGES = ("hymba_requests_running", "vllm:num_requests_running", "sglang:num_running_reqs")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    model_ids: tuple[str, ...]
    max_model_len: int | None  # from /v1/models when the server says (ours and vLLM's do)


def error_message(response: httpx.Response) -> str:
    """The message of an OpenAI error body, else the start of whatever came back."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") if isinstance(error, dict) else None
        if message is None and isinstance(body, dict):
            message = body.get("detail") or body.get("message")
        if message:
            return str(message)
    except (ValueError, UnicodeDecodeError):
        pass
    return response.text[:200].strip() or response.reason_phrase


def url_of(client: httpx.AsyncClient, path: str) -> str:
    return str(client.base_url).rstrip("/") + path


def unreachable(url: str, e: httpx.HTTPError) -> LoadTestError:
    reason = str(e) or type(e).__name__
    return LoadTestError(f"cannot reach {url}: {reason}")


async def probe(client: httpx.AsyncClient, model: str) -> ServerInfo:
    """GET /v1/models: the server is up, the key is accepted, and it serves `model`."""
    url = url_of(client, "/v1/models")
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise unreachable(url, e) from None
    if response.status_code in (401, 403):
        hint = "check --api-key" if "authorization" in client.headers else "give --api-key"
        raise LoadTestError(f"{url} answered {response.status_code}: {error_message(response)} ({hint})")
    if response.status_code != 200:
        raise LoadTestError(f"{url} answered {response.status_code}: {error_message(response)}")
    try:
        cards = response.json()["data"]
        ids = tuple(card["id"] for card in cards)
    except (ValueError, KeyError, TypeError):
        raise LoadTestError(f"{url} did not return an OpenAI model list") from None
    if model not in ids:
        raise LoadTestError(f"--model {model!r} is not served at {url_of(client, '')}; it serves: {', '.join(ids)}")
    card = cards[ids.index(model)]
    max_model_len = card.get("max_model_len")
    return ServerInfo(ids, max_model_len if isinstance(max_model_len, int) else None)


class TokenizeUnavailable(Exception):
    """The server has no usable /tokenize; prompts fall back to an estimate."""


async def count_tokens(client: httpx.AsyncClient, model: str, prompt: str | list[dict]) -> int:
    """Prompt tokens as the server counts them: a string for completions, messages (template included) for chat."""
    body = {"model": model} | ({"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt})
    try:
        response = await client.post("/tokenize", json=body)
    except httpx.HTTPError as e:
        raise unreachable(url_of(client, "/tokenize"), e) from None
    if response.status_code in (404, 405, 501):
        raise TokenizeUnavailable(f"/tokenize answered {response.status_code}")
    if response.status_code != 200:
        raise LoadTestError(f"{url_of(client, '/tokenize')} answered {response.status_code}: {error_message(response)}")
    try:
        return int(response.json()["count"])
    except (ValueError, KeyError, TypeError):
        raise TokenizeUnavailable("/tokenize did not return a count") from None


def parse_gauges(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Prometheus text -> {name: value summed over its label sets} for the names present."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, rest = line.partition(" ")
        name = series.split("{", 1)[0]
        if name in names:
            try:
                out[name] = out.get(name, 0.0) + float(rest.split()[0])
            except (ValueError, IndexError):
                continue
    return out


async def scrape_queue(client: httpx.AsyncClient) -> tuple[str | None, float | None, float | None]:
    """(name of the waiting gauge, waiting, running) from /metrics; Nones where the server has no such gauge."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None, None, None
    if response.status_code != 200:
        return None, None, None
    gauges = parse_gauges(response.text, WAITING_GAUGES + RUNNING_GAUGES)
    waiting_name = next((n for n in WAITING_GAUGES if n in gauges), None)
    running = next((gauges[n] for n in RUNNING_GAUGES if n in gauges), None)
    return waiting_name, gauges.get(waiting_name) if waiting_name else None, running
