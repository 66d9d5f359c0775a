"""The `aios` CLI without a mesh: workflow validation, usage errors, rendering."""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from aiosmesh.v1 import audit_pb2, audit_pb2_grpc, workflow_pb2, workflow_pb2_grpc
from tools.aios import render
from tools.aios.cli import main

GOOD = """\
name: refund-small
version: 3
steps:
  - id: check
    tool: orders.get
    inputs: {order_id: "${input.order_id}"}
  - id: refund
    tool: payments.refund
    depends_on: [check]
    when: "steps.check.output.amount < 50"
    inputs: {amount: "${steps.check.output.amount}"}
"""

UNKNOWN_DEP_AND_BAD_EXPR = """\
name: broken
version: 1
steps:
  - id: check
    tool: orders.get
    inputs: {order_id: "${input.order_id == }"}
  - id: refund
    tool: payments.refund
    depends_on: [nope]
"""

MISSING_TOOL = """\
name: no-tool
version: 1
steps:
  - id: check
    tool: orders.get
  - id: refund
"""

CYCLE = """\
name: loop
version: 1
steps:
  - id: a
    tool: x.y
    depends_on: [b]
  - id: b
    tool: x.y
    depends_on: [a]
"""


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.timeout(30)
def test_validate_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "good.yaml", GOOD)
    assert main(["workflows", "validate", path]) == 0
    assert "ok: refund-small@v3, 2 steps" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_validate_reports_every_error_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _write(tmp_path, "broken.yaml", UNKNOWN_DEP_AND_BAD_EXPR)
    no_tool = _write(tmp_path, "no-tool.yaml", MISSING_TOOL)
    loop = _write(tmp_path, "loop.yaml", CYCLE)
    good = _write(tmp_path, "good.yaml", GOOD)
    assert main(["workflows", "validate", broken, no_tool, loop, good]) == 1
    lines = capsys.readouterr().out.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert any(f"{broken}: steps[1].depends_on[0]: unknown step 'nope'" in e for e in errors), errors
    assert any(f"{broken}: steps[0].inputs" in e for e in errors), errors
    assert any(f"{no_tool}: steps[1]" in e and "'tool' is a required property" in e for e in errors), errors
    assert any(f"{loop}: steps: dependency cycle" in e for e in errors), errors
    assert "ok: refund-small@v3, 2 steps" in lines


@pytest.mark.timeout(30)
def test_validate_yaml_errors_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_yaml = _write(tmp_path, "bad.yaml", "name: x\nsteps: [\n  - id: a\n")
    missing = str(tmp_path / "absent.yaml")
    assert main(["workflows", "validate", bad_yaml, missing]) == 1
    out = capsys.readouterr().out
    assert f"error: {bad_yaml}: line " in out and "not valid YAML" in out
    assert f"error: {missing}: cannot read" in out


