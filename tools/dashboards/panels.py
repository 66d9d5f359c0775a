"""Small builders over grafana-foundation-sdk: a query, a time series, a stat, a dashboard
with a Prometheus datasource variable, rows laid out left to right, and ids numbered."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import stat as gs
from grafana_foundation_sdk.builders import timeseries as gt
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

__all__ = ["DS", "RATE", "Dashboard", "Q", "Row", "Var", "stat", "timeseries", "to_json"]

# Every panel and query variable reads from the dashboard's own datasource variable, so one
# import works against any Prometheus (or Thanos, Mimir) the operator picks.
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Q:
    """One PromQL query of a panel and its legend."""

    expr: str
    legend: str = ""


def _targets(panel: Any, queries: Sequence[Q]) -> None:
    for i, q in enumerate(queries):
        target = gp.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i)).range()
        if q.legend:
            target = target.legend_format(q.legend)
        panel.with_target(target)


def timeseries(title: str, *queries: Q, unit: str = "short", description: str = "", width: int = 12,
               height: int = 8, stacked: bool = False) -> gt.Panel:
    """A time series panel."""
    panel = gt.Panel().title(title).datasource(DS).unit(unit).span(width).height(height).fill_opacity(10)
    if description:
        panel = panel.description(description)
    if stacked:
        panel = panel.fill_opacity(40)
    _targets(panel, queries)
    return panel


def stat(title: str, *queries: Q, unit: str = "short", description: str = "", width: int = 6,
         height: int = 4) -> gs.Panel:
    """A single-number panel (the last value)."""
    panel = gs.Panel().title(title).datasource(DS).unit(unit).span(width).height(height)
    if description:
        panel = panel.description(description)
    _targets(panel, queries)
    return panel


@dataclass(frozen=True)
class Row:
    """A titled row of panels."""

    title: str
    panels: Sequence[Any]


@dataclass(frozen=True)
class Var:
    """A query variable over one label (multi-select, "All" = any value)."""

    name: str
    label: str
    metric: str


def Dashboard(uid: str, title: str, description: str, rows: Sequence[Row],  # noqa: N802 - reads as a type
              variables: Sequence[Var] = ()) -> dict[str, Any]:
    """The dashboard as a JSON-ready dict: datasource variable first, then ``variables``, then the rows."""
    board = (gd.Dashboard(title).uid(uid).description(description).tags(["aios-mesh"]).refresh("30s")
             .time("now-3h", "now").timezone("browser").editable()
             .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus")))
    for var in variables:
        board = board.with_variable(
            gd.QueryVariable(var.name).label(var.label).datasource(DS)
            .query(f"label_values({var.metric}, {var.name})").multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    panel_id = 1
    for row in rows:
        board = board.with_row(gd.Row(row.title).id(panel_id))
        panel_id += 1
        for panel in row.panels:
            board = board.with_panel(panel.id(panel_id))
            panel_id += 1
    out: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return out


def to_json(board: dict[str, Any]) -> str:
    """The committed form: sorted keys, two-space indent, newline at the end (stable diffs)."""
    return json.dumps(board, indent=2, sort_keys=True) + "\n"

