"""``aios``: argparse front end. Each command is one small function
``(args, ctx) -> exit code``; errors are ``CliError``s printed as
``error: <STATUS>: <details>`` (exit 1), usage errors exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiosmesh.v1 import audit_pb2, workflow_pb2
from tools.aios import render
from tools.aios.clients import CliError, Context
from tools.aios.runs import add_list_arguments, cmd_audit, cmd_list


def usage_error(message: str) -> CliError:
    return CliError(message, code=2)


def out(text: str) -> None:
    print(text, flush=True)


# -- status -----------------------------------------------------------------------------------------
def supervised_services() -> dict[str, Any]:
    """Restarts and last exit code per service, from the running embedded stack's supervisor (if any)."""
    try:
        from infra.stack import Stack
    except ImportError:  # no embedded stack in the image
        return {}

    run_dir = Path(os.environ["AIOS_RUN_DIR"]) if os.environ.get("AIOS_RUN_DIR") else None
    try:
        return dict(Stack.attach(run_dir).supervised())
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    from tools.aios.clients import all_checks

    checks = all_checks(ctx.settings)
    supervised = supervised_services()
    if args.json:
        out(render.to_json([{**c.__dict__,
                             "restarts": s.restarts if (s := supervised.get(c.name)) is not None else None,
                             "last_exit": s.last_exit if s is not None else None} for c in checks]))
    else:
        out(render.status_table(checks, supervised))
    down = [c.name for c in checks if not c.up]
    if down and not args.json:
        print(f"down: {', '.join(down)}; start the stack with `make up` (or check the AIOS_* addresses)",
              file=sys.stderr)
    return 1 if down else 0


# -- workflows ----------------------------------------------------------------------------------------
def cmd_defs(args: argparse.Namespace, ctx: Context) -> int:
    wfs = ctx.mesh.rpc("planner", "ListWorkflows", workflow_pb2.ListWorkflowsRequest()).workflows
    out(render.to_json([render.message_dict(w) for w in wfs]) if args.json else render.defs_table(wfs))
    return 0


def timeline(ctx: Context, tenant: str, run_id: str) -> tuple[list[Any] | None, str]:
    """The run's audit entries, or None and why (the run is still shown when observability is down)."""
    try:
        resp = ctx.mesh.rpc("observability", "Timeline", audit_pb2.TimelineRequest(tenant=tenant, run_id=run_id))
    except CliError as exc:
        return None, f"observability is down: {exc}" if exc.unreachable else str(exc)
    return list(resp.entries), ""


def _show_run(ctx: Context, run: Any, as_json: bool, tenant: str) -> None:
    entries, note = timeline(ctx, tenant, run.run_id)
    if as_json:
        out(render.to_json({"run": render.message_dict(run), "note": note or None,
                            "timeline": None if entries is None else [render.message_dict(e) for e in entries]}))
    else:
        out(render.run_timeline(run, entries, note))


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    _show_run(ctx, ctx.mesh.get_run(args.tenant, args.run), args.json, args.tenant)
    return 0


def validate_file(path: Path) -> tuple[list[str], Any]:
    """Errors of one workflow file (unreadable, not YAML, schema, semantics) and the parsed document."""
    import yaml

    from services.planner.workflows import validate

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror or exc}"], None
    except UnicodeDecodeError as exc:
        return [f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                "save the workflow as UTF-8"], None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return [f"{path}: {where}not valid YAML: {problem}"], None
    return validate(raw, str(path)), raw


def cmd_validate(args: argparse.Namespace, ctx: Context) -> int:
    failed = False
    for name in args.files:
        errors, raw = validate_file(Path(name))
        for err in errors:
            out(f"error: {err}")
        if errors:
            failed = True
        else:
            out(f"ok: {raw['name']}@v{raw['version']}, {len(raw['steps'])} steps")
    return 1 if failed else 0


