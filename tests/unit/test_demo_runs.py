"""``make demo`` counts only the runs of the events it published: the embedded stack keeps Redis
(and the runs of earlier demos) across invocations. A second demo once reported the first one's
240 finished runs as its own at once (intent accuracy 0.0%) and stopped the stack under its own
runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiosmesh.v1 import workflow_pb2
from tools import demo


def _run(run_id: str, event_id: str, status: str, created_ms: float) -> workflow_pb2.Run:
    return workflow_pb2.Run(run_id=run_id, tenant="demo", workflow="support-reply", status=status,
                            input_json=json.dumps({"event": {"id": event_id}, "intent": "card_arrival"}),
                            created_at_ms=int(created_ms))


@dataclass
class Planner:
    """ListRuns over an earlier demo's finished runs and this demo's, which finish on the third look."""

    looks: int = 0
    requests: list[workflow_pb2.ListRunsRequest] = field(default_factory=list)

    def ListRuns(self, request: workflow_pb2.ListRunsRequest, timeout: float) -> workflow_pb2.ListRunsResponse:
        self.requests.append(request)
        self.looks += 1
        earlier = [_run(f"old-{i}", f"old-event-{i}", "completed", 1_000) for i in range(3)]
        ours = [_run(f"new-{i}", f"event-{i}", "completed" if self.looks >= 3 else "running", 5_000)
                for i in range(3)]
        runs = [r for r in ours + earlier if r.created_at_ms >= request.created_after_ms]
        return workflow_pb2.ListRunsResponse(runs=runs, total=len(runs))


def test_a_second_demo_waits_for_its_own_runs_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(demo.time, "sleep", lambda _s: None)
    planner = Planner()
    runs = demo.wait_runs(planner, "demo", {"event-0", "event-1", "event-2"}, timeout_s=30)  # type: ignore[arg-type]
    assert sorted(r.run_id for r in runs) == ["new-0", "new-1", "new-2"]
    assert all(r.status == "completed" for r in runs) and planner.looks == 3


def test_the_wait_asks_only_for_runs_created_since_the_publish(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(demo.time, "sleep", lambda _s: None)
    planner = Planner()
    demo.wait_runs(planner, "demo", {"event-0", "event-1", "event-2"}, timeout_s=30, since_ms=4_000)  # type: ignore[arg-type]
    assert {r.created_after_ms for r in planner.requests} == {4_000}
