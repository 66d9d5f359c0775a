"""One error hierarchy. Each error says whether retrying can help (Temporal's
``non_retryable``, inverted): that flag picks retry-or-dead-letter on Kafka and
the status code at the gRPC edge."""

from __future__ import annotations


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


def is_retryable(exc: BaseException) -> bool:
    """Errors we did not classify are treated as transient: a redelivery is
    cheaper than losing work, and the capped backoff bounds the cost."""
    if isinstance(exc, AiosError):
        return exc.retryable
    return not isinstance(exc, (ValueError, TypeError, KeyError))
