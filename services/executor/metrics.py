"""The executor's metrics, through one small interface (the domain never sees them). Tool names
come from step requests, so they go through ``metrics.bounded`` (``other`` past the cap)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import bounded
from services.executor.domain import AttemptResult

__all__ = ["CIRCUIT_STATES", "claim_stored", "recorded", "replayed", "watch_circuits"]

STEP_SECONDS = Histogram("aios_executor_tool_duration_seconds", "Tool time per step attempt that started",
                         ["tool", "status"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STEPS = Counter("aios_executor_tool_calls_total", "Tool calls that started, by tool and status (ok, error)",
                ["tool", "status"])
REPLAYS = Counter("aios_executor_replays_total", "Step requests answered from the idempotency record", ["tool"])
OUTCOMES = Counter("aios_executor_attempt_outcomes_total", "Recorded attempt outcomes by kind: ok, error, "
                   "StepTimeout, not_started, superseded, late_success", ["tool", "outcome"])
CLAIMS = Counter("aios_executor_claims_total", "Tool outputs stored by reference (claim check)", ["tool"])
CLAIM_BYTES = Counter("aios_executor_claimed_bytes_total", "Bytes of tool outputs stored by reference", ["tool"])
CIRCUIT_STATES = ("closed", "half-open", "open")


def recorded(tool: str, result: AttemptResult, *, late: bool) -> None:
    """A fresh result was recorded (and is being published)."""
    tool = bounded("tool", tool)
    if late:
        outcome = "late_success"
    elif result.error_type == "AttemptSuperseded":
        outcome = "superseded"
    elif result.error_type == "StepTimeout" and not result.started:
        outcome = "not_started"
    else:
        outcome = "StepTimeout" if result.error_type == "StepTimeout" else result.status
    OUTCOMES.labels(tool, outcome).inc()
    if result.started:
        STEP_SECONDS.labels(tool, result.status).observe(result.duration_ms / 1000)
        STEPS.labels(tool, result.status).inc()


def replayed(tool: str) -> None:
    REPLAYS.labels(bounded("tool", tool)).inc()


def claim_stored(tool: str, size: int) -> None:
    tool = bounded("tool", tool)
    CLAIMS.labels(tool).inc()
    CLAIM_BYTES.labels(tool).inc(size)


class _Breaker(Protocol):
    def state(self) -> str: ...


_watched: dict[str, _Breaker] = {}


class _CircuitCollector(Collector):
    """``aios_circuit_breaker_state{connector, state}``: 1 for the state the shared (Redis) breaker
    is in, 0 for the others, read when Prometheus scrapes. Every executor replica reports the same
    state; alerts take ``max by (connector)``. A Redis error reports nothing rather than a guess."""

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("aios_circuit_breaker_state",
                                 "Connector circuit breaker state (1 = the current one of closed, half-open, open)",
                                 labels=["connector", "state"])

    def collect(self) -> Iterable[Any]:
        family = self._family()
        for name, breaker in sorted(_watched.items()):
            try:
                current = breaker.state()
            except Exception:  # Redis unreachable: no sample this scrape
                continue
            for state in CIRCUIT_STATES:
                family.add_metric([name, state], 1.0 if state == current else 0.0)
        yield family

    def describe(self) -> Iterable[Any]:
        return [self._family()]


REGISTRY.register(_CircuitCollector())


def watch_circuits(breakers: Mapping[str, _Breaker]) -> None:
    """Export the state of these connector circuit breakers (a later call replaces the set)."""
    global _watched
    _watched = dict(breakers)
