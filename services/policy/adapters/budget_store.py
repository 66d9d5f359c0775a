"""Budgets in Redis: reserve before dispatch, reconcile after, and holds that expire.

Keys (all inside the tenant's hash tag, so the Lua scripts touch one slot):
  aios:{t}:budget:<window>:spent      integer micro-units spent in the window
  aios:{t}:budget:<window>:reserved   integer micro-units held by open reservations (the aggregate)
  aios:{t}:budget:<window>:open       sorted set: open reservation id -> the time (ms) its hold expires
  aios:{t}:budget:<window>:holds      hash: open reservation id -> micro-units it holds
  aios:{t}:budget:res:<reservation>   hash: state (reserved|spent), cost, actual, window

Amounts are integer micro-units so the scripts compare exactly; a float sum
drifting past the limit by 1e-15 would be an overshoot. The check and the
reservation are one Lua script: no two callers can both see the same headroom.

A hold is released when its step settles (reconcile, at the actual cost: 0 for
a step that failed, was cancelled or rejected). One that nobody settles (the
run was dead-lettered, its planner lost the commit that would have settled it)
expires ``reservation_ttl_s`` after it was made: every reserve and read first
reclaims the expired holds of the window (``open`` by deadline, at most
``_RECLAIM_MAX`` a call), so ``reserved`` always equals the sum of live holds
and never keeps a dead one. A step settled after its hold expired is still
charged its actual cost. A reservation asked again after its hold expired (a
step approved after the TTL) is held again only if it still fits, never
answered as a duplicate; a reservation's own hash expires (also for `total`
budgets), and releasing one that was never made keeps nothing.

A reconcile carries the step's cumulative actual cost: what was charged before
for the same reservation is subtracted, so a repeat changes nothing and a cost
reported after the step settled (a late success) is charged once.

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

# KEYS: spent, reserved, res, open, holds. Reclaims holds whose deadline passed (ARGV[1] = now ms,
# ARGV[2] = most to reclaim); leaves `reclaimed` (micro-units) and `expired` (holds) set.
_RECLAIM = """
local reclaimed, expired = 0, 0
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  reclaimed = reclaimed + tonumber(redis.call('HGET', KEYS[5], id) or '0')
  expired = expired + 1
  redis.call('HDEL', KEYS[5], id)
  redis.call('ZREM', KEYS[4], id)
end
if reclaimed > 0 then
  local held = tonumber(redis.call('GET', KEYS[2]) or '0')
  if held <= reclaimed then redis.call('DEL', KEYS[2]) else redis.call('DECRBY', KEYS[2], reclaimed) end
end
"""

# Reserve `cost` if spent + reserved + cost <= limit. A reservation whose hold is still open, or that
# was settled, is answered without reserving again, so a retried Evaluate never double-books (an open
# hold is extended to a full TTL from now: its step is about to run); one whose hold expired
# (reclaimed, or held in an earlier window) is reserved again, and only if it still fits: a step
# approved after its hold expired never runs with nothing held. ARGV: now, reclaim max,
# cost, limit, window ttl, window, hold deadline (ms), reservation id, reservation ttl.
# Returns {ok, spent, reserved, duplicate, expired}.
_RESERVE = _RECLAIM + """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
local was = redis.call('HGET', KEYS[3], 'state')
if was == 'spent' then
  return {1, spent, reserved, 1, expired}
end
local due = redis.call('ZSCORE', KEYS[4], ARGV[8])
if was and due then
  if tonumber(due) > tonumber(ARGV[1]) then
    -- Live: the step is about to run (an approval, a retried check), so its hold lasts a full TTL from now.
    redis.call('ZADD', KEYS[4], 'GT', tonumber(ARGV[7]), ARGV[8])
    return {1, spent, reserved, 1, expired}
  end
  -- Expired, not reclaimed yet (a backlog past the reclaim limit): reclaim it before reserving again.
  local held = tonumber(redis.call('HGET', KEYS[5], ARGV[8]) or '0')
  redis.call('HDEL', KEYS[5], ARGV[8])
  redis.call('ZREM', KEYS[4], ARGV[8])
  if reserved <= held then redis.call('DEL', KEYS[2]); reserved = 0 else reserved = redis.call('DECRBY', KEYS[2], held) end
  expired = expired + 1
end
local cost = tonumber(ARGV[3])
if spent + reserved + cost > tonumber(ARGV[4]) then
  return {0, spent, reserved, 0, expired}
end
reserved = redis.call('INCRBY', KEYS[2], cost)
redis.call('HSET', KEYS[3], 'state', 'reserved', 'cost', cost, 'window', ARGV[6])
redis.call('ZADD', KEYS[4], tonumber(ARGV[7]), ARGV[8])
redis.call('HSET', KEYS[5], ARGV[8], cost)
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  for _, i in ipairs({2, 4, 5}) do redis.call('EXPIRE', KEYS[i], ttl) end
end
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[9]))
return {1, spent, reserved, 0, expired}
"""

# Reclaim, then read. Returns {spent, reserved, expired}.
_READ = _RECLAIM + """
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'), expired}
"""

# Settle a reservation at its cumulative actual cost (ARGV[3]): release its hold if still open, charge
# what was not charged before. An unknown id (no estimate was reserved) or an expired hold is still
# charged, so costs are never lost. ARGV: now, reclaim max, actual, window ttl, window, spent ttl,
# reservation id. Returns {applied, spent, reserved, charged, expired}.
_RECONCILE = _RECLAIM + """
local actual = tonumber(ARGV[3])
local before = redis.call('HGET', KEYS[3], 'actual')
local released = 0
local cost = redis.call('HGET', KEYS[5], ARGV[7])
if cost then
  released = 1
  redis.call('HDEL', KEYS[5], ARGV[7])
  redis.call('ZREM', KEYS[4], ARGV[7])
  local held = tonumber(redis.call('GET', KEYS[2]) or '0')
  if held <= tonumber(cost) then redis.call('DEL', KEYS[2]) else redis.call('DECRBY', KEYS[2], cost) end
