"""The audit record, built in one place for every service: who did or decided
what, to which run and step, why, under which policy and model, at what cost.
Services pass what they know; the shape (and ``schemas/AuditRecord.avsc``)
lives here only, so no service drifts."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["audit_record"]


def audit_record(service: str, tenant: str, action: str, *, run_id: str | None = None, step_id: str | None = None,
                 decision: str | None = None, actor: str | None = None, reason: str | None = None,
                 policy_id: str | None = None, model_version: str | None = None, cost: float | None = None,
                 detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """An AuditRecord (envelope fields are filled by the producer's one ``encode``)."""
    return {"tenant": tenant, "service": service, "run_id": run_id or None, "step_id": step_id or None,
            "action": action, "decision": decision, "actor": actor or None, "reason": reason, "policy_id": policy_id,
            "model_version": model_version, "cost": cost,
            "detail_json": json.dumps(detail or {}, default=str, separators=(",", ":"))}
