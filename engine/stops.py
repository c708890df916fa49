"""Stop strings over a stream of text deltas: what is safe to emit now, and whether a stop string has completed.

Pure text, no tokens: it sits after the incremental detokenizer, so a stop string split across tokens is found.
"""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop string in the streamed text. Nothing from the stop string on is ever emitted, and only
    the longest tail that could still grow into a stop string is held back, so streaming stays prompt."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)  # "" would match everywhere; OpenAI clients mean "no stop"
        self._held = ""  # tail of the text that is a proper prefix of some stop string
        self.is_stopped = False

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string has completed)."""
        if self.is_stopped:
            return "", True
        text = self._held + text_delta
        # Earlier text was checked already and holds no stop string, so any match lies in `text`.
        starts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if starts:
            self._held = ""
            self.is_stopped = True
            return text[: min(starts)], True
        num_held = self._num_held(text)
        self._held = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """At the end of generation the held tail did not become a stop string: release it."""
        held, self._held = self._held, ""
        return held

    def _num_held(self, text: str) -> int:
        # The longest suffix of `text` that some stop string starts with (a full match was ruled out above).
        for n in range(min(len(text), max((len(s) for s in self.stops), default=0) - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
