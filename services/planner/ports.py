"""The planner's ports (what its handlers call out through) and their
adapters: the publisher (the producer's one encode/send path), the policy
service (gRPC) and the intent classifier (the inference service). Handlers
are unit-tested against in-memory twins of these (tests/unit/planner_twins.py)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from aiosmesh.v1 import policy_pb2, policy_pb2_grpc
from services.common.errors import InvalidArgument, TransientError
from services.common.grpc_server import channel, trace_metadata
from services.common.kafka import OutRecord
from services.planner.domain.state import CheckPolicy, RunState, Verdict

log = logging.getLogger(__name__)
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class Settlement:
    """A step's cumulative actual cost, to settle its reservation (id ``run:step``) with."""

    tenant: str
    run_id: str
    step_id: str
    cost: float


class Publisher(Protocol):
    """The producer's one publish path: encode (headers, trace, size check), send, flush."""

    def encode(self, role: str, key: str, record: dict[str, Any], *,
               headers: dict[str, str] | None = None) -> OutRecord: ...

    def send_record(self, rec: OutRecord) -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


class Policy(Protocol):
    """What the planner asks policy: may this run start, may this step run, settle a step's budget."""

    def may_start(self, tenant: str, principal: str, workflow: str, run_id: str, inputs: Any = None) -> Verdict: ...

    def may_start_many(self, checks: list[tuple[str, str, str, str]],
                       traces: Sequence[Mapping[str, str]] = ()) -> list[Verdict]: ...

    def evaluate_many(self, checks: list[tuple[RunState, CheckPolicy]],
                      traces: Sequence[Mapping[str, str]] = ()) -> list[Verdict]: ...

    def mask_many(self, items: list[tuple[str, Any]]) -> list[Any]: ...

    def reconcile_many(self, items: list[Settlement], traces: Sequence[Mapping[str, str]] = ()) -> list[str]: ...


class Classifier(Protocol):
    def classify(self, texts: list[str]) -> list[tuple[str | None, float, str]]: ...


class PolicyGateway:
    """Asks the policy service before a run starts and before every step runs."""

    def __init__(self, address: str, timeout_s: float = 3.0) -> None:
        self._stub = policy_pb2_grpc.PolicyServiceStub(channel(address))
        self._timeout = timeout_s

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout, metadata=trace_metadata())
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code in _TRANSIENT:
                raise TransientError(f"policy service {method}: {code.name}: {exc.details()}") from exc  # type: ignore[attr-defined]
            raise InvalidArgument(f"policy service {method}: {code.name}: {exc.details()}") from exc  # type: ignore[attr-defined]

    def evaluate_many(self, checks: list[tuple[RunState, CheckPolicy]],
                      traces: Sequence[Mapping[str, str]] = ()) -> list[Verdict]:
        """One EvaluateBatch for many steps, each reserving its cost estimate (reservation id ``run:step``);
        ``traces`` gives each check its run's trace context (policy continues it per check)."""
        carriers = _carriers(traces, len(checks))
        response = self._call("EvaluateBatch", policy_pb2.EvaluateBatchRequest(
            requests=[_step_request(run, check, carrier) for (run, check), carrier in zip(checks, carriers,
                                                                                        strict=True)]))
        if len(response.decisions) != len(checks):
            raise TransientError(f"policy answered {len(response.decisions)} of {len(checks)} checks")
        return [Verdict(effect=d.effect, reasons=tuple(d.reasons), policy_id=d.policy_id, role=d.approval_role,
                        model_tier=d.model_tier, inputs=_json_or_none(d.masked_inputs_json),
                        masked=bool(d.masked_inputs_json)) for d in response.decisions]

    def mask_many(self, items: list[tuple[str, Any]]) -> list[Any]:
        """The policy's pii block applied to each (tenant, JSON value), in one call: what may enter a run."""
        if not items:
            return []
        response = self._call("MaskInputs", policy_pb2.MaskRequest(items=[
            policy_pb2.MaskItem(tenant=tenant, inputs_json=json.dumps(value, default=str)) for tenant, value in items]))
        if len(response.masked_json) != len(items):
            raise TransientError(f"policy masked {len(response.masked_json)} of {len(items)} inputs")
        return [json.loads(m) for m in response.masked_json]

    def may_start(self, tenant: str, principal: str, workflow: str, run_id: str, inputs: Any = None) -> Verdict:
        """One start check; with ``inputs`` (the run's input), the answer carries them masked too
        (``Verdict.inputs``), so an API start asks policy once, not twice."""
        decision = self._call("Evaluate", policy_pb2.EvaluateRequest(
            tenant=tenant, principal=principal, action="start_workflow", workflow=workflow, run_id=run_id,
            inputs_json="{}" if inputs is None else json.dumps(inputs, default=str)))
        return Verdict(effect=decision.effect, reasons=tuple(decision.reasons), policy_id=decision.policy_id,
                       inputs=_json_or_none(decision.masked_inputs_json) if inputs is not None else None,
                       masked=inputs is not None and bool(decision.masked_inputs_json))

    def may_start_many(self, checks: list[tuple[str, str, str, str]],
                       traces: Sequence[Mapping[str, str]] = ()) -> list[Verdict]:
        """Many start checks (tenant, principal, workflow, run id) in one EvaluateBatch, each in its
        run's trace (``traces``)."""
        carriers = _carriers(traces, len(checks))
        response = self._call("EvaluateBatch", policy_pb2.EvaluateBatchRequest(requests=[
            policy_pb2.EvaluateRequest(tenant=t, principal=p, action="start_workflow", workflow=w, run_id=r,
                                       inputs_json="{}", trace_context=carrier)
            for (t, p, w, r), carrier in zip(checks, carriers, strict=True)]))
        if len(response.decisions) != len(checks):
            raise TransientError(f"policy answered {len(response.decisions)} of {len(checks)} start checks")
        return [Verdict(effect=d.effect, reasons=tuple(d.reasons), policy_id=d.policy_id) for d in response.decisions]

    def reconcile_many(self, items: list[Settlement], traces: Sequence[Mapping[str, str]] = ()) -> list[str]:
        """Turn each step's reservation (id ``run:step``) into spend (0 releases the hold), all in one
        ReconcileBudgetBatch, each in its run's trace (``traces``). Answers, per settlement, "" or why
        policy refused it for good (a retry cannot change it: the caller logs and audits it); policy
        or Redis unreachable is a TransientError for the whole batch."""
        if not items:
            return []
        requests = [policy_pb2.ReconcileRequest(tenant=s.tenant, reservation_id=f"{s.run_id}:{s.step_id}",
                                                actual_cost=s.cost, run_id=s.run_id, step_id=s.step_id,
                                                trace_context=carrier)
                    for s, carrier in zip(items, _carriers(traces, len(items)), strict=True)]
        try:
            response = self._call("ReconcileBudgetBatch", policy_pb2.ReconcileBatchRequest(requests=requests))
        except InvalidArgument as exc:
            if "UNIMPLEMENTED" not in str(exc):
                return [str(exc)] * len(items)  # the call was refused as a whole (a credential, a role)
            return [self._reconcile_one(r) for r in requests]  # a policy service older than ReconcileBudgetBatch
        if len(response.results) != len(items):
            raise TransientError(f"policy settled {len(response.results)} of {len(items)} steps")
        return [r.error for r in response.results]

    def _reconcile_one(self, request: Any) -> str:
        try:
            self._call("ReconcileBudget", request)
        except InvalidArgument as exc:
            return str(exc)
        return ""


