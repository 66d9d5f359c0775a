"""The sandbox third-party API: a stand-in for the bank and shop systems the executor's connectors call.

It behaves like a real payments-style API so retries, timeouts and compensation are tested for real:

* Every ``POST`` under ``/v1`` requires ``Idempotency-Key`` (1..255 chars), Stripe semantics, scoped per
  path + key: same key + same JSON body replays the first response byte-for-byte with
  ``Idempotent-Replayed: true`` and no new effect; same key + different body -> 422; a duplicate while the
  first is still executing -> 409 with ``Retry-After``. Stored outcomes: successes and business errors
  (409 insufficient stock, 422 over-refund, 409 order exists). Not stored, so a retry with the same key
  can still succeed: 400 validation errors, 404 unknown resources, injected faults and crashes.
* Effects: each successful execution counts once under ``counts[kind]`` and ``by_key[kind][key]``; replays
  never count, so ``by_key`` values > 1 mean one key was reused for several effects (a connector bug).
  A no-op success (blocking an already blocked card, closing a closed case, releasing nothing) still counts
  per key -- the caller's intent was carried out exactly once -- and is also tallied in ``noops[kind]``.
* Faults (``POST /_sandbox/faults``) apply to ``/v1`` requests after validation and before any state is
  touched, so a failed request has no effect and leaves its key unrecorded.
* Errors are JSON ``{"error": message, "code": machine_code, ...}``; the ``code`` tells a transient 409
  (``idempotency_key_in_use``) from a permanent one (``insufficient_stock``).

Conventions: ids are strings (``case_<hex>``, ``ref_<hex>``...); money is an integer in MINOR units
(cents), as in Stripe; timestamps are ISO-8601 UTC. Cards need no seeding (unknown cards are ``active``);
unknown SKUs have 0 stock. State is in memory, guarded by one ``threading.Lock`` that is never held across
an ``await``, so it is safe under any event loop or thread. ``/_sandbox/*`` and ``/healthz`` are the
control plane: no key, no faults, not counted in ``total_requests``.

Endpoints (effect kind in brackets):
  POST /v1/cards/{id}/block {customer_id, reason?} -> 200 [card.block]; /unblock -> 200 [card.unblock]
  POST /v1/cases {customer_id, category, summary} -> 201 [case.open]; /v1/cases/{id}/close -> 200|404 [case.close]
  POST /v1/messages {customer_id, channel, body} -> 202 [message.send]
  POST /v1/orders {order_id, customer_id, sku, quantity, amount} -> 201|409 [order.create]
  POST /v1/inventory/{sku}/reserve {order_id, quantity} -> 200|409 [inventory.reserve]
  POST /v1/inventory/{sku}/release {order_id, quantity?=all held} -> 200 [inventory.release]
  POST /v1/notifications {customer_id, order_id, template, body?} -> 202 [notification.send]
  POST /v1/refunds {order_id, amount, reason?} -> 201|404|422 [refund.create]
  POST /v1/payments/{id}/capture {amount?} -> 200 [payment.capture]
  GET  /v1/cards/{id}, /v1/cases/{id}, /v1/orders/{id}, /v1/refunds/{id}, /v1/inventory/{sku}
  GET  /healthz, /_sandbox/effects, /_sandbox/state; POST /_sandbox/reset; PUT /_sandbox/inventory/{sku}
  GET|POST|DELETE /_sandbox/faults {fail_rate, fail_status, latency_ms, jitter_ms, paths, fail_next, seed,
  retry_after_s}: POST replaces the whole config. Latency = --latency-ms baseline + latency_ms + uniform(0,
  jitter_ms); paths are prefixes; fail_next wins over fail_rate; injected 429s carry Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import http
import json
import random
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Json = dict[str, Any]
MISSING_KEY = "missing Idempotency-Key header: send a unique key per intended effect; retries reuse it"


class ApiError(Exception):
    """An error response chosen by the API; ``stored`` says whether idempotency keeps it for replays."""

    def __init__(self, status: int, message: str, code: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: Json = {"error": message, "code": code, **extra}
        self.headers: dict[str, str] = {}

    @property
    def stored(self) -> bool:
        # 400/404 mean the request never started executing (Stripe does not save those either).
        return self.status not in (400, 404)


@dataclass
class Faults:
    fail_rate: float = 0.0
    fail_status: int = 503
    latency_ms: int = 0
    jitter_ms: int = 0          # extra uniform(0, jitter_ms) per request
    paths: list[str] = field(default_factory=list)   # prefixes; empty = every /v1 path
    fail_next: int = 0
    seed: int | None = None
    retry_after_s: int = 1      # sent as Retry-After on injected 429s

    def matches(self, path: str) -> bool:
        return not self.paths or any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.paths)

    @classmethod
    def parse(cls, body: Json) -> Faults:
        unknown = set(body) - {f.name for f in fields(cls)}
        if unknown:   # a typo like "failrate" would otherwise silently inject nothing
            raise ApiError(400, f"unknown fault fields: {sorted(unknown)}", "invalid_request")
        f = cls(**body)
        num = (int, float)
        ok = (isinstance(f.fail_rate, num) and not isinstance(f.fail_rate, bool) and 0.0 <= f.fail_rate <= 1.0
              and _is_int(f.fail_status) and 400 <= f.fail_status <= 599
              and all(_is_int(v) and v >= 0 for v in (f.latency_ms, f.jitter_ms, f.fail_next, f.retry_after_s))
              and isinstance(f.paths, list) and all(isinstance(p, str) and p for p in f.paths)
              and (f.seed is None or _is_int(f.seed)))
        if not ok:
            raise ApiError(400, "invalid faults: fail_rate 0..1, fail_status 400..599, latency_ms/jitter_ms/"
                           "fail_next/retry_after_s ints >= 0, paths list of strings, seed int", "invalid_request")
        return f


@dataclass
class _Idem:
    fingerprint: str
    status: int = 0             # 0 while the first request is still executing
    body: bytes = b""


class SandboxState:
    def __init__(self, latency_ms: int = 0) -> None:
        self.lock = threading.Lock()
        self.base_latency_ms = latency_ms   # process config: survives reset
        self.reset()

    def reset(self) -> None:
        self.faults = Faults()
        self.rng = random.Random()
        self.cards: dict[str, Json] = {}
        self.cases: dict[str, Json] = {}
        self.orders: dict[str, Json] = {}
        self.inventory: dict[str, int] = {}
        self.reservations: Counter[tuple[str, str]] = Counter()
        self.refunds: dict[str, Json] = {}
        self.payments: dict[str, Json] = {}
        self.outbox: list[Json] = []
        self.idem: dict[tuple[str, str], _Idem] = {}
        self.counts: Counter[str] = Counter()
        self.by_key: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.noops: Counter[str] = Counter()
        self.total_requests = self.replays = self.faults_injected = 0

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)   # seeded runs fail the same requests every time

    def plan(self, path: str) -> tuple[float, int | None]:
        """(delay seconds, injected status or None); decided under the lock so fail_next is exact."""
        f, delay, fail = self.faults, float(self.base_latency_ms), None
        self.total_requests += 1
        if f.matches(path):
            delay += f.latency_ms + (self.rng.uniform(0, f.jitter_ms) if f.jitter_ms else 0.0)
            if f.fail_next > 0:
                f.fail_next -= 1
                fail = f.fail_status
            elif f.fail_rate and self.rng.random() < f.fail_rate:
                fail = f.fail_status
        if fail is not None:
            self.faults_injected += 1
        return delay / 1000.0, fail

    def claim(self, slot: tuple[str, str], fingerprint: str) -> tuple[_Idem, bool]:
        """Reserve the key -> (new record, False), or (stored record, True) to replay it."""
        rec = self.idem.get(slot)
        if rec is None:
            rec = self.idem[slot] = _Idem(fingerprint)
            return rec, False
        if rec.fingerprint != fingerprint:
            raise ApiError(422, "Idempotency-Key was already used with a different request body; "
                           "use a new key for a new effect", "idempotency_key_reused")
        if rec.status == 0:
            err = ApiError(409, "a request with this Idempotency-Key is still in progress; retry later",
                           "idempotency_key_in_use")
            err.headers["Retry-After"] = "1"
            raise err
        self.replays += 1
        return rec, True

    def settle(self, slot: tuple[str, str], rec: _Idem, status: int, body: bytes | None) -> None:
        """Store the outcome for replays, or (body None) forget the key so a retry can execute."""
        if self.idem.get(slot) is not rec:   # /_sandbox/reset ran meanwhile: the key is already forgotten
            return
        if body is None:
            del self.idem[slot]
        else:
            rec.status, rec.body = status, body

    def effects(self) -> Json:
        return {"counts": dict(self.counts), "by_key": {k: dict(v) for k, v in self.by_key.items()},
                "noops": dict(self.noops), "total_requests": self.total_requests, "replays": self.replays,
                "faults_injected": self.faults_injected}

    def snapshot(self) -> Json:
        return {"cards": self.cards, "cases": self.cases, "orders": self.orders, "inventory": self.inventory,
                "reservations": {f"{s}/{o}": n for (s, o), n in self.reservations.items() if n},
                "refunds": self.refunds, "payments": self.payments, "outbox": self.outbox}


# -- helpers ------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dump(body: Json) -> bytes:
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def _resp(status: int, body: Json | bytes, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else _dump(body)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def _err(e: ApiError) -> Response:
    return _resp(e.status, e.body, e.headers)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _str(b: Json, name: str, *, required: bool = True) -> str:
    v = b.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise ApiError(400, f"field {name!r} is required and must be a non-empty string", "invalid_request")
    return v


def _int(b: Json, name: str, *, minimum: int = 0, required: bool = True) -> int:
    v = b.get(name)
    if v is None and not required:
        return 0
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or v < minimum:
        unit = " (minor units, e.g. cents)" if name == "amount" else ""
        raise ApiError(400, f"field {name!r} must be an integer >= {minimum}{unit}", "invalid_request")
    return int(v)


async def _json_body(request: Request) -> Json:
    raw = await request.body()
    if not raw.strip():
        return {}   # endpoints whose fields are all optional accept an empty body
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"invalid JSON body: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "JSON body must be an object", "invalid_json")
    return body


def _fault(status: int, faults: Faults) -> Response:
    headers = {"Retry-After": str(faults.retry_after_s)} if status == 429 else None
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:   # an unassigned code such as 599
        phrase = "error"
    return _resp(status, {"error": f"injected fault: {phrase}", "code": "injected_fault"}, headers)


# -- endpoint wrappers ----------------------------------------------------------------------------------------
# A mutating handler runs under the lock and returns (status, body, changed_state).
Mutation = Callable[[SandboxState, dict[str, str], Json], tuple[int, Json, bool]]
Read = Callable[[SandboxState, dict[str, str]], Json]


def _mutating(kind: str, fn: Mutation) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        st: SandboxState = request.app.state.sandbox
        path, key = request.url.path, request.headers.get("idempotency-key")
        try:
            if not key:
                raise ApiError(400, MISSING_KEY, "missing_idempotency_key")
            if len(key) > 255:
                raise ApiError(400, "Idempotency-Key must be at most 255 characters", "invalid_idempotency_key")
            body = await _json_body(request)
        except ApiError as e:
            with st.lock:
                st.total_requests += 1
            return _err(e)
        fingerprint = hashlib.sha256(_dump(body)).hexdigest()   # canonical JSON: key order is irrelevant
        slot, early, claimed = (path, key), None, None
        with st.lock:
            delay, fail = st.plan(path)
            if fail is None:   # a faulted request must not touch the key, or its retry could never succeed
                try:
                    claimed = st.claim(slot, fingerprint)
                except ApiError as e:
                    early = e
        if delay:
            await asyncio.sleep(delay)   # the key stays "in progress" meanwhile: duplicates get 409
        if fail is not None:
            return _fault(fail, st.faults)
        if early is not None:
            return _err(early)
        assert claimed is not None   # no fault and no early error means claim() ran
        rec, replay = claimed
        if replay:
            return _resp(rec.status, rec.body, {"Idempotent-Replayed": "true"})
        with st.lock:
            try:
                status, out, changed = fn(st, request.path_params, body)
            except ApiError as e:
                st.settle(slot, rec, e.status, _dump(e.body) if e.stored else None)
                return _err(e)
            except Exception:
                st.settle(slot, rec, 500, None)   # a crash stored nothing, like a 500 before commit
                raise
            st.counts[kind] += 1
            st.by_key[kind][key] += 1
            if not changed:
                st.noops[kind] += 1
            content = _dump(out)
            st.settle(slot, rec, status, content)
        return _resp(status, content)
    return endpoint


def _reading(fn: Read) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        st: SandboxState = request.app.state.sandbox
        with st.lock:
            delay, fail = st.plan(request.url.path)
        if delay:
            await asyncio.sleep(delay)
        if fail is not None:
            return _fault(fail, st.faults)
        try:
            with st.lock:
                return _resp(200, fn(st, request.path_params))
        except ApiError as e:
            return _err(e)
    return endpoint


def _get(table: dict[str, Json], ident: str, what: str) -> Json:
    if ident not in table:
        raise ApiError(404, f"unknown {what} {ident!r}", "not_found")
    return table[ident]


# -- banking ---------------------------------------------------------------------------------------------------
def block_card(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    cid, customer, reason = p["card_id"], _str(b, "customer_id"), _str(b, "reason", required=False)
    card = st.cards.setdefault(cid, {"card_id": cid, "status": "active", "customer_id": customer})
    if card["status"] == "blocked":
        return 200, {"card_id": cid, "status": "blocked", "blocked_at": card["blocked_at"], "already": True}, False
    card.update(status="blocked", blocked_at=_now(), reason=reason, customer_id=customer)
    return 200, {"card_id": cid, "status": "blocked", "blocked_at": card["blocked_at"], "already": False}, True


def unblock_card(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    cid = p["card_id"]
    card = st.cards.get(cid)
    if card is None or card["status"] != "blocked":   # compensating an unapplied block is a safe no-op
        return 200, {"card_id": cid, "status": "active", "already": True}, False
    card.update(status="active", unblocked_at=_now())
    return 200, {"card_id": cid, "status": "active", "unblocked_at": card["unblocked_at"], "already": False}, True


def open_case(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    case = {"case_id": _new_id("case"), "status": "open", "customer_id": _str(b, "customer_id"),
            "category": _str(b, "category"), "summary": _str(b, "summary"), "opened_at": _now()}
    st.cases[case["case_id"]] = case
    return 201, dict(case), True


def close_case(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    case = _get(st.cases, p["case_id"], "case")
    if case["status"] == "closed":
        return 200, {"case_id": case["case_id"], "status": "closed", "closed_at": case["closed_at"],
                     "already": True}, False
    case.update(status="closed", closed_at=_now(), close_reason=_str(b, "reason", required=False))
    return 200, {"case_id": case["case_id"], "status": "closed", "closed_at": case["closed_at"],
                 "already": False}, True


def send_message(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    msg = {"message_id": _new_id("msg"), "kind": "message", "customer_id": _str(b, "customer_id"),
           "channel": _str(b, "channel"), "body": _str(b, "body"), "sent_at": _now()}
    st.outbox.append(msg)
    return 202, {"message_id": msg["message_id"], "status": "queued"}, True


# -- commerce ----------------------------------------------------------------------------------------------------
def create_order(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    order = {"order_id": _str(b, "order_id"), "customer_id": _str(b, "customer_id"), "sku": _str(b, "sku"),
             "quantity": _int(b, "quantity", minimum=1), "amount": _int(b, "amount"), "refunded": 0,
             "status": "placed", "created_at": _now()}
    if order["order_id"] in st.orders:
        raise ApiError(409, f"order {order['order_id']!r} already exists", "order_exists")
    st.orders[order["order_id"]] = order
    return 201, dict(order), True


def reserve_stock(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    sku, order_id, qty = p["sku"], _str(b, "order_id"), _int(b, "quantity", minimum=1)
    available = st.inventory.get(sku, 0)
    if qty > available:
        raise ApiError(409, "insufficient stock", "insufficient_stock", available=available, requested=qty)
    st.inventory[sku] = available - qty
    st.reservations[(sku, order_id)] += qty
    return 200, {"reservation_id": _new_id("res"), "sku": sku, "order_id": order_id, "quantity": qty,
                 "available": st.inventory[sku]}, True


def release_stock(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    sku, order_id = p["sku"], _str(b, "order_id")
    held = st.reservations[(sku, order_id)]
    qty = min(_int(b, "quantity", minimum=1, required=False) or held, held)   # default: all it holds
    st.reservations[(sku, order_id)] -= qty
    st.inventory[sku] = st.inventory.get(sku, 0) + qty
    return 200, {"sku": sku, "order_id": order_id, "released": qty, "available": st.inventory[sku],
                 "already": qty == 0}, qty > 0


def send_notification(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    note = {"notification_id": _new_id("ntf"), "kind": "notification", "customer_id": _str(b, "customer_id"),
            "order_id": _str(b, "order_id"), "template": _str(b, "template"),
            "body": _str(b, "body", required=False), "sent_at": _now()}
    st.outbox.append(note)
    return 202, {"notification_id": note["notification_id"], "status": "queued"}, True


def create_refund(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    order_id, amount, reason = _str(b, "order_id"), _int(b, "amount", minimum=1), _str(b, "reason", required=False)
    order = _get(st.orders, order_id, "order")
    refundable = order["amount"] - order["refunded"]
    if amount > refundable:   # cumulative: two partial refunds cannot exceed the order either
        raise ApiError(422, "refund amount exceeds the refundable amount of the order", "refund_exceeds_amount",
                       refundable=refundable, requested=amount)
    order["refunded"] += amount
    if order["refunded"] == order["amount"]:
        order["status"] = "refunded"
    refund = {"refund_id": _new_id("ref"), "status": "succeeded", "order_id": order_id, "amount": amount,
              "reason": reason, "created_at": _now()}
    st.refunds[refund["refund_id"]] = refund
    return 201, dict(refund), True


def capture_payment(st: SandboxState, p: dict[str, str], b: Json) -> tuple[int, Json, bool]:
    pid = p["payment_id"]
    if pid in st.payments:
        return 200, {**st.payments[pid], "already": True}, False
    st.payments[pid] = {"payment_id": pid, "status": "captured", "amount": _int(b, "amount", required=False),
                        "captured_at": _now()}
    return 200, {**st.payments[pid], "already": False}, True


# -- control plane (/_sandbox/*): no idempotency, no faults ----------------------------------------------------
async def _admin(request: Request) -> Response:
    st: SandboxState = request.app.state.sandbox
    path, method = request.url.path, request.method
    try:
        body = await _json_body(request) if method in ("POST", "PUT") else {}
        with st.lock:
            if path == "/_sandbox/effects":
                return _resp(200, st.effects())
            if path == "/_sandbox/state":
                return _resp(200, st.snapshot())
            if path == "/_sandbox/reset":
                st.reset()
                return _resp(200, {"reset": True})
            if path == "/_sandbox/faults":
                if method == "POST":
                    st.set_faults(Faults.parse(body))
                elif method == "DELETE":
                    st.set_faults(Faults())
                return _resp(200, asdict(st.faults))
            sku = request.path_params["sku"]
            st.inventory[sku] = _int(body, "available")
            return _resp(200, {"sku": sku, "available": st.inventory[sku]})
    except ApiError as e:
        return _err(e)


async def _healthz(request: Request) -> Response:
    return _resp(200, {"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    msg = f"no route for {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
    return _resp(exc.status_code, {"error": msg, "code": http.HTTPStatus(exc.status_code).name.lower()},
                 exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    # A sandbox bug must still look like an API's 500 (JSON), so connectors exercise their 5xx path.
    return _resp(500, {"error": f"internal error: {type(exc).__name__}", "code": "internal"})


MUTATIONS: list[tuple[str, str, Mutation]] = [
    ("/v1/cards/{card_id}/block", "card.block", block_card),
    ("/v1/cards/{card_id}/unblock", "card.unblock", unblock_card),
    ("/v1/cases", "case.open", open_case),
    ("/v1/cases/{case_id}/close", "case.close", close_case),
    ("/v1/messages", "message.send", send_message),
    ("/v1/orders", "order.create", create_order),
    ("/v1/inventory/{sku}/reserve", "inventory.reserve", reserve_stock),
    ("/v1/inventory/{sku}/release", "inventory.release", release_stock),
    ("/v1/notifications", "notification.send", send_notification),
    ("/v1/refunds", "refund.create", create_refund),
    ("/v1/payments/{payment_id}/capture", "payment.capture", capture_payment),
]
READS: list[tuple[str, Read]] = [
    ("/v1/cards/{card_id}", lambda st, p: st.cards.get(p["card_id"], {"card_id": p["card_id"], "status": "active"})),
    ("/v1/cases/{case_id}", lambda st, p: _get(st.cases, p["case_id"], "case")),
    ("/v1/orders/{order_id}", lambda st, p: _get(st.orders, p["order_id"], "order")),
    ("/v1/refunds/{refund_id}", lambda st, p: _get(st.refunds, p["refund_id"], "refund")),
    ("/v1/inventory/{sku}", lambda st, p: {"sku": p["sku"], "available": st.inventory.get(p["sku"], 0),
                                           "reserved": sum(n for (s, _), n in st.reservations.items()
                                                           if s == p["sku"])}),
]


def create_app(latency_ms: int = 0) -> Starlette:
    """A fresh sandbox with its own state (tests make one per test)."""
    routes = [Route(path, _mutating(kind, fn), methods=["POST"]) for path, kind, fn in MUTATIONS]
    routes += [Route(path, _reading(fn), methods=["GET"]) for path, fn in READS]
    routes += [
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/_sandbox/effects", _admin, methods=["GET"]),
        Route("/_sandbox/state", _admin, methods=["GET"]),
        Route("/_sandbox/reset", _admin, methods=["POST"]),
        Route("/_sandbox/faults", _admin, methods=["GET", "POST", "DELETE"]),
        Route("/_sandbox/inventory/{sku}", _admin, methods=["PUT"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                            Exception: _crash})
    app.state.sandbox = SandboxState(latency_ms)
    return app
