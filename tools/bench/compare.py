"""Before/after in one run: the orchestration bench of an earlier revision and of
this tree, back to back on the same machine, with their ratios.

    python -m tools.bench.compare --before e7b8d3f [--quick]

The earlier revision is exported (``git archive``) into a scratch folder and run
with this tree's virtualenv, so both sides see the same interpreter, libraries
and machine load window. Each side's figures are also given as ratios to its
own raw Kafka round trip, measured in the same run: compare those, not absolute
times, on a shared machine. Writes ``bench/before_after.json`` and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from services.common.catalog import REPO_ROOT

OUT = REPO_ROOT / "bench" / "before_after.json"
FIGURES = [  # (label, path in results.json, higher is better)
    ("Kafka round trip p50 (ms)", ("kafka_round_trip", "p50_ms"), False),
    ("step overhead p50 (ms)", ("step_overhead", "p50_ms"), False),
    ("step overhead p50 / round trip", ("step_overhead", "p50_vs_round_trip"), False),
    ("step overhead p99 / round trip", ("step_overhead", "p99_vs_round_trip"), False),
    ("3-step runs/s", ("throughput", "runs_per_s"), True),
    ("planner kill -9: runs move again after (s)", ("recovery", "seconds_until_runs_move"), False),
    ("recovery lost runs", ("recovery", "lost_runs"), False),
    ("recovery duplicated effects", ("recovery", "duplicated_effects"), False),
]


def _export(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO_ROOT, check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True)
    archive_path = into / ".src.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into, filter="data")
    archive_path.unlink()
    (into / ".cache").symlink_to(REPO_ROOT / ".cache")  # the fitted classifier, not refitted


def _bench(tree: Path, quick: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "tools.bench.run", "--only", "orchestration"] + (["--quick"] if quick else [])
    print(f"\n== {tree}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True, timeout=1800)
    results: dict[str, Any] = json.loads((tree / "bench" / "results.json").read_text())
    return results


def _get(results: dict[str, Any], path: tuple[str, str]) -> float | None:
    value = results.get(path[0], {}).get(path[1])
    return float(value) if isinstance(value, (int, float)) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.compare")
    parser.add_argument("--before", required=True, help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="aios-before-"))
    try:
        _export(args.before, scratch / "tree")
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        before = _bench(scratch / "tree", args.quick)
        after = _bench(REPO_ROOT, args.quick)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for label, path, higher in FIGURES:
        b, a = _get(before, path), _get(after, path)
        rows.append({"figure": label, "before": b, "after": a, "higher_is_better": higher,
                     "after_over_before": (a / b) if a is not None and b else None})
    OUT.write_text(json.dumps({"before": args.before, "after": "HEAD", "when": started, "quick": args.quick,
                               "rows": rows}, indent=2))
    print(f"\n{'figure':45s} {'before':>10s} {'after':>10s} {'after/before':>13s}")
    for r in rows:
        fmt = lambda v: f"{v:10.2f}" if v is not None else f"{'-':>10s}"  # noqa: E731
        ratio = f"{r['after_over_before']:13.2f}" if r["after_over_before"] is not None else f"{'-':>13s}"
        print(f"{r['figure']:45s} {fmt(r['before'])} {fmt(r['after'])} {ratio}")
    print(f"written: {OUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
