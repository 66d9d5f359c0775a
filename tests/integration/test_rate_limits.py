"""Rate limits per tenant and connector hold across executor replicas: two executors (two Redis
clients, two threads) share one limit; a step over it waits for its slot or fails retryably as
its connector declares; the wait is a metric."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from infra.stack import Stack
from services.common.errors import ConfigError, is_retryable
from services.executor.adapters.connectors import HttpConnectors
from services.executor.adapters.rate_limits import RateLimit, RateLimited, RateLimiter
from services.executor.adapters.toolbox import Call, Toolbox

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
HOUR = 1 / 3600  # one call an hour: after the burst, nothing more fits while a test runs


@pytest.fixture
def clients(infra: Stack) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    url = infra.env()["AIOS_REDIS_URL"]
    a, b = redis.Redis.from_url(url), redis.Redis.from_url(url)
    yield a, b
    a.close()
    b.close()


def _name() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _call(tenant: str, timeout_s: float = 5.0) -> Call:
    return Call(tenant=tenant, run_id="r", step_id="s", attempt=1, idempotency_key="r:s", latency_class="",
                timeout_s=timeout_s)


def _hammer(limiter: RateLimiter, tenant: str, connector: str | None, n: int, out: list[str]) -> None:
    for _ in range(n):
        try:
            limiter.acquire(tenant, connector, 5.0)
            out.append("ok")
        except RateLimited:
            out.append("limited")


def test_two_executors_share_one_connector_limit(clients: tuple[redis.Redis, redis.Redis]) -> None:
    connector = _name()
    limit = {connector: RateLimit(HOUR, burst=5, max_wait_ms=0, setting="test")}
    results: list[list[str]] = [[], []]
    threads = [threading.Thread(target=_hammer, args=(RateLimiter(c, connectors=limit), _name(), connector, 20, out))
               for c, out in zip(clients, results, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    admitted = sum(r.count("ok") for r in results)
    assert admitted == 5, results  # the burst, once, across both replicas (each alone would admit 5)
    assert sum(r.count("limited") for r in results) == 35


def test_two_executors_share_one_tenant_limit_and_tenants_are_apart(
        clients: tuple[redis.Redis, redis.Redis]) -> None:
    tenant, other = _name(), _name()
    args = {"tenant_default": RateLimit(HOUR, burst=3, max_wait_ms=0, setting="AIOS_EXECUTOR_TENANT_RATE_PER_S")}
    a, b = (RateLimiter(c, **args) for c in clients)
    results: list[str] = []
    for limiter in (a, b, a, b, a, b):
        _hammer(limiter, tenant, None, 1, results)
    assert results == ["ok"] * 3 + ["limited"] * 3
    _hammer(b, other, None, 1, results)
    assert results[-1] == "ok"  # another tenant has its own budget


def test_a_waiting_step_gets_its_own_slot_across_executors(clients: tuple[redis.Redis, redis.Redis]) -> None:
    """Reservations, not polling: eight calls from two replicas at 20/s get eight start times
    at least 1/20 s apart, and each waited for its own."""
    connector = _name()
    limit = RateLimit(20, burst=1, max_wait_ms=5000)
    limiters = [RateLimiter(c) for c in clients]
    starts: list[int] = []
    lock = threading.Lock()

    def take(limiter: RateLimiter) -> None:
        for _ in range(4):
            got = limiter.reserve(f"aios:ratelimit:{{connector:{connector}}}", limit, 5.0)
            assert got.admitted
            with lock:
                starts.append(got.start_us)

    threads = [threading.Thread(target=take, args=(lim,)) for lim in limiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    starts.sort()
    assert len(starts) == 8
    assert all(b - a >= 50_000 for a, b in zip(starts, starts[1:], strict=False)), starts


def test_the_declared_policy_waits_or_fails_retryably_and_the_wait_is_a_metric(
        clients: tuple[redis.Redis, redis.Redis]) -> None:
    waits: list[float] = []
    tenant = _name()
    waiting = RateLimiter(clients[0], tenant_default=RateLimit(0.5, burst=1, max_wait_ms=4000), sleep=waits.append)
    before = REGISTRY.get_sample_value("aios_executor_rate_limit_wait_seconds_count",
                                       {"scope": "tenant", "name": "other", "outcome": "waited"}) or 0
    toolbox = Toolbox({"echo": lambda inputs, call: {"timeout_s": call.timeout_s}}, limiter=waiting)
    first = toolbox.run("echo", {}, _call(tenant)).output
    second = toolbox.run("echo", {}, _call(tenant)).output
    # One call per 2 s: the second call waits (the sleep is recorded, not slept) however slow the box is.
    assert first == {"timeout_s": 5.0} and len(waits) == 1 and 0 < waits[0] <= 2.0
    assert second["timeout_s"] == pytest.approx(5.0 - waits[0])  # the wait comes off the attempt's timeout
    observed = sum(REGISTRY.get_sample_value("aios_executor_rate_limit_wait_seconds_count",
                                             {"scope": "tenant", "name": name, "outcome": "waited"}) or 0
                   for name in (tenant, "other"))
    assert observed - before == 2

    failing = Toolbox({"echo": lambda inputs, call: {}}, limiter=RateLimiter(
        clients[1], tenant_default=RateLimit(HOUR, burst=1, max_wait_ms=100, setting="AIOS_EXECUTOR_TENANT_RATE_PER_S")))
    failing.run("echo", {}, _call(tenant + "x"))
    with pytest.raises(RateLimited) as refused:
        failing.run("echo", {}, _call(tenant + "x"))
    assert is_retryable(refused.value)
    assert "over its rate limit of 0.000277778 calls/s" in str(refused.value)
    assert "AIOS_EXECUTOR_TENANT_RATE_PER_S" in str(refused.value) and "100 ms this step may wait" in str(refused.value)


def test_connectors_declare_their_limit_and_a_bad_one_is_refused(
        clients: tuple[redis.Redis, redis.Redis], tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("connectors:\n  bank:\n    base_url: http://127.0.0.1:9\n"
                    "    rate_limit: {per_second: 5, burst: 2, max_wait_ms: 250}\n"
                    "    tools: {ping: {method: GET, path: /ping}, now: {method: GET, path: /now, max_wait_ms: 0}}\n")
    connectors = HttpConnectors(clients[0], good)
    try:
        assert connectors.rate_limits["bank"] == RateLimit(5.0, 2, 250, setting=f"connectors.bank.rate_limit in {good.name}")
        assert connectors.tools["bank.ping"].max_wait_ms is None and connectors.tools["bank.now"].max_wait_ms == 0
    finally:
        connectors.close()
    broken = tmp_path / "broken.yaml"
    broken.write_text(good.read_text().replace("max_wait_ms: 0", "max_wait_ms: soon"))
    with pytest.raises(ConfigError, match="bank.now.max_wait_ms must be a whole number of ms >= 0"):
        HttpConnectors(clients[0], broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("per_second: 5", "per_second: 0"))
    with pytest.raises(ConfigError, match="connectors.bank.rate_limit: per_second > 0 is required"):
        HttpConnectors(clients[0], bad)


def test_a_tool_declares_its_own_wait(clients: tuple[redis.Redis, redis.Redis]) -> None:
    """The connector lets a call wait 2 s for its slot; a tool declaring max_wait_ms 0 fails at once."""
    connector, waits = _name(), []
    limiter = RateLimiter(clients[0], connectors={connector: RateLimit(20, burst=1, max_wait_ms=2000)},
                          sleep=waits.append)
    limiter.acquire("t", connector, 5.0)
    with pytest.raises(RateLimited, match="more than the 0 ms this step may wait"):
        limiter.acquire("t", connector, 5.0, max_wait_ms=0)
    limiter.acquire("t", connector, 5.0)  # the connector's own policy: it waits for its slot
    assert len(waits) == 1 and 0 < waits[0] <= 0.05
