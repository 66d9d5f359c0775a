"""The executor's Redis key layout, in one place.

Every key of one step lives in the tenant's hash tag, so the unit of work's
commit and the lease script each touch one Redis Cluster slot:

  aios:{t}:step:<key>         hash (unit of work): state = the step's idempotency record
                              (every attempt's result, late successes), ver, outbox
  aios:{t}:step:<key>:lease   string "<attempt>:<token>": the attempt whose tool call runs now;
                              a short TTL (AIOS_EXECUTOR_LEASE_TTL_S), renewed while the call runs
  aios:{t}:step:<key>:fence   string: the newest attempt that ever took the lease; an older
                              attempt never starts
  aios:{t}:claim:<sha256>     string: a tool output stored by reference (claim check)
  aios:circuit:<connector>:*  the connectors' circuit breakers (shared by every tenant)

(The executor before the unit of work kept string records under ``aios:{t}:idem:``; the new
records use their own prefix so an upgrade never reads an old string as a hash. Old records
expire on their own.)

Records, fences and claims expire after the retention setting
(AIOS_EXECUTOR_RECORD_TTL_S, 7 days by default).
"""

from __future__ import annotations

__all__ = ["claim", "fence", "lease", "record"]


def record(tenant: str, idempotency_key: str) -> str:
    return f"aios:{{{tenant}}}:step:{idempotency_key}"


def lease(tenant: str, idempotency_key: str) -> str:
    return record(tenant, idempotency_key) + ":lease"


def fence(tenant: str, idempotency_key: str) -> str:
    return record(tenant, idempotency_key) + ":fence"


def claim(tenant: str, sha256: str) -> str:
    return f"aios:{{{tenant}}}:claim:{sha256}"
