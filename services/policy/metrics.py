"""Policy metrics for Prometheus (scraped from AIOS_POLICY_METRICS_PORT). Tenant and action come
from the request, so both go through ``metrics.bounded``: a caller inventing tenants or actions
gets ``other``, not a new series each."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import bounded

DECISIONS = Counter("aios_policy_decisions_total", "Policy decisions, by tenant, action and effect",
                    ["tenant", "action", "effect"])
EVALUATE_SECONDS = Histogram("aios_policy_evaluate_duration_seconds",
                             "Time to evaluate one request, budget included", ["action"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                  0.05, 0.1, 0.5))
BUDGET_REMAINING = Gauge("aios_budget_remaining_currency_units",
                         "Budget left in the current window, as policy last saw it", ["tenant"])
BUDGET_RESERVED = Gauge("aios_budget_reserved_currency_units",
                        "Budget held by open reservations in the current window, as policy last saw it", ["tenant"])
BUDGET_HOLDS_EXPIRED = Counter("aios_budget_holds_expired",
                               "Budget holds released because nobody settled them within "
                               "AIOS_POLICY_RESERVATION_TTL_S (a run that never settles its steps)", ["tenant"])
BUDGET_LIMIT = Gauge("aios_budget_limit_currency_units", "Budget limit per window", ["tenant"])
BUDGET_DENIALS = Counter("aios_policy_budget_denials_total", "Requests denied because the budget was exhausted",
                         ["tenant"])
AUDIT_PUBLISH_ERRORS = Counter("aios_policy_audit_publish_errors_total",
                               "Flushes of audit records the broker did not acknowledge")


def decided(tenant: str, action: str, effect: str, *, budget_exhausted: bool, seconds: float) -> None:
    """One evaluated request."""
    tenant, action = bounded("tenant", tenant), bounded("action", action)
    DECISIONS.labels(tenant, action, effect).inc()
    if budget_exhausted:
        BUDGET_DENIALS.labels(tenant).inc()
    EVALUATE_SECONDS.labels(action).observe(seconds)


def budget_seen(tenant: str, remaining: float, limit: float, *, reserved: float = 0.0) -> None:
    """A tenant's budget as a decision or a reconciliation left it."""
    tenant = bounded("tenant", tenant)
    BUDGET_REMAINING.labels(tenant).set(remaining)
    BUDGET_LIMIT.labels(tenant).set(limit)
    BUDGET_RESERVED.labels(tenant).set(reserved)


def holds_expired(tenant: str, holds: int) -> None:
    """The budget store reclaimed holds nobody settled in time."""
    BUDGET_HOLDS_EXPIRED.labels(bounded("tenant", tenant)).inc(holds)
