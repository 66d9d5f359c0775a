"""Raw PII never leaves the planner: the run's input is masked by policy before
it is classified, stored or published, and every step dispatches the inputs
policy masked. The twin policy masks with the real masker and the mesh's
default pii block; the records are the real Avro bytes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from aiosmesh.v1 import workflow_pb2
from services.planner import wire
from services.planner.domain.state import CheckPolicy, RunState, StepState, Verdict
from services.planner.domain.workflow import build
from services.planner.grpc_api import WorkflowApi
from services.planner.workflows import Registry
from services.policy.domain.masking import mask_value
from services.policy.domain.model import PiiSpec
from tests.unit.planner_twins import ALLOW, CountingPolicy, Mesh, RecordingPublisher, mesh

pytestmark = pytest.mark.timeout(10)

PII = PiiSpec(frozenset({"email", "phone", "card_number", "iban"}), ("email", "card_number", "phone", "iban"))
RAW = ["jane.roe@example.com", "4111 1111 1111 1111", "+44 7700 900123", "DE89 3704 0044 0532 0130 00"]
TEXT = f"I lost my card {RAW[1]}; write to {RAW[0]} or call {RAW[2]}. Refund to {RAW[3]}."
FLOW = {"name": "help", "version": 1, "trigger": {"event_type": "support.message.received", "intents": ["lost_or_stolen_card"]}, "steps": [
    {"id": "reply", "tool": "messages.send", "inputs": {"body": "${input.text}", "to": "${input.email}"}},
]}


def _verdict(**fields: Any) -> Verdict:
    """A verdict with what this version of Verdict carries (masked inputs, when it has them)."""
    known = {f.name for f in dataclasses.fields(Verdict)}
    return Verdict(**{k: v for k, v in fields.items() if k in known})


@dataclasses.dataclass
class MaskingPolicy(CountingPolicy):
    """Allows everything and masks as the policy service does."""

    masked: list[Any] = dataclasses.field(default_factory=list)

    asked: list[str] = dataclasses.field(default_factory=list)  # each call, as a policy RPC

    def mask_many(self, items: list[tuple[str, Any]]) -> list[Any]:
        self.asked.append("MaskInputs")
        self.masked += [value for _tenant, value in items]
        return [mask_value(value, PII) for _tenant, value in items]

    def may_start(self, tenant: str, principal: str, workflow: str, run_id: str, inputs: Any = None) -> Verdict:
        """Evaluate(start_workflow): its answer masks the inputs sent with it, as decide() does."""
        self.asked.append("Evaluate")
        self.starts.append(run_id)
        if inputs is None:
            return ALLOW
        return _verdict(effect="allow", reasons=ALLOW.reasons, policy_id=ALLOW.policy_id,
                        inputs=mask_value(inputs, PII), masked=True)

    def evaluate_many(self, checks: list[tuple[RunState, CheckPolicy]], traces: Any = ()) -> list[Verdict]:
        super().evaluate_many(checks, traces)
        return [_verdict(effect="allow", reasons=ALLOW.reasons, policy_id=ALLOW.policy_id,
                         inputs=mask_value(check.inputs, PII), masked=True) for _run, check in checks]


class RecordingClassifier:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def classify(self, texts: list[str]) -> list[tuple[str | None, float, str]]:
        self.texts += texts
        return [("lost_or_stolen_card", 0.9, "test@v1") for _ in texts]


def _masking_mesh() -> tuple[Mesh, MaskingPolicy]:
    m = mesh(FLOW)
    policy = MaskingPolicy()
    m.planner.policy = policy
    return m, policy


def _everything_the_planner_wrote(m: Mesh) -> str:
    published = [json.dumps(r, default=str) for role in ("step_requests", "workflow_events", "audit", "approvals")
                 for r in m.publisher.decoded(role)]
    stored = json.dumps(m.runs.load("t1", "run-1").run.to_dict() if m.runs.load("t1", "run-1").run else {})
    return "\n".join(published) + stored


def _assert_no_raw(blob: str) -> None:
    leaked = [v for v in RAW if v in blob]
    assert leaked == [], f"raw PII left the planner: {leaked}"


def test_a_step_dispatches_the_inputs_policy_masked() -> None:
    m, _policy = _masking_mesh()
    rec = m.publisher.inbound("commands", "run-1", wire.command(
        "t1", "run-1", "api:ann", "StartWorkflow", {"workflow": "help", "workflow_version": 1,
                                                   "input_json": json.dumps({"text": TEXT, "email": RAW[0]})}))
    m.planner.handle([rec])
    [request] = m.publisher.decoded("step_requests")
    inputs = json.loads(request["inputs_json"])
    assert inputs["to"] == "j***@example.com"
    assert "**** **** **** 1111" in inputs["body"] and "**** **** **** **30 00" in inputs["body"]
    assert RAW[0] not in request["inputs_json"]


def test_an_ingress_message_is_masked_before_it_is_classified_stored_or_published() -> None:
    m, policy = _masking_mesh()
    classifier = RecordingClassifier()
    m.planner.classifier = classifier
    rec = m.publisher.inbound("ingress", "c-1", {
        "event_id": "e-1", "tenant": "t1", "occurred_at": 1, "source": "helpdesk",
        "type": "support.message.received", "subject": "c-1",
        "data_json": json.dumps({"text": TEXT, "email": RAW[0], "customer_id": "c-1"}), "workflow": None})
    m.planner.handle([rec])
    assert classifier.texts and all(v not in t for t in classifier.texts for v in RAW)
    assert "I lost my card **** **** **** 1111" in classifier.texts[0]  # the words still classify
    run_id = m.publisher.decoded("step_requests")[0]["run_id"]
    run = m.runs.load("t1", run_id).run
    assert run is not None and run.input["customer_id"] == "c-1" and run.input["intent"] == "lost_or_stolen_card"
    blob = "\n".join(json.dumps(r, default=str) for role in ("step_requests", "workflow_events", "audit")
                     for r in m.publisher.decoded(role)) + json.dumps(run.to_dict())
    _assert_no_raw(blob)
    assert policy.masked  # one call masked the batch's messages


def test_a_persons_reason_to_approve_reject_or_cancel_is_masked_before_it_enters_the_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Why someone decided is free text ("called the customer at ..."): it goes into the run's
    events and the audit trail, so it is masked like the run's input."""
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")  # in-process: the auth matrix covers the edge
    gate = StepState(id="gate", tool="bank.block_card", status="waiting_approval", approval_role="fraud-ops")
    run = RunState(run_id="run-1", tenant="t1", workflow="help", version=1, input={}, status="waiting_approval",
                   steps={"gate": gate})

    class Runs:
        r = None  # the listing's Redis: not used by these calls

        def get(self, tenant: str, run_id: str) -> RunState:
            return run

    publisher = RecordingPublisher()
    api = WorkflowApi(store=Runs(), registry=Registry([]), producer=publisher,  # type: ignore[arg-type]
                      policy=MaskingPolicy(), default_tenant="t1")  # type: ignore[arg-type]
    reason = "called " + ", ".join(RAW)
    api.Approve(workflow_pb2.DecisionRequest(run_id="run-1", step_id="gate", actor="ann", reason=reason), None)
    api.Reject(workflow_pb2.DecisionRequest(run_id="run-1", step_id="gate", actor="ann", reason=reason), None)
    api.Cancel(workflow_pb2.CancelRequest(run_id="run-1", actor="ann", reason=reason), None)
    commands = publisher.decoded("commands")
    assert len(commands) == 3 and all("called j***@example.com" in json.dumps(c) for c in commands), commands
    _assert_no_raw(json.dumps(commands))


def test_an_api_start_asks_policy_once_and_its_input_enters_the_run_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start check carries the run's input and answers it masked: one Evaluate, no MaskInputs
    (was: Evaluate with '{}', then MaskInputs, two round trips to policy per start)."""
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")

    class Runs:
        r = None
        pending: list[RunState] = []

        def get(self, tenant: str, run_id: str) -> None:
            return None

        def mark_pending(self, run: RunState) -> bool:
            self.pending.append(run)
            return True

    publisher, policy, runs = RecordingPublisher(), MaskingPolicy(), Runs()
    api = WorkflowApi(store=runs, registry=Registry([build(FLOW)]), producer=publisher,  # type: ignore[arg-type]
                      policy=policy, default_tenant="t1")  # type: ignore[arg-type]
    api.StartWorkflow(workflow_pb2.StartWorkflowRequest(workflow="help", actor="ann", input_json=json.dumps(
        {"text": TEXT, "email": RAW[0]})), None)
    assert policy.asked == ["Evaluate"]
    assert runs.pending[0].input["email"] == "j***@example.com"
    _assert_no_raw(json.dumps(runs.pending[0].input) + json.dumps(publisher.decoded("commands")))
