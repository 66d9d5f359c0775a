"""A hot-standby planner fires no timers: only the replica that holds the planner group's standby
lease (the group's member) runs the timer poller. A standby that polled too would race the member
for every due timer and send its FireTimer commands to partitions it does not own, doubling the
timer traffic the member then has to discard (and it keeps polling Redis every 50 ms for nothing).

A planner is built in this process with AIOS_STANDBY_LEASE_MS while another "replica" holds the
lease; a due timer must stay in Redis while it stands by, and fire once the lease is free and this
planner takes over."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from infra.stack import procs
from services.common.runtime import StandbyLease
from services.common.settings import load_settings
from services.planner.main import PlannerSettings, bootstrap
from services.planner.store import TENANTS
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_standby_planner_fires_no_timer_until_it_holds_the_lease(mesh_env: dict[str, str], prefix: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_PLANNER_ADDR", f"127.0.0.1:{procs.free_port()}")
    monkeypatch.setenv("AIOS_PLANNER_METRICS_PORT", "0")
    monkeypatch.setenv("AIOS_STANDBY_LEASE_MS", "300")
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")
    client = redis.Redis.from_url(mesh_env["AIOS_REDIS_URL"], decode_responses=True, socket_timeout=5)
    tenant = f"standby-{uuid.uuid4().hex[:8]}"
    timers, timerdata = f"aios:{{{tenant}}}:timers", f"aios:{{{tenant}}}:timerdata"
    lease_key = StandbyLease.key_for(prefix + "planner")
    client.set(lease_key, "other-replica/1/cafe", px=60_000)  # the active planner, elsewhere
    client.sadd(TENANTS, tenant)
    client.zadd(timers, {"t-1": int(time.time() * 1000) - 1000})
    client.hset(timerdata, "t-1", json.dumps({"kind": "step_timeout", "step_id": "a", "run_id": "run-x"}))
    rt = bootstrap(load_settings(PlannerSettings))
    try:
        wait_for(lambda: rt.consumers[0].standing_by.is_set(), timeout_s=30, message="the planner stands by")
        time.sleep(1.0)  # twenty poll intervals of 50 ms
        assert client.zscore(timers, "t-1") is not None, "a standby planner fired a due timer"
        client.delete(lease_key)  # the active planner is gone: this one takes over, and fires it
        wait_for(lambda: client.zscore(timers, "t-1") is None, timeout_s=30,
                 message="the planner that took the lease fires the due timer")
    finally:
        rt.shutdown()
        client.srem(TENANTS, tenant)
        client.delete(timers, timerdata)
        client.close()
