"""The engine's boundary objects: what a caller submits and what generation yields. No torch here.

The server builds GenerationRequest objects and consumes TokenEvents; it never sees tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs / completions logprobs
# A temperature under this samples greedily (vLLM's epsilon): greedy is the limit as the temperature goes to 0, and
# logits divided by a temperature that is ~0 in fp32 overflow into a NaN row.
GREEDY_BELOW = 1e-5


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"  # should_stop() turned true (client gone, timeout, shutdown)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping. Defaults are OpenAI's; `temperature == 0` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1.0: off (CTRL-style, applied to prompt and output tokens)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # same for prompt tokens (completions `echo` + `logprobs`)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS / stop ids / stop strings are not honoured before this many tokens

    def __post_init__(self) -> None:
        # Our own invariant: the server validates user input with clear 400s before building this.
        assert self.max_tokens >= 1 and self.temperature >= 0 and 0 < self.top_p <= 1, self
        assert self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, self.logprobs

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position's logprob: the token at that position and the `top` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step of generation. `text` is the newly printable text (may be empty while a UTF-8 character
    or a possible stop string is held back). The last event has `finish_reason` set; it may carry no token
    (cancellation, or a stop string completed by held-back text)."""

    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first event only, when asked; None for token 0


class EngineError(RuntimeError):
    """Generation failed inside the engine (non-finite logits, out of memory, a kernel error). The worker that
    raised it has already reset itself and can serve the next request."""
