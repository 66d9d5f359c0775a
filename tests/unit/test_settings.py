"""A bad setting stops a service at start-up with exit code 2 and a message
that names the variable and says how to fix it (docs/CONVENTIONS.md, Settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _start_planner(**bad: str) -> subprocess.CompletedProcess[str]:
    # Only the bad variable is set: nothing else the planner reads can fail first, and should validation
    # wrongly pass, the planner points at nothing and the timeout below kills it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **bad})
    return subprocess.run([sys.executable, "-m", "services.planner"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("name", "value"), [
    ("AIOS_FETCH_WAIT_MS", "abc"),
    ("AIOS_PLANNER_METRICS_PORT", "-1"),
])
def test_bad_setting_exits_2_naming_the_variable_and_the_fix(name: str, value: str) -> None:
    proc = _start_planner(**{name: value})
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert name in proc.stderr, proc.stderr
    assert repr(value) in proc.stderr, f"the offending value should be shown: {proc.stderr}"
    assert "fix the environment variable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, f"a bad setting is a message, not a crash: {proc.stderr}"
    # Only the bad variable is reported, not every setting.
    flagged = [line for line in proc.stderr.splitlines() if line.strip().startswith("AIOS_")]
    assert len(flagged) == 1 and flagged[0].strip().startswith(f"{name}="), proc.stderr