@pytest.mark.timeout(30)
def test_validate_a_file_that_is_not_utf8_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by tests/fuzz/test_fuzz_workflows.py: b"\\x80" crashed validate with a UnicodeDecodeError."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: x\n\x80\xff")
    assert main(["workflows", "validate", str(binary)]) == 1
    assert f"error: {binary}: not UTF-8 text (byte 0x80 at offset 8)" in capsys.readouterr().out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [
    [],
    ["nonsense"],
    ["workflows"],
    ["workflows", "validate"],
    ["approve", "run-1", "step"],               # --by and --reason are required
    ["workflows", "list", "--limit", "0"],
    ["workflows", "list", "--since", "last tuesday"],
    ["dlq", "show", "not-a-number"],
    ["dlq", "replay"],                          # neither --offset nor --all
    ["dlq", "replay", "--all", "--offset", "3"],
    ["start", "wf", "--input", "{not json"],
    ["start", "wf", "--input", "[1, 2]"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.strip()


@pytest.mark.timeout(30)
def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "workflows" in capsys.readouterr().out


def _run() -> workflow_pb2.Run:
    start = 1_700_000_000_000.0
    return workflow_pb2.Run(
        run_id="run-abc", tenant="demo", workflow="support-card-block", workflow_version=2, status="failed",
        created_at_ms=start, updated_at_ms=start + 4000, finished_at_ms=start + 4200, cost=0.0123,
        input_json='{"card_id": "c-1"}', output_json="", error="notify failed: TimeoutError",
        steps=[workflow_pb2.StepView(step_id="block_card", tool="bank.block_card", status="compensated",
                                     attempt=1, started_at_ms=start + 100, finished_at_ms=start + 900,
                                     duration_ms=800, decision="require_approval", decided_by="alice",
                                     policy_id="card-block-needs-human", trace_id="4bf92f3577b34da6a3ce929d0e0e4736"),
               workflow_pb2.StepView(step_id="notify", tool="messages.send", status="failed", attempt=3,
                                     duration_ms=2500, cost=0.0123, error="TimeoutError: sandbox slow")])


@pytest.mark.timeout(30)
def test_run_timeline_has_header_steps_and_audit() -> None:
    run = _run()
    entries = [audit_pb2.AuditEntry(occurred_at_ms=run.created_at_ms + 1500, service="policy",
                                    action="policy.evaluated", step_id="block_card", decision="require_approval",
                                    actor="workflow:support-card-block", reason="card blocks need a human",
                                    policy_id="card-block-needs-human")]
    text = render.run_timeline(run, entries, now=run.created_at_ms + 60_000)
    assert "support-card-block@v2" in text and "failed" in text and "4.2s" in text
    assert "notify failed: TimeoutError" in text
    for step_id, status in (("block_card", "compensated"), ("notify", "failed")):
        line = next(line for line in text.splitlines() if line.startswith(step_id))
        assert status in line
    assert "require_approval [card-block-needs-human] by alice" in text
    audit_line = next(line for line in text.splitlines() if "policy.evaluated" in line)
    assert "+1.500s" in audit_line and "card-block-needs-human" in audit_line


@pytest.mark.timeout(30)
def test_run_timeline_without_observability_still_shows_the_run() -> None:
    text = render.run_timeline(_run(), None, "observability is down: UNAVAILABLE")
    assert "block_card" in text and "notify" in text
    assert "(unavailable: observability is down: UNAVAILABLE)" in text


@pytest.mark.timeout(30)
def test_runs_and_approvals_tables() -> None:
    run = _run()
    waiting = workflow_pb2.Run(run_id="run-w", workflow="wf", workflow_version=1, status="waiting_approval",
                               created_at_ms=1000, updated_at_ms=2000,
                               steps=[workflow_pb2.StepView(step_id="gate", tool="bank.block_card",
                                                            status="waiting_approval"),
                                      workflow_pb2.StepView(step_id="after", tool="x.y", status="pending")])
    table = render.runs_table([run, waiting], now=run.created_at_ms + 5000)
    assert table.splitlines()[0].split() == ["RUN", "WORKFLOW", "STATUS", "AGE", "DURATION", "COST"]
    assert "run-abc" in table and "support-card-block@v2" in table and "0.0123" in table
    approvals = render.approvals_table([waiting])
    assert "gate" in approvals and "after" not in approvals
    assert render.approvals_table([]) == "no steps are waiting for approval"


@pytest.mark.timeout(30)
def test_small_formatters() -> None:
    assert render.duration(0) == "-"
    assert render.duration(850) == "850ms"
    assert render.duration(3_200) == "3.2s"
    assert render.duration(125_000) == "2m05s"
    assert render.age(1_000, now=61_000 + 1_000) == "1m ago"
    assert render.truncate("a" * 100, 10) == "a" * 9 + "…"
    assert render.preview_bytes(b"hello").startswith("utf-8: hello")
    assert render.preview_bytes(b"\xff\x00").startswith("hex: ff 00")


class _FakePlanner(workflow_pb2_grpc.WorkflowServiceServicer):
    """Answers like the planner, from memory."""

    def __init__(self) -> None:
        self.started: list[workflow_pb2.StartWorkflowRequest] = []
        self.decisions: list[workflow_pb2.DecisionRequest] = []
        self.runs = [_run()]
        self.listed: list[workflow_pb2.ListRunsRequest] = []

    def StartWorkflow(self, request, context):  # noqa: N802
        self.started.append(request)
        return workflow_pb2.StartWorkflowResponse(run_id="run-abc", created=True)

    def GetRun(self, request, context):  # noqa: N802
        if request.run_id != "run-abc":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r} for tenant {request.tenant!r}")
        return _run()

    def ListRuns(self, request, context):  # noqa: N802
        """Pages over ``self.runs`` like the planner: filters, limit, an opaque token, the total."""
        self.listed.append(request)
        runs = [r for r in self.runs if not request.status or r.status == request.status]
        at = int(request.page_token or 0)
        page = runs[at:at + (request.limit or 50)]
        more = at + len(page) < len(runs)
        return workflow_pb2.ListRunsResponse(runs=page, total=len(runs),
                                             next_page_token=str(at + len(page)) if more else "")

    def Approve(self, request, context):  # noqa: N802
        self.decisions.append(request)
        return workflow_pb2.CommandAccepted(run_id=request.run_id, command_id="cmd-1")


@pytest.fixture
def planner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_FakePlanner]:
    fake = _FakePlanner()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    monkeypatch.setenv("AIOS_RUN_DIR", str(tmp_path))  # never pick up a running demo stack
    monkeypatch.setenv("AIOS_PLANNER_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("AIOS_OBSERVABILITY_ADDR", f"127.0.0.1:{closed.getsockname()[1]}")
    try:
        yield fake
    finally:
        server.stop(0)
        closed.close()


@pytest.mark.timeout(60)
def test_show_without_observability_shows_the_run_with_a_note(planner: _FakePlanner,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tenant", "acme", "workflows", "show", "run-abc"]) == 0
    out = capsys.readouterr().out
    assert "block_card" in out and "notify" in out and "support-card-block@v2" in out
    assert "(unavailable: observability is down: UNAVAILABLE: cannot reach the observability at" in out


@pytest.mark.timeout(60)
def test_grpc_errors_print_status_and_exit_1(planner: _FakePlanner, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workflows", "show", "run-missing"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: no run 'run-missing' for tenant 'demo'")
    assert main(["reject", "run-abc", "notify", "--by", "bob", "--reason", "no"]) == 1
    assert capsys.readouterr().err.startswith("error: UNIMPLEMENTED: ")


@pytest.mark.timeout(60)
def test_start_wait_approve_and_list(planner: _FakePlanner, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "support-card-block", "--input", '{"card_id": "c-1"}', "--request-id", "r-1",
                 "--wait", "--timeout", "10"]) == 1  # the fake run ends failed
    out = capsys.readouterr().out
    assert out.startswith("run-abc (created)") and "status    failed" in out
    assert planner.started[0].request_id == "r-1" and json.loads(planner.started[0].input_json) == {"card_id": "c-1"}
    assert main(["approve", "run-abc", "block_card", "--by", "alice", "--reason", "verified by phone"]) == 0
    assert "approved step block_card of run run-abc" in capsys.readouterr().out
    assert (planner.decisions[0].actor, planner.decisions[0].reason) == ("alice", "verified by phone")
    assert main(["workflows", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["run_id"] == "run-abc"


@pytest.mark.timeout(60)
def test_grpc_health_check_up_and_down() -> None:
    from grpc_health.v1 import health, health_pb2_grpc

    from tools.aios.clients import grpc_health

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        up = grpc_health("planner", f"127.0.0.1:{port}")
        down = grpc_health("memory", f"127.0.0.1:{closed.getsockname()[1]}", timeout=1)
    finally:
        server.stop(0)
        closed.close()
    assert (up.up, up.detail) == (True, "SERVING")
    assert not down.up and down.detail.startswith("UNAVAILABLE")
    assert "DOWN" in render.status_table([up, down]) and "UP" in render.status_table([up, down])


@pytest.mark.timeout(30)
def test_the_timeline_shows_each_steps_times_outcome_policy_cost_and_trace() -> None:
    run = _run()
    run.actor, run.trace_id = "user:otto", "0af7651916cd43dd8448eb211c80319c"
    text = render.run_timeline(run, [], now=run.created_at_ms + 60_000)
    assert "actor     user:otto" in text and "trace     0af7651916cd43dd8448eb211c80319c" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("STEP"))
    assert header.split() == ["STEP", "TOOL", "START", "END", "OUTCOME", "ATTEMPTS", "DECISION", "DURATION", "COST",
                              "TRACE", "ERROR"]
    block = next(line for line in lines if line.startswith("block_card"))
    for cell in ("+0.100s", "+0.900s", "compensated", "require_approval [card-block-needs-human] by alice", "800ms",
                 "4bf92f3577b34da6a3ce929d0e0e4736"):
        assert cell in block, cell
    notify = next(line for line in lines if line.startswith("notify"))
    assert "failed" in notify and "0.0123" in notify and "TimeoutError: sandbox slow" in notify
    assert lines.index(block) < lines.index(notify)  # started first; a step not started yet comes last


def _many(n: int) -> list[workflow_pb2.Run]:
    return [workflow_pb2.Run(run_id=f"run-{i:03d}", workflow="wf", workflow_version=1,
                             status="failed" if i % 2 else "completed", created_at_ms=1_700_000_000_000 - i)
            for i in range(n)]


@pytest.mark.timeout(60)
def test_list_pages_with_limit_and_token_and_walks_everything_with_all(
        planner: _FakePlanner, capsys: pytest.CaptureFixture[str]) -> None:
    planner.runs = _many(240)  # 120 failed
    assert main(["workflows", "list", "--status", "failed", "--limit", "50"]) == 0
    out = capsys.readouterr().out
    assert sum(1 for line in out.splitlines() if line.startswith("run-")) == 50
    assert out.rstrip().endswith("50 of 120 matching runs; next page: aios workflows list --status failed "
                                 "--limit 50 --page-token 50")
    assert main(["workflows", "list", "--status", "failed", "--limit", "50", "--page-token", "100"]) == 0
    out = capsys.readouterr().out
    assert sum(1 for line in out.splitlines() if line.startswith("run-")) == 20
    assert out.rstrip().endswith("20 of 120 matching runs from this token") and "next page" not in out
    planner.listed.clear()
    assert main(["workflows", "list", "--status", "failed", "--all", "--json"]) == 0
    ids = [r["run_id"] for r in json.loads(capsys.readouterr().out)]
    assert ids == [f"run-{i:03d}" for i in range(1, 240, 2)]  # all 120, in order, once each
    assert [r.limit for r in planner.listed] == [1000]
    planner.runs = _many(2500)
    planner.listed.clear()
    assert main(["workflows", "list", "--all", "--json"]) == 0
    assert len({r["run_id"] for r in json.loads(capsys.readouterr().out)}) == 2500
    assert [r.page_token for r in planner.listed] == ["", "1000", "2000"]


@pytest.mark.timeout(30)
def test_list_times_are_ages_or_iso_and_the_next_page_hint_repeats_them_exactly() -> None:
    import datetime as dt

    from tools.aios.runs import iso, parse_when

    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    assert parse_when("7d", now) == round((now - dt.timedelta(days=7)).timestamp() * 1000)
    assert parse_when("90m", now) == round((now - dt.timedelta(minutes=90)).timestamp() * 1000)
    assert parse_when("2026-11-23", now) == round(dt.datetime(2026, 11, 23, tzinfo=dt.UTC).timestamp() * 1000)
    assert parse_when("2026-11-23T08:00:00+01:00") == round(dt.datetime(2026, 11, 23, 7, tzinfo=dt.UTC)
                                                            .timestamp() * 1000)
    ms = parse_when("36h", now) + 123
    assert parse_when(iso(ms)) == ms  # what the hint prints reads back to the same filter


class _FakeAudit(audit_pb2_grpc.AuditServiceServicer):
    """Pages a run's trail newest first, like the observability service's Query."""

    def __init__(self, n: int) -> None:
        self.entries = [audit_pb2.AuditEntry(event_id=f"e{i}", tenant="demo", run_id="run-abc", service="planner",
                                             action=f"workflow.Step{i}", occurred_at_ms=1_000 + i) for i in range(n)]
        self.queries: list[audit_pb2.AuditQuery] = []

    def Query(self, request, context):  # noqa: N802
        self.queries.append(request)
        found = sorted((e for e in self.entries if e.run_id == request.run_id), key=lambda e: -e.occurred_at_ms)
        at = int(request.page_token or 0)
        page = found[at:at + (request.limit or 100)]
        more = at + len(page) < len(found)
        return audit_pb2.AuditQueryResponse(entries=page, total=len(found),
                                            next_page_token=str(at + len(page)) if more else "")


@pytest.fixture
def audit(planner: _FakePlanner, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeAudit]:
    fake = _FakeAudit(2_500)  # more than one page of the API's largest (1000)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    audit_pb2_grpc.add_AuditServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("AIOS_OBSERVABILITY_ADDR", f"127.0.0.1:{port}")
    try:
        yield fake
    finally:
        server.stop(0)


@pytest.mark.timeout(60)
def test_audit_shows_a_runs_whole_trail_oldest_first_or_a_page_of_the_newest(
        audit: _FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    """Every entry of a long trail, through the pages (was: one Timeline call, cut at 10,000); or with
    --limit the newest entries and how to reach the older ones."""
    assert main(["audit", "run-abc", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [e["event_id"] for e in got] == [f"e{i}" for i in range(2_500)]
    assert [q.limit for q in audit.queries] == [1000, 1000, 1000]
    assert main(["audit", "run-abc", "--limit", "3"]) == 0
    printed = capsys.readouterr()
    rows = [line for line in printed.out.splitlines() if "workflow.Step" in line]
    assert [r.split()[2] for r in rows] == ["workflow.Step2497", "workflow.Step2498", "workflow.Step2499"]
    assert "3 of 2500 entries, the newest; older: aios audit run-abc --limit 3 --page-token 3" in printed.err
    assert main(["audit", "run-abc", "--limit", "3", "--page-token", "3", "--json"]) == 0
    assert [e["event_id"] for e in json.loads(capsys.readouterr().out)] == ["e2494", "e2495", "e2496"]
    assert main(["audit", "run-nope"]) == 1
    assert "no audit entries for run 'run-nope' of tenant 'demo'" in capsys.readouterr().err
