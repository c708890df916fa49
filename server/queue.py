"""RequestQueue: the bounded FIFO between routes and engines, and one worker per engine.

Owns admission (429 when full, 503 while loading or draining), cancellation (client gone, timeout,
shutdown), the per-request deadline and the drain on SIGTERM. Each worker runs one request at a time in a
thread, so the event loop stays free; the engine stays synchronous and only sees `should_stop`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.api import EngineError, FinishReason, GenerationRequest, TokenEvent
from server import errors
from server.metrics import Metrics

if TYPE_CHECKING:
    from engine.generate import Engine

log = logging.getLogger("hymba.queue")
RETRY_AFTER_S = 1
WORKER_STOP_GRACE_S = 5.0  # after a cancel, a worker needs one token to notice; this bounds a stuck one


class CancelReason(str, enum.Enum):
    CLIENT_GONE = "client_disconnected"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    SIBLING_FAILED = "sibling_failed"  # another choice of the same request failed


@dataclass(eq=False)
class Job:
    """One generation: a request, its place in its group, and what the worker measured."""

    request: GenerationRequest
    group: JobGroup
    index: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: CancelReason | None = None
    is_done: bool = False  # set by the worker thread before it posts the final event
    admitted_at: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)
    final: TokenEvent | None = None


class JobGroup:
    """The jobs of one HTTP request (n choices of each prompt), their events merged by arrival."""

    def __init__(self, queue: RequestQueue, requests: Sequence[GenerationRequest], timeout: float) -> None:
        self._queue = queue
        self._events: asyncio.Queue[tuple[int, TokenEvent | BaseException]] = asyncio.Queue()
        self.jobs = [Job(request, self, i) for i, request in enumerate(requests)]
        self.timeout = timeout

    def post(self, job: Job, item: TokenEvent | BaseException) -> None:
        self._events.put_nowait((job.index, item))

    def cancel(self, reason: CancelReason) -> None:
        for job in self.jobs:
            self._queue.cancel(job, reason)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Yield (choice index, event) until every job has finished. Raises APIError for a failed job,
        a job cancelled by the server, or the deadline; the other jobs are then cancelled."""
        deadline = self.jobs[0].admitted_at + self.timeout
        num_open = len(self.jobs)
        while num_open:
            try:
                index, item = await asyncio.wait_for(self._events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.cancel(CancelReason.TIMEOUT)
                raise errors.timed_out(self.timeout) from None
            if isinstance(item, BaseException):
                self.cancel(CancelReason.SIBLING_FAILED)
                if isinstance(item, ValueError):  # the engine refused the request itself: a one-line reason
                    raise errors.invalid_request(str(item)) from item
                raise errors.internal() from item
            if item.finish_reason == FinishReason.CANCELLED:
                reason = self.jobs[index].cancel_reason or CancelReason.SHUTDOWN
                self.cancel(reason)
                raise _cancelled_error(reason, self.timeout)
            if item.finish_reason is not None:
                num_open -= 1
            yield index, item


def _cancelled_error(reason: CancelReason, timeout: float) -> errors.APIError:
    if reason == CancelReason.TIMEOUT:
        return errors.timed_out(timeout)
    if reason == CancelReason.CLIENT_GONE:
        return errors.client_closed()
    return errors.unavailable("draining")


class RequestQueue:
    def __init__(self, max_waiting: int, metrics: Metrics) -> None:
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.is_draining = False
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._workers: list[asyncio.Task] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._is_closed = False

    @property
    def phase(self) -> str:
        if self.is_draining:
            return "draining"
        return "ready" if self._workers else "loading"

    def submit(self, requests: Sequence[GenerationRequest], timeout: float) -> JobGroup:
        """Admit all of `requests` or none; never blocks."""
        if self.phase != "ready":
            raise errors.unavailable(self.phase)
        capacity = self.max_waiting + len(self._workers)
        if len(self._waiting) + len(self._running) + len(requests) > capacity:
            raise errors.queue_full(RETRY_AFTER_S)
        group = JobGroup(self, requests, timeout)
        self._waiting.extend(group.jobs)
        self._changed()
        return group

    def cancel(self, job: Job, reason: CancelReason) -> None:
        if job.is_done or job.cancelled.is_set():
            return
        job.cancel_reason = reason
        job.cancelled.set()
        self.metrics.cancellations.labels(reason.value).inc()
        if job in self._waiting:  # never started: drop it now and tell its reader
            self._waiting.remove(job)
            job.is_done = True
            job.group.post(job, TokenEvent(None, "", finish_reason=FinishReason.CANCELLED))
            self._changed()

    def start(self, engines: Sequence[Engine]) -> None:
        self._workers = [asyncio.create_task(self._run_worker(e), name=f"worker-{i}") for i, e in enumerate(engines)]

    async def drain(self, timeout: float) -> None:
        """Stop admitting (503), let admitted requests finish for up to `timeout` s, cancel the rest."""
        self.is_draining = True
        log.info("draining: %d running, %d waiting", len(self._running), len(self._waiting))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        await self.stop()

    async def stop(self) -> None:
        """Cancel whatever is left, then let the workers exit."""
        self.is_draining = True
        for job in [*self._waiting, *self._running]:
            self.cancel(job, CancelReason.SHUTDOWN)
        self._is_closed = True
        self._wakeup.set()
        if self._workers:
            _, stuck = await asyncio.wait(self._workers, timeout=WORKER_STOP_GRACE_S)
            for task in stuck:
                log.error("%s did not stop within %.0f s of being cancelled", task.get_name(), WORKER_STOP_GRACE_S)
                task.cancel()

    async def _next(self) -> Job | None:
        while not self._waiting:
            if self._is_closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        job = self._waiting.popleft()
        self._running.add(job)
        self._changed()
        return job

    async def _run_worker(self, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        while (job := await self._next()) is not None:
            started_at = time.monotonic()
            self.metrics.queue_wait.observe(started_at - job.admitted_at)
            self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))
            try:
                await asyncio.to_thread(_generate_into, engine, job, loop, self.metrics)
            finally:
                self._running.discard(job)
                self._changed()
            self._record_finished(job, started_at)

    def _changed(self) -> None:
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(len(self._running))
        if self._waiting:
            self._wakeup.set()
        if self._waiting or self._running:
            self._idle.clear()
        else:
            self._idle.set()

    def _record_finished(self, job: Job, started_at: float) -> None:
        """Per-request figures; tokens, TTFT and inter-token gaps are recorded as each token comes (_record_token)."""
        m, times = self.metrics, job.token_times
        if job.final is not None and job.final.finish_reason is not None:
            m.finished.labels(job.final.finish_reason.value).inc()
        if not times:
            return
        m.e2e_latency.observe(times[-1] - job.admitted_at)
        if len(times) > 1 and times[-1] > times[0]:
            m.decode_rate.observe((len(times) - 1) / (times[-1] - times[0]))


