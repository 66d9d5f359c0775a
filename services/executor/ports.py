"""The executor's ports. Each has a Redis (or Kafka) adapter and an in-memory
twin that pass the same contract tests (tests/integration/test_executor_store.py),
so handlers get millisecond unit tests. The idempotency record itself goes
through the shared unit of work (``services.common.uow.UnitOfWork``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from services.common.kafka import OutRecord
from services.executor.domain import LeaseGrant

__all__ = ["ClaimStore", "Lease", "LeaseStore", "RecordProducer"]


@dataclass(frozen=True)
class Lease:
    """One holder's lease on a step: attempt ``attempt`` runs its tool call."""

    tenant: str
    idempotency_key: str
    attempt: int
    token: str  # unique per acquisition: only its holder renews or releases it


class LeaseStore(Protocol):
    """Who may run a step's tool call now (one call per idempotency key at a time)."""

    def acquire(self, lease: Lease, ttl_ms: int, retention_s: int) -> LeaseGrant:
        """Take the lease for ``lease.attempt`` unless a newer attempt took it
        before (``superseded``) or another holder's call still runs (``busy``).
        A grant raises the step's fence to this attempt, kept for ``retention_s``."""
        ...

    def renew(self, lease: Lease, ttl_ms: int) -> bool:
        """Extend our lease; False if it is no longer ours (it expired)."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the lease up, if it is still ours."""
        ...


class ClaimStore(Protocol):
    """Outputs stored by reference, addressed by content hash."""

    def put(self, tenant: str, sha256: str, data: bytes, ttl_s: int) -> str:
        """Store ``data``; return its key."""
        ...

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or None once expired."""
        ...


class RecordProducer(Protocol):
    """Kafka records: encoded first (they go into the outbox), sent after the commit."""

    def encode(self, role: str, key: str, record: dict[str, Any]) -> OutRecord: ...

    def send_record(self, record: OutRecord) -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...

    def thread_errors(self) -> list[Any]: ...

    def use_errors(self, bucket: list[Any] | None) -> None: ...
