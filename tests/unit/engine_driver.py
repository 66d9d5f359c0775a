"""Drives the pure engine the way the planner's handler does: every
``CheckPolicy`` a transition returns is answered by a policy function and fed
back with ``apply_verdicts``, so engine tests read as one call per event."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from services.planner.domain import engine as real
from services.planner.domain.state import CheckPolicy, Command, RunState, Verdict
from services.planner.domain.workflow import WorkflowDef

Policy = Callable[[RunState, Any, Any, Any], Verdict]
ALLOW = Verdict("allow", ("ok",), "test@v1:allow")


def allow(*_: Any) -> Verdict:
    """The policy that lets every step run."""
    return ALLOW


def resolve(run: RunState, wf: WorkflowDef, cmds: list[Command], now: int, policy: Policy) -> list[Command]:
    while checks := [c for c in cmds if isinstance(c, CheckPolicy)]:
        verdicts = {c.step_id: policy(run, wf.step(c.step_id), c.inputs, c.amount) for c in checks}
        cmds = real.apply_verdicts(run, wf, cmds, verdicts, now)
    return cmds


def _start(run_id: str, tenant: str, wf: WorkflowDef, run_input: dict[str, Any], now: int,
           policy: Policy) -> tuple[RunState, list[Command]]:
    run, cmds = real.start(run_id, tenant, wf, run_input, now)
    return run, resolve(run, wf, cmds, now, policy)


def _wrap(fn: Callable[..., list[Command]]) -> Callable[..., list[Command]]:
    def call(run: RunState, wf: WorkflowDef, *args: Any) -> list[Command]:
        *event, now, policy = args
        return resolve(run, wf, fn(run, wf, *event, now), now, policy)
    return call


engine = SimpleNamespace(
    start=_start, advance=_wrap(real.advance), on_result=_wrap(real.on_result), on_timer=_wrap(real.on_timer),
    on_decision=_wrap(real.on_decision), on_cancel=_wrap(real.on_cancel), TransitionError=real.TransitionError,
    context=real.context)
