"""Prometheus metrics through one small interface. Each service exposes
``/metrics`` on its own port (loopback by default)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Runtime metrics every consumer loop reports, labelled by service and topic.
RECORDS = Counter("aios_records_total", "Records handled by the consumer loop",
                  ["service", "topic", "outcome"])
HANDLE_SECONDS = Histogram("aios_handle_seconds", "Time to handle one consumed batch",
                           ["service", "topic"],
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
DEAD_LETTERS = Counter("aios_dead_letters_total", "Records sent to the dead-letter topic",
                       ["service", "topic", "error_type"])
TRANSIENT_RETRIES = Counter("aios_transient_retries_total", "Handler retries after a transient error",
                            ["service", "topic"])
BACKPRESSURE_PAUSES = Counter("aios_backpressure_pauses_total",
                              "Partitions paused because the handler was at capacity (admission control)",
                              ["service", "topic"])
CONSUMER_LAG = Gauge("aios_consumer_lag", "Records behind the high watermark, per partition",
                     ["service", "topic", "partition"])
UP = Gauge("aios_service_up", "1 while the service is running", ["service"])


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
