"""Which trace a run's work belongs to: one trace per run, though the planner decides for many
runs in one consumer batch (whose span continues only the first record's trace). The run keeps
the context of what started it (``RunState.trace``); each piece of work on the run (its records,
its policy checks, its budget settlements) is parented by ``trace_parent``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from opentelemetry import trace

from services.common import tracing
from services.planner.domain.state import RunState

__all__ = ["root_trace", "trace_parent"]


class Traced(Protocol):
    """Something applied to a run that came with a record's headers (its W3C trace context)."""

    @property
    def headers(self) -> Mapping[str, str]: ...


def root_trace(item: Traced, run: RunState) -> None:
    """Give a run its trace once: the trace of what started it (an upstream event, an API call),
    or, when that carried none, a root span the planner starts for the run, so its steps, checks
    and records still meet in one trace."""
    if run.trace is not None:
        return
    if item.headers.get("traceparent"):
        run.trace = {"traceparent": item.headers["traceparent"]}
        return
    with tracing.span_from_headers(f"planner run {run.workflow}", {}, kind=trace.SpanKind.INTERNAL,
                                   **{"aios.run_id": run.run_id, "aios.tenant": run.tenant}):
        run.trace = {k: v for k, v in tracing.inject().items() if k == "traceparent"}


def trace_parent(item: Traced, run: RunState) -> Mapping[str, str]:
    """The record's own trace when it is the run's (a step result, a command on the run's trace);
    else the run's (a timer fired by the poller, a person's approval on their own trace)."""
    own, root = item.headers.get("traceparent", ""), (run.trace or {}).get("traceparent", "")
    if own and (not root or own.split("-")[1:2] == root.split("-")[1:2]):
        return item.headers
    return run.trace or item.headers
