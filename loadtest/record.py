"""RequestRecord: what one streamed request did, as the client saw it. Times are seconds from when it was sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

COMPLETED = 200


@dataclass(slots=True)
class RequestRecord:
    index: int  # which prompt (and arrival) of the run
    sent_at: float  # time.perf_counter() as the request left
    status: int | str = COMPLETED  # HTTP status, or a name: ConnectError, stream_error, incomplete_stream, ...
    error: str | None = None
    chunk_offsets: list[float] = field(default_factory=list)  # seconds after sent_at of each chunk with new text
    e2el: float | None = None  # seconds from sent_at to the end of the stream (or of the error)
    prompt_tokens: int | None = None  # usage.prompt_tokens, when the server sent usage
    usage_output_tokens: int | None = None  # usage.completion_tokens
    retry_after: str | None = None  # the Retry-After header of a 429 or 503

    def fail(self, status: int | str, error: str, retry_after: str | None = None) -> None:
        self.status, self.error, self.retry_after = status, error, retry_after

    @property
    def is_completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def ttft(self) -> float | None:
        return self.chunk_offsets[0] if self.chunk_offsets else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in pairwise(self.chunk_offsets)]

    @property
    def output_tokens(self) -> int:
        """The server's count when it sent usage, else one token per chunk (a lower bound: a chunk may hold more)."""
        return self.usage_output_tokens if self.usage_output_tokens is not None else len(self.chunk_offsets)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2EL - TTFT) / (output tokens - 1), as vLLM's benchmark has it."""
        if self.ttft is None or self.e2el is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_json(self, run_start: float) -> dict:
        ms = 1e3
        return {
            "index": self.index,
            "start_s": round(self.sent_at - run_start, 6),
            "status": self.status,
            "error": self.error,
            "ttft_ms": None if self.ttft is None else round(self.ttft * ms, 3),
            "tpot_ms": None if self.tpot is None else round(self.tpot * ms, 3),
            "e2el_ms": None if self.e2el is None else round(self.e2el * ms, 3),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.usage_output_tokens,
            "num_chunks": len(self.chunk_offsets),
            "retry_after": self.retry_after,
            "itl_ms": [round(x * ms, 3) for x in self.itls],
        }
