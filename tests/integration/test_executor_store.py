"""The executor's stores against real Redis and their in-memory twins: the
lease contract (attempt fencing) and the claim contract run against both, so
the twins may stand in for Redis in the handler's unit tests. Then retention
and claims through the real adapters, and Redis failures as transient errors."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.errors import NotFound, PermanentError, TransientError
from services.common.kafka import OutRecord
from services.common.uow import RedisUnitOfWork
from services.executor.adapters import keys
from services.executor.adapters.claims import MemoryClaimStore, RedisClaimStore, read_claim
from services.executor.adapters.connectors import CircuitBreaker
from services.executor.adapters.leases import LeaseKeeper, MemoryLeaseStore, RedisLeaseStore
from services.executor.adapters.runner import ToolRunner
from services.executor.adapters.toolbox import Toolbox
from services.executor.handlers import ExecutorConfig, StepHandler
from services.executor.main import ExecutorSettings
from services.executor.ports import ClaimStore, Lease, LeaseStore
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
RETENTION_S = 600


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    leases: LeaseStore
    claims: ClaimStore
    expire: Callable[[Callable[[], bool]], None]  # let TTLs run out until the predicate holds


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest, client: redis.Redis) -> Backend:
    if request.param == "memory":
        clock = Clock()

        def advance(done: Callable[[], bool]) -> None:
            clock.now += 3600
            assert done()
        return Backend(MemoryLeaseStore(clock), MemoryClaimStore(clock), advance)

    def wait(done: Callable[[], bool]) -> None:
        wait_for(done, timeout_s=10, message="the TTL to run out")
    return Backend(RedisLeaseStore(client), RedisClaimStore(client), wait)


def lease(key: str, attempt: int, token: str = "") -> Lease:
    return Lease("t1", key, attempt, token or uuid.uuid4().hex)


@pytest.fixture
def key() -> str:
    return f"run-{uuid.uuid4().hex[:8]}:step"


# -- the lease contract ------------------------------------------------------------------------------------------
def test_one_holder_at_a_time(backend: Backend, key: str) -> None:
    mine, other = lease(key, 1), lease(key, 1)
    assert backend.leases.acquire(mine, 60_000, RETENTION_S).status == "granted"
    assert backend.leases.acquire(mine, 60_000, RETENTION_S).status == "granted"  # our own: refreshed
    busy = backend.leases.acquire(other, 60_000, RETENTION_S)
    assert (busy.status, busy.holder) == ("busy", 1)
    backend.leases.release(other)  # not the holder: nothing happens
    assert backend.leases.acquire(other, 60_000, RETENTION_S).status == "busy"
    backend.leases.release(mine)
    assert backend.leases.acquire(other, 60_000, RETENTION_S).status == "granted"


def test_a_newer_attempt_waits_for_an_older_call(backend: Backend, key: str) -> None:
    old = lease(key, 1)
    backend.leases.acquire(old, 60_000, RETENTION_S)
    grant = backend.leases.acquire(lease(key, 2), 60_000, RETENTION_S)
    assert (grant.status, grant.holder) == ("busy", 1)
    backend.leases.release(old)
    assert backend.leases.acquire(lease(key, 2), 60_000, RETENTION_S).status == "granted"


def test_an_older_attempt_is_fenced_out_even_after_the_newer_lease_is_gone(backend: Backend, key: str) -> None:
    newer = lease(key, 3)
    backend.leases.acquire(newer, 60_000, RETENTION_S)
    assert backend.leases.acquire(lease(key, 2), 60_000, RETENTION_S).status == "superseded"
    backend.leases.release(newer)
    grant = backend.leases.acquire(lease(key, 2), 60_000, RETENTION_S)
    assert (grant.status, grant.holder) == ("superseded", 3)
    assert backend.leases.acquire(lease(key, 3), 60_000, RETENTION_S).status == "granted"  # a redelivery of 3


def test_renew_only_by_the_holder_and_a_crashed_holder_expires(backend: Backend, key: str) -> None:
    holder = lease(key, 1)
    backend.leases.acquire(holder, 300, RETENTION_S)
    assert backend.leases.renew(holder, 300)
    assert not backend.leases.renew(lease(key, 1), 300)
    successor = lease(key, 2)
    backend.expire(lambda: backend.leases.acquire(successor, 60_000, RETENTION_S).status == "granted")
    assert not backend.leases.renew(holder, 300), "an expired lease is gone for good"


def test_the_fence_expires_with_the_retention(backend: Backend, key: str) -> None:
    newer = lease(key, 5)
    backend.leases.acquire(newer, 60_000, 1)
    backend.leases.release(newer)
    backend.expire(lambda: backend.leases.acquire(lease(key, 1), 60_000, 1).status == "granted")


# -- the claim contract ------------------------------------------------------------------------------------------
def test_claims_by_content_hash_expire(backend: Backend) -> None:
    data = json.dumps({"rows": list(range(100))}).encode()
    sha = hashlib.sha256(data).hexdigest()
    key = backend.claims.put("t1", sha, data, 1)
    assert key == f"aios:{{t1}}:claim:{sha}"
    assert backend.claims.get(key) == data
    assert backend.claims.put("t1", sha, data, 1) == key  # the same output is stored once
    backend.expire(lambda: backend.claims.get(key) is None)


# -- the real adapters together ----------------------------------------------------------------------------------
class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[OutRecord] = []

    def encode(self, role: str, key: str, record: dict[str, Any]) -> OutRecord:
        return OutRecord(role, key, json.dumps(record).encode(), {}, record["event_id"])

    def send_record(self, record: OutRecord) -> None:
        self.sent.append(record)

    def flush(self, timeout_s: float = 30.0) -> None:
        pass


def test_retention_and_claims_on_real_redis(client: redis.Redis) -> None:
    settings = ExecutorSettings(executor_record_ttl_s=RETENTION_S, executor_claim_threshold_bytes=1024)
    toolbox = Toolbox({"big": lambda inputs, call: {"blob": "z" * 5000}})
    producer = RecordingProducer()
    leases = RedisLeaseStore(client)
    handler = StepHandler(
        uow=RedisUnitOfWork(client), leases=leases, claims=RedisClaimStore(client), producer=producer,
        runner=ToolRunner(toolbox, workers=2), keeper=LeaseKeeper(leases, 10_000),
        config=ExecutorConfig(name="ex-it", record_ttl_s=settings.executor_record_ttl_s,
                              claim_threshold_bytes=settings.executor_claim_threshold_bytes))
    idem = f"run-{uuid.uuid4().hex[:8]}:big"
    try:
        handler.run_step({"event_id": "e", "tenant": "t1", "occurred_at": 0, "run_id": "r", "workflow": "w",
                          "step_id": "big", "attempt": 1, "idempotency_key": idem, "tool": "big", "inputs_json": "{}",
                          "latency_class": "bulk", "timeout_ms": 5000, "cost_estimate": 0.0, "deadline_ms": None})
    finally:
        handler.close(grace_s=1)
    [result] = [json.loads(r.value) for r in producer.sent if r.topic == "step_results"]
    ref = json.loads(result["output_json"])
    claim_key = ref["$claim"]
    for redis_key in (keys.record("t1", idem), keys.fence("t1", idem), claim_key):
        assert 0 < client.ttl(redis_key) <= RETENTION_S, redis_key
    assert not client.exists(keys.lease("t1", idem)), "the lease is released once the result is recorded"
    assert read_claim(client, ref) == {"blob": "z" * 5000}
    assert read_claim(client, {"n": 1}) == {"n": 1}
    client.set(claim_key, "tampered")
    with pytest.raises(PermanentError):
        read_claim(client, ref)
    client.delete(claim_key)
    with pytest.raises(NotFound):
        read_claim(client, ref)


def test_the_retention_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_EXECUTOR_RECORD_TTL_S", "86400")
    assert ExecutorSettings().executor_record_ttl_s == 86400
    with pytest.raises(ValueError):
        ExecutorSettings(executor_claim_threshold_bytes=900_000)  # would not fit in a record


def test_a_lease_keeper_renews_while_the_call_runs(client: redis.Redis, key: str) -> None:
    store = RedisLeaseStore(client)
    held = lease(key, 1)
    store.acquire(held, 600, RETENTION_S)
    keeper = LeaseKeeper(store, 600)  # renews every 200 ms
    keeper.hold(held)
    try:
        time.sleep(1.5)  # the TTL runs out twice over unless renewed; not an assertion on time
        assert store.renew(held, 600), "the lease must still be ours while its call runs"
    finally:
        keeper.release(held)
        keeper.stop()
    assert not client.exists(keys.lease("t1", key))


# -- Redis failures ----------------------------------------------------------------------------------------------
def test_redis_being_away_is_a_transient_error_everywhere() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, decode_responses=True,
                       retry=Retry(NoBackoff(), 0))  # fail at once instead of redis-py's own retries
    held = lease("k", 1)
    calls: list[Callable[[], Any]] = [
        lambda: RedisLeaseStore(dead).acquire(held, 1000, 60), lambda: RedisLeaseStore(dead).renew(held, 1000),
        lambda: RedisLeaseStore(dead).release(held), lambda: RedisClaimStore(dead).put("t1", "ab", b"x", 60),
        lambda: RedisClaimStore(dead).get("k"), lambda: CircuitBreaker(dead, "c").before_call(),
        lambda: CircuitBreaker(dead, "c").record(False), lambda: CircuitBreaker(dead, "c").record(True),
        lambda: RedisUnitOfWork(dead).load("k")]
    for call in calls:
        with pytest.raises(TransientError):
            call()
