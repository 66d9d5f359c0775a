"""The connector circuit breaker on the real embedded Redis, as two executor
replicas see it: two ``CircuitBreaker`` objects (two Redis connections) for the
same connector share one failure window and one open state."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from infra.stack import Stack
from services.executor.adapters.connectors import CircuitBreaker, CircuitOpen
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def clients(infra: Stack) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """One Redis connection per 'replica'."""
    url = infra.env()["AIOS_REDIS_URL"]
    a = redis.Redis.from_url(url, decode_responses=True)
    b = redis.Redis.from_url(url, decode_responses=True)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def connector() -> str:
    return f"conn{uuid.uuid4().hex[:8]}"  # one Redis for the session: every test has its own connector


def _pair(clients: tuple[redis.Redis, redis.Redis], name: str, **kw: int) -> tuple[CircuitBreaker, CircuitBreaker]:
    conf = {"failure_threshold": 5, "window_s": 30, "open_s": 10, **kw}
    return CircuitBreaker(clients[0], name, **conf), CircuitBreaker(clients[1], name, **conf)


def test_failures_on_one_replica_open_the_circuit_for_the_other(clients, connector) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(clients, connector)
    for _ in range(4):
        a.before_call()
        a.record(False)
    b.before_call()  # 4 failures: still closed everywhere
    assert a.state() == b.state() == "closed"
    a.record(False)  # the 5th
    assert a.state() == b.state() == "open"
    with pytest.raises(CircuitOpen) as refused:
        b.before_call()
    assert refused.value.retryable and refused.value.kind == "CircuitOpen"
    assert connector in str(refused.value)
    assert clients[1].exists(f"aios:circuit:{connector}:open")
    assert 0 < clients[1].ttl(f"aios:circuit:{connector}:open") <= 10


def test_failures_from_both_replicas_count_in_one_window(clients, connector) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(clients, connector)
    for breaker in (a, b, a, b):
        breaker.record(False)
    assert a.state() == "closed"
    b.record(False)
    assert a.state() == "open" and b.state() == "open"


def test_a_success_on_either_replica_clears_the_count(clients, connector) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(clients, connector)
    for _ in range(4):
        a.record(False)
    b.record(True)
    for _ in range(4):
        a.record(False)
    assert a.state() == b.state() == "closed", "the count restarted after b's success"


def test_circuit_closes_for_both_after_the_open_period(clients, connector) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(clients, connector, open_s=1)
    for _ in range(5):
        a.record(False)
    with pytest.raises(CircuitOpen):
        b.before_call()
    wait_for(lambda: b.state() == "half-open", timeout_s=5, message="the open period (1 s) to end")
    a.before_call()  # the trial call
    a.record(True)
    assert b.state() == "closed"
    b.before_call()


def test_connectors_have_separate_circuits(clients, connector) -> None:  # type: ignore[no-untyped-def]
    a, _ = _pair(clients, connector)
    other = CircuitBreaker(clients[1], connector + "-other")
    for _ in range(5):
        a.record(False)
    assert a.state() == "open"
    other.before_call()
    assert other.state() == "closed"


def test_after_the_open_period_one_trial_call_decides(clients, connector) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(clients, connector, open_s=1)
    for _ in range(5):
        a.record(False)
    wait_for(lambda: not clients[0].exists(f"aios:circuit:{connector}:open"), timeout_s=5,
             message="the open period (1 s) to end")
    a.before_call()  # the trial call
    with pytest.raises(CircuitOpen):
        b.before_call()  # while the trial is in flight, the other replica still fails fast
    a.record(False)  # the trial failed
    with pytest.raises(CircuitOpen):
        b.before_call()  # so the circuit is open again at once
