"""Audit queries: argument rules and filters, independent of the store."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from services.common.errors import InvalidArgument
from services.observability.domain.entries import AuditEntry, valid_tenant

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True)
class AuditFilter:
    tenant: str
    run_id: str = ""
    action: str = ""     # exact, or a glob such as "workflow.*"
    limit: int = DEFAULT_LIMIT
    actor: str = ""
    workflow: str = ""  # entries of runs of this workflow
    since_ms: float = -math.inf  # occurred at or after
    until_ms: float = math.inf   # occurred before

    @property
    def action_glob(self) -> bool:
        return any(c in self.action for c in "*?[")

    def action_matches(self, action: str) -> bool:
        if not self.action:
            return True
        return fnmatchcase(action, self.action) if self.action_glob else action == self.action

    def accepts(self, entry: AuditEntry) -> bool:
        if self.run_id and entry.run_id != self.run_id:
            return False
        if self.actor and entry.actor != self.actor:
            return False
        return self.since_ms <= entry.occurred_at_ms < self.until_ms and self.action_matches(entry.action)

    def scope(self) -> dict[str, Any]:
        """What a page token is bound to: the filters, not the page size."""
        return {"t": self.tenant, "r": self.run_id, "a": self.action, "u": self.actor, "w": self.workflow,
                "f": self.since_ms, "to": self.until_ms}


def check_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("tenant is required")
    if not valid_tenant(tenant):
        raise InvalidArgument(f"tenant {tenant!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
    return tenant


def build_filter(tenant: str, run_id: str = "", action: str = "", limit: int = 0, *, actor: str = "",
                 workflow: str = "", since_ms: float = 0, until_ms: float = 0) -> AuditFilter:
    """Validate a Query; limit 0 means the default, larger than the maximum is capped; times of 0
    are unset."""
    check_tenant(tenant)
    if limit < 0:
        raise InvalidArgument(f"limit must be >= 0, got {limit}")
    for name, value in (("since_ms", since_ms), ("until_ms", until_ms)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{name} must be epoch milliseconds >= 0, got {value}")
    if since_ms and until_ms and since_ms >= until_ms:
        raise InvalidArgument(f"since_ms ({since_ms}) must be before until_ms ({until_ms})")
    return AuditFilter(tenant=tenant, run_id=run_id, action=action, limit=min(limit or DEFAULT_LIMIT, MAX_LIMIT),
                       actor=actor, workflow=workflow, since_ms=since_ms or -math.inf, until_ms=until_ms or math.inf)


def check_timeline(tenant: str, run_id: str) -> None:
    check_tenant(tenant)
    if not run_id:
        raise InvalidArgument("run_id is required for a timeline")