def _json_or_none(text: str) -> Any:
    return json.loads(text) if text else None


_TRACE_KEYS = ("traceparent", "tracestate")


def _carriers(traces: Sequence[Mapping[str, str]], n: int) -> list[dict[str, str]]:
    """W3C trace context per check (empty where none was given)."""
    if traces and len(traces) != n:
        raise ValueError(f"{len(traces)} trace contexts for {n} checks")
    return [{k: t[k] for k in _TRACE_KEYS if t.get(k)} for t in traces] if traces else [{} for _ in range(n)]


def _step_request(run: RunState, check: CheckPolicy, trace_context: Mapping[str, str] | None = None) -> Any:
    req = policy_pb2.EvaluateRequest(
        tenant=run.tenant, principal=f"workflow:{run.workflow}", action="run_step", workflow=run.workflow,
        step_id=check.step_id, tool=check.tool, resource=check.tool, cost_estimate=check.cost_estimate,
        inputs_json=json.dumps(check.inputs, default=str), run_id=run.run_id,
        reservation_id=f"{run.run_id}:{check.step_id}", trace_context=dict(trace_context or {}))
    if check.recheck:  # an approved step: only its budget is checked again, on no inputs (they were masked)
        req.recheck_budget, req.inputs_json = True, ""
        return req
    if check.amount is not None:
        req.amount = step_amount(check.amount)
    return req


def step_amount(value: Any) -> float:
    """A step's rendered ``amount`` as the policy reads it: NaN when it is not a finite, non-negative
    number, so the policy fails closed on it. (It was 0.0, which passed every amount rule.)"""
    if isinstance(value, bool):
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) and number >= 0 else math.nan


class IntentClassifier:
    """Routes free text to an intent through the inference service's bulk tier."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        from services.common.inference_client import InferenceClient

        self._client = InferenceClient(base_url, timeout_s)

    def classify(self, texts: list[str]) -> list[tuple[str | None, float, str]]:
        try:
            result = self._client.classify(texts, "bulk")
        except Exception as exc:
            if getattr(exc, "retryable", True):
                raise TransientError(f"inference unavailable: {exc}") from exc
            raise
        return [(p.label, p.score, result.model_ref) for p in result.predictions]
