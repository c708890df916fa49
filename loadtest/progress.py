"""A one-line live progress bar on stderr, redrawn in place on a terminal; elsewhere one line per finished run."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from loadtest.record import RequestRecord

BAR_WIDTH = 24
REDRAW_S = 0.1


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.is_live = self.stream.isatty()
        self.num_done = self.num_ok = self.num_rejected = self.num_failed = self.in_flight = 0
        self.started_at = time.perf_counter()
        self._drawn_at = 0.0

    def sent(self) -> None:
        self.in_flight += 1
        self.refresh()

    def finished(self, record: RequestRecord) -> None:
        self.in_flight -= 1
        self.num_done += 1
        if record.is_completed:
            self.num_ok += 1
        elif record.status == 429:
            self.num_rejected += 1
        else:
            self.num_failed += 1
        self.refresh()

    def line(self) -> str:
        filled = BAR_WIDTH * self.num_done // max(1, self.total)
        elapsed = time.perf_counter() - self.started_at
        return (
            f"{self.label:<10} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.num_done}/{self.total}"
            f"  ok {self.num_ok}  429 {self.num_rejected}  err {self.num_failed}  in flight {self.in_flight}"
            f"  {elapsed:.1f} s"
        )

    def refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.is_live and (force or now - self._drawn_at >= REDRAW_S):
            self._drawn_at = now
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()

    def close(self) -> None:
        if self.is_live:
            self.refresh(force=True)
            self.stream.write("\n")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
