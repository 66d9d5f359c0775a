"""Rate limits per tenant and per connector, shared by every executor replica through Redis.

Each limit is a GCRA (generic cell rate algorithm) in one Lua script: a limit of ``rate`` calls
per second with a ``burst`` keeps one number per key, the theoretical arrival time (TAT) of the
next call. A call may start at ``TAT - (burst - 1) / rate``; the script *reserves* that start
(moves the TAT on by ``1 / rate``) and answers how long to wait for it, or refuses without
reserving when the wait is longer than the caller may wait. Reserving is what keeps the limit
across replicas: two executors asking at once get two different start times, never the same
slot. Time is the Redis server's (``TIME``), so replicas' clocks do not matter.

Key layout: ``aios:ratelimit:{tenant:<tenant>}`` and ``aios:ratelimit:{connector:<name>}``, each
its own hash slot; a key expires once its TAT has passed (an idle limit costs no memory).

A step under both a tenant and a connector limit reserves both (the tenant first) and waits for
the later start. If the connector then refuses, the tenant's reservation is not given back: the
tenant loses one slot, which errs on the side of the limit. What a limited step does is its
declared policy (a tool's ``max_wait_ms``, else its connector's ``rate_limit.max_wait_ms`` in
connectors.yaml; the tenant limit's own wait for other tools): wait up to that long, else fail as ``RateLimited``, a transient error,
so the workflow's retry policy tries it again later."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis
from prometheus_client import Histogram

from services.common.errors import TransientError
from services.common.metrics import bounded
from services.executor.adapters.redis_calls import redis_call

__all__ = ["RateLimit", "RateLimited", "RateLimiter", "WAIT_SECONDS"]

WAIT_SECONDS = Histogram(
    "aios_executor_rate_limit_wait_seconds",
    "Time a step waited for a rate limit (outcome waited), or would have had to (outcome refused)",
    ["scope", "name", "outcome"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))

# KEYS[1] the limit; ARGV: interval_us (1/rate), tolerance_us ((burst-1)/rate), max_wait_us.
# Returns {wait_us, start_us}: wait_us < 0 means refused, -wait_us is what it would have waited.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, tolerance, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local start = tat - tolerance
if start < now then start = now end
local wait = start - now
if wait > max_wait then
  return {-wait, start}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.floor((next_tat - now) / 1000) + 1000)
return {wait, start}
"""


class RateLimited(TransientError):
    """A tenant or connector is over its rate limit and the step may not wait that long."""


@dataclass(frozen=True)
class RateLimit:
    """``rate`` calls per second, up to ``burst`` at once; a step waits at most ``max_wait_ms`` for one."""

    rate: float
    burst: int = 1
    max_wait_ms: int = 0
    setting: str = ""  # where it is configured, for the refusal's message

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1 or self.max_wait_ms < 0:
            raise ValueError(f"a rate limit needs rate > 0, burst >= 1 and max_wait_ms >= 0, got {self}")


@dataclass(frozen=True)
class Reservation:
    """The answer for one limit: admitted after ``wait_s``, or refused (it would have been ``wait_s``)."""

    admitted: bool
    wait_s: float
    start_us: int


class RateLimiter:
    """The limits of one deployment: per tenant (a default and overrides) and per connector."""

    def __init__(self, client: redis.Redis, *, tenant_default: RateLimit | None = None,
                 tenants: Mapping[str, RateLimit] | None = None, connectors: Mapping[str, RateLimit] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.r = client
        self.tenant_default, self.tenants = tenant_default, dict(tenants or {})
        self.connectors = dict(connectors or {})
        self.sleep = sleep
        self._reserve = client.register_script(_RESERVE)

    def reserve(self, key: str, limit: RateLimit, max_wait_s: float) -> Reservation:
        """One call against one limit: reserve its start, unless that is more than ``max_wait_s`` away."""
        interval_us = max(1, round(1_000_000 / limit.rate))
        wait_us, start_us = redis_call(self._reserve, keys=[key],
                                       args=[interval_us, interval_us * (limit.burst - 1), int(max_wait_s * 1e6)])
        return Reservation(wait_us >= 0, abs(int(wait_us)) / 1e6, int(start_us))

    def acquire(self, tenant: str, connector: str | None, timeout_s: float, *,
                max_wait_ms: int | None = None) -> float:
        """Wait until this tenant (and connector) may make one more call; the seconds waited.
        Raises RateLimited when a limit would make the step wait longer than its policy allows
        (``max_wait_ms`` the tool declares, else its connector's, else the tenant limit's; never
        longer than the attempt has left)."""
        scopes = [("tenant", tenant, f"aios:ratelimit:{{tenant:{tenant}}}", self.tenants.get(tenant) or
                   self.tenant_default)]
        if connector is not None:
            scopes.append(("connector", connector, f"aios:ratelimit:{{connector:{connector}}}",
                           self.connectors.get(connector)))
        # The policy is the connector's when the step calls one, else the tenant limit's own.
        policy = next((lim for scope, _n, _k, lim in reversed(scopes) if lim is not None), None)
        if policy is None:
            return 0.0
        max_wait_s = min((policy.max_wait_ms if max_wait_ms is None else max_wait_ms) / 1000, max(0.0, timeout_s))
        wait_s = 0.0
        for scope, name, key, limit in scopes:
            if limit is None:
                continue
            got = self.reserve(key, limit, max_wait_s)
            label = bounded("tenant", name) if scope == "tenant" else name
            if not got.admitted:
                WAIT_SECONDS.labels(scope, label, "refused").observe(got.wait_s)
                raise RateLimited(
                    f"{scope} {name} is over its rate limit of {limit.rate:g} calls/s (burst {limit.burst}, "
                    f"{limit.setting}); the next call fits in {got.wait_s * 1000:.0f} ms, more than the "
                    f"{max_wait_s * 1000:.0f} ms this step may wait: retried later")
            WAIT_SECONDS.labels(scope, label, "waited").observe(got.wait_s)
            wait_s = max(wait_s, got.wait_s)
        if wait_s > 0:
            self.sleep(wait_s)
        return wait_s
