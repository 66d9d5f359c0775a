"""The run state machine: (state, event) -> (new state, commands).

Every public function takes the run, its workflow definition, the event and
the current time, mutates only the run, and returns the commands to carry out.
It never calls out: a step that needs a policy verdict becomes ``checking``
and the transition returns ``CheckPolicy``; the handler asks policy outside
the commit and feeds the verdict back with ``on_verdict`` (``apply_verdicts``
for a batch), so the verdict is recorded in the step and a retried commit or a
replay never asks twice.

Timeouts say what they bound (as Temporal's do): a step's ``timeout_ms`` is
start-to-close, one running attempt, enforced by the executor from the moment
the call starts, so time queued behind a restart backlog never burns an
attempt; ``schedule_to_close_ms`` optionally bounds the whole step, queue and
retries included; the run deadline bounds the run."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from services.planner.domain import expressions
from services.planner.domain.settle import attempt_cost as _cost
from services.planner.domain.settle import maybe_asked as _maybe_asked
from services.planner.domain.settle import settle as _settle
from services.planner.domain.state import (
    STEP_ACTIVE,
    STEP_DONE,
    AskApproval,
    Audited,
    CancelTimer,
    CheckPolicy,
    Command,
    Dispatch,
    Emit,
    ParkDeadLetter,
    RunEnded,
    RunState,
    SettleBudget,
    StartTimer,
    StepOutcome,
    StepState,
    Verdict,
)
from services.planner.domain.workflow import StepDef, WorkflowDef


class TransitionError(ValueError):
    """The event does not fit the run's state (e.g. approving a step that is not waiting)."""


def context(run: RunState) -> dict[str, Any]:
    """What expressions see: the run's input, earlier steps' outputs, the run itself."""
    return {"input": run.input,
            "steps": {k: {"output": s.output, "status": s.status, "error": s.error} for k, s in run.steps.items()},
            "run": {"id": run.run_id, "tenant": run.tenant, "workflow": run.workflow, "version": run.version}}


def start(run_id: str, tenant: str, wf: WorkflowDef, run_input: dict[str, Any], now_ms: int) -> tuple[RunState, list[Command]]:
    run = RunState(run_id=run_id, tenant=tenant, workflow=wf.name, version=wf.version, input=run_input,
                   created_at=now_ms, updated_at=now_ms)
    for step in wf.steps:
        run.steps[step.id] = StepState(id=step.id, tool=step.tool, idempotency_key=f"{run_id}:{step.id}")
    cmds: list[Command] = [Emit("RunStarted", detail={"input": run_input, "workflow_digest": wf.digest})]
    if wf.deadline_ms:
        run.deadline_timer = f"{run_id}:deadline"
        cmds.append(StartTimer(run.deadline_timer, now_ms + wf.deadline_ms, "run_deadline"))
    return run, cmds + advance(run, wf, now_ms)


def advance(run: RunState, wf: WorkflowDef, now_ms: int) -> list[Command]:
    """Dispatch every ready step, or finish the run; called after each event."""
    run.updated_at = now_ms
    if run.terminal:
        return []
    if run.status in ("compensating", "failing"):
        return _advance_compensation(run, wf, now_ms)
    cmds: list[Command] = []
    progressed = True
    while progressed:  # skipping a step can make others ready in the same pass
        progressed = False
        for step in wf.steps:
            state = run.steps[step.id]
            if state.status != "pending" or not _deps_done(run, step):
                continue
            progressed = True
            cmds += _begin_step(run, wf, step, now_ms)
            if run.status not in ("running", "waiting_approval"):
                return cmds  # a step failed: _fail took over
    if all(s.status in STEP_DONE for s in run.steps.values()):
        try:
            run.output = expressions.render(wf.output, context(run)) if wf.output is not None else None
        except expressions.ExpressionError as exc:
            return cmds + _fail(run, wf, f"output: {exc}", now_ms)
        cmds += _end(run, "completed", None, now_ms)
    return cmds


def _deps_done(run: RunState, step: StepDef) -> bool:
    return all(run.steps[d].status in STEP_DONE for d in step.depends_on)


