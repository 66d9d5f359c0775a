"""Audit queries: argument rules and filters, independent of the store."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

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

    def accepts(self, entry: AuditEntry) -> bool:
        if self.run_id and entry.run_id != self.run_id:
            return False
        if not self.action:
            return True
        if any(c in self.action for c in "*?["):
            return fnmatchcase(entry.action, self.action)
        return entry.action == self.action


def check_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("tenant is required")
    if not valid_tenant(tenant):
        raise InvalidArgument(f"tenant {tenant!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
    return tenant


def build_filter(tenant: str, run_id: str = "", action: str = "", limit: int = 0) -> AuditFilter:
    """Validate a Query; limit 0 means the default, larger than the maximum is capped."""
    check_tenant(tenant)
    if limit < 0:
        raise InvalidArgument(f"limit must be >= 0, got {limit}")
    return AuditFilter(tenant=tenant, run_id=run_id, action=action, limit=min(limit or DEFAULT_LIMIT, MAX_LIMIT))


def check_timeline(tenant: str, run_id: str) -> None:
    check_tenant(tenant)
    if not run_id:
        raise InvalidArgument("run_id is required for a timeline")
