"""Formatting: plain aligned text for people, JSON for machines. Every function
returns a string (the CLI prints it), so output is easy to test and to pipe."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict


def now_ms() -> float:
    return time.time() * 1000


# -- small formatters ------------------------------------------------------------------------------
def truncate(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def duration(ms: float) -> str:
    if ms <= 0:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def age(ts_ms: float, now: float | None = None) -> str:
    if not ts_ms:
        return "-"
    seconds = max(0.0, ((now if now is not None else now_ms()) - ts_ms) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def clock(ts_ms: float) -> str:
    if not ts_ms:
        return "-"
    return dt.datetime.fromtimestamp(ts_ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S%z")


def cost(value: float) -> str:
    return "0" if not value else f"{value:.4f}"


def offset(ts_ms: float, start_ms: float) -> str:
    if not ts_ms or not start_ms:
        return "-"
    return f"{(ts_ms - start_ms) / 1000:+.3f}s"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
                     for line in lines)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def message_dict(message: Any) -> dict[str, Any]:
    return dict(MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def _pretty_json(text: str) -> str:
    if not text:
        return "-"
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


# -- runs -------------------------------------------------------------------------------------------
def run_duration(run: Any, now: float | None = None) -> str:
    if run.finished_at_ms:
        return duration(run.finished_at_ms - run.created_at_ms)
    if not run.created_at_ms:
        return "-"
    return duration((now if now is not None else now_ms()) - run.created_at_ms) + "+"


def runs_table(runs: Sequence[Any], now: float | None = None) -> str:
    if not runs:
        return "no runs"
    return table(["RUN", "WORKFLOW", "STATUS", "AGE", "DURATION", "COST"],
                 [[r.run_id, f"{r.workflow}@v{r.workflow_version}", r.status, age(r.created_at_ms, now),
                   run_duration(r, now), cost(r.cost)] for r in runs])


def defs_table(workflows: Sequence[Any]) -> str:
    if not workflows:
        return "no workflows deployed"
    return table(["WORKFLOW", "VERSION", "STEPS", "TRIGGER", "DESCRIPTION"],
                 [[w.name, w.version, ", ".join(w.steps), truncate(w.trigger, 60), truncate(w.description, 60)]
                  for w in workflows])


def run_header(run: Any, now: float | None = None) -> str:
    rows = [("run", run.run_id), ("workflow", f"{run.workflow}@v{run.workflow_version}"),
            ("status", run.status), ("created", f"{clock(run.created_at_ms)} ({age(run.created_at_ms, now)})"),
            ("duration", run_duration(run, now)), ("cost", cost(run.cost)),
            ("actor", run.actor or "-"), ("trace", run.trace_id or "-"),
            ("input", truncate(_pretty_json(run.input_json), 200))]
    if run.error:
        rows.append(("error", run.error))
    rows.append(("output", truncate(_pretty_json(run.output_json), 400)))
    return "\n".join(f"{k:<9} {v}" for k, v in rows)


def _decision(step: Any) -> str:
    """The policy decision: its effect and the policy behind it, and who decided when a person did."""
    text = step.decision or "-"
    if step.policy_id:
        text += f" [{step.policy_id}]"
    return f"{text} by {step.decided_by}" if step.decided_by else text


def steps_table(steps: Sequence[Any], start_ms: float = 0.0) -> str:
    """The steps as a timeline: in the order they started (steps not started yet last), each with
    its start and end relative to the run's start, outcome, attempts, policy decision, cost and the
    trace its dispatch went out in."""
    if not steps:
        return "no steps yet"
    ordered = sorted(steps, key=lambda s: (not s.started_at_ms, s.started_at_ms))
    return table(["STEP", "TOOL", "START", "END", "OUTCOME", "ATTEMPTS", "DECISION", "DURATION", "COST", "TRACE",
                  "ERROR"],
                 [[s.step_id, s.tool, offset(s.started_at_ms, start_ms), offset(s.finished_at_ms, start_ms), s.status,
                   s.attempt, _decision(s), duration(s.duration_ms), cost(s.cost), s.trace_id or "-",
                   truncate(s.error, 80) or "-"] for s in ordered])


def audit_table(entries: Sequence[Any], start_ms: float) -> str:
    if not entries:
        return "no audit entries yet"
    return table(["AT", "SERVICE", "ACTION", "STEP", "DECISION", "ACTOR", "REASON", "POLICY"],
                 [[offset(e.occurred_at_ms, start_ms), e.service, e.action, e.step_id or "-", e.decision or "-",
                   e.actor or "-", truncate(e.reason, 60) or "-", e.policy_id or "-"] for e in entries])


def run_timeline(run: Any, entries: Sequence[Any] | None, note: str = "", now: float | None = None) -> str:
    """Header, steps, then the audit trail (or a note saying why it is missing)."""
    parts = [run_header(run, now), "", "steps (times from the run's start):", steps_table(run.steps, run.created_at_ms),
             "", "audit timeline:"]
    if entries is None:
        parts.append(f"(unavailable: {note})" if note else "(unavailable)")
    else:
        parts.append(audit_table(entries, run.created_at_ms))
    return "\n".join(parts)


def approvals_table(runs: Sequence[Any], now: float | None = None) -> str:
    rows = [[r.run_id, f"{r.workflow}@v{r.workflow_version}", s.step_id, s.tool, s.decision or "-",
             age(r.updated_at_ms, now)]
            for r in runs for s in r.steps if s.status == "waiting_approval"]
    if not rows:
        return "no steps are waiting for approval"
    return table(["RUN", "WORKFLOW", "STEP", "TOOL", "DECISION", "WAITING SINCE"], rows)


def status_table(checks: Sequence[Any], supervised: Mapping[str, Any] | None = None) -> str:
    """One row per component; with ``supervised`` (the embedded stack's supervisor state by
    service), also how often each service was restarted and its last exit code."""
    if not supervised:
        return table(["COMPONENT", "ADDRESS", "STATE", "DETAIL"],
                     [[c.name, c.address, "UP" if c.up else "DOWN", truncate(c.detail, 100)] for c in checks])
    rows = []
    for c in checks:
        svc = supervised.get(c.name)
        restarts = str(svc.restarts) if svc is not None else "-"
        last_exit = str(svc.last_exit) if svc is not None and svc.last_exit is not None else "-"
        rows.append([c.name, c.address, "UP" if c.up else "DOWN", restarts, last_exit, truncate(c.detail, 100)])
    return table(["COMPONENT", "ADDRESS", "STATE", "RESTARTS", "LAST EXIT", "DETAIL"], rows)


# -- dead letters -----------------------------------------------------------------------------------
def dlq_table(entries: Sequence[Any], now: float | None = None) -> str:
    if not entries:
        return "no dead letters"
    return table(["OFFSET", "AGE", "SERVICE", "SOURCE TOPIC", "ERROR TYPE", "MESSAGE", "RETRYABLE"],
                 [[e.offset, age(e.occurred_at, now), e.get("service") or "-", e.source_topic or "-",
                   e.error_type or "-", truncate(e.message, 80), "yes" if e.get("retryable") else "no"]
                  for e in entries])


def dead_letter_dict(entry: Any, *, full: bool = False) -> dict[str, Any]:
    """offset/partition are the dead letter's own; source_* say where the original record was."""
    rec = {k: v for k, v in (entry.record or {}).items() if k not in ("key", "value", "partition", "offset")}
    key = entry.get("key")
    data = {**rec, "offset": entry.offset, "partition": entry.partition, "source_partition": entry.get("partition"),
            "source_offset": entry.get("offset"), "error_type": entry.error_type, "error_message": entry.message,
            "key": key.decode("utf-8", "replace") if key else None}
    if full:
        data["value_base64"] = base64.b64encode(entry.get("value") or b"").decode()
    return data