def _begin_step(run: RunState, wf: WorkflowDef, step: StepDef, now_ms: int) -> list[Command]:
    state = run.steps[step.id]
    ctx = context(run)
    try:
        if step.when and not expressions.evaluate(step.when, ctx):
            state.status, state.finished_at = "skipped", now_ms
            return [Emit("StepSkipped", step.id, "skipped", {"when": step.when})]
        inputs = expressions.render(step.inputs, ctx)
        amount = expressions.render(step.amount, ctx) if step.amount is not None else None
        gated = step.approval is not None and (not step.approval.when or
                                               bool(expressions.evaluate(step.approval.when, ctx)))
    except expressions.ExpressionError as exc:
        state.settled_cost = state.cost  # it never asked policy: no hold to release
        return _step_failed(run, wf, step.id, "ExpressionError", str(exc), now_ms)
    state.inputs, state.amount, state.gated = inputs, amount, gated
    state.status = "checking"
    return [CheckPolicy(step.id, step.tool, inputs, amount, step.cost_estimate)]


def on_verdict(run: RunState, wf: WorkflowDef, step_id: str, verdict: Verdict, now_ms: int) -> list[Command]:
    """Policy answered for a step that was ``checking``: dispatch, ask a person, or fail it."""
    state = run.steps[step_id]
    if state.status != "checking":
        # The run failed or was cancelled while we asked: keep the verdict so its reservation is released.
        state.decision, state.policy_id = state.decision or verdict.effect, state.policy_id or verdict.policy_id
        return [SettleBudget(step_id, 0.0)] if wf.step(step_id).cost_estimate > 0 else []
    step = wf.step(step_id)
    if state.decision == "approved":  # the budget re-check of an approved step (on_decision)
        if verdict.effect == "deny":
            state.policy_id = verdict.policy_id
            return _step_failed(run, wf, step.id, "PolicyDenied", "; ".join(verdict.reasons) or "denied", now_ms)
        return _dispatch(run, step, now_ms)
    state.decision, state.policy_id = verdict.effect, verdict.policy_id
    if verdict.masked:
        state.inputs = verdict.inputs  # only masked inputs are dispatched, shown for approval, stored
    if verdict.effect == "deny":
        return _step_failed(run, wf, step.id, "PolicyDenied", "; ".join(verdict.reasons) or "denied", now_ms)
    if verdict.effect == "require_approval" or state.gated:
        role = verdict.role or (step.approval.role if step.approval else "approver")
        reason = "; ".join(verdict.reasons) or (step.approval.reason if step.approval else "")
        return _ask_approval(run, step, role, reason, now_ms)
    return _dispatch(run, step, now_ms)


def apply_verdicts(run: RunState, wf: WorkflowDef, cmds: list[Command], verdicts: Mapping[str, Verdict],
                   now_ms: int) -> list[Command]:
    """Replace each ``CheckPolicy`` in ``cmds`` by what its verdict leads to (which may ask again)."""
    out: list[Command] = []
    for cmd in cmds:
        out += on_verdict(run, wf, cmd.step_id, verdicts[cmd.step_id], now_ms) if isinstance(cmd, CheckPolicy) \
            else [cmd]
    return out


def _ask_approval(run: RunState, step: StepDef, role: str, reason: str, now_ms: int) -> list[Command]:
    state = run.steps[step.id]
    state.status, state.approval_role = "waiting_approval", role
    if run.status == "running":
        run.status = "waiting_approval"
    cmds: list[Command] = []
    deadline = None
    if step.approval and step.approval.timeout_ms:
        deadline = now_ms + step.approval.timeout_ms
        state.timer_id = f"{run.run_id}:{step.id}:approval:{int(state.escalated)}"
        cmds.append(StartTimer(state.timer_id, deadline, "approval_deadline", step.id))
    cmds += [AskApproval(step.id, step.tool, role, reason, state.inputs, deadline),
             Emit("ApprovalRequested", step.id, "waiting_approval", {"role": role, "reason": reason})]
    return cmds


