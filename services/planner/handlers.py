"""The planner's message handlers: ingress events, workflow commands and step
results all become transitions of one run, saved with their outbox."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from services.common.errors import BadRecord, Conflict, NotFound, PermanentError, PolicyDenied, TransientError
from services.common.kafka import Inbound, MeshProducer
from services.planner import wire
from services.planner.domain import engine
from services.planner.domain.state import STEP_TERMINAL, Audited, CancelTimer, Command, RunState, StartTimer
from services.planner.domain.workflow import WorkflowDef, build
from services.planner.ports import IntentClassifier, PolicyGateway
from services.planner.store import OutRecord, RunStore
from services.planner.workflows import Registry

log = logging.getLogger(__name__)
Transition = Callable[[RunState, WorkflowDef], list[Command]]


class UnknownWorkflow(PermanentError):
    """An event or command names a workflow that is not deployed."""


def run_id_for(tenant: str, request_id: str) -> str:
    """Deterministic run id: a redelivered event or a repeated request maps to the same run."""
    return "run-" + hashlib.sha256(f"{tenant}\x00{request_id}".encode()).hexdigest()[:20]


class Planner:
    def __init__(self, *, store: RunStore, registry: Registry, producer: MeshProducer, policy: PolicyGateway,
                 classifier: IntentClassifier | None) -> None:
        self.store, self.registry, self.producer = store, registry, producer
        self.policy, self.classifier = policy, classifier
        self._pending: dict[tuple[str, str], str] = {}
        self._produced: set[str] = set()

    # -- batch entry point ---------------------------------------------------------
    def handle(self, records: Sequence[Inbound]) -> None:
        self._pending, self._produced = {}, set()
        intents = self._classify([r for r in records if r.role == "ingress"])
        for rec in records:
            if rec.role == "ingress":
                self.on_ingress(rec, intents.get((rec.topic, rec.partition, rec.offset), (None, 0.0, "")))
            elif rec.role == "commands":
                self.on_command(rec)
            elif rec.role == "step_results":
                self.on_result(rec)
        # The outbox may only be cleared once the broker has acknowledged it.
        self.producer.flush()
        for (tenant, run_id), version in self._pending.items():
            self.store.clear_outbox(tenant, run_id, version)

    def _classify(self, ingress: list[Inbound]) -> dict[tuple[str, int, int], tuple[str | None, float, str]]:
        wanted = [r for r in ingress if not r.value.get("workflow") and self.registry.needs_intent(r.value["type"])]
        if not wanted or self.classifier is None:
            return {}
        texts = [str(_data(r).get("text", ""))[:2000] for r in wanted]
        labels = self.classifier.classify(texts)
        return {(r.topic, r.partition, r.offset): label for r, label in zip(wanted, labels, strict=True)}

    # -- ingress --------------------------------------------------------------------
    def on_ingress(self, rec: Inbound, intent: tuple[str | None, float, str]) -> None:
        v, data = rec.value, _data(rec)
        label, score, model_version = intent
        if v.get("workflow"):
            wf = self._latest(v["workflow"])
            why = f"event names workflow {wf.name}"
        else:
            route = self.registry.route(v["type"], label)
            if route.workflow is None:
                raise UnknownWorkflow(route.reason)
            wf, why = self.registry.latest(route.workflow), route.reason
        run_input = {**data, "intent": label, "intent_score": round(score, 4),
                     "event": {"id": v["event_id"], "type": v["type"], "source": v["source"], "subject": v["subject"]}}
        routed = {"intent": label, "score": score, "model_version": model_version, "reason": why}
        self.start_run(v["tenant"], run_id_for(v["tenant"], v["event_id"]), wf, run_input, v["event_id"],
                       actor=f"source:{v['source']}", routed=routed)

    def start_run(self, tenant: str, run_id: str, wf: WorkflowDef, run_input: dict[str, Any], event_id: str,
                  *, actor: str, routed: dict[str, Any] | None = None) -> None:
        def create() -> tuple[RunState, list[Command]]:
            verdict = self.policy.may_start(tenant, actor, wf.name, run_id)
            if verdict.effect == "deny":
                raise PolicyDenied(f"{actor} may not start {wf.name}: {'; '.join(verdict.reasons)}")
            self.store.snapshot_definition(wf.name, wf.version, wf.source)
            run, cmds = engine.start(run_id, tenant, wf, run_input, _now(), self.policy.port)
            return run, cmds

        extra = [("audit", wire.audit(RunState(run_id, tenant, wf.name, wf.version, run_input), "run.routed",
                                      actor=actor, decision=wf.ref, reason=(routed or {}).get("reason"),
                                      detail=routed or {}))] if routed else []
        self._apply(tenant, run_id, event_id, None, create=create, extra=extra)

    # -- commands -------------------------------------------------------------------
    def on_command(self, rec: Inbound) -> None:
        v = rec.value
        tenant, run_id, cmd = v["tenant"], v["run_id"], v["command"]
        actor, reason, step_id = v.get("actor") or "unknown", v.get("reason") or "", v.get("step_id") or ""
        if cmd == "start":
            wf = self._latest(v.get("workflow") or "")
            run_input = json.loads(v.get("input_json") or "{}")
            self.start_run(tenant, run_id, wf, run_input, v["event_id"], actor=actor)
            return
        now = _now()
        transitions: dict[str, Transition] = {
            "approve": lambda run, wf: self._decide(run, wf, step_id, True, actor, reason, now),
            "reject": lambda run, wf: self._decide(run, wf, step_id, False, actor, reason, now),
            "cancel": lambda run, wf: engine.on_cancel(run, wf, actor, reason, now, self.policy.port),
            "signal": lambda run, wf: self._signal(run, wf, v, now),
            "timer": lambda run, wf: engine.on_timer(run, wf, v.get("timer_id") or "",
                                                     json.loads(v.get("payload_json") or "{}").get("kind", ""),
                                                     step_id or None, now, self.policy.port),
        }
        if cmd not in transitions:
            raise BadRecord(f"unknown command {cmd!r}; expected one of start, {', '.join(transitions)}")
        self._apply(tenant, run_id, v["event_id"], transitions[cmd])

    def _decide(self, run: RunState, wf: WorkflowDef, step_id: str, approved: bool, actor: str, reason: str,
                now: int) -> list[Command]:
        try:
            cmds = engine.on_decision(run, wf, step_id, approved, actor, reason, now, self.policy.port)
        except engine.TransitionError as exc:
            log.info("decision ignored: %s", exc)
            return [Audited("approval.ignored", step_id, actor, str(exc), None)]
        # Who, when and why, through the outbox with the transition it caused.
        return [Audited("approval.approved" if approved else "approval.rejected", step_id, actor, reason,
                        "approve" if approved else "reject"), *cmds]

    def _signal(self, run: RunState, wf: WorkflowDef, v: dict[str, Any], now: int) -> list[Command]:
        run.input.setdefault("signals", {})[v.get("reason") or "signal"] = json.loads(v.get("payload_json") or "null")
        return engine.advance(run, wf, now, self.policy.port)

    # -- step results ---------------------------------------------------------------
    def on_result(self, rec: Inbound) -> None:
        v = rec.value
        outcome = wire.outcome_from(v)
        now = _now()
        self._apply(v["tenant"], v["run_id"], v["event_id"],
                    lambda run, wf: engine.on_result(run, wf, outcome, now, self.policy.port))

    # -- the one place state changes ------------------------------------------------
    def _apply(self, tenant: str, run_id: str, event_id: str, transition: Transition | None, *,
               create: Callable[[], tuple[RunState, list[Command]]] | None = None,
               extra: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        for _ in range(5):
            loaded = self.store.load(tenant, run_id)
            before = {sid: st.status for sid, st in loaded.run.steps.items()} if loaded.run else {}
            self._produce(loaded.outbox)  # left over from a crash or from earlier in this batch
            if loaded.run is None:
                if create is None:
                    raise NotFound(f"no run {run_id} for tenant {tenant}")
                run, cmds = create()
            elif event_id in loaded.run.seen or transition is None:
                return  # duplicate delivery: its effects are already in the outbox
            else:
                run = loaded.run
                cmds = transition(run, self._definition(run))
            self._settle_budgets(run, before)
            run.remember(event_id)
            out = self._encode(run, cmds, extra or [])
            adds = [(c.due_ms, c.timer_id, {"kind": c.kind, "step_id": c.step_id, "run_id": run_id})
                    for c in cmds if isinstance(c, StartTimer)]
            removes = [c.timer_id for c in cmds if isinstance(c, CancelTimer)]
            try:
                version = self.store.save(run, loaded.version, loaded.outbox + out, adds, removes)
            except Conflict:
                continue  # another replica moved the run: reload and re-apply
            self._pending[(tenant, run_id)] = version
            self._produce(out)
            if loaded.run is None:
                self.store.clear_pending(tenant, run_id)
            return
        # Another replica keeps moving the run (a rebalance in progress): retry the record later.
        raise TransientError(f"run {run_id}: gave up after repeated concurrent updates")

    def _settle_budgets(self, run: RunState, before: dict[str, str]) -> None:
        """Reconcile each budget reservation once, when its step settles, with the cost of all its
        attempts (a step that ends by failure, rejection or cancellation releases its hold). Done
        before the save: reconcile is idempotent per reservation, so a redelivery repeats it safely."""
        wf = self._definition(run)
        for sid, state in run.steps.items():
            was = before.get(sid, "pending")
            if state.status == was or state.status not in STEP_TERMINAL or not state.decision:
                continue
            if wf.step(sid).cost_estimate > 0:
                self.policy.reconcile(run.tenant, run.run_id, sid, state.cost)

    def _encode(self, run: RunState, cmds: list[Command], extra: list[tuple[str, dict[str, Any]]]) -> list[OutRecord]:
        pairs = extra + [pair for cmd in cmds for pair in wire.records_for(run, cmd)]
        out = []
        for role, record in pairs:
            spec = self.producer.catalog.spec(role)
            value = self.producer.codec.encode(spec.schema, record)
            if len(value) > self.producer.MAX_BYTES - 4096:
                # Refuse before saving: an outbox record that can never be sent would block the run.
                raise BadRecord(f"run {run.run_id} would produce a {len(value)}-byte {spec.schema} record, over the "
                                f"{self.producer.MAX_BYTES}-byte limit; keep large payloads out of run inputs and "
                                "outputs (store them and pass a reference)")
            headers = {"aios-schema": spec.schema, "event-id": record["event_id"], "tenant": run.tenant}
            out.append(OutRecord(spec.name, run.run_id, value, headers, record["event_id"]))
        return out

    def _produce(self, records: list[OutRecord]) -> None:
        for rec in records:
            if rec.event_id not in self._produced:
                self._produced.add(rec.event_id)
                self.producer.send_raw(rec.topic, rec.key, rec.value, rec.headers)

    def _definition(self, run: RunState) -> WorkflowDef:
        wf = self.registry.get(run.workflow, run.version)
        if wf is None:
            source = self.store.load_definition(run.workflow, run.version)
            if source is None:
                raise UnknownWorkflow(f"run {run.run_id} needs {run.workflow}@v{run.version}, which is neither "
                                      "deployed nor snapshotted")
            wf = build(source)
            self.registry.add(wf)
        return wf

    def _latest(self, name: str) -> WorkflowDef:
        try:
            return self.registry.latest(name)
        except NotFound as exc:
            raise UnknownWorkflow(str(exc)) from None


def _data(rec: Inbound) -> dict[str, Any]:
    try:
        data = json.loads(rec.value.get("data_json") or "{}")
    except json.JSONDecodeError as exc:
        raise BadRecord(f"data_json is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRecord("data_json must be a JSON object")
    return data


def _now() -> int:
    return int(time.time() * 1000)
