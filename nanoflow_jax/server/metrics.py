"""Prometheus metrics of the server (prometheus_client, a registry of its own).

The engine thread publishes a `Snapshot` after every iteration (queue lengths, KV pages, token
and preemption counters); a collector turns the latest one into gauges and counters at scrape
time, so a scrape never touches the engine. Throughput gauges are rates over the last
`RATE_WINDOW_S` seconds of those counters. Latency histograms (queue time, time to first token,
time per output token, end to end) are observed by the engine thread as requests progress.
Names follow vLLM's with the `nanoflow_` prefix for `vllm:`.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RATE_WINDOW_S = 10.0
_SAMPLE_EVERY_S = 0.25

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.4, 0.5, 0.75, 1.0, 2.5)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  20.0, 40.0, 80.0, 160.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    running: int = 0  # requests with a sequence admitted to the running batch
    waiting: int = 0  # requests queued (in the scheduler or not yet handed to it)
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    prompt_tokens: int = 0  # prefill tokens computed (recomputation after preemption included)
    generation_tokens: int = 0
    preemptions: int = 0  # sequences preempted (recompute) since start


class ServerMetrics:
    def __init__(self, model_name: str = ""):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram("nanoflow_time_to_first_token_seconds",
                              "Time from arrival to the first generated token",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("nanoflow_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              labels, buckets=_TPOT_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("nanoflow_request_queue_time_seconds",
                                    "Time from arrival to the step that first scheduled the "
                                    "request", labels, buckets=_QUEUE_BUCKETS,
                                    registry=self.registry)
        self.e2e = Histogram("nanoflow_e2e_request_latency_seconds",
                             "Time from arrival to the last token", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("nanoflow_requests_finished",
                                "Finished sequences (choices) by reason: stop, length, abort, "
                                "error", labels + ["finished_reason"], registry=self.registry)
        self.rejected = Counter("nanoflow_requests_rejected",
                                "Requests refused before queueing (queue_full, draining, "
                                "engine_dead)", labels + ["reason"], registry=self.registry)
        for reason in ("stop", "length", "abort", "error"):  # present from the first scrape
            self.finished.labels(model_name, reason)
        for reason in ("queue_full", "draining", "engine_dead"):
            self.rejected.labels(model_name, reason)
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._samples: collections.deque = collections.deque()  # (monotonic t, prompt, gen)
        self.registry.register(_SnapshotCollector(self))

    # ---- written by the engine thread --------------------------------------------------------

    def publish(self, snap: Snapshot) -> None:
        now = time.monotonic()
        with self._lock:
            self._snapshot = snap
            if not self._samples or now - self._samples[-1][0] >= _SAMPLE_EVERY_S:
                self._samples.append((now, snap.prompt_tokens, snap.generation_tokens))
            # Keep one sample older than the window: the base of the rate.
            while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW_S:
                self._samples.popleft()

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_finished(self, e2e_s: float, tpot_s: float | None, reasons: list[str]) -> None:
        self.e2e.labels(self.model_name).observe(max(e2e_s, 0.0))
        if tpot_s is not None:
            self.tpot.labels(self.model_name).observe(max(tpot_s, 0.0))
        for r in reasons:
            self.finished.labels(self.model_name, r).inc()

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    # ---- read at scrape time ----------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def rates(self) -> tuple[float, float]:
        """(prompt, generation) tokens/s over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            snap, samples = self._snapshot, list(self._samples)
        if not samples:
            return 0.0, 0.0
        base = samples[0]
        for s in samples:  # the newest sample at or before the window's start, else the oldest
            if s[0] <= now - RATE_WINDOW_S:
                base = s
        dt = now - base[0]
        if dt <= 0:
            return 0.0, 0.0
        return ((snap.prompt_tokens - base[1]) / dt, (snap.generation_tokens - base[2]) / dt)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        s = m.snapshot
        name = [m.model_name]

        def gauge(metric, doc, value):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric(name, value)
            return g

        def counter(metric, doc, value):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric(name, value)
            return c

        prompt_rate, gen_rate = m.rates()
        yield gauge("nanoflow_num_requests_running", "Requests in the running batch", s.running)
        yield gauge("nanoflow_num_requests_waiting", "Requests waiting to be admitted",
                    s.waiting)
        yield gauge("nanoflow_kv_pages_used", "KV cache pages in use", s.kv_pages_used)
        yield gauge("nanoflow_kv_pages_total", "KV cache pages", s.kv_pages_total)
        yield gauge("nanoflow_kv_cache_usage_ratio", "Fraction of KV pages in use",
                    s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0)
        yield counter("nanoflow_prompt_tokens", "Prefill tokens computed", s.prompt_tokens)
        yield counter("nanoflow_generation_tokens", "Tokens generated", s.generation_tokens)
        yield counter("nanoflow_num_preemptions", "Sequences preempted (KV pages freed, to be "
                      "recomputed)", s.preemptions)
        yield gauge("nanoflow_prompt_throughput_tokens_per_second",
                    f"Prefill tokens/s over the last {RATE_WINDOW_S:g} s", prompt_rate)
        yield gauge("nanoflow_generation_throughput_tokens_per_second",
                    f"Generated tokens/s over the last {RATE_WINDOW_S:g} s", gen_rate)