def _dispatch(run: RunState, step: StepDef, now_ms: int) -> list[Command]:
    state = run.steps[step.id]
    state.attempt += 1
    state.status = "dispatched"
    cmds: list[Command] = []
    deadline = None
    if step.schedule_to_close_ms:
        deadline = int(state.started_at or now_ms) + step.schedule_to_close_ms
        if state.schedule_timer is None:
            state.schedule_timer = f"{run.run_id}:{step.id}:schedule_to_close"
            cmds.append(StartTimer(state.schedule_timer, deadline, "schedule_to_close", step.id))
    state.started_at = state.started_at or now_ms
    return cmds + [Dispatch(step.id, step.tool, state.attempt, state.idempotency_key, state.inputs, step.timeout_ms,
                            step.latency_class, step.cost_estimate, deadline_ms=deadline),
                   Emit("StepDispatched", step.id, "dispatched", {"tool": step.tool, "attempt": state.attempt})]


def on_result(run: RunState, wf: WorkflowDef, res: StepOutcome, now_ms: int) -> list[Command]:
    """A step (or compensation) attempt finished."""
    if res.compensation:
        return _on_compensation_result(run, wf, res, now_ms)
    state = run.steps.get(res.step_id)
    if state is None:
        return []
    if state.status not in ("dispatched", "retrying"):
        if res.ok and state.status in ("failed", "cancelled") and not state.late and state.output is None:
            return _late_success(run, wf, res, now_ms)
        return []  # stale or duplicate: the step already settled
    if not res.ok and (res.attempt != state.attempt or state.status != "dispatched"):
        # An older attempt's failure, or a failure for an attempt we already gave up on: the retry
        # decides. A late success still counts: the effect happened.
        return []
    cmds: list[Command] = [CancelTimer(state.timer_id)] if state.timer_id else []
    state.timer_id = None
    cost = _cost(wf, res)
    state.cost += cost
    run.cost += cost
    if res.ok:
        cmds += _clear_schedule_timer(state)
        state.status, state.output, state.finished_at = "succeeded", res.output, now_ms
        run.finish_order.append(state.id)
        cmds.append(Emit("StepCompleted", state.id, "succeeded", {"attempt": res.attempt, "cost": cost},
                         duration_ms=res.duration_ms))
        cmds += _settle(wf, state)
        if run.status == "running" or run.status == "waiting_approval":
            _refresh_waiting(run)
        return cmds + advance(run, wf, now_ms)
    return cmds + _retry_or_fail(run, wf, state.id, res.error_type or "Error", res.error_message or "",
                                 res.retryable, now_ms)


def _clear_schedule_timer(state: StepState) -> list[Command]:
    if state.schedule_timer is None:
        return []
    timer, state.schedule_timer = state.schedule_timer, None
    return [CancelTimer(timer)]


def _late_success(run: RunState, wf: WorkflowDef, res: StepOutcome, now_ms: int) -> list[Command]:
    """A success for a step the run had given up on (its last attempt timed out, or the run was
    cancelled or failed while it ran). The effect happened: record it and undo it, never drop it."""
    state = run.steps[res.step_id]
    state.late, state.output = True, res.output
    cost = _cost(wf, res)
    state.cost += cost
    run.cost += cost
    cmds: list[Command] = [Emit("StepCompleted", state.id, state.status,
                                {"attempt": res.attempt, "cost": cost, "late": True}, duration_ms=res.duration_ms)]
    cmds += _settle(wf, state)
    if wf.step(state.id).compensate is None:
        reason = f"{state.tool} succeeded after run {run.run_id} gave up on step {state.id}; it has no compensation"
        return cmds + [Audited("step.late_success", state.id, "system:planner", reason, "manual"),
                       AskApproval(state.id, state.tool, "operations", f"manual review needed: {reason}",
                                   state.output, None)]
    if run.status == "failing":
        # Compensation has not been planned yet: it will include this step, newest first.
        run.finish_order.append(state.id)
        state.status = "succeeded"
        return cmds + _advance_compensation(run, wf, now_ms)
    if run.status == "compensating" and state.id not in run.compensation_queue:
        run.compensation_queue.insert(0, state.id)  # the newest effect is undone first
        state.status = "succeeded"
        return cmds + _advance_compensation(run, wf, now_ms)
    # The run already ended (or is still running after a step it does not depend on gave up): undo it alone.
    state.status = "succeeded" if not run.terminal else state.status
    return cmds + _dispatch_compensation(run, wf, state.id, now_ms)


