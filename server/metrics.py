"""Metrics: every Prometheus series the server exports, defined once, in a registry of its own per app.

Names follow `hymba_<what>_<unit>`; histograms mirror vLLM's so its dashboards translate directly.
Requests are recorded at three points: admitted (queue wait), first token, finished.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1200, 2000, 5000)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "hymba_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("hymba_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("hymba_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "hymba_time_to_first_token_seconds",
            "From admission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "hymba_inter_token_latency_seconds", "Gap between consecutive tokens", buckets=TOKEN_GAP_BUCKETS, registry=r
        )
        self.e2e_latency = Histogram(
            "hymba_e2e_request_latency_seconds", "From admission to the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "hymba_queue_wait_seconds", "From admission to a worker starting it", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_rate = Histogram(
            "hymba_request_decode_tokens_per_second",
            "Per request: tokens after the first divided by the time after the first token",
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.running = Gauge("hymba_requests_running", "Requests a worker is generating", registry=r)
        self.waiting = Gauge("hymba_requests_waiting", "Admitted requests waiting for a worker", registry=r)
        self.finished = Counter(
            "hymba_requests_finished", "Generations finished, by finish reason", ["finish_reason"], registry=r
        )
        self.errors = Counter("hymba_errors", "Error responses and events, by error type", ["type"], registry=r)
        self.cancellations = Counter(
            "hymba_cancellations", "Generations cancelled before their end, by reason", ["reason"], registry=r
        )
        self.state_bytes = Gauge(
            "hymba_decode_state_bytes", "Bytes of one request's decode state, per worker", ["device"], registry=r
        )
        self.load_seconds = Gauge("hymba_model_load_seconds", "Seconds taken to load the model", registry=r)
        self.info = Info("hymba_model", "Served model and server version", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
