"""Small synchronous client for the sandbox's control plane, for tests, the demo and benchmarks.

    with SandboxClient() as sb:               # AIOS_SANDBOX_URL, else http://127.0.0.1:18100
        sb.reset()
        sb.set_faults(fail_rate=0.3, paths=["/v1/refunds"], seed=7)
        ...
        assert sb.effect_count("refund.create", key="run1:step3") == 1

Pass ``http=starlette.testclient.TestClient(create_app())`` to drive an in-process app without a network.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:18100"


class SandboxClient:
    def __init__(self, base_url: str | None = None, *, timeout_s: float = 5.0,
                 http: httpx.Client | None = None) -> None:
        self.base_url = (base_url or os.environ.get("AIOS_SANDBOX_URL") or DEFAULT_URL).rstrip("/")
        self._owned = http is None
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.http.request(method, path, **kw)
        resp.raise_for_status()   # the control plane never fails on purpose: any error is a real problem
        return resp.json()

    # -- control plane ------------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"sandbox not healthy at {self.base_url} after {timeout_s}s")
            time.sleep(0.05)

    def effects(self) -> dict[str, Any]:
        """``{"counts", "by_key", "noops", "total_requests", "replays", "faults_injected"}``."""
        return self._call("GET", "/_sandbox/effects")

    def effect_count(self, kind: str, key: str | None = None) -> int:
        """How many times ``kind`` took effect in total, or for one idempotency key."""
        eff = self.effects()
        if key is None:
            return int(eff["counts"].get(kind, 0))
        return int(eff["by_key"].get(kind, {}).get(key, 0))

    def set_faults(self, *, fail_rate: float = 0.0, fail_status: int = 503, latency_ms: int = 0,
                   jitter_ms: int = 0, paths: list[str] | None = None, fail_next: int = 0,
                   seed: int | None = None, retry_after_s: int = 1) -> dict[str, Any]:
        """Replace the fault configuration (not a merge); returns the configuration now in force."""
        return self._call("POST", "/_sandbox/faults", json={
            "fail_rate": fail_rate, "fail_status": fail_status, "latency_ms": latency_ms, "jitter_ms": jitter_ms,
            "paths": list(paths or []), "fail_next": fail_next, "seed": seed, "retry_after_s": retry_after_s})

    def clear_faults(self) -> None:
        self._call("DELETE", "/_sandbox/faults")

    def reset(self) -> None:
        """Forget all state, idempotency keys, counters and faults."""
        self._call("POST", "/_sandbox/reset")

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/_sandbox/state")

    # -- seeding --------------------------------------------------------------------------------------------------
    def set_inventory(self, sku: str, available: int) -> None:
        self._call("PUT", f"/_sandbox/inventory/{sku}", json={"available": available})

    def seed_order(self, order_id: str, customer_id: str, sku: str, quantity: int, amount: int) -> dict[str, Any]:
        """Create an order (amount in minor units); re-seeding the same order is a no-op replay."""
        return self._call("POST", "/v1/orders", headers={"Idempotency-Key": f"seed-order-{order_id}"}, json={
            "order_id": order_id, "customer_id": customer_id, "sku": sku, "quantity": quantity, "amount": amount})

    @staticmethod
    def new_key() -> str:
        return uuid.uuid4().hex
