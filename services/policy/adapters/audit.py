"""Every decision goes to the ``audit`` topic. Records are queued on the
producer (librdkafka batches and sends them in the background); a small thread
flushes every ~100 ms so delivery errors surface in logs and metrics quickly,
and the runtime's producer close flushes the rest on a graceful stop. No
Evaluate call waits for the broker."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from services.common.audit import audit_record
from services.common.errors import AiosError
from services.common.kafka import MeshProducer
from services.policy import metrics
from services.policy.domain.model import BudgetState, Decision, PolicyRequest

log = logging.getLogger(__name__)
# Masked inputs ride along for auditors; cap them so one huge input cannot
# push the record past the consumers' size limit.
_MAX_INPUTS_CHARS = 4000


class AuditPublisher:
    def __init__(self, producer: MeshProducer, *, flush_interval_s: float = 0.1) -> None:
        self._producer = producer
        self._interval = flush_interval_s
        self._pending = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AuditPublisher:
        self._thread = threading.Thread(target=self._run, name="policy-audit-flush", daemon=True)
        self._thread.start()
        return self

    def publish(self, key: str, record: dict[str, Any]) -> None:
        self._producer.send("audit", key=key, record=record)
        self._pending.set()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            if self._pending.is_set():
                self._pending.clear()
                self._flush(timeout_s=5.0)

    def _flush(self, timeout_s: float) -> None:
        try:
            self._producer.flush(timeout_s)
        except AiosError as exc:
            metrics.AUDIT_PUBLISH_ERRORS.inc()
            log.error("audit records not acknowledged by the broker: %s", exc)

    def stop(self) -> None:
        """Stop the flusher and flush what is still queued."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        self._flush(timeout_s=10.0)


def _budget_detail(state: BudgetState | None) -> dict[str, float] | None:
    if state is None:
        return None
    return {"limit": state.limit, "spent": state.spent, "reserved": state.reserved, "remaining": state.remaining}


def decision_record(req: PolicyRequest, decision: Decision) -> dict[str, Any]:
    """The AuditRecord for one Evaluate."""
    inputs = json.dumps(decision.masked_inputs, separators=(",", ":")) if decision.masked_inputs is not None else ""
    detail = {
        "action": req.action, "workflow": req.workflow, "tool": req.tool, "resource": req.resource,
        "amount": req.amount, "cost_estimate": req.cost_estimate, "approval_role": decision.approval_role,
        "model_tier": decision.model_tier, "reservation_id": decision.reservation_id,
        "reasons": list(decision.reasons), "budget": _budget_detail(decision.budget),
        "inputs": inputs[:_MAX_INPUTS_CHARS], "inputs_truncated": len(inputs) > _MAX_INPUTS_CHARS,
    }
    return audit_record("policy", req.tenant, "policy.evaluate", run_id=req.run_id, step_id=req.step_id,
                        decision=decision.effect, actor=req.principal, reason="; ".join(decision.reasons),
                        policy_id=decision.policy_id, cost=req.cost_estimate or 0.0, detail=detail)


def reconcile_record(tenant: str, reservation_id: str, actual_cost: float, applied: bool,
                     state: BudgetState, *, run_id: str = "", step_id: str = "") -> dict[str, Any]:
    """The AuditRecord for one ReconcileBudget (a duplicate is recorded too, as such)."""
    reason = (f"reservation {reservation_id} reconciled at {actual_cost:g}" if applied
              else f"reservation {reservation_id} was already reconciled")
    return audit_record("policy", tenant, "budget.reconcile", run_id=run_id, step_id=step_id,
                        decision="spent" if applied else "duplicate", reason=reason,
                        cost=actual_cost if applied else 0.0,
                        detail={"reservation_id": reservation_id, "budget": _budget_detail(state)})
