"""Prometheus metrics through one small interface. Each service exposes
``/metrics`` on its own port (loopback by default).

Naming follows Prometheus conventions, and ``tests/monitoring/test_metric_names.py``
checks every series the mesh registers: an ``aios_`` prefix, the unit as a
plural suffix (``_seconds``, ``_bytes``, ``_records``, ``_currency_units``),
``_total`` on counters and only on counters, histograms for latencies, and label
values from bounded sets. Where a label's values come from callers (tenant,
workflow, model, error class), ``bounded`` caps how many distinct values one
process reports and folds the rest into ``other``, so a misbehaving caller
cannot blow up the time-series database."""

from __future__ import annotations

import re
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = ["ADMISSION_QUEUE", "BACKPRESSURE_PAUSES", "CONSUMER_LAG", "DEAD_LETTERS", "GRPC_HANDLED", "GRPC_SECONDS",
           "HANDLE_SECONDS", "OTHER", "PAUSED_PARTITIONS", "RECORDS", "TRANSIENT_RETRIES", "UP", "bounded",
           "clear_consumer_lag", "report_paused", "start_metrics_server", "transient_retry"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Runtime metrics every consumer loop reports, labelled by service and topic. Each
# service consumes in one group named after it (``<prefix><service>``), so the
# ``service`` label names the consumer group too.
RECORDS = Counter("aios_records_total", "Records handled by the consumer loop, by outcome (ok, dead_letter)",
                  ["service", "topic", "outcome"])
HANDLE_SECONDS = Histogram("aios_consumer_batch_duration_seconds", "Time to handle one consumed batch",
                           ["service", "topic"], buckets=LATENCY_BUCKETS)
DEAD_LETTERS = Counter("aios_dead_letters_total", "Records sent to the dead-letter topic",
                       ["service", "topic", "error_type"])
TRANSIENT_RETRIES = Counter("aios_transient_retries_total", "Handler retries after a transient error, by its class",
                            ["service", "topic", "error_type"])
BACKPRESSURE_PAUSES = Counter("aios_backpressure_pauses_total",
                              "Partitions paused because the handler was at capacity (admission control)",
                              ["service", "topic"])
CONSUMER_LAG = Gauge("aios_consumer_lag_records",
                     "Records behind the high watermark, per assigned partition of the service's consumer group",
                     ["service", "topic", "partition"])
PAUSED_PARTITIONS = Gauge("aios_consumer_paused_partitions",
                          "Assigned partitions paused: waiting for capacity (backpressure) or to retry a record (retry)",
                          ["service", "reason"])
ADMISSION_QUEUE = Gauge("aios_admission_queue_records",
                        "Records held back in partitions paused for capacity (admission control): the admission queue",
                        ["service"])
UP = Gauge("aios_service_up", "1 while the service is running", ["service"])

# The gRPC edge (services.common.grpc_server): rate, errors and latency per method.
GRPC_HANDLED = Counter("aios_grpc_server_handled_total", "gRPC calls answered, by method and status code",
                       ["grpc_service", "grpc_method", "grpc_code"])
GRPC_SECONDS = Histogram("aios_grpc_server_handling_seconds", "Time to answer one gRPC call",
                         ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS)

OTHER = "other"
MAX_LABEL_VALUES = 200  # distinct caller-chosen values one process reports per label kind
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
_seen: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def bounded(kind: str, value: str, *, limit: int = MAX_LABEL_VALUES) -> str:
    """``value`` as a label value of ``kind`` (tenant, workflow, model, ...): itself while fewer than
    ``limit`` distinct values of that kind were seen by this process, ``other`` after that; ``unknown``
    when empty, ``other`` when it is not a plain identifier (free text never becomes a label)."""
    if not value:
        return "unknown"
    if not _LABEL_VALUE.match(value):
        return OTHER
    with _seen_lock:
        seen = _seen.setdefault(kind, set())
        if value in seen:
            return value
        if len(seen) >= limit:
            return OTHER
        seen.add(value)
        return value


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on ``host`` (AIOS_METRICS_HOST); port 0 disables it (tests that run several
    services in one process)."""
    if port:
        start_http_server(port, addr=host)


def clear_consumer_lag(service: str, topic: str, partition: int) -> None:
    """Drop the lag series of a partition this process no longer owns."""
    try:
        CONSUMER_LAG.remove(service, topic, str(partition))
    except KeyError:  # never reported (revoked before the first report); older clients raise
        pass


def transient_retry(service: str, topic: str, exc: BaseException) -> None:
    """A handler failed transiently and its record will be retried."""
    TRANSIENT_RETRIES.labels(service, topic, bounded("error_type", type(exc).__name__)).inc()


def report_paused(service: str, backpressure: int, retry: int, queued: int) -> None:
    """Paused partitions by reason and the records held back by admission control."""
    PAUSED_PARTITIONS.labels(service, "backpressure").set(backpressure)
    PAUSED_PARTITIONS.labels(service, "retry").set(retry)
    ADMISSION_QUEUE.labels(service).set(queued)
