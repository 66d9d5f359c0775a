"""One error hierarchy. Each error says whether retrying can help (Temporal's
``non_retryable``, inverted): that flag picks retry-or-dead-letter on Kafka and
the status code at the gRPC edge."""

from __future__ import annotations

import redis.exceptions as _redis


class AiosError(Exception):
    """Base of every error the mesh raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable

    @property
    def kind(self) -> str:
        return type(self).__name__


class TransientError(AiosError):
    """Something outside us is briefly unavailable; the same call may succeed later."""

    retryable = True


class PermanentError(AiosError):
    """Retrying the same input can never succeed."""

    retryable = False


class BadRecord(PermanentError):
    """A Kafka record that cannot be decoded or does not fit its contract."""


class RecordTooLarge(BadRecord):
    """A record over the Kafka message size limit: it can never be produced as it is."""


class UnknownSchema(BadRecord):
    """The record names a schema this deployment does not know."""


class InvalidArgument(PermanentError):
    """A request argument is missing or malformed (gRPC INVALID_ARGUMENT)."""


class NotFound(PermanentError):
    """The named run, workflow or fact does not exist (gRPC NOT_FOUND)."""


class Conflict(PermanentError):
    """A compare-and-set lost: the caller's version is stale (gRPC ABORTED)."""


class PolicyDenied(PermanentError):
    """The policy service refused the action."""


class ConfigError(PermanentError):
    """A setting or declarative file is invalid; the process must not start."""


# Reply prefixes of a Redis that is alive but cannot serve this command *now*: out of
# memory (OOM), a replica or a demoted primary (READONLY), loading its dataset after a
# restart (LOADING), running a long script (BUSY), a replica cut off from its primary
# (MASTERDOWN), too few replicas for min-replicas-to-write (NOREPLICAS), a snapshot that
# cannot be written (MISCONF), and a cluster mid-failover or resharding (CLUSTERDOWN,
# TRYAGAIN, MOVED, ASK). Each one clears without any change to the command.
_TRANSIENT_REPLIES = ("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "MISCONF",
                      "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK")
# redis-py's own classes for some of those replies and for an unreachable server.
_TRANSIENT_TYPES = (_redis.ConnectionError, _redis.TimeoutError, _redis.ReadOnlyError, _redis.BusyLoadingError,
                    _redis.OutOfMemoryError, _redis.MasterDownError, _redis.ClusterDownError,
                    _redis.TryAgainError, _redis.MovedError, _redis.AskError)


def redis_error(exc: BaseException) -> AiosError:
    """Classify a Redis failure.

    TransientError (retry with backoff; on Kafka the record waits, at the gRPC edge
    UNAVAILABLE) for: connection and timeout errors, OOM ("OOM command not allowed"),
    READONLY (a replica, or a primary demoted by a failover), LOADING (restarted and
    reading its AOF), BUSY (a long script), MASTERDOWN, NOREPLICAS, MISCONF, and cluster
    failover or resharding replies (CLUSTERDOWN, TRYAGAIN, MOVED, ASK).
    PermanentError for every other reply (WRONGTYPE, a Lua error, bad arguments): the
    same command can never succeed, so retrying for minutes only delays the dead letter.
    """
    if isinstance(exc, AiosError):
        return exc
    if _redis_transient(exc):
        err: AiosError = TransientError(f"redis unavailable: {type(exc).__name__}: {exc}")
    else:
        err = PermanentError(f"redis refused the command: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _redis_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, _redis.ResponseError):
        # redis-py prefixes an error inside a pipeline: "Command # 2 (EVALSHA ...) of pipeline caused
        # error: MISCONF ...". The reply's code follows that prefix.
        reply = str(exc).rsplit("of pipeline caused error: ", 1)[-1]
        head = reply.lstrip("-").split(" ", 1)[0].upper()
        return head in _TRANSIENT_REPLIES
    # Other RedisErrors (DataError: a value redis-py cannot encode, and the like) are about the input.
    return not isinstance(exc, _redis.RedisError)


def is_retryable(exc: BaseException) -> bool:
    """Whether the same call may succeed later. Redis errors are classified by
    ``redis_error``; errors we did not classify are treated as transient: a
    redelivery is cheaper than losing work, and the capped backoff bounds the cost."""
    if isinstance(exc, AiosError):
        return exc.retryable
    if isinstance(exc, _redis.RedisError):
        return _redis_transient(exc)
    return not isinstance(exc, (ValueError, TypeError, KeyError))


class Backpressure(TransientError):
    """The handler is at capacity: ``deferred`` records (topic, partition, offset) were not handled
    and must come again later. The consumer loop pauses and rewinds their partitions, acknowledges
    the rest of the batch, and never dead-letters a record for waiting (it is not a failure)."""

    def __init__(self, message: str, deferred: list[tuple[str, int, int]], retry_after_s: float = 0.2) -> None:
        super().__init__(message)
        self.deferred = deferred
        self.retry_after_s = retry_after_s
