"""The planner's message handlers: ingress events, workflow commands and step
results all become transitions of one run, in three moves:

  load    the run (and produce any outbox a crash left behind);
  decide  the pure engine's transition; every ``CheckPolicy`` it returns is
          asked of the policy service here, outside the commit, and fed back
          with ``engine.apply_verdicts``; verdicts and budget settlements are
          kept per batch, so a commit retried after a compare-and-set conflict
          never asks policy twice nor writes a second audit record;
  commit  state, outbox, dedupe marker and timers in one unit of work, then
          produce the outbox and clear it once the broker acknowledged it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.common import tracing
from services.common.errors import (
    Backpressure,
    BadRecord,
    Conflict,
    NotFound,
    PolicyDenied,
    TransientError,
)
from services.common.kafka import Inbound, OutRecord
from services.common.uow import AlreadyApplied
from services.planner import metrics, wire
from services.planner.batch import (
    Admission,
    AtCapacity,
    Batch,
    Decide,
    Item,
    UnknownWorkflow,
    decision_commands,
    event_data,
    run_id_for,
    signal_commands,
    stamp_trace,
)
from services.planner.domain import engine
from services.planner.domain.state import (
    Audited,
    CancelTimer,
    CheckPolicy,
    Command,
    RunState,
    SettleBudget,
    StartTimer,
    StepOutcome,
    Verdict,
)
from services.planner.domain.workflow import WorkflowDef, build
from services.planner.intents import BackgroundIntents, Intent
from services.planner.ports import Classifier, Policy, Publisher, Settlement
from services.planner.run_trace import root_trace, trace_parent
from services.planner.store import Definitions, LoadedRun, RunChange, RunStore
from services.planner.workflows import Registry

log = logging.getLogger(__name__)
MAX_CONFLICTS = 5


class Planner:
    def __init__(self, *, runs: RunStore, definitions: Definitions, registry: Registry, publisher: Publisher,
                 policy: Policy, classifier: Classifier | None, clock: Callable[[], int] | None = None,
                 admission: Admission | None = None) -> None:
        self.runs, self.definitions, self.registry = runs, definitions, registry
        self.publisher, self.policy, self.classifier = publisher, policy, classifier
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.admission = admission or Admission()

    # -- batch entry point ---------------------------------------------------------
    def handle(self, records: Sequence[Inbound]) -> None:
        """In-flight work first: commands and step results of running runs, then new ingress events,
        admitted while their tenant and workflow are under their in-flight limits. An event over
        the limit is not buffered: it and the rest of its partition are deferred (Backpressure),
        so the consumer pauses that partition and reads it again as runs finish."""
        batch = Batch()
        for rec in records:
            batch.headers = rec.headers
            if rec.role == "commands":
                self.on_command(batch, wire.command_from(rec.value))
            elif rec.role == "step_results":
                self.on_result(batch, rec.value["tenant"], rec.value["run_id"], rec.value["event_id"],
                               wire.outcome_from(rec.value))
        deferred, unclassified = self._admit_ingress(batch, [r for r in records if r.role == "ingress"])
        self._apply_all(batch)
        # The outbox may only be cleared once the broker has acknowledged it.
        self.publisher.flush()
        self.runs.clear_outboxes(batch.committed)
        if deferred:
            if len(deferred) > unclassified:
                metrics.ADMISSION_WAITS.inc(len(deferred) - unclassified)
            retry_after = self.classifier.retry_after_s() if unclassified and isinstance(
                self.classifier, BackgroundIntents) else 0.2
            raise Backpressure(f"{len(deferred)} ingress event(s) wait for runs in flight to finish "
                               f"({unclassified} for their intent)",
                               [(r.topic, r.partition, r.offset) for r in deferred], retry_after_s=retry_after)

    def _admit_ingress(self, batch: Batch, ingress: list[Inbound]) -> tuple[list[Inbound], int]:
        """Turn admitted ingress into items; return the deferred records and how many of them wait for
        their intent (the rest wait for room)."""
        deferred: list[Inbound] = []
        blocked: set[tuple[str, int]] = set()
        ready = []
        for rec in ingress:  # the tenant's limit first: no classification for events that must wait
            if (rec.topic, rec.partition) in blocked or not self._has_room(batch, rec.tenant, None):
                blocked.add((rec.topic, rec.partition))
                deferred.append(rec)
            else:
                ready.append(rec)
        masked = self._mask_ingress(ready)
        intents, waiting = self._classify(ready, masked)
        unclassified = 0
        for rec in ready:
            at = (rec.topic, rec.partition, rec.offset)
            if at in waiting and (rec.topic, rec.partition) not in blocked:
                unclassified += 1  # its intent is on its way: it and the rest of its partition come again
                blocked.add((rec.topic, rec.partition))
            if (rec.topic, rec.partition) in blocked:
                deferred.append(rec)
                continue
            batch.headers = rec.headers
            try:
                self.on_ingress(batch, rec, intents.get(at, (None, 0.0, "")), masked.get(at))
            except AtCapacity:
                blocked.add((rec.topic, rec.partition))
                deferred.append(rec)
        return deferred, unclassified

    def _has_room(self, batch: Batch, tenant: str, workflow: str | None) -> bool:
        limits = self.admission
        if not limits.per_tenant and not limits.per_workflow:
            return True
        key = (tenant, workflow or "")
        if key not in batch.in_flight:
            batch.in_flight[key] = list(self.runs.in_flight(tenant, workflow or ""))
        tenant_n, wf_n = batch.in_flight[key]
        if limits.per_tenant and tenant_n >= limits.per_tenant:
            return False
        return not (workflow and limits.per_workflow and wf_n >= limits.per_workflow)

    def _took_room(self, batch: Batch, tenant: str, workflow: str) -> None:
        for (t, wf), counts in batch.in_flight.items():
            if t == tenant:
                counts[0] += 1
                if wf == workflow:
                    counts[1] += 1

    def _mask_ingress(self, ingress: list[Inbound]) -> dict[tuple[str, int, int], dict[str, Any]]:
        """Each event's data as policy masks it, in one call: the raw text is classified, stored and
        published nowhere (an event whose data is not a JSON object fails later, in on_ingress)."""
        parsed = []
        for rec in ingress:
            try:
                parsed.append((rec, event_data(rec)))
            except BadRecord:
                continue
        masked = self.policy.mask_many([(rec.value["tenant"], data) for rec, data in parsed])
        return {(rec.topic, rec.partition, rec.offset): value for (rec, _), value in zip(parsed, masked, strict=True)
                if isinstance(value, dict)}

    def _classify(self, ingress: list[Inbound], masked: Mapping[tuple[str, int, int], dict[str, Any]],
                  ) -> tuple[dict[tuple[str, int, int], Intent], set[tuple[str, int, int]]]:
        """Intents of the events that need one, by record; and the records whose intent is still being
        classified in the background (BackgroundIntents: the loop never waits for the model)."""
        wanted = [r for r in ingress if not r.value.get("workflow") and self.registry.needs_intent(r.value["type"])
                  and (r.topic, r.partition, r.offset) in masked]
        if not wanted or self.classifier is None:
            return {}, set()
        texts = [str(masked[(r.topic, r.partition, r.offset)].get("text", ""))[:2000] for r in wanted]
        # One model call for the batch: its span continues the batch's trace and links the others'.
        with tracing.tracer().start_as_current_span("planner classify", links=tracing.links_to(
                r.headers for r in wanted), attributes={"aios.inference.texts": len(texts)}):
            if isinstance(self.classifier, BackgroundIntents):
                known, _waiting = self.classifier.lookup([(r.value["event_id"], t) for r, t in zip(wanted, texts,
                                                                                                  strict=True)])
                return ({(r.topic, r.partition, r.offset): known[r.value["event_id"]] for r in wanted
                         if r.value["event_id"] in known},
                        {(r.topic, r.partition, r.offset) for r in wanted if r.value["event_id"] not in known})
            labels = self.classifier.classify(texts)
        return {(r.topic, r.partition, r.offset): label for r, label in zip(wanted, labels, strict=True)}, set()

    # -- ingress --------------------------------------------------------------------
    def on_ingress(self, batch: Batch, rec: Inbound, intent: tuple[str | None, float, str],
                   masked: dict[str, Any] | None = None) -> None:
        v = rec.value
        data = masked if masked is not None else self.policy.mask_many([(v["tenant"], event_data(rec))])[0]
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
        actor = f"source:{v['source']}"
        tenant, run_id = v["tenant"], run_id_for(v["tenant"], v["event_id"])
        if not self._has_room(batch, tenant, wf.name) and self.runs.load(tenant, run_id).run is None:
            raise AtCapacity(f"{tenant}/{wf.name} is at its in-flight limit")
        self._took_room(batch, tenant, wf.name)
        self.start_run(batch, tenant, run_id, wf, run_input, v["event_id"], actor=actor, routed=routed,
                       trigger=v["type"], check_start=True)

    def start_run(self, batch: Batch, tenant: str, run_id: str, wf: WorkflowDef, run_input: dict[str, Any],
                  event_id: str, *, actor: str, routed: dict[str, Any] | None = None,
                  trigger: str | None = None, check_start: bool = False) -> None:
        """Create the run. Upstream events are checked here (once per run, not per delivery); API
        starts were checked by the gRPC API before they were accepted."""
        def create(existing: RunState | None) -> tuple[RunState, list[Command]]:
            if existing is not None:
                raise AlreadyApplied(f"run {run_id} exists")  # a repeated start: nothing to do
            if check_start:
                verdict = self._cached(batch, (run_id, ""),
                                       lambda: self.policy.may_start(tenant, actor, wf.name, run_id))
                if verdict.effect == "deny":
                    raise PolicyDenied(f"{actor} may not start {wf.name}: {'; '.join(verdict.reasons)}")
            self.definitions.snapshot(wf.name, wf.version, wf.source)
            run, cmds = engine.start(run_id, tenant, wf, run_input, self.clock())
            run.trigger, run.actor = trigger, actor
            if routed:
                cmds.insert(0, Audited("run.routed", None, actor, str(routed.get("reason") or ""), wf.ref, routed))
            return run, cmds

        batch.items.append(Item(tenant, run_id, event_id, create,
                                (tenant, actor, wf.name, run_id) if check_start else None, batch.headers))

    # -- commands -------------------------------------------------------------------
    def on_command(self, batch: Batch, cmd: wire.CommandIn) -> None:
        b, now = cmd.body, self.clock()
        if cmd.kind == "StartWorkflow":
            wf = self._version(b["workflow"], b.get("workflow_version"))
            try:
                run_input = json.loads(b.get("input_json") or "{}")
            except json.JSONDecodeError as exc:
                raise BadRecord(f"StartWorkflow input_json is not JSON: {exc}") from exc
            self.start_run(batch, cmd.tenant, cmd.run_id, wf, run_input, cmd.event_id, actor=cmd.actor)
            return
        transitions: dict[str, Callable[[RunState, WorkflowDef], list[Command]]] = {
            "ApproveStep": lambda run, wf: decision_commands(run, wf, b["step_id"], True, cmd.actor, b.get("reason", ""), now),
            "RejectStep": lambda run, wf: decision_commands(run, wf, b["step_id"], False, cmd.actor, b.get("reason", ""), now),
            "CancelRun": lambda run, wf: engine.on_cancel(run, wf, cmd.actor, b.get("reason", ""), now),
            "SignalRun": lambda run, wf: signal_commands(run, wf, b["name"], b.get("payload_json"), now),
            "FireTimer": lambda run, wf: engine.on_timer(run, wf, b["timer_id"], b["kind"], b.get("step_id"), now),
        }
        if cmd.kind not in transitions:
            raise BadRecord(f"unknown command {cmd.kind!r}; expected StartWorkflow or one of {', '.join(transitions)}")
        self._apply(batch, cmd.tenant, cmd.run_id, cmd.event_id, self._existing(cmd.tenant, cmd.run_id,
                                                                              transitions[cmd.kind]))

    # -- step results ---------------------------------------------------------------
    def on_result(self, batch: Batch, tenant: str, run_id: str, event_id: str, outcome: StepOutcome) -> None:
        now = self.clock()
        self._apply(batch, tenant, run_id, event_id,
                    self._existing(tenant, run_id, lambda run, wf: engine.on_result(run, wf, outcome, now)))

    def _existing(self, tenant: str, run_id: str,
                  transition: Callable[[RunState, WorkflowDef], list[Command]]) -> Decide:
        def decide(run: RunState | None) -> tuple[RunState, list[Command]]:
            if run is None:
                raise NotFound(f"no run {run_id} for tenant {tenant}")
            return run, transition(run, self._definition(run))
        return decide

    # -- the one place state changes ------------------------------------------------
    def _apply(self, batch: Batch, tenant: str, run_id: str, event_id: str, decide: Decide) -> None:
        batch.items.append(Item(tenant, run_id, event_id, decide, headers=batch.headers))

    def _apply_all(self, batch: Batch) -> None:
        """load -> decide -> commit for every item of the batch, in rounds: each round takes the next
        event of every run (a run's events apply in order), loads those runs in one round trip, asks
        policy once for all their checks, and commits them in one script. A run that lost a
        compare-and-set reloads and re-applies in the next round (verdicts are cached)."""
        queues: dict[tuple[str, str], list[Item]] = {}
        for item in batch.items:
            queues.setdefault((item.tenant, item.run_id), []).append(item)
        conflicts: dict[tuple[str, str], int] = {}
        while queues:
            heads = [q[0] for q in queues.values()]
            loaded = self.runs.load_many([(i.tenant, i.run_id, i.event_id) for i in heads])
            self._check_starts(batch, [(i.start_check, i.headers) for i, (lr, seen) in zip(heads, loaded, strict=True)
                                       if i.start_check and lr.run is None and not seen])
            decided: list[tuple[Item, LoadedRun, RunState, list[Command]]] = []
            for item, (lr, seen) in zip(heads, loaded, strict=True):
                self._produce(batch, lr.outbox)  # left over from a crash or from earlier in this batch
                step = self._decide(item, lr, seen)
                if step is None:
                    queues[(item.tenant, item.run_id)].pop(0)  # a duplicate, or nothing changes
                else:
                    root_trace(item, step[0])
                    decided.append((item, lr, *step))
            self._ask_policy_all(batch, decided)
            self._settle_budgets(batch, decided)
            changes = []
            for item, lr, run, cmds in decided:
                out = self._encode(run, cmds, item)
                changes.append((out, RunChange(
                    run=run, expected=lr.version, outbox=lr.outbox + out, event_id=item.event_id,
                    previous_status=lr.status,
                    timers_add=[(c.due_ms, c.timer_id, {"kind": c.kind, "step_id": c.step_id, "run_id": item.run_id})
                                for c in cmds if isinstance(c, StartTimer)],
                    timers_remove=[c.timer_id for c in cmds if isinstance(c, CancelTimer)])))
            results = self.runs.commit_many([change for _out, change in changes])
            for (item, _lr, _run, _cmds), (out, _change), result in zip(decided, changes, results, strict=True):
                key = (item.tenant, item.run_id)
                if isinstance(result, Conflict):
                    conflicts[key] = conflicts.get(key, 0) + 1
                    if conflicts[key] >= MAX_CONFLICTS:
                        # Another replica keeps moving the run (a rebalance in progress): retry later.
                        raise TransientError(f"run {item.run_id}: gave up after {MAX_CONFLICTS} concurrent updates")
                    continue  # another replica moved the run: reload and re-apply next round
                queues[key].pop(0)
                if isinstance(result, str):
                    batch.committed[key] = result
                    self._produce(batch, out)
                # AlreadyApplied: another replica applied this very event meanwhile
            queues = {k: q for k, q in queues.items() if q}

    def _check_starts(self, batch: Batch,
                      checks: list[tuple[tuple[str, str, str, str] | None, Mapping[str, str]]]) -> None:
        """Ask policy, in one call, whether each new run of the round may start (the create decision
        then finds its verdict cached), each check in the trace of the event that starts its run;
        runs that exist already are not asked again."""
        wanted = [(c, headers) for c, headers in checks if c is not None and (c[3], "") not in batch.verdicts]
        if wanted:
            verdicts = self.policy.may_start_many([c for c, _h in wanted], traces=[h for _c, h in wanted])
            for (check, _headers), verdict in zip(wanted, verdicts, strict=True):
                batch.verdicts[(check[3], "")] = verdict

    def _decide(self, item: Item, lr: LoadedRun, seen: bool) -> tuple[RunState, list[Command]] | None:
        if seen:
            return None  # a duplicate delivery: its effects are in the outbox produced above
        try:
            run, cmds = item.decide(lr.run)
        except AlreadyApplied:
            return None
        if run.terminal and lr.run is not None and lr.run.terminal and not cmds:
            return None  # nothing changes for an ended run (a late timer, a duplicate result)
        return run, cmds

    def _ask_policy_all(self, batch: Batch, decided: list[tuple[Item, LoadedRun, RunState, list[Command]]]) -> None:
        """Every CheckPolicy of the round in one call, fed back run by run (which may ask again)."""
        while True:
            wanted = [(item, run, c) for item, _lr, run, cmds in decided for c in cmds
                      if isinstance(c, CheckPolicy) and (run.run_id, c.step_id) not in batch.verdicts]
            if wanted:
                # One call for many runs: each check carries its own run's trace context, which the
                # policy service continues per check (docs/DECISIONS.md, one trace per run).
                verdicts = self.policy.evaluate_many([(run, c) for _i, run, c in wanted],
                                                     traces=[trace_parent(i, run) for i, run, _c in wanted])
                for (_item, run, c), verdict in zip(wanted, verdicts, strict=True):
                    batch.verdicts[(run.run_id, c.step_id)] = verdict
            pending = False
            for n, (item, lr, run, cmds) in enumerate(decided):
                if any(isinstance(c, CheckPolicy) for c in cmds):
                    cmds = engine.apply_verdicts(run, self._definition(run), cmds, {
                        c.step_id: batch.verdicts[(run.run_id, c.step_id)] for c in cmds
                        if isinstance(c, CheckPolicy)}, self.clock())
                    decided[n] = (item, lr, run, cmds)
                    pending = pending or any(isinstance(c, CheckPolicy) for c in cmds)
            if not pending:
                return

    @staticmethod
    def _cached(batch: Batch, key: tuple[str, str], ask: Callable[[], Verdict]) -> Verdict:
        if key not in batch.verdicts:
            batch.verdicts[key] = ask()
        return batch.verdicts[key]

    def _settle_budgets(self, batch: Batch, decided: list[tuple[Item, LoadedRun, RunState, list[Command]]]) -> None:
        """Reconcile each settled step's reservation once, before the commit, the whole round in one call
        (each in its run's trace): reconcile is idempotent per reservation, so a crash before the commit
        repeats it harmlessly. A settlement policy refuses for good (a bad cost or id) is logged
        and audited with the transition; it never fails it, or the run would never end."""
        wanted: dict[tuple[str, str, float], tuple[Item, RunState, SettleBudget]] = {}
        for item, _lr, run, cmds in decided:
            for cmd in cmds:
                # Keyed by cost too: a failure and a late success of one step in one batch settle twice.
                if isinstance(cmd, SettleBudget) and (run.run_id, cmd.step_id, cmd.cost) not in batch.settled:
                    wanted.setdefault((run.run_id, cmd.step_id, cmd.cost), (item, run, cmd))
        if wanted:
            errors = self.policy.reconcile_many(
                [Settlement(run.tenant, run.run_id, c.step_id, c.cost) for _i, run, c in wanted.values()],
                traces=[trace_parent(i, run) for i, run, _c in wanted.values()])
            for key, error in zip(wanted, errors, strict=True):
                batch.settled.add(key)
                if error:
                    log.warning("policy refused to settle step %s of run %s at %s: %s", key[1], key[0], key[2], error)
                    batch.refused[key] = error
        for _item, _lr, run, cmds in decided:  # also when a conflict re-decided the run: the record stays
            cmds += [Audited("budget.settle_refused", c.step_id, "system:planner",
                             f"policy refused to settle cost {c.cost:g}: {batch.refused[(run.run_id, c.step_id, c.cost)]}",
                             None, {"cost": c.cost}) for c in list(cmds)
                     if isinstance(c, SettleBudget) and (run.run_id, c.step_id, c.cost) in batch.refused]

    def _encode(self, run: RunState, cmds: list[Command], item: Item) -> list[OutRecord]:
        """The records a transition produces, encoded under a span of the run's own trace (one trace
        per run, though a batch decides for many runs). ``encode`` refuses an oversized record before
        the save: an outbox record that can never be sent would block the run."""
        root_trace(item, run)
        kind = item.headers.get("aios-schema", "record").rsplit(".", 1)[-1]
        with tracing.span_from_headers(f"planner {kind}", trace_parent(item, run),
                                       **{"aios.run_id": run.run_id, "aios.tenant": run.tenant}):
            stamp_trace(run, cmds)
            return [self.publisher.encode(role, run.run_id, record)
                    for cmd in cmds for role, record in wire.records_for(run, cmd)]

    def _produce(self, batch: Batch, records: list[OutRecord]) -> None:
        for rec in records:
            if rec.event_id not in batch.produced:
                batch.produced.add(rec.event_id)
                self.publisher.send_record(rec)

    def _definition(self, run: RunState) -> WorkflowDef:
        wf = self.registry.get(run.workflow, run.version)
        if wf is None:
            source = self.definitions.load(run.workflow, run.version)
            if source is None:
                raise UnknownWorkflow(f"run {run.run_id} needs {run.workflow}@v{run.version}, which is neither "
                                      "deployed nor snapshotted")
            wf = build(source)
            self.registry.add(wf)
        return wf

    def _version(self, name: str, version: int | None) -> WorkflowDef:
        if version is not None:
            found = self.registry.get(name, version)
            if found is not None:
                return found
        return self._latest(name)

    def _latest(self, name: str) -> WorkflowDef:
        try:
            return self.registry.latest(name)
        except NotFound as exc:
            raise UnknownWorkflow(str(exc)) from None
