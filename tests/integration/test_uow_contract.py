"""The unit-of-work contract, run against the Redis adapter and its in-memory
twin: whatever passes here may stand in for the other in handler tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from infra.stack import Stack
from services.common.errors import Conflict, TransientError
from services.common.kafka import OutRecord
from services.common.uow import (
    AlreadyApplied,
    Change,
    MemoryUnitOfWork,
    RedisUnitOfWork,
    TimerOps,
    UnitOfWork,
)
from tests.integration.conftest import redis_calls

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["redis", "memory"])
def uow(request: pytest.FixtureRequest, infra: Stack) -> Iterator[UnitOfWork]:
    if request.param == "memory":
        yield MemoryUnitOfWork()
    else:
        yield RedisUnitOfWork(redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True))


def key(tag: str) -> str:
    return f"test:{{{uuid.uuid4().hex[:8]}}}:{tag}"


def rec(n: int) -> OutRecord:
    return OutRecord(topic="t", key="k", value=bytes([n, 0, 255]), headers={"event-id": f"e{n}"}, event_id=f"e{n}")


def test_create_then_compare_and_set(uow: UnitOfWork) -> None:
    k = key("run")
    assert uow.load(k).state is None
    v1 = uow.commit(Change(k, "", "s1", outbox=[rec(1)]))
    loaded = uow.load(k)
    assert (loaded.state, loaded.version, loaded.outbox) == ("s1", v1, [rec(1)])
    v2 = uow.commit(Change(k, v1, "s2", outbox=[rec(2)]))
    assert v2 != v1 and uow.load(k).state == "s2"
    with pytest.raises(Conflict) as err:
        uow.commit(Change(k, v1, "stale"))  # computed from an old version: refused
    assert err.value.retryable
    with pytest.raises(Conflict):
        uow.commit(Change(k, "", "again"))  # creating what exists: refused
    assert uow.load(k).state == "s2"


def test_outbox_is_cleared_only_for_the_version_it_was_written_with(uow: UnitOfWork) -> None:
    k = key("run")
    v1 = uow.commit(Change(k, "", "s1", outbox=[rec(1)]))
    v2 = uow.commit(Change(k, v1, "s2", outbox=[rec(1), rec(2)]))
    uow.clear_outbox(k, v1)  # a late clear of an older version must not drop the newer outbox
    assert uow.load(k).outbox == [rec(1), rec(2)]
    uow.clear_outboxes([(k, v2)])
    assert uow.load(k).outbox == []


def test_clearing_a_batchs_outboxes_is_one_round_trip_and_survives_an_emptied_script_cache(
        client: redis.Redis) -> None:
    """A pipeline of registered scripts asks SCRIPT EXISTS before every execute (two round trips per
    batch); clear_outboxes sends its EVALSHAs alone, and loads the script only on NOSCRIPT (a restarted
    Redis has an empty script cache)."""
    uow = RedisUnitOfWork(client)
    done = [(k, uow.commit(Change(k, "", "s", outbox=[rec(1)]))) for k in (key("a"), key("b"))]
    before = redis_calls(client, "script|exists")
    uow.clear_outboxes(done)
    assert redis_calls(client, "script|exists") == before
    assert [uow.load(k).outbox for k, _v in done] == [[], []]
    client.script_flush()  # as after a restart
    again = [(k, uow.commit(Change(k, v, "s2", outbox=[rec(2)]))) for k, v in done]
    uow.clear_outboxes(again)
    assert [uow.load(k).outbox for k, _v in again] == [[], []]


def test_a_marker_makes_a_second_apply_of_the_same_event_a_no_op(uow: UnitOfWork) -> None:
    k, m = key("run"), key("seen:e1")
    v1 = uow.commit(Change(k, "", "s1", markers=[m], marker_ttl_s=60))
    assert uow.seen(m)
    with pytest.raises(AlreadyApplied):
        uow.commit(Change(k, v1, "s2", markers=[m], marker_ttl_s=60))
    assert uow.load(k).state == "s1"


def test_mark_once(uow: UnitOfWork) -> None:
    m = key("seen")
    assert uow.mark_once(m, 60) is True
    assert uow.mark_once(m, 60) is False
    assert uow.seen(m)


def test_timers_index_and_members_commit_with_the_state(uow: UnitOfWork, infra: Stack) -> None:
    k = key("run")
    tag = k.split(":")[1]
    sched, data, idx, members = f"test:{tag}:timers", f"test:{tag}:timerdata", f"test:{tag}:runs", "test:tenants"
    ops = TimerOps(sched, data, add=[(5, "a", json.dumps({"kind": "x"})), (9, "b", "{}")])
    v1 = uow.commit(Change(k, "", "s1", timers=ops, index=[(idx, 42.0, "run-1")], members=[(members, tag)]))
    uow.commit(Change(k, v1, "s2", timers=TimerOps(sched, data, add=[(7, "a", "{}")], remove=["a", "b"])))
    if isinstance(uow, MemoryUnitOfWork):
        schedule, payloads = uow.zsets[sched], uow.hashes[data]
        assert uow.zsets[idx] == {"run-1": 42.0} and tag in uow.sets[members]
    else:
        r = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True)
        schedule = dict(r.zrange(sched, 0, -1, withscores=True))
        payloads = r.hgetall(data)
        assert r.zscore(idx, "run-1") == 42.0 and r.sismember(members, tag)
    # Removals happen before additions: "a" was cleared and set again, "b" is gone.
    assert schedule == {"a": 7.0} and payloads == {"a": "{}"}


def test_a_commit_deletes_what_it_makes_obsolete(uow: UnitOfWork) -> None:
    k, pending = key("run"), key("pending")
    assert uow.mark_once(pending, 60)
    uow.commit(Change(k, "", "s1", deletes=[pending]))
    assert not uow.seen(pending)


def test_index_entries_come_and_go_with_commits(uow: UnitOfWork) -> None:
    k = key("run")
    active = f"test:{k.split(':')[1]}:active"
    v1 = uow.commit(Change(k, "", "s1", index=[(active, 1.0, "run-1")]))
    uow.commit(Change(key("run"), "", "s", index=[(active, 2.0, "run-2")]))
    assert uow.count(active) == 2
    uow.commit(Change(k, v1, "done", unindex=[(active, "run-1")]))
    assert uow.count(active) == 1


def test_many_changes_commit_in_one_call_each_succeeding_or_failing_alone(uow: UnitOfWork) -> None:
    a, b, c, m = key("a"), key("b"), key("c"), key("seen")
    va = uow.commit(Change(a, "", "a1"))
    uow.mark_once(m, 60)
    out = uow.commit_many([Change(a, va, "a2", outbox=[rec(1)]), Change(b, "", "b1", markers=[key("x")]),
                           Change(c, "", "c1", markers=[m]), Change(a, va, "stale")])
    assert isinstance(out[0], str) and isinstance(out[1], str)
    assert isinstance(out[2], AlreadyApplied) and isinstance(out[3], Conflict)
    assert (uow.load(a).state, uow.load(a).outbox, uow.load(b).state, uow.load(c).state) == ("a2", [rec(1)], "b1", None)
    loaded = uow.load_many([a, c], [m, key("none")])
    assert [(lo.state, seen) for lo, seen in loaded] == [("a2", True), (None, False)]


def test_retention_expires_the_state(uow: UnitOfWork, infra: Stack) -> None:
    k = key("run")
    v1 = uow.commit(Change(k, "", "s1"))
    uow.commit(Change(k, v1, "final", expire_s=100))
    if isinstance(uow, MemoryUnitOfWork):
        ttl = uow.expiry[k] - uow.clock()
    else:
        ttl = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"]).ttl(k)
    assert 0 < ttl <= 100


def test_memory_twin_forgets_expired_state_and_markers() -> None:
    clock = Clock()
    uow = MemoryUnitOfWork(clock)
    k, m = key("run"), key("seen")
    uow.commit(Change(k, "", "s", markers=[m], marker_ttl_s=10, expire_s=20))
    clock.now += 11
    assert not uow.seen(m) and uow.load(k).state == "s"
    clock.now += 10
    assert uow.load(k).state is None


def test_redis_down_is_transient(infra: Stack) -> None:
    dead = RedisUnitOfWork(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    with pytest.raises(TransientError):
        dead.load("x")
    with pytest.raises(TransientError):
        dead.commit(Change("x", "", "s"))