end
local charge = actual
if before then charge = actual - tonumber(before) end
if charge > 0 then
  redis.call('INCRBY', KEYS[1], charge)
  local ttl = tonumber(ARGV[4])
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
end
-- Releasing at 0 what was never reserved nor charged changes nothing: no record is kept for it.
local applied = released == 1 or charge > 0 or (not before and redis.call('EXISTS', KEYS[3]) == 1)
if applied then
  if not before or charge > 0 then before = actual end
  redis.call('HSET', KEYS[3], 'state', 'spent', 'actual', before, 'window', ARGV[5])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
end
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
return {applied and 1 or 0, spent, reserved, math.max(charge, 0), expired}
"""

# A spent reservation only guards against duplicate reconciles; keep it a while.
_SPENT_TTL_S = 30 * 86400
_MAX_RESERVATION_ID = 256
_RECLAIM_MAX = 100  # expired holds reclaimed per call: bounds the script's time under a backlog
DEFAULT_RESERVATION_TTL_S = 3600


def _keys(tenant: str, window: str, reservation_id: str) -> list[str]:
    base = f"aios:{{{tenant}}}:budget"
    return [f"{base}:{window}:spent", f"{base}:{window}:reserved", f"{base}:res:{reservation_id}",
            f"{base}:{window}:open", f"{base}:{window}:holds"]


class RedisBudgetStore:
    def __init__(self, client: redis.Redis, *, reservation_ttl_s: int = DEFAULT_RESERVATION_TTL_S) -> None:
        self._redis = client
        self._hold_ms = reservation_ttl_s * 1000
        self._reserve = client.register_script(_RESERVE)
        self._reconcile = client.register_script(_RECONCILE)
        self._read = client.register_script(_READ)
        self.expired_total = 0  # holds this process reclaimed (nobody settled them in time)
        self.on_expired: Any = None  # called with (tenant, holds) after a call reclaimed some

    def _run(self, tenant: str, script: Any, keys: list[str], args: list[Any]) -> list[int]:
        try:
            out = [int(x) for x in script(keys=keys, args=args)]
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        if out[-1]:
            self.expired_total += out[-1]
            if self.on_expired is not None:
                self.on_expired(tenant, out[-1])
        return out

    def _res_ttl_s(self, spec: BudgetSpec) -> int:
        """How long a reservation's hash lives: its window's, and never forever (a `total` window keeps
        its counters, not the hashes of holds that expired): long enough for a late reconcile to find
        the window it was made in, past its hold's own deadline."""
        return max(window_ttl_s(spec.window) or _SPENT_TTL_S, self._hold_ms // 1000 + 86400)

    def reserve(self, tenant: str, spec: BudgetSpec, reservation_id: str, cost: float,
                now_ms: int) -> tuple[bool, BudgetState]:
        """Atomically hold ``cost`` against the budget until it is settled or expires;
        (False, state) when it does not fit."""
        _check_reservation_id(reservation_id)
        window = window_id(spec.window, now_ms)
        ok, spent, reserved, _dup, _expired = self._run(
            tenant, self._reserve, _keys(tenant, window, reservation_id),
            [now_ms, _RECLAIM_MAX, to_micros(cost), to_micros(spec.limit), window_ttl_s(spec.window), window,
             now_ms + self._hold_ms, reservation_id, self._res_ttl_s(spec)])
        return bool(ok), _state(tenant, spec, spent, reserved)

    def reconcile(self, tenant: str, spec: BudgetSpec, reservation_id: str, actual_cost: float,
                  now_ms: int) -> tuple[bool, BudgetState]:
        """Release the hold and charge the step's cumulative ``actual_cost`` (what was charged for it
        before is subtracted); (False, state) when nothing changed (a repeat)."""
        _check_reservation_id(reservation_id)
        try:
            # The window a reservation was made in never changes, so reading it
            # before the script is safe; unknown reservations count in today's.
            window = self._redis.hget(_keys(tenant, "", reservation_id)[2], "window")
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        window = str(window or window_id(spec.window, now_ms))
        applied, spent, reserved, _charged, _expired = self._run(
            tenant, self._reconcile, _keys(tenant, window, reservation_id),
            [now_ms, _RECLAIM_MAX, to_micros(actual_cost), window_ttl_s(spec.window), window, _SPENT_TTL_S,
             reservation_id])
        return bool(applied), _state(tenant, spec, spent, reserved)

    def read(self, tenant: str, spec: BudgetSpec, now_ms: int) -> BudgetState:
        """The budget of the current window, expired holds reclaimed first."""
        spent, reserved, _expired = self._run(tenant, self._read, _keys(tenant, window_id(spec.window, now_ms), ""),
                                              [now_ms, _RECLAIM_MAX])
        return _state(tenant, spec, spent, reserved)


def _state(tenant: str, spec: BudgetSpec, spent: int, reserved: int) -> BudgetState:
    return BudgetState(tenant=tenant, limit=spec.limit, spent=from_micros(spent), reserved=from_micros(reserved))


def _check_reservation_id(reservation_id: str) -> None:
    if not reservation_id:
        raise InvalidArgument("reservation_id is required")
    if len(reservation_id) > _MAX_RESERVATION_ID:
        raise InvalidArgument(f"reservation_id is longer than {_MAX_RESERVATION_ID} characters")
