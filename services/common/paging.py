"""Keyset paging over Redis sorted sets, for the visibility APIs (ListRuns, audit queries).

A listing is one sorted set (an index: every member of it matches the filters), read newest
first: by score (a time in ms) descending, then by member descending for equal scores. A page
ends at a cursor, the (score, member) of its last item; the next page starts strictly after
it. Offsets would shift when members arrive at the head while someone pages (each page would
repeat the items pushed down); a cursor does not: new members sort before it and never enter a
later page, and no member that was there when paging began is skipped or seen twice.

The page token is the cursor, opaque to callers (base64 of JSON), and carries a digest of the
query it belongs to, so a token replayed with other filters is refused instead of silently
paging a different listing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any
from urllib.parse import quote

from services.common.errors import InvalidArgument
from services.common.uow import redis_call

__all__ = ["Cursor", "Page", "combination_key", "combinations_of", "decode_token", "encode_token", "zpage"]

INF = float("inf")


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last item's score and member."""

    score: float
    member: str


@dataclass
class Page:
    items: list[tuple[str, float]]  # (member, score), newest first
    next: Cursor | None  # None on the last page
    total: int  # members matching the query, all pages


def _scope(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(cursor: Cursor | None, query: Any) -> str:
    """The opaque token of the page after ``cursor`` ("" when there is none)."""
    if cursor is None:
        return ""
    raw = json.dumps({"s": cursor.score, "m": cursor.member, "q": _scope(query)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, query: Any) -> Cursor | None:
    """The cursor of a token from ``encode_token`` for the same query; None for "" (the first page)."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = Cursor(float(raw["s"]), str(raw["m"]))
        scope = str(raw["q"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument("page_token is not a token this API issued: pass next_page_token of the "
                              "previous page unchanged, or leave it empty for the first page") from None
    if scope != _scope(query):
        raise InvalidArgument("page_token belongs to a listing with other filters: keep the filters of the "
                              "first page while paging, or leave page_token empty to start over")
    return cursor


def _bound(value: float, *, exclusive: bool = False) -> str:
    if value in (INF, -INF):
        return "+inf" if value > 0 else "-inf"
    return ("(" if exclusive else "") + repr(float(value))


def _after(client: Any, key: str, cursor: Cursor | None, low: float, high: float,
           count: int) -> list[tuple[str, float]]:
    """Up to ``count`` members after the cursor (or from ``high``, exclusive), newest first, in one
    round trip: the members tied with the cursor's score are few (same millisecond)."""
    pipe = client.pipeline(transaction=False)
    if cursor is not None:
        pipe.zrangebyscore(key, _bound(cursor.score), _bound(cursor.score), withscores=True)
        top = _bound(cursor.score, exclusive=True)
    else:
        top = _bound(high, exclusive=True)
    pipe.zrevrangebyscore(key, top, _bound(low), start=0, num=count, withscores=True)
    got = redis_call(pipe.execute)
    ties: list[tuple[str, float]] = []
    if cursor is not None:
        ties = sorted(((m, s) for m, s in got[0] if m < cursor.member), reverse=True)
    return [*ties, *((m, float(s)) for m, s in got[-1])][:count]


def zpage(client: Any, keys: str | list[str], *, limit: int, cursor: Cursor | None = None, since: float = -INF,
          until: float = INF, accept: Callable[[list[str]], list[bool]] | None = None,
          chunk: int = 500) -> Page:
    """One page of ``keys`` (one index, or the union of disjoint ones, e.g. every action a glob
    names) with scores in [since, until), newest first, after ``cursor``.

    ``accept`` filters members the index cannot (it is given a chunk of members and says which
    match): then the page and the count read every candidate, so use it only on small sets (one
    run's audit timeline), never on a tenant-wide index."""
    keys = [keys] if isinstance(keys, str) else keys
    if accept is not None:
        if len(keys) != 1:
            raise ValueError("accept filters one small index")
        return _filtered(client, keys[0], limit, cursor, since, until, accept, chunk)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zcount(key, _bound(since), _bound(until, exclusive=True))
    total = sum(int(n) for n in redis_call(pipe.execute))
    items = sorted((item for key in keys for item in _after(client, key, cursor, since, until, limit + 1)),
                   key=lambda it: (it[1], it[0]), reverse=True)
    return _cut(items, limit, total)


def _cut(items: list[tuple[str, float]], limit: int, total: int) -> Page:
    more = len(items) > limit
    items = items[:limit]
    return Page(items, Cursor(items[-1][1], items[-1][0]) if more else None, total)


def _filtered(client: Any, key: str, limit: int, cursor: Cursor | None, since: float, until: float,
              accept: Callable[[list[str]], list[bool]], chunk: int) -> Page:
    items: list[tuple[str, float]] = []
    total, at = 0, None
    while True:
        got = _after(client, key, at, since, until, chunk)
        if not got:
            return _cut(items, limit, total)
        for (member, score), ok in zip(got, accept([m for m, _s in got]), strict=True):
            if ok:
                total += 1
                if (cursor is None or (score, member) < (cursor.score, cursor.member)) and len(items) <= limit:
                    items.append((member, score))
        at = Cursor(got[-1][1], got[-1][0])


def combination_key(prefix: str, dims: Sequence[tuple[str, str]]) -> str:
    """The index of the items with these (dimension, value) pairs (empty values left out), under
    ``prefix``. Values are percent-encoded, so an actor such as ``source:crm`` cannot pass for
    another dimension."""
    return ":".join([prefix, *(f"{name}={quote(value, safe='')}" for name, value in dims if value)])


def combinations_of(dims: Mapping[str, str], *, smallest: int = 0) -> list[dict[str, str]]:
    """Every combination of the dimensions that have a value (of at least ``smallest`` of them):
    the indexes one item belongs to, so that any filter reads exactly one index."""
    present = [name for name, value in dims.items() if value]
    return [{name: dims[name] for name in chosen}
            for n in range(smallest, len(present) + 1) for chosen in combinations(present, n)]
