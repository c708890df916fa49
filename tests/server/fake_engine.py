"""FakeEngine: the Engine interface the server uses, with predictable tokens and a settable pace. No torch.

It loads the real tokenizer of a conformance checkpoint (word-level: id i >= 3 is the word `t<i>`), so prompts,
chat templates and detokenization are the real ones; only the model is replaced. Token k of a generation is
`3 + (last prompt id - 3 + k + 1 + seed) % (VOCAB - 3)` (seed only when sampling): a prompt ending in t5 goes on
t6 t7 t8 ...; token k's fake logprob is -0.1 * (k + 1).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from engine.api import EngineError, FinishReason, GenerationRequest, TokenEvent, TokenLogprob
from engine.tokenizer import Tokenizer

ODD_6L = Path(__file__).parents[1] / "data" / "conformance" / "hymba-odd-6L"
VOCAB = 300
FAIL_ID = 299  # a prompt containing this id makes the engine raise EngineError on its second token


def fake_token(prompt: tuple[int, ...], k: int, seed: int = 0) -> int:
    return 3 + (prompt[-1] - 3 + k + 1 + seed) % (VOCAB - 3)


@dataclass
class Run:
    request: GenerationRequest
    num_tokens: int = 0
    finish_reason: FinishReason | None = None
    stopped_at: float | None = None


@dataclass
class FakeEngine:
    token_delay: float = 0.0
    max_model_len: int = 64
    device: str = "cpu"
    model_name: str = "hymba-fake"
    state_nbytes: int = 123_456
    load_seconds: float = 0.25
    defaults: dict = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    max_active: int = 0
    tokenizer_dir: Path = ODD_6L

    def __post_init__(self) -> None:
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.config = SimpleNamespace(vocab_size=max(VOCAB, self.tokenizer.vocab_size))
        self._active = 0
        self._lock = threading.Lock()

    def generate(self, request: GenerationRequest, should_stop):
        run = Run(request)
        self.runs.append(run)
        with self._lock:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        try:
            yield from self._generate(request, should_stop, run)
        finally:
            run.stopped_at = time.monotonic()
            with self._lock:
                self._active -= 1

    def _generate(self, request: GenerationRequest, should_stop, run: Run):
        params, prompt = request.params, request.prompt_ids
        seed = params.seed or 0 if params.temperature > 0 else 0
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = (None, *(_logprob(t, -1.0, params.prompt_logprobs) for t in prompt[1:]))
        text = ""
        for k in range(params.max_tokens):
            if should_stop():
                run.finish_reason = FinishReason.CANCELLED
                yield TokenEvent(None, "", finish_reason=FinishReason.CANCELLED, num_completion_tokens=k)
                return
            if self.token_delay:
                time.sleep(self.token_delay)
            if FAIL_ID in prompt and k == 1:
                raise EngineError("the fake engine failed on purpose")
            token = fake_token(prompt, k, seed)
            piece = ("" if k == 0 else " ") + f"t{token}"
            finish = None
            if token in params.stop_token_ids:
                piece, finish = "", FinishReason.STOP
            elif any(s in text + piece for s in params.stop):
                stop = next(s for s in params.stop if s in text + piece)
                piece, finish = (text + piece)[: (text + piece).index(stop)][len(text) :], FinishReason.STOP
            elif k + 1 == params.max_tokens:
                finish = FinishReason.LENGTH
            text += piece
            logprob = _logprob(token, -0.1 * (k + 1), params.logprobs) if params.logprobs is not None else None
            run.num_tokens = k + 1
            run.finish_reason = finish
            yield TokenEvent(token, piece, logprob, finish, len(prompt), k + 1, prompt_logprobs if k == 0 else None)
            if finish is not None:
                return


def _logprob(token: int, logprob: float, k: int) -> TokenLogprob:
    top = tuple((3 + (token - 3 + j) % (VOCAB - 3), logprob - j) for j in range(k))
    return TokenLogprob(token, logprob, top)
