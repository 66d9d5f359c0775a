"""The sandbox third-party API, in process (no network): idempotency, effects, faults, business errors."""

from __future__ import annotations

import asyncio
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from tools.sandbox.api import MISSING_KEY, create_app
from tools.sandbox.client import SandboxClient

with warnings.catch_warnings():   # starlette nags to swap httpx for httpx2; the TestClient works the same
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def sb(client: TestClient) -> SandboxClient:
    return SandboxClient(http=client)


def post(c: TestClient, path: str, body: dict, key: str | None) -> httpx.Response:
    return c.post(path, json=body, headers={"Idempotency-Key": key} if key is not None else {})


BLOCK = {"customer_id": "cust-1", "reason": "lost card"}


@pytest.mark.timeout(30)
def test_missing_or_empty_key_is_rejected_without_effect(client: TestClient, sb: SandboxClient) -> None:
    for key in (None, ""):
        r = post(client, "/v1/cards/card-1/block", BLOCK, key)
        assert r.status_code == 400
        assert r.json()["error"] == MISSING_KEY
    assert post(client, "/v1/cards/card-1/block", BLOCK, "k" * 256).status_code == 400
    assert sb.effects()["counts"] == {}


@pytest.mark.timeout(30)
def test_replay_returns_first_response_and_counts_one_effect(client: TestClient, sb: SandboxClient) -> None:
    first = post(client, "/v1/cases", {"customer_id": "c1", "category": "dispute", "summary": "x"}, "case-k1")
    assert first.status_code == 201 and first.json()["status"] == "open"
    assert "Idempotent-Replayed" not in first.headers
    again = post(client, "/v1/cases", {"summary": "x", "category": "dispute", "customer_id": "c1"}, "case-k1")
    assert again.status_code == 201
    assert again.content == first.content          # byte-identical, same case_id
    assert again.headers["Idempotent-Replayed"] == "true"
    eff = sb.effects()
    assert eff["counts"] == {"case.open": 1}
    assert eff["by_key"] == {"case.open": {"case-k1": 1}}
    assert eff["replays"] == 1 and eff["total_requests"] == 2
    assert len(sb.state()["cases"]) == 1


@pytest.mark.timeout(30)
def test_same_key_different_body_is_422(client: TestClient, sb: SandboxClient) -> None:
    assert post(client, "/v1/messages", {"customer_id": "c1", "channel": "sms", "body": "hi"}, "m1").status_code == 202
    r = post(client, "/v1/messages", {"customer_id": "c1", "channel": "sms", "body": "bye"}, "m1")
    assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused"
    # keys are scoped per path: the same key on another endpoint is a different request
    assert post(client, "/v1/cards/card-9/block", BLOCK, "m1").status_code == 200
    assert sb.effect_count("message.send") == 1


@pytest.mark.timeout(30)
def test_fail_next_then_retry_with_same_key_succeeds_once(client: TestClient, sb: SandboxClient) -> None:
    sb.seed_order("o1", "cust-1", "sku-1", 1, 5000)
    sb.set_faults(fail_next=1, paths=["/v1/refunds"])
    body = {"order_id": "o1", "amount": 2000, "reason": "supplier delay"}
    failed = post(client, "/v1/refunds", body, "refund-o1")
    assert failed.status_code == 503 and failed.json()["code"] == "injected_fault"
    assert sb.effect_count("refund.create") == 0
    ok = post(client, "/v1/refunds", body, "refund-o1")
    assert ok.status_code == 201 and ok.json()["status"] == "succeeded"
    assert "Idempotent-Replayed" not in ok.headers
    assert post(client, "/v1/refunds", body, "refund-o1").headers["Idempotent-Replayed"] == "true"
    eff = sb.effects()
    assert eff["by_key"]["refund.create"] == {"refund-o1": 1} and eff["faults_injected"] == 1
    assert client.get("/v1/orders/o1").json()["refunded"] == 2000


