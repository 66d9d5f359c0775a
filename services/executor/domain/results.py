"""Result classification: how a tool call's return or exception becomes an attempt's result."""

from __future__ import annotations

from typing import Any

from services.common.errors import AiosError, is_retryable
from services.executor.domain.model import AttemptResult, StepAttempt

__all__ = ["failed", "not_started", "succeeded", "superseded", "timed_out"]

MAX_MESSAGE = 2000


def succeeded(attempt: int, output: Any, *, duration_ms: float, cost: float, model: str | None) -> AttemptResult:
    """The tool returned."""
    return AttemptResult(attempt, "ok", output=output, duration_ms=duration_ms, cost=cost, model=model)


def failed(attempt: int, exc: BaseException, *, duration_ms: float) -> AttemptResult:
    """The tool raised: the error's kind, message and whether a retry can help.
    Errors we did not classify are retryable unless they are about the input
    (``services.common.errors.is_retryable``)."""
    kind = exc.kind if isinstance(exc, AiosError) else type(exc).__name__
    return AttemptResult(attempt, "error", error_type=kind, error_message=str(exc)[:MAX_MESSAGE],
                         retryable=is_retryable(exc), duration_ms=duration_ms)


def timed_out(attempt: StepAttempt, *, duration_ms: float) -> AttemptResult:
    """The call started but did not return within its start-to-close bound. It
    may still finish: its late success is recorded and published then."""
    return AttemptResult(attempt.attempt, "error", error_type="StepTimeout",
                         error_message=f"{attempt.tool} did not finish within {attempt.timeout_ms} ms of starting",
                         retryable=True, duration_ms=duration_ms)


def not_started(attempt: StepAttempt) -> AttemptResult:
    """The call waited for a free tool worker past its attempt's deadline: it never starts."""
    return AttemptResult(attempt.attempt, "error", error_type="StepTimeout",
                         error_message=f"{attempt.tool} did not start within {attempt.timeout_ms} ms: no free tool "
                         "worker on this executor; the call was not made", retryable=True, started=False)


def superseded(attempt: StepAttempt, newer: int) -> AttemptResult:
    """A newer attempt of the step started first: this one never starts."""
    return AttemptResult(attempt.attempt, "error", error_type="AttemptSuperseded",
                         error_message=f"attempt {attempt.attempt} of {attempt.idempotency_key} was not started: "
                         f"attempt {newer} started first", retryable=False, started=False)
