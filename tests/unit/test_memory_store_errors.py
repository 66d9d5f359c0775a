"""The memory store classifies Redis errors with ``errors.redis_error``: down, out of memory,
read-only or loading is transient (retry; UNAVAILABLE at the gRPC edge), a reply no retry can
change is permanent (dead letter; FAILED_PRECONDITION). A stand-in client fails every call."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.exceptions as rex

from services.common.errors import PermanentError, TransientError
from services.memory.domain import Item
from services.memory.store import MemoryStore

pytestmark = pytest.mark.timeout(30)

REDIS_FAILURES = [
    (redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused."), TransientError),
    (redis.TimeoutError("Timeout reading from socket"), TransientError),
    (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), TransientError),
    (rex.ReadOnlyError("You can't write against a read only replica."), TransientError),
    (rex.BusyLoadingError("Redis is loading the dataset in memory"), TransientError),
    (rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), PermanentError),
    (rex.ResponseError("ERR Error running script: user_script:3: attempt to compare nil"), PermanentError),
]


class FailingRedis:
    """Every command, pipeline and script fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def _fail(self, *_args: Any, **_kwargs: Any) -> Any:
        raise self.error

    def register_script(self, _source: str) -> Any:
        return self._fail

    def pipeline(self, *_args: Any, **_kwargs: Any) -> Any:
        return self  # queued commands fail on execute(), like a real pipeline's

    def __getattr__(self, _name: str) -> Any:
        return self._fail


@pytest.mark.parametrize(("error", "kind"), REDIS_FAILURES, ids=lambda v: type(v).__name__)
def test_memory_store_classifies_redis_errors(error: Exception, kind: type[Exception]) -> None:
    store = MemoryStore(FailingRedis(error))  # type: ignore[arg-type]
    calls = [
        lambda: store.get_fact("t1", "k"),
        lambda: store.put_fact("t1", "k", "{}", expected_version=-1, provenance_json="{}"),
        lambda: store.set_working("t1", "k", "{}", ttl_s=60),
        lambda: store.remember("t1", "kb", [Item("a", "x", "{}", "", "{}", "x")], [[0.0] * 4]),
    ]
    for call in calls:
        with pytest.raises(kind) as raised:
            call()
        assert raised.value.__cause__ is error  # the original reply stays in the traceback