def _record_token(job: Job, metrics: Metrics) -> None:
    """As each token comes, so that tokens/s and a stalled worker show on /metrics while requests run."""
    now = time.monotonic()
    metrics.generated_tokens.inc()
    if job.token_times:
        metrics.inter_token_latency.observe(now - job.token_times[-1])
    else:
        metrics.time_to_first_token.observe(now - job.admitted_at)
    job.token_times.append(now)


def _generate_into(engine: Engine, job: Job, loop: asyncio.AbstractEventLoop, metrics: Metrics) -> None:
    """Runs in a worker thread: the one place engine.generate is called. Never raises."""
    item: TokenEvent | BaseException
    try:
        for item in engine.generate(job.request, should_stop=job.cancelled.is_set):
            if item.token_id is not None:
                _record_token(job, metrics)
            if item.finish_reason is not None:
                job.final = item
                job.is_done = True
            loop.call_soon_threadsafe(job.group.post, job, item)
            if item.finish_reason is not None:
                return
        item = EngineError("the engine stopped without a finish reason")
    except Exception as e:  # worker boundary: report it to the request, keep the worker alive
        # A ValueError before the first token is the engine refusing the request (a 400 with its reason); after
        # one, generation itself failed, and its message is internal.
        item = EngineError(f"generation failed: {e!r}") if isinstance(e, ValueError) and job.token_times else e
    log.error("request %s failed: %s", job.request.request_id, item, exc_info=item)
    job.is_done = True
    with contextlib.suppress(RuntimeError):  # the loop is gone only when the process is exiting
        loop.call_soon_threadsafe(job.group.post, job, item)
