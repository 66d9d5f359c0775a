"""Leases on steps: one tool call per idempotency key at a time, and attempt fencing.

A lease names the attempt whose call runs and a token unique to its holder. It
is held until the call really returns (a ``LeaseKeeper`` renews it every third
of its TTL), not until the attempt times out: a retry waits while the timed-out
call still runs. If the executor dies, the lease expires after its TTL and the
retry may start (third parties still deduplicate by the step's idempotency key).

The fence is the newest attempt that ever took the lease; it outlives the lease
(the retention setting), so an older attempt never starts after a newer one did.
Key layout: ``services.executor.adapters.keys``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from services.common.errors import AiosError
from services.executor.adapters import keys
from services.executor.adapters.redis_calls import redis_call
from services.executor.domain import LeaseGrant
from services.executor.ports import Lease, LeaseStore

__all__ = ["LeaseKeeper", "MemoryLeaseStore", "RedisLeaseStore"]
log = logging.getLogger(__name__)

# KEYS: lease, fence. ARGV: attempt, token, ttl ms, retention s.
# Returns {0 granted | 1 busy | 2 superseded, attempt that holds or fenced}.
_ACQUIRE = """
local attempt = tonumber(ARGV[1])
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if fence > attempt then return {2, fence} end
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  local held = tonumber(string.sub(cur, 1, sep - 1))
  if string.sub(cur, sep + 1) ~= ARGV[2] then return {1, held} end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], tostring(math.max(fence, attempt)), 'EX', ARGV[4])
return {0, attempt}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_STATUS = {0: "granted", 1: "busy", 2: "superseded"}


def _value(lease: Lease) -> str:
    return f"{lease.attempt}:{lease.token}"


class RedisLeaseStore:
    """Leases and fences in Redis, each operation one Lua script."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self, lease: Lease, ttl_ms: int, retention_s: int) -> LeaseGrant:
        code, holder = redis_call(self._acquire, keys=[keys.lease(lease.tenant, lease.idempotency_key),
                                                       keys.fence(lease.tenant, lease.idempotency_key)],
                                  args=[lease.attempt, lease.token, ttl_ms, retention_s])
        return LeaseGrant(_STATUS[int(code)], int(holder))

    def renew(self, lease: Lease, ttl_ms: int) -> bool:
        return bool(redis_call(self._renew, keys=[keys.lease(lease.tenant, lease.idempotency_key)],
                               args=[_value(lease), ttl_ms]))

    def release(self, lease: Lease) -> None:
        redis_call(self._release, keys=[keys.lease(lease.tenant, lease.idempotency_key)], args=[_value(lease)])

    def holder(self, tenant: str, idempotency_key: str) -> int | None:
        """The attempt holding the lease now (tests, operators)."""
        cur = redis_call(self._client.get, keys.lease(tenant, idempotency_key))
        return None if cur is None else int(str(cur).split(":", 1)[0])


class MemoryLeaseStore:
    """The in-memory twin: same contract, a dict and a clock you can move."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.leases: dict[tuple[str, str], tuple[str, float]] = {}  # -> (value, expires at)
        self.fences: dict[tuple[str, str], tuple[int, float]] = {}

    def _lease(self, slot: tuple[str, str]) -> str | None:
        entry = self.leases.get(slot)
        if entry is None or entry[1] <= self.clock():
            self.leases.pop(slot, None)
            return None
        return entry[0]

    def _fence(self, slot: tuple[str, str]) -> int:
        entry = self.fences.get(slot)
        if entry is None or entry[1] <= self.clock():
            self.fences.pop(slot, None)
            return 0
        return entry[0]

    def acquire(self, lease: Lease, ttl_ms: int, retention_s: int) -> LeaseGrant:
        slot = (lease.tenant, lease.idempotency_key)
        with self._lock:
            fence = self._fence(slot)
            if fence > lease.attempt:
                return LeaseGrant("superseded", fence)
            cur = self._lease(slot)
            if cur is not None and cur != _value(lease):
                return LeaseGrant("busy", int(cur.split(":", 1)[0]))
            now = self.clock()
            self.leases[slot] = (_value(lease), now + ttl_ms / 1000)
            self.fences[slot] = (max(fence, lease.attempt), now + retention_s)
            return LeaseGrant("granted", lease.attempt)

    def renew(self, lease: Lease, ttl_ms: int) -> bool:
        slot = (lease.tenant, lease.idempotency_key)
        with self._lock:
            if self._lease(slot) != _value(lease):
                return False
            self.leases[slot] = (_value(lease), self.clock() + ttl_ms / 1000)
            return True

    def release(self, lease: Lease) -> None:
        slot = (lease.tenant, lease.idempotency_key)
        with self._lock:
            if self._lease(slot) == _value(lease):
                del self.leases[slot]

    def holder(self, tenant: str, idempotency_key: str) -> int | None:
        """The attempt holding the lease now (tests)."""
        with self._lock:
            cur = self._lease((tenant, idempotency_key))
            return None if cur is None else int(cur.split(":", 1)[0])


class LeaseKeeper:
    """Renews every lease this executor holds, every third of the TTL, until it is released."""

    def __init__(self, store: LeaseStore, ttl_ms: int) -> None:
        self.store, self.ttl_ms = store, ttl_ms
        self._held: set[Lease] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def hold(self, lease: Lease) -> None:
        with self._lock:
            self._held.add(lease)

    def release(self, lease: Lease) -> None:
        """Stop renewing and give the lease up (it expires on its own if Redis is down)."""
        with self._lock:
            self._held.discard(lease)
        try:
            self.store.release(lease)
        except AiosError as exc:
            log.warning("lease %s#%d not released (%s); it expires on its own",
                        lease.idempotency_key, lease.attempt, exc)

    def held(self) -> set[Lease]:
        with self._lock:
            return set(self._held)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            for lease in self.held():
                try:
                    if not self.store.renew(lease, self.ttl_ms):
                        log.error("lease on %s (attempt %d) was lost while its call runs: a retry may start "
                                  "next to it", lease.idempotency_key, lease.attempt)
                        with self._lock:
                            self._held.discard(lease)
                except AiosError as exc:  # Redis briefly away: the next round tries again
                    log.warning("lease on %s not renewed: %s", lease.idempotency_key, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
