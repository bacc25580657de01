"""A small Prometheus registry written by hand (text exposition format 0.0.4, no dependency).

Counters and latency histograms per route (the route template, so ids do not explode the label
set), and histograms of the decode, embed and search stages.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            row = self._data.get(labels)
            if row is None:
                row = self._data[labels] = [0.0] * (len(self.buckets) + 2)
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def count(self, *labels: str) -> int:
        with self._lock:
            row = self._data.get(labels)
            return int(row[-1]) if row else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        lines = self.header()
        for key, row in items:
            for bound, n in zip(self.buckets, row):
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, ('le', _num(bound)))} {_num(n)}")
            lines.append(f"{self.name}_bucket{_labels(self.label_names, key, ('le', '+Inf'))} {_num(row[-1])}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(row[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(row[-1])}")
        return lines


class Gauge(_Metric):
    """A gauge whose value is read when the metrics are scraped."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._read = read

    def render(self) -> list[str]:
        try:
            items = list(self._read())
        except Exception:  # a scrape never fails because of one gauge
            items = []
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Value(_Metric):
    """A gauge holding one number that the code sets."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, initial: float = 0.0) -> None:
        super().__init__(name, help_text)
        self.value = initial

    def set(self, value: float) -> None:
        self.value = value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.value)}"]


# The methods a route may be counted under; any other goes in as "other", so that a client
# inventing methods cannot grow the label set (and the memory of /metrics) without bound.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The metrics of one app."""

    def __init__(self) -> None:
        self.requests = Counter("imgsearch_http_requests_total", "HTTP requests by route, method and status code.",
                                ("route", "method", "status"))
        self.latency = Histogram("imgsearch_http_request_duration_seconds", "HTTP request latency by route and method.",
                                 ("route", "method"))
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.decode = Histogram("imgsearch_decode_seconds", "Time to decode and prepare the images of one request.")
        self.embed = Histogram("imgsearch_embed_seconds", "Time to embed one batch of images with onnxruntime.")
        self.search = Histogram("imgsearch_search_seconds", "Time of one FAISS search call (a batch of queries).")
        self.batch_size = Histogram("imgsearch_search_batch_size", "Searches per micro-batch (POST /search with batching on).",
                                    buckets=BATCH_BUCKETS)
        self.batch_wait = Histogram("imgsearch_search_batch_wait_seconds",
                                    "Time the oldest search of a micro-batch waited before the batch started.")
        self.images_embedded = Counter("imgsearch_images_embedded_total", "Images embedded by the service.")
        self.reloads = Counter("imgsearch_reloads_total", "Bundle reloads by outcome.", ("outcome",))
        self.writes = Counter("imgsearch_writes_total", "Adds and deletes journalled, by operation.", ("op",))
        self.compactions = Counter("imgsearch_compactions_total", "Compactions of the journal into a new version, "
                                   "by outcome.", ("outcome",))
        self.integrity = Value("imgsearch_bundle_integrity_ok", "1 when the served version's files matched their "
                               "hashes, 0 when not, -1 before the background check has finished.", -1.0)
        self._gauges: list[Gauge] = []

    def add_gauge(self, gauge: Gauge) -> None:
        self._gauges.append(gauge)

    def track_in_flight(self, delta: int) -> None:
        with self._in_flight_lock:
            self.in_flight += delta

    def render(self) -> str:
        in_flight = Gauge("imgsearch_http_requests_in_flight", "HTTP requests being served.",
                          lambda: [((), self.in_flight)])
        parts = [self.requests, self.latency, in_flight, self.decode, self.embed, self.search, self.batch_size,
                 self.batch_wait,
                 self.images_embedded, self.reloads, self.writes, self.compactions, self.integrity, *self._gauges]
        lines: list[str] = []
        for metric in parts:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
