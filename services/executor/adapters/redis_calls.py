"""Every Redis call the executor makes goes through ``redis_call``: a Redis
failure becomes the mesh's error (``services.common.errors.redis_error``):
unreachable, timed out, OOM, READONLY, LOADING, failover -> TransientError
(the consumer retries the record); any other reply -> PermanentError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from services.common.errors import redis_error

__all__ = ["redis_call"]


def redis_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one Redis call (a command, a script or a pipeline's execute)."""
    try:
        return fn(*args, **kwargs)
    except redis.RedisError as exc:
        raise redis_error(exc) from exc