def preview_bytes(value: bytes, limit: int = 512) -> str:
    """UTF-8 when the bytes are text, else a hex dump of the first ``limit`` bytes."""
    head = value[:limit]
    more = f" … ({len(value)} bytes)" if len(value) > limit else f" ({len(value)} bytes)"
    try:
        return "utf-8: " + head.decode("utf-8") + more
    except UnicodeDecodeError:
        return "hex: " + head.hex(" ") + more


def dlq_detail(entry: Any, decoded: tuple[str, dict[str, Any]] | None, replayed: bool) -> str:
    rec = entry.record or {}
    key = rec.get("key")
    rows = [("offset", f"{entry.offset} (partition {entry.partition})"),
            ("occurred", f"{clock(entry.occurred_at)} ({age(entry.occurred_at)})"),
            ("tenant", rec.get("tenant") or "-"), ("service", rec.get("service") or "-"),
            ("group", rec.get("group") or "-"),
            ("source", f"{rec.get('source_topic')} partition {rec.get('partition')} offset {rec.get('offset')}"),
            ("key", key.decode("utf-8", "replace") if isinstance(key, bytes) else "-"),
            ("error", f"{rec.get('error_type')}: {rec.get('error_message')}"),
            ("retryable", f"{'yes' if rec.get('retryable') else 'no'} (attempts {rec.get('attempts')})"),
            ("replayed", "yes" if replayed else "no")]
    if entry.decode_error:
        rows.append(("decode", entry.decode_error))
    lines = [f"{k:<10} {v}" for k, v in rows]
    lines += ["original headers:"] + ([f"  {k}: {v}" for k, v in sorted(entry.headers.items())] or ["  (none)"])
    value = rec.get("value") or b""
    if decoded is not None:
        lines += [f"value ({decoded[0]}):", to_json(decoded[1])]
    else:
        lines += ["value (not a known Avro record):", preview_bytes(value)]
    return "\n".join(lines)


def replay_table(outcomes: Sequence[Any]) -> str:
    if not outcomes:
        return "nothing to replay"
    return table(["OFFSET", "SOURCE TOPIC", "RESULT", "DETAIL"],
                 [[o.entry.offset, o.entry.source_topic or "-", o.action, o.detail] for o in outcomes])
