"""Pure helpers of `make bench-peers` (tools/bench/peers.py): no PostgreSQL, no DBOS, no stack."""

from __future__ import annotations

import json
from pathlib import Path

from tools.bench import peers
from tools.bench import run as bench_run


def _point(mode: str, c: int, rps: float, p50: float = 10.0, p99: float = 20.0) -> dict:
    return {"mode": mode, "concurrency": c, "runs": int(rps * 10), "errors": 0, "seconds": 10.0,
            "runs_per_s": rps, "steps_per_s": 3 * rps, "p50_ms": p50, "p99_ms": p99}


def test_pct_nearest_rank_and_empty() -> None:
    values = [float(v) for v in range(1, 101)]
    assert peers.pct(values, 0.5) == 51.0  # round(0.5 * 99) = 50 -> the 51st value
    assert peers.pct(values, 0.99) == 99.0
    assert peers.pct(values, 0.0) == 1.0
    assert peers.pct(values, 1.0) == 100.0
    assert peers.pct([], 0.5) == 0.0
    assert peers.pct([3.0, 1.0, 2.0], 0.5) == 2.0  # unsorted input


def test_ratio_guards_a_zero_denominator() -> None:
    assert peers.ratio(60.0, 30.0) == 2.0
    assert peers.ratio(1.0, 0.0) is None


def test_pair_points_matches_mode_and_concurrency() -> None:
    dbos = [_point("closed loop", 8, 100.0), _point("burst", 600, 80.0), _point("closed loop", 32, 120.0)]
    mesh = [_point("closed loop", 8, 50.0), _point("burst", 600, 160.0)]
    rows = peers.pair_points(dbos, mesh)
    assert [(r["mode"], r["concurrency"]) for r in rows] == [("closed loop", 8), ("burst", 600)]
    assert rows[0]["mesh_over_dbos"] == 0.5
    assert rows[1]["mesh_over_dbos"] == 2.0


def test_headline_prefers_the_reference_concurrency() -> None:
    rows = peers.pair_points([_point("burst", 600, 80.0), _point("closed loop", 8, 100.0)],
                             [_point("burst", 600, 40.0), _point("closed loop", 8, 25.0)])
    top = peers.headline(rows)
    assert top["concurrency"] == 8 and top["mode"] == "closed loop"
    assert top["dbos"]["runs_per_s"] == 100.0 and top["mesh"]["runs_per_s"] == 25.0
    assert top["mesh_over_dbos"] == 0.25
    assert set(top["dbos"]) >= {"runs_per_s", "p50_ms", "p99_ms", "concurrency"}
    only_burst = peers.headline(peers.pair_points([_point("burst", 600, 80.0)], [_point("burst", 600, 40.0)]))
    assert only_burst["mode"] == "burst"
    assert peers.headline([]) == {}


def test_merge_keeps_every_existing_key_and_replaces_peers() -> None:
    existing = {"machine": "m", "throughput": {"runs_per_s": 1.0}, "peers": {"old": True}}
    merged = peers.merge_results(existing, {"mesh_over_dbos": 0.5})
    assert merged["machine"] == "m" and merged["throughput"] == {"runs_per_s": 1.0}
    assert merged["peers"] == {"mesh_over_dbos": 0.5}
    assert existing["peers"] == {"old": True}  # not mutated


def test_load_results_tolerates_missing_and_broken_files(tmp_path: Path) -> None:
    assert peers.load_results(tmp_path / "none.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert peers.load_results(bad) == {}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": 1}))
    assert peers.load_results(good) == {"a": 1}


def _peers_section() -> dict:
    rows = peers.pair_points([_point("closed loop", 8, 100.0), _point("burst", 600, 80.0)],
                             [_point("closed loop", 8, 50.0), _point("burst", 600, 200.0)])
    return {**peers.headline(rows), "goal_mesh_over_dbos": 2.0, "points": rows, "machine": "x86_64, 2 cores",
            "when": "2026-01-01 00:00 UTC",
            "dbos_recovery": {"runs": 12, "lost_runs": 0, "steps_executed_after_crash": 24,
                              "seconds_until_runs_move": 1.5, "seconds_until_all_recovered": 1.6},
            "setup": {"dbos": "dbos 3.4.0 (own venv)", "postgres": {"server_version": "15.18", "fsync": "on",
                                                                    "synchronous_commit": "on", "run_as": "aiosbench"}}}


def test_render_peers_states_the_ratio_against_the_goal() -> None:
    text = bench_run.render_peers({"peers": _peers_section()})
    assert text.startswith("## Peers")
    assert "| closed loop, 8 clients | 100.0 runs/s" in text
    assert "0.50x (below the 2x goal)" in text
    assert "2.50x (meets the 2x goal)" in text
    assert "fsync on" in text and "aiosbench" in text
    assert "runs move again after 1.5 s" in text
    assert bench_run.render_peers({}) == ""


def test_write_report_adds_peers_after_the_main_table(tmp_path: Path, monkeypatch) -> None:
    report = tmp_path / "benchmarks.md"
    monkeypatch.setattr(bench_run, "REPORT", report)
    bench_run.write_report({"peers": _peers_section()})  # no main figures yet: the section alone
    assert report.read_text().startswith("# Benchmarks\n")
    assert "## Peers" in report.read_text()
    results = {"machine": "m", "when": "w", "throughput": {"concurrency": 600, "runs_per_s": 50.0,
                                                          "steps_per_s": 150.0}, "peers": _peers_section()}
    bench_run.write_report(results)
    text = report.read_text()
    assert text.index("| throughput, 3-step workflow") < text.index("## Peers")
