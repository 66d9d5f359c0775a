"""The `aios` CLI without a mesh: workflow validation, usage errors, rendering."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from aiosmesh.v1 import audit_pb2, workflow_pb2
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
@pytest.mark.parametrize("argv", [
    [],
    ["nonsense"],
    ["workflows"],
    ["workflows", "validate"],
    ["approve", "run-1", "step"],               # --by and --reason are required
    ["workflows", "list", "--limit", "0"],
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
                                     duration_ms=800, decision="require_approval", decided_by="alice"),
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
    assert "require_approval by alice" in text
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
