"""Budgets in Redis: reserve before dispatch, reconcile after.

Keys (all inside the tenant's hash tag, so the Lua scripts touch one slot):
  aios:{t}:budget:<window>:spent      integer micro-units spent in the window
  aios:{t}:budget:<window>:reserved   integer micro-units held by open reservations
  aios:{t}:budget:res:<reservation>   hash: state (reserved|spent), cost, actual, window

Amounts are integer micro-units so the scripts compare exactly; a float sum
drifting past the limit by 1e-15 would be an overshoot. The check and the
reservation are one Lua script: no two callers can both see the same headroom.

Redis errors go through ``errors.redis_error``: down, slow, OOM, READONLY or
LOADING is a TransientError (Evaluate answers UNAVAILABLE, the caller retries);
a reply no retry can change (WRONGTYPE on a budget key) is a PermanentError.
"""

from __future__ import annotations

from typing import Any

import redis

from services.common.errors import InvalidArgument, redis_error
from services.policy.domain.decide import from_micros, to_micros, window_id, window_ttl_s
from services.policy.domain.model import BudgetSpec, BudgetState

# Reserve `cost` if spent + reserved + cost <= limit; a reservation id seen
# before (in any state) is answered without reserving again, so a retried
# Evaluate never double-books. Returns {ok, spent, reserved, duplicate}.
_RESERVE = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {1, spent, reserved, 1}
end
local cost = tonumber(ARGV[1])
if spent + reserved + cost > tonumber(ARGV[2]) then
  return {0, spent, reserved, 0}
end
reserved = redis.call('INCRBY', KEYS[2], cost)
redis.call('HSET', KEYS[3], 'state', 'reserved', 'cost', cost, 'window', ARGV[4])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return {1, spent, reserved, 0}
"""

# Move a reservation to spent at its actual cost. Idempotent: a reservation
# already spent is left alone. An unknown id (no estimate was reserved, or the
# reservation expired) still records the spend, so costs are never lost.
# Returns {applied, spent, reserved}.
_RECONCILE = """
local state = redis.call('HGET', KEYS[3], 'state')
if state ~= 'spent' then
  if state == 'reserved' then
    local cost = tonumber(redis.call('HGET', KEYS[3], 'cost'))
    local held = tonumber(redis.call('GET', KEYS[2]) or '0')
    if held <= cost then redis.call('DEL', KEYS[2]) else redis.call('DECRBY', KEYS[2], cost) end
  end
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[3], 'state', 'spent', 'actual', ARGV[1], 'window', ARGV[3])
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
end
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
if state == 'spent' then return {0, spent, reserved} end
return {1, spent, reserved}
"""

# A spent reservation only guards against duplicate reconciles; keep it a while.
_SPENT_TTL_S = 30 * 86400
_MAX_RESERVATION_ID = 256


def _keys(tenant: str, window: str, reservation_id: str) -> list[str]:
    base = f"aios:{{{tenant}}}:budget"
    return [f"{base}:{window}:spent", f"{base}:{window}:reserved", f"{base}:res:{reservation_id}"]


class RedisBudgetStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._reserve = client.register_script(_RESERVE)
        self._reconcile = client.register_script(_RECONCILE)

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> list[int]:
        try:
            return [int(x) for x in script(keys=keys, args=args)]
        except redis.RedisError as exc:
            raise redis_error(exc) from exc

    def reserve(self, tenant: str, spec: BudgetSpec, reservation_id: str, cost: float,
                now_ms: int) -> tuple[bool, BudgetState]:
        """Atomically hold ``cost`` against the budget; (False, state) when it does not fit."""
        _check_reservation_id(reservation_id)
        window = window_id(spec.window, now_ms)
        ok, spent, reserved, _dup = self._run(
            self._reserve, _keys(tenant, window, reservation_id),
            [to_micros(cost), to_micros(spec.limit), window_ttl_s(spec.window), window])
        return bool(ok), _state(tenant, spec, spent, reserved)

    def reconcile(self, tenant: str, spec: BudgetSpec, reservation_id: str, actual_cost: float,
                  now_ms: int) -> tuple[bool, BudgetState]:
        """Turn a reservation into spend; (False, state) if it was reconciled before."""
        _check_reservation_id(reservation_id)
        try:
            # The window a reservation was made in never changes, so reading it
            # before the script is safe; unknown reservations count in today's.
            window = self._redis.hget(_keys(tenant, "", reservation_id)[2], "window")
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        window = str(window or window_id(spec.window, now_ms))
        applied, spent, reserved = self._run(
            self._reconcile, _keys(tenant, window, reservation_id),
            [to_micros(actual_cost), window_ttl_s(spec.window), window, _SPENT_TTL_S])
        return bool(applied), _state(tenant, spec, spent, reserved)

    def read(self, tenant: str, spec: BudgetSpec, now_ms: int) -> BudgetState:
        keys = _keys(tenant, window_id(spec.window, now_ms), "")
        try:
            spent, reserved = self._redis.mget(keys[0], keys[1])
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        return _state(tenant, spec, int(spent or 0), int(reserved or 0))


def _state(tenant: str, spec: BudgetSpec, spent: int, reserved: int) -> BudgetState:
    return BudgetState(tenant=tenant, limit=spec.limit, spent=from_micros(spent), reserved=from_micros(reserved))


def _check_reservation_id(reservation_id: str) -> None:
    if not reservation_id:
        raise InvalidArgument("reservation_id is required")
    if len(reservation_id) > _MAX_RESERVATION_ID:
        raise InvalidArgument(f"reservation_id is longer than {_MAX_RESERVATION_ID} characters")