def _retry_or_fail(run: RunState, wf: WorkflowDef, step_id: str, error_type: str, message: str,
                   retryable: bool, now_ms: int) -> list[Command]:
    step, state = wf.step(step_id), run.steps[step_id]
    state.error, state.error_type = message, error_type
    if (retryable and error_type not in step.retry.non_retryable and state.attempt < step.retry.max_attempts
            and run.status in ("running", "waiting_approval")):
        rand = random.Random(f"{run.run_id}:{step_id}:{state.attempt}").random()
        delay = step.retry.delay_ms(state.attempt, rand)
        state.status = "retrying"
        state.timer_id = f"{run.run_id}:{step_id}:retry:{state.attempt}"
        return [StartTimer(state.timer_id, now_ms + delay, "retry", step_id),
                Emit("StepRetrying", step_id, "retrying",
                     {"attempt": state.attempt, "error_type": error_type, "error": message, "delay_ms": delay})]
    return _step_failed(run, wf, step_id, error_type, message, now_ms)


def _step_failed(run: RunState, wf: WorkflowDef, step_id: str, error_type: str, message: str,
                 now_ms: int) -> list[Command]:
    state = run.steps[step_id]
    state.status, state.error, state.error_type, state.finished_at = "failed", message, error_type, now_ms
    cmds: list[Command] = [Emit("StepFailed", step_id, "failed", {"error_type": error_type, "error": message,
                                                                  "attempt": state.attempt}),
                           *_clear_schedule_timer(state), *_settle(wf, state)]
    return cmds + _fail(run, wf, f"step {step_id} failed: {error_type}: {message}", now_ms)


def _fail(run: RunState, wf: WorkflowDef, reason: str, now_ms: int,
          ending: str = "failed") -> list[Command]:
    """Stop dispatching; compensate what completed once in-flight steps settle."""
    if run.terminal:
        return []
    if run.status in ("failing", "compensating"):
        return _advance_compensation(run, wf, now_ms)  # another step settled while failing
    run.error, run.ending, run.status = reason, ending, "failing"
    cmds: list[Command] = []
    maybe_held = {s.id for s in run.steps.values() if s.status != "pending" or _maybe_asked(run, wf, s.id)}
    for state in run.steps.values():
        if state.status in ("pending", "checking", "retrying", "waiting_approval"):
            if state.timer_id:
                cmds.append(CancelTimer(state.timer_id))
                state.timer_id = None
            cmds += _clear_schedule_timer(state)
            state.status = "cancelled"
            if state.id in maybe_held:
                cmds += _settle(wf, state)
    return cmds + _advance_compensation(run, wf, now_ms)


def _advance_compensation(run: RunState, wf: WorkflowDef, now_ms: int) -> list[Command]:
    if any(s.status == "dispatched" for s in run.steps.values()):
        return []  # wait: an in-flight step may still succeed and then need compensating
    if run.status == "failing":
        run.compensation_queue = [sid for sid in reversed(run.finish_order)
                                  if run.steps[sid].status == "succeeded" and wf.step(sid).compensate]
        run.status = "compensating"
        if run.compensation_queue:
            return [Emit("CompensationStarted", detail={"steps": list(run.compensation_queue)})] + \
                _advance_compensation(run, wf, now_ms)
    if any(run.steps[sid].compensation in ("dispatched", "retrying") for sid in run.compensation_queue):
        return []  # one compensation at a time, in reverse order of completion
    for sid in run.compensation_queue:
        state = run.steps[sid]
        if state.compensation in ("", "pending"):
            return _dispatch_compensation(run, wf, sid, now_ms)
    return _end(run, run.ending or "failed", run.error, now_ms)


def _dispatch_compensation(run: RunState, wf: WorkflowDef, step_id: str, now_ms: int) -> list[Command]:
    call = wf.step(step_id).compensate
    assert call is not None
    state = run.steps[step_id]
    state.comp_attempt += 1
    state.compensation = "dispatched"
    try:
        inputs = expressions.render(call.inputs, context(run))
    except expressions.ExpressionError as exc:
        return _compensation_failed(run, step_id, f"ExpressionError: {exc}", now_ms)
    return [Dispatch(step_id, call.tool, state.comp_attempt, f"{run.run_id}:{step_id}:compensate", inputs,
                     call.timeout_ms, "interactive", 0.0, compensation=True),
            Emit("CompensationDispatched", step_id, "compensating", {"tool": call.tool,
                                                                     "attempt": state.comp_attempt})]


