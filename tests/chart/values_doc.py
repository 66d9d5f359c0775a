"""The chart README's values table, generated from the `# --` comments in
values.yaml (the helm-docs convention). A value documented `# -- (object)` or
`# -- (list)` is one row; its children are not listed separately. `# -- (int)`
names the type of a value whose default is null.

    .venv/bin/python -m tests.chart.values_doc --write   # rewrite the README table
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "aios-mesh"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


@dataclass
class Row:
    path: str
    kind: str
    default: Any
    description: str | None


def _lookup(values: Any, path: list[str]) -> Any:
    for part in path:
        values = values[part]
    return values


def parse(text: str) -> list[Row]:
    """Every documented (or undocumented) leaf of values.yaml, in file order."""
    values = yaml.safe_load(text)
    rows: list[Row] = []
    stack: list[tuple[int, str]] = []
    pending: str | None = None
    skip_below: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if skip_below is not None:
            if indent > skip_below or stripped.startswith("- "):
                continue
            skip_below = None
        if stripped.startswith("# --"):
            pending = stripped[4:].strip()
            continue
        if stripped.startswith("#") or stripped.startswith("- "):
            continue
        match = KEY.match(line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _i, k in stack] + [match["key"]]
        rest = match["rest"].split(" #", 1)[0].strip()
        annotated = re.match(r"^\(([a-z]+)\)\s*", pending or "")
        whole = annotated is not None and annotated.group(1) in ("object", "list")
        if rest and rest not in ("|", ">") or whole:
            default = _lookup(values, path)
            kind = annotated.group(1) if annotated else type(default).__name__
            description = pending[annotated.end():] if annotated and pending else pending
            rows.append(Row(".".join(path), {"str": "string", "int": "int", "bool": "bool", "float": "float",
                                              "dict": "object", "list": "list"}.get(kind, kind), default, description))
            if not rest:
                skip_below = indent
        else:
            stack.append((indent, match["key"]))
        pending = None
    return rows


def _default(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return "see values.yaml" if len(text) > 60 else text


def table(rows: list[Row]) -> str:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for row in rows:
        desc = (row.description or "").replace("|", "\\|")
        lines.append(f"| `{row.path}` | {row.kind} | `{_default(row.default)}` | {desc} |")
    return "\n".join(lines)


def readme_section(readme: str) -> str:
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the table in charts/aios-mesh/README.md")
    args = parser.parse_args(argv)
    generated = table(parse((CHART / "values.yaml").read_text()))
    if args.write:
        readme_path = CHART / "README.md"
        head, rest = readme_path.read_text().split(START, 1)
        readme_path.write_text(f"{head}{START}\n{generated}\n{END}{rest.split(END, 1)[1]}")
        return 0
    print(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
