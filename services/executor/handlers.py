"""Runs step requests: one attempt of one step, never deciding what runs next.

Exactly-once effects per idempotency key, in two layers:
* the executor records each attempt's result in Redis *before* the result is
  produced and the request's offset stored, so a redelivered request replays
  the recorded result instead of running the tool again;
* connectors receive the idempotency key (``Idempotency-Key`` header), so a
  crash after the effect but before the record is written is deduplicated by
  the third party, as real payment and messaging APIs do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
from prometheus_client import Counter, Histogram

from services.common.errors import AiosError, TransientError, is_retryable
from services.common.kafka import Inbound, MeshProducer
from services.executor.tools import Call, Toolbox

log = logging.getLogger(__name__)
STEP_SECONDS = Histogram("aios_step_seconds", "Tool time per step attempt", ["tool", "status"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STEPS = Counter("aios_steps_total", "Step attempts by tool and outcome", ["tool", "status"])
REPLAYS = Counter("aios_step_replays_total", "Step requests answered from the idempotency record", ["tool"])
RECORD_TTL_S = 7 * 24 * 3600


class Executor:
    def __init__(self, *, toolbox: Toolbox, producer: MeshProducer, redis_client: redis.Redis, name: str,
                 workers: int = 16) -> None:
        self.toolbox, self.producer, self.r, self.name = toolbox, producer, redis_client, name
        self._release = redis_client.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="step")
        self.tool_pool = ThreadPoolExecutor(max_workers=workers * 2, thread_name_prefix="tool")

    def handle(self, records: Sequence[Inbound]) -> None:
        """Run a batch's steps concurrently (they belong to different runs or are independent branches)."""
        futures = [self.pool.submit(self.run_step, rec.value) for rec in records]
        errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err

    def _key(self, tenant: str, idem: str, attempt: int | None = None) -> str:
        return f"aios:{{{tenant}}}:idem:{idem}" + (f"#{attempt}" if attempt is not None else "")

    def run_step(self, req: dict[str, Any]) -> None:
        tenant, idem, attempt = req["tenant"], req["idempotency_key"], int(req["attempt"])
        if self._replay(req, tenant, idem, attempt):
            return
        # One execution at a time per key: a redelivery racing the original (a rebalance, or the
        # planner's retry arriving while attempt 1 still runs) waits, then replays the record.
        lease = self._key(tenant, idem) + ":lease"
        try:
            acquired = self.r.set(lease, self.name, nx=True, px=int(req["timeout_ms"]) + 5000)
        except redis.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc
        if not acquired:
            raise TransientError(f"step {idem} is running on another executor; its result will be replayed")
        try:
            # The holder before us may have finished between our check and our lease.
            if not self._replay(req, tenant, idem, attempt):
                self._run_leased(req, tenant, idem, attempt)
        finally:
            try:
                self._release(keys=[lease], args=[self.name])
            except redis.RedisError:
                pass  # it expires on its own

    def _replay(self, req: dict[str, Any], tenant: str, idem: str, attempt: int) -> bool:
        """Publish the recorded result, if this step (or this attempt) already ran."""
        try:
            done, this_attempt = self.r.mget(self._key(tenant, idem), self._key(tenant, idem, attempt))
        except redis.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc
        recorded = done or this_attempt
        if recorded:
            REPLAYS.labels(req["tool"]).inc()
            self._publish(req, json.loads(recorded), replayed=True)
        return bool(recorded)

    def _run_leased(self, req: dict[str, Any], tenant: str, idem: str, attempt: int) -> None:
        result = self._execute(req)
        # Record before publishing: from here on, a redelivery replays instead of re-running.
        pipe = self.r.pipeline()
        pipe.set(self._key(tenant, idem, attempt), json.dumps(result), ex=RECORD_TTL_S)
        if result["status"] == "ok":
            pipe.set(self._key(tenant, idem), json.dumps(result), ex=RECORD_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc
        self._publish(req, result, replayed=False)

    def _execute(self, req: dict[str, Any]) -> dict[str, Any]:
        timeout_s = max(0.001, int(req["timeout_ms"]) / 1000)
        call = Call(tenant=req["tenant"], run_id=req["run_id"], step_id=req["step_id"], attempt=int(req["attempt"]),
                    idempotency_key=req["idempotency_key"], latency_class=req["latency_class"], timeout_s=timeout_s)
        started = time.perf_counter()
        model, cost = None, float(req.get("cost_estimate") or 0.0)
        try:
            inputs = json.loads(req["inputs_json"] or "{}")
            future = self.tool_pool.submit(self.toolbox.run, req["tool"], inputs, call)
            out = future.result(timeout=timeout_s)
            model, cost = out.model, out.cost or cost
            result = {"status": "ok", "output": out.output, "error_type": None, "error_message": None,
                      "retryable": False}
        except FutureTimeout:
            result = {"status": "error", "output": None, "error_type": "StepTimeout",
                      "error_message": f"{req['tool']} did not finish within {req['timeout_ms']} ms", "retryable": True}
        except Exception as exc:  # the tool's failure is the step's result, not the consumer's
            kind = exc.kind if isinstance(exc, AiosError) else type(exc).__name__
            if not isinstance(exc, AiosError):
                log.warning("tool %s raised %s: %s", req["tool"], kind, exc)
            result = {"status": "error", "output": None, "error_type": kind, "error_message": str(exc)[:2000],
                      "retryable": is_retryable(exc)}
        duration_ms = (time.perf_counter() - started) * 1000
        STEP_SECONDS.labels(req["tool"], result["status"]).observe(duration_ms / 1000)
        STEPS.labels(req["tool"], result["status"]).inc()
        result.update(duration_ms=duration_ms, cost=cost if result["status"] == "ok" else 0.0, model=model)
        return result

    def _publish(self, req: dict[str, Any], result: dict[str, Any], *, replayed: bool) -> None:
        # A deterministic event id: a replayed result is recognised as the same event downstream.
        event_id = hashlib.sha256(f"{req['idempotency_key']}#{req['attempt']}#result".encode()).hexdigest()[:32]
        self.producer.send("step_results", req["run_id"], {
            "event_id": event_id, "tenant": req["tenant"], "run_id": req["run_id"], "step_id": req["step_id"],
            "attempt": int(req["attempt"]), "idempotency_key": req["idempotency_key"], "status": result["status"],
            "output_json": json.dumps(result["output"], default=str) if result["output"] is not None else None,
            "error_type": result["error_type"], "error_message": result["error_message"],
            "retryable": bool(result["retryable"]), "duration_ms": float(result["duration_ms"]),
            "cost": float(result["cost"]), "executor": self.name, "replayed": replayed})
        if not replayed:
            self.producer.send("usage", req["run_id"], {
                "event_id": event_id[:24] + "usage", "tenant": req["tenant"], "run_id": req["run_id"],
                "step_id": req["step_id"], "tool": req["tool"], "model": result.get("model"), "units": 1.0,
                "cost": float(result["cost"]), "latency_class": req["latency_class"],
                "duration_ms": float(result["duration_ms"])})

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.tool_pool.shutdown(wait=False, cancel_futures=True)