def _on_compensation_result(run: RunState, wf: WorkflowDef, res: StepOutcome, now_ms: int) -> list[Command]:
    state = run.steps.get(res.step_id)
    if state is None or state.compensation != "dispatched" or (not res.ok and res.attempt != state.comp_attempt):
        return []
    cmds: list[Command] = [CancelTimer(state.timer_id)] if state.timer_id else []
    state.timer_id = None
    if res.ok:
        state.compensation = "compensated"
        cmds.append(Emit("StepCompensated", state.id, "compensated", {"attempt": res.attempt}))
        if run.terminal:
            return cmds  # a late success undone after the run ended
        return cmds + _advance_compensation(run, wf, now_ms)
    return cmds + _retry_compensation(run, wf, state.id, f"{res.error_type}: {res.error_message}",
                                      res.retryable, now_ms)


def _retry_compensation(run: RunState, wf: WorkflowDef, step_id: str, error: str, retryable: bool,
                        now_ms: int) -> list[Command]:
    call = wf.step(step_id).compensate
    assert call is not None
    state = run.steps[step_id]
    if retryable and state.comp_attempt < call.retry.max_attempts:
        rand = random.Random(f"{run.run_id}:{step_id}:comp:{state.comp_attempt}").random()
        delay = call.retry.delay_ms(state.comp_attempt, rand)
        state.compensation = "retrying"
        state.timer_id = f"{run.run_id}:{step_id}:comp_retry:{state.comp_attempt}"
        return [StartTimer(state.timer_id, now_ms + delay, "comp_retry", step_id),
                Emit("CompensationRetrying", step_id, "retrying", {"error": error, "delay_ms": delay})]
    return _compensation_failed(run, step_id, error, now_ms)


def _compensation_failed(run: RunState, step_id: str, error: str, now_ms: int) -> list[Command]:
    """A compensation that keeps failing needs a person: dead letter + manual task."""
    state = run.steps[step_id]
    state.compensation = "failed"
    if not run.terminal:
        run.error = f"compensation of {step_id} failed: {error}"
    cmds: list[Command] = [
        Emit("CompensationFailed", step_id, "compensation_failed", {"error": error}),
        ParkDeadLetter(step_id, f"compensation of {step_id} failed: {error}"),
        AskApproval(step_id, state.tool, "operations",
                    f"manual action needed: undo {state.tool} for run {run.run_id} ({error})", state.output, None)]
    if run.terminal:
        return cmds  # a late success's compensation failed after the run ended: the person above acts
    return cmds + _end(run, "compensation_failed", run.error, now_ms)


def _end(run: RunState, status: str, error: str | None, now_ms: int) -> list[Command]:
    run.status, run.error, run.finished_at, run.updated_at = status, error, now_ms, now_ms
    cmds: list[Command] = []
    if run.deadline_timer:
        cmds.append(CancelTimer(run.deadline_timer))
        run.deadline_timer = None
    kind = {"completed": "RunCompleted", "cancelled": "RunCancelled"}.get(status, "RunFailed")
    cmds += [Emit(kind, status=status, detail={"error": error, "cost": run.cost},
                  duration_ms=float(now_ms - run.created_at)),
             RunEnded(status, error)]
    return cmds


def _refresh_waiting(run: RunState) -> None:
    if run.status in ("running", "waiting_approval"):
        waiting = any(s.status == "waiting_approval" for s in run.steps.values())
        run.status = "waiting_approval" if waiting else "running"


