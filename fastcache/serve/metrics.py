"""The server's Prometheus metrics, in a registry of its own (prometheus-client does the format).

Updated from the request handlers (requests, latency) and the worker thread (queue, batches,
steps, compilations); prometheus-client's instruments are thread-safe.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

PREFIX = "fastcache_serve"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
RESPONSE_STATUSES = (200, 400, 401, 404, 408, 413, 429, 499, 500, 503, 504)  # what the image endpoint answers


class ServeMetrics:
    """Every metric of one server (one engine). `render()` is the /metrics body."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series beside every counter and histogram (process-wide)
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
        self.info = Info(f"{PREFIX}_build", "model, accelerator and settings of this server", registry=registry)
        self.requests = Counter(f"{PREFIX}_requests", "image requests answered, by HTTP status",
                                ["status"], registry=registry)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds",
                                 "seconds from arrival to response of successful image requests",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "requests waiting for a pipeline call", registry=registry)
        self.running = Gauge(f"{PREFIX}_running_requests", "requests in the pipeline call under way", registry=registry)
        self.batch_images = Histogram(f"{PREFIX}_batch_images", "images requested per pipeline call (before padding)",
                                      buckets=BATCH_BUCKETS, registry=registry)
        self.batch_requests = Histogram(f"{PREFIX}_batch_requests", "requests per pipeline call",
                                        buckets=BATCH_BUCKETS, registry=registry)
        self.calls = Counter(f"{PREFIX}_pipeline_calls", "pipeline calls, by the warmed batch size they ran at",
                             ["batch_size"], registry=registry)
        self.padding = Counter(f"{PREFIX}_padding_images",
                               "images computed only to reach a warmed batch size", registry=registry)
        self.call_seconds = Histogram(f"{PREFIX}_pipeline_call_seconds", "seconds per pipeline call",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.failed_calls = Counter(f"{PREFIX}_pipeline_failures", "pipeline calls that raised", registry=registry)
        self.dropped = Counter(f"{PREFIX}_dropped_requests",
                               "requests dropped before their pipeline call started, by reason",
                               ["reason"], registry=registry)
        self.discarded = Counter(f"{PREFIX}_discarded_results",
                                 "requests whose call ran but whose client had gone (timeout, disconnect)",
                                 registry=registry)
        self.interrupted = Counter(f"{PREFIX}_interrupted_calls",
                                   "pipeline calls stopped early: no request wanted them any more, or "
                                   "the server was stopped (a second SIGTERM)",
                                   registry=registry)
        self.unet_steps = Counter(f"{PREFIX}_unet_steps",
                                  "U-Net evaluations since warm-up: refresh (full U-Net) or cached (shallow "
                                  "branch); fastcache only", ["kind"], registry=registry)
        self.compilations = Gauge(f"{PREFIX}_compilations_since_warmup",
                                  "graphs compiled after warm-up (must stay 0)", registry=registry)
        self.ready = Gauge(f"{PREFIX}_ready", "1 once every declared shape is warmed, 0 before and while draining",
                           registry=registry)
        self.warmed_shapes = Gauge(f"{PREFIX}_warmed_shapes", "(size, batch size) shapes warmed so far",
                                   registry=registry)
        self.warmup_seconds = Gauge(f"{PREFIX}_warmup_seconds", "seconds from load to ready", registry=registry)
        self.compile_cache_loaded = Gauge(f"{PREFIX}_compile_cache_loaded",
                                          "1 when --compile-cache was loaded before warm-up", registry=registry)
        self.compile_cache_saved = Gauge(f"{PREFIX}_compile_cache_saved",
                                         "1 when --compile-cache was written after warm-up", registry=registry)
        for kind in ("refresh", "cached"):
            self.unet_steps.labels(kind)
        for reason in ("timeout", "disconnected", "cancelled", "shutdown"):
            self.dropped.labels(reason)
        for status in RESPONSE_STATUSES:  # every series exists from the start, so rate() sees its first event
            self.requests.labels(str(status))

    def watch_compilations(self, since_warmup: Callable[[], int]) -> None:
        """Read the count at every scrape, so the gauge cannot lag a compilation."""
        self.compilations.set_function(lambda: float(since_warmup()))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
