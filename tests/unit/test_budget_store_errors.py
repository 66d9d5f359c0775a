"""The budget store classifies Redis errors with ``errors.redis_error``: down, out of memory,
read-only or loading is transient (Evaluate answers UNAVAILABLE and the caller retries), a reply
no retry can change (WRONGTYPE on a budget key) is permanent. A stand-in client fails every call."""

from __future__ import annotations

import pytest

from services.policy.adapters.budget_store import RedisBudgetStore
from services.policy.domain.model import BudgetSpec
from tests.unit.test_memory_store_errors import REDIS_FAILURES, FailingRedis

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("error", "kind"), REDIS_FAILURES, ids=lambda v: type(v).__name__)
def test_budget_store_classifies_redis_errors(error: Exception, kind: type[Exception]) -> None:
    store = RedisBudgetStore(FailingRedis(error))  # type: ignore[arg-type]
    spec = BudgetSpec(limit=10.0, window="day", policy_ref="test")
    calls = [
        lambda: store.reserve("t1", spec, "res-1", 1.0, now_ms=0),
        lambda: store.reconcile("t1", spec, "res-1", 1.0, now_ms=0),
        lambda: store.read("t1", spec, now_ms=0),
    ]
    for call in calls:
        with pytest.raises(kind) as raised:
            call()
        assert raised.value.__cause__ is error