@pytest.mark.timeout(30)
def test_injected_429_carries_retry_after_and_rate_is_seeded(client: TestClient, sb: SandboxClient) -> None:
    sb.set_faults(fail_rate=1.0, fail_status=429, retry_after_s=2)
    r = client.get("/v1/inventory/sku-1")
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    outcomes = []
    for _ in range(2):
        sb.set_faults(fail_rate=0.5, seed=42)
        outcomes.append([client.get("/v1/inventory/sku-1").status_code for _ in range(20)])
    assert outcomes[0] == outcomes[1] and {200, 503} == set(outcomes[0])
    sb.clear_faults()
    assert client.get("/v1/inventory/sku-1").status_code == 200
    assert client.post("/_sandbox/faults", json={"failrate": 1}).status_code == 400


@pytest.mark.timeout(30)
def test_refund_business_errors(client: TestClient, sb: SandboxClient) -> None:
    sb.seed_order("o2", "cust-2", "sku-2", 1, 1000)
    over = post(client, "/v1/refunds", {"order_id": "o2", "amount": 1001, "reason": "r"}, "r-over")
    assert over.status_code == 422 and over.json()["refundable"] == 1000
    assert post(client, "/v1/refunds", {"order_id": "o2", "amount": 600}, "r-a").status_code == 201
    assert post(client, "/v1/refunds", {"order_id": "o2", "amount": 600}, "r-b").status_code == 422  # cumulative
    assert post(client, "/v1/refunds", {"order_id": "nope", "amount": 1}, "r-c").status_code == 404
    assert post(client, "/v1/refunds", {"order_id": "o2", "amount": "ten"}, "r-d").status_code == 400
    assert sb.effects()["counts"] == {"order.create": 1, "refund.create": 1}


@pytest.mark.timeout(30)
def test_inventory_reserve_release_and_insufficient_stock(client: TestClient, sb: SandboxClient) -> None:
    sb.set_inventory("sku-3", 2)
    assert post(client, "/v1/inventory/sku-3/reserve", {"order_id": "o3", "quantity": 2}, "res-1").status_code == 200
    short = post(client, "/v1/inventory/sku-3/reserve", {"order_id": "o4", "quantity": 1}, "res-2")
    assert short.status_code == 409 and short.json()["error"] == "insufficient stock"
    # a stored business outcome: the same key replays the 409 even after stock arrives
    sb.set_inventory("sku-3", 5)
    replay = post(client, "/v1/inventory/sku-3/reserve", {"order_id": "o4", "quantity": 1}, "res-2")
    assert replay.status_code == 409 and replay.headers["Idempotent-Replayed"] == "true"
    rel = post(client, "/v1/inventory/sku-3/release", {"order_id": "o3"}, "rel-1")
    assert rel.json()["released"] == 2 and rel.json()["available"] == 7
    noop = post(client, "/v1/inventory/sku-3/release", {"order_id": "o3"}, "rel-2")
    assert noop.status_code == 200 and noop.json()["already"] is True
    eff = sb.effects()
    assert eff["counts"] == {"inventory.reserve": 1, "inventory.release": 2}
    assert eff["noops"] == {"inventory.release": 1}


@pytest.mark.timeout(30)
def test_card_block_unblock_and_case_close(client: TestClient, sb: SandboxClient) -> None:
    assert post(client, "/v1/cards/c7/block", BLOCK, "b1").json()["already"] is False
    again = post(client, "/v1/cards/c7/block", BLOCK, "b2")         # new key, card already blocked
    assert again.status_code == 200 and again.json()["already"] is True
    assert client.get("/v1/cards/c7").json()["status"] == "blocked"
    assert post(client, "/v1/cards/c7/unblock", {}, "u1").json()["status"] == "active"
    assert post(client, "/v1/cases/case_missing/close", {}, "cl0").status_code == 404
    case_id = post(client, "/v1/cases", {"customer_id": "c", "category": "dispute", "summary": "s"}, "o").json()[
        "case_id"]
    assert post(client, f"/v1/cases/{case_id}/close", {"reason": "resolved"}, "cl1").json()["status"] == "closed"
    eff = sb.effects()
    assert eff["by_key"]["card.block"] == {"b1": 1, "b2": 1} and eff["noops"] == {"card.block": 1}
    assert eff["counts"]["card.unblock"] == 1 and eff["counts"]["case.close"] == 1