# -- start, approvals, cancel -----------------------------------------------------------------------
def _parse_input(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise usage_error(f"--input is not valid JSON ({exc}); pass an object like '{{\"k\": 1}}'") from None
    if not isinstance(value, dict):
        raise usage_error("--input must be a JSON object, e.g. '{\"order_id\": \"o-1\"}'")
    return json.dumps(value)


def cmd_start(args: argparse.Namespace, ctx: Context) -> int:
    req = workflow_pb2.StartWorkflowRequest(tenant=args.tenant, workflow=args.workflow, input_json=_parse_input(args.input),
                                     request_id=args.request_id or "", actor=args.actor)
    resp = ctx.mesh.rpc("planner", "StartWorkflow", req)
    if not args.json:
        out(f"{resp.run_id} ({'created' if resp.created else 'existing run for this request id'})")
    if not args.wait:
        if args.json:
            out(render.to_json({"run_id": resp.run_id, "created": resp.created}))
        return 0
    run = ctx.mesh.wait_for_run(args.tenant, resp.run_id, args.timeout)
    if args.json:
        out(render.to_json({"run_id": resp.run_id, "created": resp.created, "run": render.message_dict(run)}))
    else:
        _show_run(ctx, run, False, args.tenant)
    return 0 if run.status == "completed" else 1


def cmd_decide(args: argparse.Namespace, ctx: Context) -> int:
    req = workflow_pb2.DecisionRequest(tenant=args.tenant, run_id=args.run, step_id=args.step, actor=args.by,
                                reason=args.reason)
    method = "Approve" if args.command == "approve" else "Reject"
    resp = ctx.mesh.rpc("planner", method, req)
    verb = "approved" if args.command == "approve" else "rejected"
    out(f"{verb} step {args.step} of run {resp.run_id} (command {resp.command_id})")
    return 0


def cmd_approvals(args: argparse.Namespace, ctx: Context) -> int:
    req = workflow_pb2.ListRunsRequest(tenant=args.tenant, status="waiting_approval", limit=args.limit)
    runs = ctx.mesh.rpc("planner", "ListRuns", req).runs
    if args.json:
        out(render.to_json([{"run_id": r.run_id, "workflow": r.workflow, "workflow_version": r.workflow_version,
                             "steps": [render.message_dict(s) for s in r.steps if s.status == "waiting_approval"]}
                            for r in runs]))
    else:
        out(render.approvals_table(runs))
    return 0


def cmd_cancel(args: argparse.Namespace, ctx: Context) -> int:
    req = workflow_pb2.CancelRequest(tenant=args.tenant, run_id=args.run, actor=args.by, reason=args.reason)
    resp = ctx.mesh.rpc("planner", "Cancel", req)
    out(f"cancel requested for run {resp.run_id} (command {resp.command_id})")
    return 0


# -- dead letters -----------------------------------------------------------------------------------
def _dlq_selection(args: argparse.Namespace, ctx: Context, offsets: Sequence[int] | None = None) -> list[Any]:
    from tools.aios import dlq

    entries = dlq.read_all(ctx.settings, deadline_s=args.deadline)
    return dlq.select(entries, prefix=ctx.settings.topic_prefix, service=args.service, topic=args.topic,
                      error_type=args.error_type, offsets=offsets)


def cmd_dlq_list(args: argparse.Namespace, ctx: Context) -> int:
    entries = _dlq_selection(args, ctx)
    entries = entries[-args.limit:] if args.limit else entries
    out(render.to_json([render.dead_letter_dict(e) for e in entries]) if args.json else render.dlq_table(entries))
    return 0


def _redis(ctx: Context) -> Any:
    from tools.aios.clients import redis_client

    return redis_client(ctx.settings.redis_url)


def cmd_dlq_show(args: argparse.Namespace, ctx: Context) -> int:
    import redis

    from tools.aios import dlq

    entry = dlq.find(dlq.read_all(ctx.settings, deadline_s=args.deadline), args.offset)
    decoded = dlq.decode_original(dlq.new_codec(ctx.settings), entry)
    try:
        replayed = bool(_redis(ctx).sismember(dlq.REPLAYED_KEY, entry.member))
    except redis.RedisError:
        replayed = False
    if args.json:
        out(render.to_json({**render.dead_letter_dict(entry, full=True), "headers": entry.headers, "replayed": replayed,
                            "decoded": {"schema": decoded[0], "record": decoded[1]} if decoded else None}))
    else:
        out(render.dlq_detail(entry, decoded, replayed))
    return 0


def cmd_dlq_replay(args: argparse.Namespace, ctx: Context) -> int:
    import redis

    from tools.aios import dlq
    from tools.aios.clients import redis_unreachable

    if bool(args.offset) == bool(args.all):
        raise usage_error("say what to replay: --offset N (repeatable) or --all (with optional filters)")
    selected = _dlq_selection(args, ctx, args.offset or None)
    for missing in sorted(set(args.offset or ()) - {e.offset for e in selected}):
        print(f"warning: no dead letter at offset {missing} matches", file=sys.stderr)
    selected, refused = authorize_replay(ctx, selected)
    for line in refused:
        print(f"refused: {line}", file=sys.stderr)
    try:
        outcomes = dlq.replay(ctx.settings, selected, _redis(ctx), dry_run=args.dry_run, force=args.force)
    except redis.RedisError as exc:
        raise redis_unreachable(ctx.settings.redis_url, exc) from None
    if args.json:
        out(render.to_json([{"offset": o.entry.offset, "source_topic": o.entry.source_topic, "action": o.action,
                             "detail": o.detail} for o in outcomes]))
    else:
        out(render.replay_table(outcomes))
    return 0


def authorize_replay(ctx: Context, entries: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """The dead letters our principal may replay (ReplayDeadLetter on each one's tenant), and why the
    others may not. A guard rail: the CLI writes to Kafka itself, so what enforces it is the topics' ACLs."""
    from services.common.auth import AuthError, principal_from_claims
    from services.common.authz import authorizer, resource_for

    client = ctx.mesh.client("planner")
    if client is None:  # AIOS_GRPC_AUTH=none: no identity to check
        return list(entries), []
    try:
        who = principal_from_claims(client.principal_claims())
    except AuthError as exc:
        raise CliError(f"UNAUTHENTICATED: {exc}; set AIOS_TOKEN or AIOS_TOKEN_FILE", status="UNAUTHENTICATED") from None
    allowed, refused = [], []
    for e in entries:
        tenant = str(e.get("tenant") or e.headers.get("aios-tenant", ""))
        decision = authorizer().decide(who, "ReplayDeadLetter", resource_for(
            "ReplayDeadLetter", tenant=tenant, topic=e.source_topic))
        if decision.allowed:
            allowed.append(e)
        else:
            refused.append(f"offset {e.offset}: PERMISSION_DENIED: {who.id} may not replay a dead letter of tenant "
                           f"{tenant or '(none)'} ({', '.join(decision.policies) or 'no policy permits it'})")
    return allowed, refused


# -- policy -----------------------------------------------------------------------------------------
def cmd_policy_test(args: argparse.Namespace, ctx: Context) -> int:
    """Each case of a cases file decided by the authorization policies, with the policies behind it."""
    from tools.aios import policy_test

    policies = Path(args.policies) if args.policies else _authz_default("authz_policy_file")
    schema = Path(args.schema) if args.schema else _authz_default("authz_schema_file")
    try:
        authorizer = policy_test.load_authorizer(policies, schema)
        results = policy_test.run_cases(authorizer, policy_test.load_cases(Path(args.cases)))
    except (policy_test.PolicyFileError, policy_test.CasesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out(render.to_json([{"name": r.name, "principal": r.principal, "action": r.action, "resource": r.resource,
                             "decision": r.effect, "policies": list(r.decision.policies),
                             "errors": list(r.decision.errors), "expect": r.expect or None, "ok": r.ok}
                            for r in results]))
    else:
        out(policy_test.render(results))
    return 0 if all(r.ok for r in results) else 1


def _authz_default(field: str) -> Path:
    from services.common.settings import GrpcAuthSettings

    return Path(GrpcAuthSettings.model_fields[field].default)


# -- topics -----------------------------------------------------------------------------------------
def cmd_topics_apply(args: argparse.Namespace, ctx: Context) -> int:
    """Create the catalog's missing topics: the code the chart's topics Job and the embedded stack run."""
    from services.common import topics
    from tools.aios.clients import load_cli_settings, start_hint

    settings = load_cli_settings(topics.TopicSettings)
    try:
        return topics.apply(settings, out=sys.stdout)  # the current stdout, not the one at import
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        raise CliError(f"UNAVAILABLE: {exc.code}; {start_hint('AIOS_KAFKA_BOOTSTRAP')}", unreachable=True) from None


# -- parser -----------------------------------------------------------------------------------------
def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tenant", default=argparse.SUPPRESS, help="tenant (default $AIOS_DEFAULT_TENANT or demo)")
    return common


def _json_flag(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _add_workflows(sub: Any, common: argparse.ArgumentParser) -> None:
    wf = sub.add_parser("workflows", help="runs and definitions", parents=[common]).add_subparsers(
        dest="wf_command", required=True, metavar="{list,defs,show,validate}")
    p = _json_flag(wf.add_parser("list", help="runs, newest first, a page at a time (or --all)", parents=[common]))
    add_list_arguments(p, _limit)
    p.set_defaults(func=cmd_list)
    _json_flag(wf.add_parser("defs", help="deployed workflow definitions", parents=[common])).set_defaults(
        func=cmd_defs)
    p = _json_flag(wf.add_parser("show", help="one run as a timeline", parents=[common]))
    p.add_argument("run")
    p.set_defaults(func=cmd_show)
    p = wf.add_parser("validate", help="check workflow files", parents=[common])
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)


def _add_runs(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _json_flag(sub.add_parser("start", help="start a workflow run", parents=[common]))
    p.add_argument("workflow")
    p.add_argument("--input", default="{}", help="JSON object, seen by steps as ${input.*}")
    p.add_argument("--request-id", help="idempotency key: the same id returns the same run")
    p.add_argument("--actor", default=os.environ.get("USER") or "cli")
    p.add_argument("--wait", action="store_true", help="wait for a final state and print the result")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (with --wait)")
    p.set_defaults(func=cmd_start)
    for name in ("approve", "reject"):
        p = sub.add_parser(name, help=f"{name} a step waiting for approval", parents=[common])
        p.add_argument("run")
        p.add_argument("step")
        p.add_argument("--by", required=True, help="who decides")
        p.add_argument("--reason", required=True)
        p.set_defaults(func=cmd_decide)
    p = _json_flag(sub.add_parser("approvals", help="steps waiting for approval", parents=[common]))
    p.add_argument("--limit", type=_limit, default=100)
    p.set_defaults(func=cmd_approvals)
    p = sub.add_parser("cancel", help="cancel a run", parents=[common])
    p.add_argument("run")
    p.add_argument("--by", required=True)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_cancel)
    p = _json_flag(sub.add_parser("audit", help="a run's audit trail, oldest first (all of it, or --limit "
                                  "newest entries a page)", parents=[common]))
    p.add_argument("run")
    p.add_argument("--limit", type=int, default=0, help="entries per page, newest first (1-1000; 0: all)")
    p.add_argument("--page-token", default="", help="continue after a page (printed under it)")
    p.set_defaults(func=cmd_audit)


def _dlq_filters(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--service", help="service that dead-lettered the record")
    p.add_argument("--topic", help="source topic (with or without the topic prefix)")
    p.add_argument("--error-type")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds to read the topic")
    return p


def _add_dlq(sub: Any, common: argparse.ArgumentParser) -> None:
    dlq = sub.add_parser("dlq", help="dead letters", parents=[common]).add_subparsers(
        dest="dlq_command", required=True, metavar="{list,show,replay}")
    p = _json_flag(_dlq_filters(dlq.add_parser("list", help="list dead letters", parents=[common])))
    p.add_argument("--limit", type=int, default=0, help="only the newest N")
    p.set_defaults(func=cmd_dlq_list)
    p = _json_flag(dlq.add_parser("show", help="one dead letter in full", parents=[common]))
    p.add_argument("offset", type=int)
    p.add_argument("--deadline", type=float, default=30.0)
    p.set_defaults(func=cmd_dlq_show)
    p = _json_flag(_dlq_filters(dlq.add_parser("replay", help="re-publish to the source topic", parents=[common])))
    p.add_argument("--offset", type=int, action="append", help="dead-letter offset (repeatable)")
    p.add_argument("--all", action="store_true", help="every dead letter matching the filters")
    p.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    p.add_argument("--force", action="store_true", help="replay even if already replayed")
    p.set_defaults(func=cmd_dlq_replay)


def _add_topics(sub: Any, common: argparse.ArgumentParser) -> None:
    topics = sub.add_parser("topics", help="the catalog's Kafka topics", parents=[common]).add_subparsers(
        dest="topics_command", required=True, metavar="{apply}")
    topics.add_parser("apply", help="create missing topics (AIOS_TOPICS_REPLICATION_FACTOR, "
                      "AIOS_TOPICS_PARTITIONS, AIOS_TOPICS_CONFIG); existing ones are left as they are",
                      parents=[common]).set_defaults(func=cmd_topics_apply)


def _add_policy(sub: Any, common: argparse.ArgumentParser) -> None:
    policy = sub.add_parser("policy", help="authorization policies (Cedar)", parents=[common]).add_subparsers(
        dest="policy_command", required=True, metavar="{test}")
    p = _json_flag(policy.add_parser("test", help="decide each case of a cases file and show the policies behind "
                                     "each decision (see tools/aios/policy_test.py for the format)", parents=[common]))
    p.add_argument("cases", metavar="FILE", help="YAML/JSON list of cases: principal, action, tenant, ..., expect")
    p.add_argument("--policies", help="Cedar policy file (default: AIOS_AUTHZ_POLICY_FILE's default)")
    p.add_argument("--schema", help="Cedar schema file (default: AIOS_AUTHZ_SCHEMA_FILE's default)")
    p.set_defaults(func=cmd_policy_test)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aios", description="Operate the AIOS mesh.")
    parser.add_argument("--tenant", default=os.environ.get("AIOS_DEFAULT_TENANT") or "demo",
                        help="tenant (default $AIOS_DEFAULT_TENANT or demo)")
    common = _common()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _json_flag(sub.add_parser("status", help="health of every component", parents=[common])).set_defaults(
        func=cmd_status)
    _add_workflows(sub, common)
    _add_runs(sub, common)
    _add_dlq(sub, common)
    _add_topics(sub, common)
    _add_policy(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    ctx = Context()
    try:
        return int(args.func(args, ctx))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except SystemExit as exc:  # invalid AIOS_* settings (the message names the variable)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
