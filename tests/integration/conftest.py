"""Fixtures of the integration tests beyond the session's broker and Redis (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from infra.stack import Stack


@pytest.fixture
def client(infra: Stack) -> Iterator[redis.Redis]:
    """A client of the session's Redis (replies decoded to str), closed after the test."""
    c = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True)
    yield c
    c.close()


def redis_calls(client: redis.Redis, command: str) -> int:
    """How many times the session's Redis has run ``command`` (e.g. "hmget", "script|exists"): round
    trips a test can count, where timing them could not be asserted."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
