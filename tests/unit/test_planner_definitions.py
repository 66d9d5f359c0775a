"""Workflow snapshots (RedisDefinitions): written once per version and process within a minute,
not once per run start; written again after that (a snapshot lost with Redis's last second of
writes comes back)."""

from __future__ import annotations

from typing import Any

from services.planner.store import RedisDefinitions


class CountingRedis:
    """Stands in for the Redis client: counts SETs and keeps the values (SET NX semantics)."""

    def __init__(self) -> None:
        self.sets = 0
        self.data: dict[str, str] = {}

    def set(self, key: str, value: str, nx: bool = False) -> bool:
        self.sets += 1
        if nx and key in self.data:
            return False
        self.data[key] = value
        return True

    def get(self, key: str) -> Any:
        return self.data.get(key)


def test_a_version_is_snapshotted_once_per_minute_not_once_per_run() -> None:
    client = CountingRedis()
    defs = RedisDefinitions(client)  # type: ignore[arg-type]
    for _ in range(100):
        defs.snapshot("pay", 1, {"name": "pay", "version": 1})
    defs.snapshot("pay", 2, {"name": "pay", "version": 2})
    assert client.sets == 2
    assert defs.load("pay", 1) == {"name": "pay", "version": 1}
    client.data.clear()  # Redis lost its last writes
    defs._written = {k: t - RedisDefinitions.REWRITE_S for k, t in defs._written.items()}  # a minute later
    defs.snapshot("pay", 1, {"name": "pay", "version": 1})
    assert defs.load("pay", 1) == {"name": "pay", "version": 1}