@pytest.mark.timeout(30)
def test_concurrent_duplicates_from_threads_take_effect_once(client: TestClient, sb: SandboxClient) -> None:
    body = {"customer_id": "c1", "order_id": "o1", "template": "delay", "body": "sorry"}
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda _: post(client, "/v1/notifications", body, "ntf-1").status_code, range(16)))
    assert set(codes) <= {202, 409} and 202 in codes
    assert sb.effects()["by_key"] == {"notification.send": {"ntf-1": 1}}


@pytest.mark.timeout(30)
def test_concurrent_duplicates_in_flight_get_409_and_one_effect() -> None:
    app = create_app()

    async def run() -> tuple[list[httpx.Response], dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sb") as c:
            await c.post("/_sandbox/faults", json={"latency_ms": 100})   # keeps the first one "in progress"
            await c.post("/v1/orders", headers={"Idempotency-Key": "seed"}, json={
                "order_id": "o9", "customer_id": "c", "sku": "s", "quantity": 1, "amount": 900})
            rs = await asyncio.gather(*[c.post("/v1/refunds", headers={"Idempotency-Key": "ref-o9"},
                                               json={"order_id": "o9", "amount": 900}) for _ in range(10)])
            late = await c.post("/v1/refunds", headers={"Idempotency-Key": "ref-o9"},
                                json={"order_id": "o9", "amount": 900})
            return [*rs, late], (await c.get("/_sandbox/effects")).json()

    responses, eff = asyncio.run(run())
    codes = Counter(r.status_code for r in responses[:-1])
    assert codes[201] == 1 and codes[409] == 9
    assert all(r.json()["code"] == "idempotency_key_in_use" and "Retry-After" in r.headers
               for r in responses[:-1] if r.status_code == 409)
    assert responses[-1].status_code == 201 and responses[-1].headers["Idempotent-Replayed"] == "true"
    assert eff["by_key"]["refund.create"] == {"ref-o9": 1}


@pytest.mark.timeout(30)
def test_reset_clears_state_keys_counters_and_faults(client: TestClient, sb: SandboxClient) -> None:
    sb.seed_order("o5", "c", "s", 1, 100)
    sb.set_faults(fail_rate=1.0, paths=["/v1/cases"])
    sb.reset()
    eff = sb.effects()
    assert eff["counts"] == {} and eff["total_requests"] == 0 and eff["replays"] == 0
    assert client.get("/v1/orders/o5").status_code == 404
    assert post(client, "/v1/cases", {"customer_id": "c", "category": "k", "summary": "s"}, "k").status_code == 201
    # the seeding key was forgotten too: seeding again is a fresh effect, not a replay
    assert "Idempotent-Replayed" not in client.post("/v1/orders", headers={"Idempotency-Key": "seed-order-o5"}, json={
        "order_id": "o5", "customer_id": "c", "sku": "s", "quantity": 1, "amount": 100}).headers


@pytest.mark.timeout(30)
def test_protocol_errors_are_json(client: TestClient) -> None:
    bad = client.post("/v1/cases", content=b"{not json", headers={"Idempotency-Key": "j1"})
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]
    missing = client.get("/v1/nowhere")
    assert missing.status_code == 404 and "no route" in missing.json()["error"]
    assert client.get("/v1/cards/c1/block").status_code == 405
    assert client.get("/healthz").status_code == 200
    assert post(client, "/v1/cases", {"customer_id": "c"}, "j2").status_code == 400
    # a validation error is not stored: fixing the body under the same key works
    assert post(client, "/v1/cases", {"customer_id": "c", "category": "k", "summary": "s"}, "j2").status_code == 201
