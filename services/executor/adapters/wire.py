"""Wire conversion, all of it in this one module: StepRequest records become
``StepAttempt``; attempt results become StepResult and UsageRecord records.

Event ids are deterministic, so a record produced again (a replay, an outbox
produced twice after a crash) is recognised downstream as the same event:

  step result          sha256("<idempotency key>#<attempt>#result")[:32]
  late success         sha256("<idempotency key>#<attempt>#late")[:32]
  usage                the result's id [:24] + "usage"
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from services.executor.domain import AttemptResult, StepAttempt

__all__ = ["STEP_RESULTS", "USAGE", "attempt_from", "encode_output", "result_event_id", "step_result", "usage"]

STEP_RESULTS, USAGE = "step_results", "usage"


def attempt_from(value: dict[str, Any]) -> StepAttempt:
    """A StepRequest record as the attempt it orders. Undecodable inputs do not
    raise here: the attempt fails with InvalidArgument, so the planner hears back."""
    inputs: Any = None
    error = None
    try:
        inputs = json.loads(value.get("inputs_json") or "{}")
    except ValueError as exc:
        error = str(exc)
    step_id = str(value["step_id"])
    kind = value.get("kind") or ("compensation" if step_id.endswith(".compensate") else "action")
    return StepAttempt(tenant=str(value["tenant"]), run_id=str(value["run_id"]), step_id=step_id,
                       attempt=int(value["attempt"]), idempotency_key=str(value["idempotency_key"]),
                       tool=str(value["tool"]), inputs=inputs, latency_class=str(value.get("latency_class") or ""),
                       timeout_ms=int(value["timeout_ms"]), cost_estimate=float(value.get("cost_estimate") or 0.0),
                       kind=str(kind), inputs_error=error)


def encode_output(output: Any) -> str | None:
    """A tool output as it travels in ``output_json`` (the claim check measures this text)."""
    return json.dumps(output, default=str) if output is not None else None


def result_event_id(idempotency_key: str, attempt: int, *, late: bool = False) -> str:
    return hashlib.sha256(f"{idempotency_key}#{attempt}#{'late' if late else 'result'}".encode()).hexdigest()[:32]


def step_result(attempt: StepAttempt, result: AttemptResult, *, executor: str, replayed: bool,
                late: bool = False) -> dict[str, Any]:
    """The StepResult answering ``attempt`` (``result`` may be another attempt's
    success replayed for it). A late success: status "ok", the attempt it
    belongs to, ``late`` true and its own event id."""
    return {
        "event_id": result_event_id(attempt.idempotency_key, attempt.attempt, late=late),
        "tenant": attempt.tenant, "occurred_at": _now_ms(), "run_id": attempt.run_id, "step_id": attempt.step_id,
        "attempt": attempt.attempt, "idempotency_key": attempt.idempotency_key, "status": result.status,
        "output_json": encode_output(result.output),
        "error_type": result.error_type, "error_message": result.error_message,
        "retryable": bool(result.retryable), "duration_ms": float(result.duration_ms), "cost": float(result.cost),
        "executor": executor, "replayed": replayed, "kind": attempt.kind, "late": late}


def usage(attempt: StepAttempt, result: AttemptResult, *, late: bool = False) -> dict[str, Any]:
    """The UsageRecord of a fresh result whose call ran."""
    return {
        "event_id": result_event_id(attempt.idempotency_key, attempt.attempt, late=late)[:24] + "usage",
        "tenant": attempt.tenant, "occurred_at": _now_ms(), "run_id": attempt.run_id, "step_id": attempt.step_id,
        "tool": attempt.tool, "model": result.model, "units": 1.0, "cost": float(result.cost),
        "latency_class": attempt.latency_class, "duration_ms": float(result.duration_ms)}


def _now_ms() -> int:
    return int(time.time() * 1000)
