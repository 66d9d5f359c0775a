"""``aios workflows list`` and ``aios audit``: page through runs with filters, or through a run's
audit trail, one page or all of them.

The planner and the observability service serve pages from their indexes with an opaque
next-page token and the count of all matches; this module only walks the pages and says how to
get the next one."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from aiosmesh.v1 import audit_pb2, workflow_pb2
from tools.aios import render
from tools.aios.clients import CliError, Context

ALL_PAGE = 1000  # page size when walking everything (--all): the API's maximum
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: dt.datetime | None = None) -> int:
    """Epoch ms of ``7d`` / ``12h`` / ``30m`` ago, or of an ISO 8601 date or time (UTC unless it
    names its zone). An argparse type: a bad value is a usage error that shows the forms."""
    now = now or dt.datetime.now(dt.UTC)
    ago = _AGO.match(text.strip())
    if ago:
        return round((now.timestamp() - float(ago.group(1)) * _UNIT_S[ago.group(2)]) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: use an age such as 7d, 12h or 30m, or an ISO "
                                         "date/time such as 2026-11-23 or 2026-11-23T08:00:00+01:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(when.timestamp() * 1000)


def iso(ms: float) -> str:
    """An absolute time ``parse_when`` reads back to the same millisecond."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _request(args: argparse.Namespace, limit: int, token: str) -> workflow_pb2.ListRunsRequest:
    return workflow_pb2.ListRunsRequest(
        tenant=args.tenant, workflow=args.workflow or "", status=args.status or "", actor=args.actor or "",
        created_after_ms=args.since or 0, created_before_ms=args.until or 0, limit=limit, page_token=token)


def walk(call: Callable[[int, str], Any], limit: int, token: str = "") -> Iterator[Any]:
    """The responses of a paged call (``call(limit, token)``) from ``token`` on, until the last page."""
    while True:
        resp = call(limit, token)
        yield resp
        token = resp.next_page_token
        if not token:
            return


def pages(ctx: Context, args: argparse.Namespace, limit: int, token: str = "") -> Iterator[Any]:
    """ListRuns responses from ``token`` on, until the last page."""
    return walk(lambda n, t: ctx.mesh.rpc("planner", "ListRuns", _request(args, n, t)), limit, token)


def _next_hint(args: argparse.Namespace, token: str) -> str:
    flags = [f"--{name} {getattr(args, name)!s}" for name in ("workflow", "status", "actor") if getattr(args, name)]
    # Absolute times: "7d" read again on the next call would be another filter, which the token refuses.
    flags += [f"--{name} {iso(getattr(args, name))}" for name in ("since", "until") if getattr(args, name)]
    return " ".join(["aios workflows list", *flags, f"--limit {args.limit}", f"--page-token {token}"])


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    """One page (``--limit``, ``--page-token``) or every page (``--all``), newest first."""
    if args.all:
        runs, total = [], 0
        for n, resp in enumerate(pages(ctx, args, ALL_PAGE, args.page_token or "")):
            runs += resp.runs
            total = resp.total if n == 0 else total
        token = ""
    else:
        resp = next(pages(ctx, args, args.limit, args.page_token or ""))
        runs, total, token = list(resp.runs), resp.total, resp.next_page_token
    if args.json:
        render_out(render.to_json([render.message_dict(r) for r in runs]))
        if token:
            print(f"next_page_token: {token}", file=sys.stderr)
        return 0
    render_out(render.runs_table(runs))
    where = "from this token " if args.page_token else ""
    summary = f"{len(runs)} of {total} matching runs {where}".rstrip()
    render_out(f"{summary}; next page: {_next_hint(args, token)}" if token else summary)
    return 0


def cmd_audit(args: argparse.Namespace, ctx: Context) -> int:
    """A run's audit trail, oldest first: all of it (AuditService.Query's pages, no cap), or with
    ``--limit`` one page of its newest entries, and how to get the page of older ones."""
    def query(limit: int, token: str) -> Any:
        return ctx.mesh.rpc("observability", "Query", audit_pb2.AuditQuery(
            tenant=args.tenant, run_id=args.run, limit=limit, page_token=token))

    if args.limit:
        resp = next(walk(query, args.limit, args.page_token or ""))
        entries, total, token = list(resp.entries), resp.total, resp.next_page_token
    else:
        entries, total, token = [], 0, ""
        for n, resp in enumerate(walk(query, ALL_PAGE, args.page_token or "")):
            entries += resp.entries
            total = resp.total if n == 0 else total
    if not entries and not args.page_token:
        raise CliError(f"no audit entries for run {args.run!r} of tenant {args.tenant!r}: unknown run, another "
                       "tenant's run, or past the retention", code=1)
    entries.reverse()  # pages come newest first; a trail reads oldest first
    if args.json:
        render_out(render.to_json([render.message_dict(e) for e in entries]))
    else:
        render_out(render.audit_table(entries, entries[0].occurred_at_ms if entries else 0))
    if token:
        which = "older than the page before" if args.page_token else "the newest"
        print(f"{len(entries)} of {total} entries, {which}; older: aios audit {args.run} --limit {args.limit} "
              f"--page-token {token}", file=sys.stderr)
    return 0


def render_out(text: str) -> None:
    print(text, flush=True)


def add_list_arguments(p: argparse.ArgumentParser, limit_type: Any) -> None:
    p.add_argument("--workflow", help="only runs of this workflow")
    p.add_argument("--status", help="only runs in this status (running, waiting_approval, completed, failed, ...)")
    p.add_argument("--actor", help="only runs started by this principal (or source:<system>)")
    p.add_argument("--since", type=parse_when, metavar="WHEN",
                   help="created at or after: an age (7d, 12h, 30m) or an ISO date/time (UTC unless zoned)")
    p.add_argument("--until", type=parse_when, metavar="WHEN", help="created before (same forms as --since)")
    p.add_argument("--limit", type=limit_type, default=50, help="runs per page (1-1000, default 50)")
    p.add_argument("--page-token", default="", help="continue after a page (printed under it)")
    p.add_argument("--all", action="store_true", help="every matching run, all pages")
