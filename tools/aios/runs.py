"""``aios workflows list``: page through runs with filters, one page or all of them.

The planner serves pages from its indexes with an opaque next-page token and the count of all
matching runs; this module only walks the pages and says how to get the next one."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from collections.abc import Iterator
from typing import Any

from aiosmesh.v1 import workflow_pb2
from tools.aios import render
from tools.aios.clients import Context

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


def pages(ctx: Context, args: argparse.Namespace, limit: int, token: str = "") -> Iterator[Any]:
    """ListRuns responses from ``token`` on, until the last page."""
    while True:
        resp = ctx.mesh.rpc("planner", "ListRuns", _request(args, limit, token))
        yield resp
        token = resp.next_page_token
        if not token:
            return


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
