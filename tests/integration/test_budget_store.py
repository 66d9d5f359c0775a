"""The budget store on the real Redis: holds that nobody settles expire by themselves (reclaimed
inside the reserve script, so the aggregate `reserved` counter never keeps a dead hold), and a
reconcile charges the step's cumulative actual cost, so a cost reported after the step settled
(a late success) is charged once, not dropped."""

from __future__ import annotations

import uuid

import pytest
import redis

from services.policy.adapters.budget_store import RedisBudgetStore
from services.policy.domain.model import BudgetSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SPEC = BudgetSpec(limit=1.0, window="total", policy_ref="test@v1")


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_a_hold_nobody_settles_expires_and_frees_its_headroom(client: redis.Redis) -> None:
    """Old code: a hold stayed in `reserved` for the window (or forever for window: total)."""
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    assert store.reserve(t, SPEC, "run-1:pay", 0.6, now_ms=0)[0]
    ok, state = store.reserve(t, SPEC, "run-2:pay", 0.6, now_ms=59_000)
    assert not ok and state.reserved == pytest.approx(0.6)         # still held within its TTL
    ok, state = store.reserve(t, SPEC, "run-2:pay", 0.6, now_ms=60_001)
    assert ok and state.reserved == pytest.approx(0.6)             # run-1's hold was reclaimed
    assert store.read(t, SPEC, now_ms=120_002).reserved == 0.0     # and run-2's, by a read
    assert store.expired_total == 2
    # The planner settles run-1 after all (its result came in late): charged, nothing released twice.
    applied, state = store.reconcile(t, SPEC, "run-1:pay", 0.5, now_ms=130_000)
    assert applied and (state.spent, state.reserved) == pytest.approx((0.5, 0.0))


def test_settling_releases_the_hold_and_charges_the_actual_cost(client: redis.Redis) -> None:
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    store.reserve(t, SPEC, "r:a", 0.2, now_ms=0)
    applied, state = store.reconcile(t, SPEC, "r:a", 0.0, now_ms=10)   # the step failed for good
    assert applied and (state.spent, state.reserved) == (0.0, 0.0)
    # A success arrives after the planner gave up on the step: its cost is charged, once.
    applied, state = store.reconcile(t, SPEC, "r:a", 0.4, now_ms=20)
    assert applied and state.spent == pytest.approx(0.4)
    applied, state = store.reconcile(t, SPEC, "r:a", 0.4, now_ms=30)
    assert not applied and state.spent == pytest.approx(0.4)
    # Nothing of the hold is left to expire later.
    assert store.read(t, SPEC, now_ms=10**9).reserved == 0.0 and store.expired_total == 0


def test_a_cost_above_the_estimate_is_charged_in_full(client: redis.Redis) -> None:
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    store.reserve(t, SPEC, "r:a", 0.1, now_ms=0)
    _applied, state = store.reconcile(t, SPEC, "r:a", 0.95, now_ms=1)
    assert (state.spent, state.reserved, state.remaining) == pytest.approx((0.95, 0.0, 0.05))
    assert not store.reserve(t, SPEC, "r:b", 0.1, now_ms=2)[0]


def test_a_reclaimed_hold_is_reserved_again_and_only_if_it_still_fits(client: redis.Redis) -> None:
    """A step approved after its hold expired asks again with the same reservation id. Old code
    answered "ok" (a duplicate) because the `res` hash was still there: the step ran with nothing
    held while other steps had used the freed headroom."""
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    assert store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=0)[0]
    assert store.reserve(t, SPEC, "run-2:pay", 0.5, now_ms=60_001)[0]         # run-1's hold was reclaimed
    ok, state = store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=60_002)      # approved the next morning
    assert not ok and state.reserved == pytest.approx(0.5)                    # 0.5 + 0.6 > 1.0: refused
    store.reconcile(t, SPEC, "run-2:pay", 0.0, now_ms=60_003)
    ok, state = store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=60_004)
    assert ok and state.reserved == pytest.approx(0.6)                        # held again
    # A live hold asked again is still a duplicate: nothing is held twice.
    ok, state = store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=60_005)
    assert ok and state.reserved == pytest.approx(0.6)
    # And a settled reservation is never held again.
    store.reconcile(t, SPEC, "run-1:gate", 0.6, now_ms=60_006)
    ok, state = store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=60_007)
    assert ok and (state.spent, state.reserved) == pytest.approx((0.6, 0.0))


def test_reservations_of_a_total_budget_expire(client: redis.Redis) -> None:
    """A `window: total` budget keeps its counters forever, but a reservation's own hash must not
    outlive what it guards: old code gave it the window's TTL, which is none for total."""
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    store.reserve(t, SPEC, "run-1:a", 0.1, now_ms=0)
    assert client.ttl(f"aios:{{{t}}}:budget:res:run-1:a") > 0


def test_releasing_a_reservation_never_made_leaves_nothing_behind(client: redis.Redis) -> None:
    """Settling at 0 a step that never reserved changes nothing and keeps no 30-day hash."""
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    applied, state = store.reconcile(t, SPEC, "run-1:never", 0.0, now_ms=0)
    assert not applied and (state.spent, state.reserved) == (0.0, 0.0)
    assert not client.exists(f"aios:{{{t}}}:budget:res:run-1:never")


def test_a_hold_asked_again_lasts_a_full_ttl_from_then(client: redis.Redis) -> None:
    """An approval a minute before the hold's deadline dispatches a step that may run for minutes: old
    code kept the first deadline, so the hold was reclaimed while the step ran."""
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    assert store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=0)[0]
    assert store.reserve(t, SPEC, "run-1:gate", 0.6, now_ms=59_000)[0]       # approved: asked again
    ok, state = store.reserve(t, SPEC, "run-2:pay", 0.5, now_ms=100_000)     # 40 s after the first deadline
    assert not ok and state.reserved == pytest.approx(0.6) and store.expired_total == 0


def test_an_expired_hold_behind_a_reclaim_backlog_is_not_taken_for_a_live_one(client: redis.Redis) -> None:
    """A reserve reclaims at most 100 expired holds; one asked again beyond them has passed its deadline
    all the same and is held again from now, not answered as a live duplicate."""
    store, t = RedisBudgetStore(client, reservation_ttl_s=60), tenant()
    for i in range(101):
        store.reserve(t, SPEC, f"old-{i:03}", 0.001, now_ms=0)
    store.reserve(t, SPEC, "run-1:gate", 0.5, now_ms=0)  # sorts after the old ones at the same deadline
    ok, state = store.reserve(t, SPEC, "run-1:gate", 0.5, now_ms=60_001)
    assert ok and store.expired_total == 101                  # 100 reclaimed by the sweep, the gate by itself
    assert client.zscore(f"aios:{{{t}}}:budget:total:open", "run-1:gate") == 120_001
    assert state.reserved == pytest.approx(0.501)             # the gate again, and old-100 not swept yet