def on_decision(run: RunState, wf: WorkflowDef, step_id: str, approved: bool, actor: str, reason: str,
                now_ms: int) -> list[Command]:
    """A person approved or rejected a waiting step."""
    state = run.steps.get(step_id)
    if state is None:
        raise TransitionError(f"run {run.run_id} has no step {step_id!r}; steps: {sorted(run.steps)}")
    if state.status != "waiting_approval":
        raise TransitionError(f"step {step_id} is {state.status}, not waiting for approval")
    cmds: list[Command] = [CancelTimer(state.timer_id)] if state.timer_id else []
    state.timer_id = None
    state.decided_by = actor
    if approved:
        # Its hold may have expired while the gate was open (a person approves the next morning): the
        # budget is checked again, and the hold reserved again, before it runs (on_verdict).
        state.decision, state.status = "approved", "checking"
        cmds.append(Emit("ApprovalGranted", step_id, "approved", {"actor": actor, "reason": reason}))
        step = wf.step(step_id)
        cmds.append(CheckPolicy(step_id, step.tool, state.inputs, state.amount, step.cost_estimate, recheck=True))
        _refresh_waiting(run)
        return cmds
    state.decision = "rejected"
    cmds.append(Emit("ApprovalRejected", step_id, "rejected", {"actor": actor, "reason": reason}))
    return cmds + _step_failed(run, wf, step_id, "ApprovalRejected", f"rejected by {actor}: {reason}", now_ms)


def on_cancel(run: RunState, wf: WorkflowDef, actor: str, reason: str, now_ms: int) -> list[Command]:
    if run.terminal or run.status in ("failing", "compensating"):
        return []
    return [Emit("CancelRequested", detail={"actor": actor, "reason": reason})] + \
        _fail(run, wf, f"cancelled by {actor}: {reason}", now_ms, ending="cancelled")


def on_timer(run: RunState, wf: WorkflowDef, timer_id: str, kind: str, step_id: str | None, now_ms: int) -> list[Command]:
    """A durable timer fired. Timers fire at least once; the id check makes them count once."""
    if kind == "schedule_to_close":
        state = run.steps.get(step_id or "")
        if state is None or state.schedule_timer != timer_id or state.status not in ("dispatched", "retrying"):
            return []
        state.schedule_timer = None
        if state.timer_id:  # a pending retry timer
            cmds: list[Command] = [CancelTimer(state.timer_id)]
            state.timer_id = None
        else:
            cmds = []
        return cmds + _step_failed(run, wf, state.id, "ScheduleToCloseTimeout",
                                   f"step did not settle within {wf.step(state.id).schedule_to_close_ms} ms of its "
                                   "first dispatch (schedule_to_close_ms)", now_ms)
    if kind == "run_deadline":
        if run.deadline_timer != timer_id or run.terminal:
            return []
        run.deadline_timer = None
        return _fail(run, wf, f"run deadline of {wf.deadline_ms} ms exceeded", now_ms)
    state = run.steps.get(step_id or "")
    if state is None or state.timer_id != timer_id:
        return []  # already handled, or superseded by a newer timer
    state.timer_id = None
    step = wf.step(state.id)
    if kind == "retry" and state.status == "retrying":
        return _dispatch(run, step, now_ms)
    if kind == "step_timeout" and state.status == "dispatched":
        return _retry_or_fail(run, wf, state.id, "StepTimeout", f"no result within {step.timeout_ms} ms",
                              True, now_ms)
    if kind == "approval_deadline" and state.status == "waiting_approval":
        return _approval_timed_out(run, wf, step, now_ms)
    if kind == "comp_retry" and state.compensation == "retrying":
        return _dispatch_compensation(run, wf, state.id, now_ms)
    if kind == "comp_timeout" and state.compensation == "dispatched":
        return _retry_compensation(run, wf, state.id, "CompensationTimeout", True, now_ms)
    return []


def _approval_timed_out(run: RunState, wf: WorkflowDef, step: StepDef, now_ms: int) -> list[Command]:
    state = run.steps[step.id]
    approval = step.approval
    if approval and approval.on_timeout == "escalate" and approval.escalate_to and not state.escalated:
        state.escalated = True
        return [Emit("ApprovalEscalated", step.id, "waiting_approval", {"from": state.approval_role,
                                                                        "to": approval.escalate_to})] + \
            _ask_approval(run, step, approval.escalate_to, f"escalated: no decision by {state.approval_role}",
                          now_ms)
    state.decided_by = "system:timeout"
    return [Emit("ApprovalTimedOut", step.id, "rejected", {})] + \
        _step_failed(run, wf, step.id, "ApprovalTimeout", "no decision before the approval deadline", now_ms)


__all__ = ["TransitionError", "advance", "context", "on_cancel", "on_decision", "on_result", "on_timer", "start",
           "STEP_ACTIVE"]
