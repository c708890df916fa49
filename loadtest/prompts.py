"""Prompts for a run: synthetic ones fitted to a token length through the server's /tokenize, or a JSONL file.

Each synthetic prompt is its own random run of common words, so no two share a prefix (a prefix cache on the
server cannot help). Without /tokenize the length is estimated from TOKENS_PER_WORD and usage reports the truth.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest.config import LoadTestError

# English prose through a Llama- or GPT-style BPE tokenizer; used only when the server has no /tokenize
TOKENS_PER_WORD = 1.3
MAX_TOKENIZE_IN_FLIGHT = 16
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this are be had have not but one all "
    "were when there can an which their said more if will each about how up out them then she many some so these "
    "would other into has two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know get through "
    "back much before go good new write our used me man too any day same right look think also around another "
    "came come work three word must because does part even place well such here take why things help put years "
    "different away again off went old number great tell men say small every found still between name should home "
    "big give air line set own under read last never us left end along while might next sound below saw something "
    "thought both few those always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took sometimes four head "
    "above kind began almost live page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes soon times story boys since white days ever paper hard near "
    "sentence better best across during today others sure means knew"
)
WORDS = tuple(_WORD_TEXT.split())
FILLERS = ("a", "I", "the", "of", "to", "and", "in", "is")  # one token each in most vocabularies

Content = str | list[dict]  # text for completions, messages for chat
TokenCounter = Callable[[Content], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Prompt:
    content: Content
    max_tokens: int
    num_tokens: int | None  # as the server's /tokenize counted it; None when estimated or read from a file


@dataclass(frozen=True, slots=True)
class PromptSet:
    prompts: list[Prompt]  # one per request of a run, in order; every run replays the same list
    source: str  # tokenize, estimate or dataset


def wrap(text: str, endpoint: str) -> Content:
    return [{"role": "user", "content": text}] if endpoint == "chat" else text


async def fit(
    count: TokenCounter, words: list[str], target: int, words_per_token: float, endpoint: str
) -> tuple[str, int]:
    """(text, tokens): the longest prompt of at most `target` tokens made of the first words of `words`, then
    topped up with short words where the next word would overshoot; exactly `target` unless every try overshoots.
    Each guess moves by the token shortfall times words_per_token, in a bracket that only shrinks."""
    lo, lo_tokens, hi = 0, 0, len(words)  # prompt(lo) <= target < prompt(hi): a word is one token or more
    n = min(hi - 1, max(1, round(target * words_per_token)))
    while hi - lo > 1:
        c = await count(wrap(" ".join(words[:n]), endpoint))
        if c == target:
            return " ".join(words[:n]), c
        if c < target:
            lo, lo_tokens = n, c
        else:
            hi = n
        step = round((target - c) * words_per_token) or (1 if c < target else -1)
        n = min(hi - 1, max(lo + 1, n + step))
    if lo == 0:
        raise LoadTestError(f"--prompt-tokens {target} is too few: a one-word prompt already takes more tokens")
    text, tokens = " ".join(words[:lo]), lo_tokens
    fillers = list(FILLERS)
    for _ in range(2 * len(FILLERS)):  # a few tokens short at most: the bracket ended one word below target
        if tokens == target or not fillers:
            break
        longer = f"{text} {fillers[0]}"
        c = await count(wrap(longer, endpoint))
        if c <= target:
            text, tokens = longer, c
        else:
            fillers.pop(0)  # too long here; a shorter one may still fit
    return text, tokens


async def synthetic_prompts(
    count: TokenCounter | None, num: int, target: int, max_tokens: int, endpoint: str, seed: int
) -> PromptSet:
    """`num` prompts of `target` tokens each; `count` is the server's tokenizer, or None to estimate."""
    rng = random.Random(seed)
    pools = [rng.choices(WORDS, k=2 * target + 16) for _ in range(num)]
    if count is None:
        n = max(1, round(target / TOKENS_PER_WORD))
        return PromptSet([Prompt(wrap(" ".join(p[:n]), endpoint), max_tokens, None) for p in pools], "estimate")

    limit = asyncio.Semaphore(MAX_TOKENIZE_IN_FLIGHT)

    async def make(words: list[str], words_per_token: float) -> Prompt:
        async with limit:
            text, num_tokens = await fit(count, words, target, words_per_token, endpoint)
            return Prompt(wrap(text, endpoint), max_tokens, num_tokens)

    first = await make(pools[0], 1 / TOKENS_PER_WORD)
    words_per_token = len(_text(first.content).split()) / first.num_tokens  # this tokenizer's, to fit the rest
    rest = await asyncio.gather(*(make(p, words_per_token) for p in pools[1:]))
    return PromptSet([first, *rest], "tokenize")


def _text(content: Content) -> str:
    return content if isinstance(content, str) else content[-1]["content"]


def load_dataset(path: Path, endpoint: str, num: int, max_tokens: int) -> PromptSet:
    """One prompt per line: {"prompt": str} or, for chat, {"messages": [...]}; an optional "max_tokens" overrides
    --max-tokens. Lines are used in file order and repeated when --requests asks for more."""
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            prompts.append(_parse_line(line, f"{path}:{lineno}", endpoint, max_tokens))
    if not prompts:
        raise LoadTestError(f"{path}: no prompts (expected one JSON object per line)")
    return PromptSet([prompts[i % len(prompts)] for i in range(num)], "dataset")


def _parse_line(line: str, where: str, endpoint: str, max_tokens: int) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise LoadTestError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise LoadTestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    limit = row.get("max_tokens", max_tokens)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise LoadTestError(f"{where}: max_tokens must be a positive integer, got {limit!r}")
    if isinstance(row.get("prompt"), str):
        return Prompt(wrap(row["prompt"], endpoint), limit, None)
    messages = row.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages):
        if endpoint != "chat":
            raise LoadTestError(f"{where}: has messages, which need --endpoint chat (or give a prompt string)")
        return Prompt(messages, limit, None)
    raise LoadTestError(f'{where}: expected "prompt" (a string) or "messages" (a list of {{role, content}})')
