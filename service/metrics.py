"""The service's Prometheus metrics, with prometheus_client.

Counters and latency histograms per route (the route template, so ids do not explode the label
set, and methods from a fixed set), histograms of the decode, embed and search stages, writes,
compactions and reloads, plus the standard process and platform collectors.

Several workers (`--workers N`): `python -m service` points PROMETHEUS_MULTIPROC_DIR at a fresh
folder before the workers start, so every worker writes its samples there and `/metrics` sums
them (prometheus_client's multiprocess mode): the same story whichever worker answers. Gauges
that describe the served bundle are read from the answering worker (they all serve one bundle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client import Counter as _PromCounter
from prometheus_client import Gauge as _PromGauge
from prometheus_client import Histogram as _PromHistogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.settings import MetricsEnvironment

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable, set by `python -m service`

# The methods a route may be counted under; any other goes in as "other", so that a client
# inventing methods cannot grow the label set (and the memory of /metrics) without bound.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

disable_created_metrics()  # the *_created series double every counter for no use here


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def multiprocess_mode() -> bool:
    """True when prometheus_client writes samples to files shared by the workers."""
    return bool(MetricsEnvironment().prometheus_multiproc_dir)


class Counter:
    """A counter with positional label values: `inc("GET", "200")`."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (), *, registry: CollectorRegistry) -> None:
        self._metric = _PromCounter(name.removesuffix("_total"), help_text, tuple(labels), registry=registry)
        self._labelled = bool(labels)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        (self._metric.labels(*labels) if self._labelled else self._metric).inc(amount)


class Histogram:
    """A histogram with positional label values: `observe(0.01, "/search", "POST")`."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._metric = _PromHistogram(name, help_text, tuple(labels), buckets=tuple(buckets), registry=registry)
        self._labelled = bool(labels)

    def observe(self, value: float, *labels: str) -> None:
        (self._metric.labels(*labels) if self._labelled else self._metric).observe(value)


class Value:
    """A gauge the code sets (in multiprocess mode: per `mode` across the live workers)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        initial: float = 0.0,
        *,
        registry: CollectorRegistry,
        mode: Literal["livesum", "livemin", "livemax", "liveall"] = "livemin",
    ) -> None:
        self._metric = _PromGauge(name, help_text, registry=registry, multiprocess_mode=mode)
        self._metric.set(initial)

    def set(self, value: float) -> None:
        self._metric.set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._metric.inc(amount)


class Gauge:
    """A gauge whose value is read when the metrics are scraped (from the answering worker)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: Sequence[str] = (),
    ) -> None:
        self.name, self.help, self.labels, self._read = name, help_text, tuple(labels), read

    def family(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        try:
            for values, value in self._read():
                family.add_metric(list(values), value)
        except Exception:  # a scrape never fails because of one gauge
            pass
        return family


class _ReadAtScrape(Collector):
    def __init__(self, gauges: list[Gauge]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for gauge in self._gauges:
            yield gauge.family()


class Metrics:
    """The metrics of one app (one registry; in multiprocess mode, the samples of every worker)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imgsearch_http_requests_total",
            "HTTP requests by route, method and status code.",
            ("route", "method", "status"),
            registry=r,
        )
        self.latency = Histogram(
            "imgsearch_http_request_duration_seconds",
            "HTTP request latency by route and method.",
            ("route", "method"),
            registry=r,
        )
        self.in_flight = Value(
            "imgsearch_http_requests_in_flight", "HTTP requests being served.", registry=r, mode="livesum"
        )
        self.decode = Histogram(
            "imgsearch_decode_seconds", "Time to decode and prepare the images of one request.", registry=r
        )
        self.embed = Histogram(
            "imgsearch_embed_seconds", "Time to embed one batch of images with onnxruntime.", registry=r
        )
        self.search = Histogram(
            "imgsearch_search_seconds", "Time of one FAISS search call (a batch of queries).", registry=r
        )
        self.batch_size = Histogram(
            "imgsearch_search_batch_size",
            "Searches per micro-batch (POST /search with batching on).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "imgsearch_search_batch_wait_seconds",
            "Time the oldest search of a micro-batch waited before the batch started.",
            registry=r,
        )
        self.images_embedded = Counter("imgsearch_images_embedded_total", "Images embedded by the service.", registry=r)
        self.reloads = Counter("imgsearch_reloads_total", "Bundle reloads by outcome.", ("outcome",), registry=r)
        self.writes = Counter(
            "imgsearch_writes_total", "Adds and deletes journalled, by operation.", ("op",), registry=r
        )
        self.compactions = Counter(
            "imgsearch_compactions_total",
            "Compactions of the journal into a new version, by outcome.",
            ("outcome",),
            registry=r,
        )
        self.integrity = Value(
            "imgsearch_bundle_integrity_ok",
            "1 when the served version's files matched their "
            "hashes, 0 when not, -1 before the background check has finished.",
            -1.0,
            registry=r,
        )
        self._gauges: list[Gauge] = []
        if not multiprocess_mode():  # with several workers these would describe only the answering one
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def add_gauge(self, gauge: Gauge) -> None:
        self._gauges.append(gauge)

    def track_in_flight(self, delta: int) -> None:
        self.in_flight.inc(delta)

    def render(self) -> bytes:
        """The Prometheus text exposition: this registry, or the sum over every worker's files."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry) + generate_latest(_registry_of(_ReadAtScrape(self._gauges)))


def _registry_of(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def worker_exited(pid: int) -> None:
    """Drop the live gauges of a worker that stopped (multiprocess mode only)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)
