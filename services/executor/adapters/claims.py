"""Claim-checked tool outputs: stored in Redis by content hash, read back by reference.

A step whose encoded output is bigger than ``AIOS_EXECUTOR_CLAIM_THRESHOLD_BYTES``
(256 KiB by default) publishes, as its output::

    {"$claim": "aios:{<tenant>}:claim:<sha256>", "bytes": <size of the JSON>, "sha256": "<hex>"}

and the output's JSON text (UTF-8) is stored under that key for the retention
setting (``AIOS_EXECUTOR_RECORD_TTL_S``, 7 days by default). Read it back with
``read_claim(redis_client, output)``: it checks the size and the hash and
returns the decoded output. A reader needs nothing from the executor but this
contract: GET the key, check the SHA-256, ``json.loads`` the bytes.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from services.common.errors import NotFound, PermanentError
from services.executor.adapters import keys
from services.executor.adapters.redis_calls import redis_call
from services.executor.domain.claims import CLAIM_FIELD, is_claim

__all__ = ["MemoryClaimStore", "RedisClaimStore", "read_claim"]


class RedisClaimStore:
    """Claims as plain Redis strings with a TTL; the same content is stored once."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def put(self, tenant: str, sha256: str, data: bytes, ttl_s: int) -> str:
        key = keys.claim(tenant, sha256)
        redis_call(self._client.set, key, data, ex=ttl_s)
        return key

    def get(self, key: str) -> bytes | None:
        value = redis_call(self._client.get, key)
        return value.encode() if isinstance(value, str) else value


class MemoryClaimStore:
    """The in-memory twin: same contract, a dict and a clock you can move."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.items: dict[str, tuple[bytes, float]] = {}

    def put(self, tenant: str, sha256: str, data: bytes, ttl_s: int) -> str:
        key = keys.claim(tenant, sha256)
        with self._lock:
            self.items[key] = (bytes(data), self.clock() + ttl_s)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self.items.get(key)
            if entry is None or entry[1] <= self.clock():
                self.items.pop(key, None)
                return None
            return entry[0]


def read_claim(client: redis.Redis, output: Any) -> Any:
    """The tool output a claim reference stands for (any other output is returned as is).

    Raises NotFound once the claim expired (past the retention setting) and
    PermanentError if the stored bytes do not match the reference's size and hash."""
    if not is_claim(output):
        return output
    data = RedisClaimStore(client).get(output[CLAIM_FIELD])
    if data is None:
        raise NotFound(f"claim {output[CLAIM_FIELD]} expired or never existed (retention: AIOS_EXECUTOR_RECORD_TTL_S)")
    if len(data) != output.get("bytes", len(data)) or hashlib.sha256(data).hexdigest() != output["sha256"]:
        raise PermanentError(f"claim {output[CLAIM_FIELD]} does not match its reference (size or sha256)")
    return json.loads(data)
