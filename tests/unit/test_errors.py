"""The error hierarchy's retry flag, and which Redis errors are transient.

The OOM case runs against a real Redis of its own (started here, stopped by PID), because
the point is the exact reply a full Redis sends; READONLY needs a replica to get for real,
so that exception is built directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex

from infra.stack import Ports, Stack
from services.common.errors import (
    BadRecord,
    PermanentError,
    RecordTooLarge,
    TransientError,
    is_retryable,
    redis_error,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A Redis for this module only: the test fills its memory limit, which must not touch the session's."""
    stack = Stack(Ports.fresh(), run_dir=Path(tmp_path_factory.mktemp("errors-redis")))
    try:
        stack.start_redis(persist=False)
        client = redis.Redis(host="127.0.0.1", port=stack.ports.redis, socket_timeout=5)
        yield client
        client.close()
    finally:
        stack.down()


def test_oom_reply_from_a_full_redis_is_transient(own_redis: redis.Redis) -> None:
    own_redis.config_set("maxmemory", "1")
    try:
        with pytest.raises(rex.ResponseError) as caught:
            own_redis.set("k", "v" * 100)
    finally:
        own_redis.config_set("maxmemory", "0")
    # redis-py turns the "OOM ..." reply into OutOfMemoryError and drops the prefix.
    assert isinstance(caught.value, rex.OutOfMemoryError) and "maxmemory" in str(caught.value), caught.value
    assert is_retryable(caught.value)
    classified = redis_error(caught.value)
    assert isinstance(classified, TransientError) and "OutOfMemoryError" in str(classified)


@pytest.mark.parametrize("reply", ["NOREPLICAS Not enough good replicas to write.",
                                   "MISCONF Redis is configured to save RDB snapshots, but it's not able to persist",
                                   "BUSY Redis is busy running a script."])
def test_a_transient_reply_inside_a_pipeline_stays_transient(own_redis: redis.Redis, reply: str) -> None:
    """redis-py rewrites an error inside a pipeline as "Command # 1 (...) of pipeline caused error:
    <reply>"; the reply's code still decides (was: read from the prefix, so a pipelined MISCONF was
    permanent and its records dead-lettered)."""
    pipe = own_redis.pipeline(transaction=False)
    pipe.eval(f"return redis.error_reply({reply!r})", 0)
    with pytest.raises(rex.ResponseError) as caught:
        pipe.execute()
    assert "of pipeline caused error" in str(caught.value), caught.value
    assert is_retryable(caught.value)
    assert isinstance(redis_error(caught.value), TransientError)


@pytest.mark.parametrize("exc", [
    rex.ReadOnlyError("You can't write against a read only replica."),
    rex.BusyLoadingError("Redis is loading the dataset in memory"),
    rex.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT."),
    rex.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    rex.ResponseError("LOADING Redis is loading the dataset in memory"),
    rex.ResponseError("READONLY You can't write against a read only replica."),
    rex.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
    rex.ResponseError("CLUSTERDOWN The cluster is down"),
    rex.ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
    rex.ConnectionError("Error 111 connecting to 127.0.0.1:16379. Connection refused."),
    rex.TimeoutError("Timeout reading from socket"),
    rex.ClusterDownError("The cluster is down"),
    rex.MovedError("3999 127.0.0.1:6381"),
])
def test_redis_unavailability_and_failover_are_transient(exc: Exception) -> None:
    assert is_retryable(exc), exc
    classified = redis_error(exc)
    assert isinstance(classified, TransientError)
    assert classified.__cause__ is exc or str(exc) in str(classified)


@pytest.mark.parametrize("exc", [
    rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rex.ResponseError("ERR Error running script (call to f_x): user_script:1: attempt to compare nil"),
    rex.DataError("Invalid input of type: 'dict'"),
])
def test_a_redis_command_that_can_never_succeed_is_not_retried(exc: Exception) -> None:
    assert not is_retryable(exc), exc
    assert isinstance(redis_error(exc), PermanentError)


def test_record_too_large_is_a_bad_record_and_not_retryable() -> None:
    err = RecordTooLarge("too big")
    assert isinstance(err, BadRecord) and not is_retryable(err)


def test_unclassified_errors_stay_retryable_and_value_errors_do_not() -> None:
    assert is_retryable(RuntimeError("who knows")) and is_retryable(TransientError("x"))
    assert not is_retryable(ValueError("bad")) and not is_retryable(PermanentError("no"))
