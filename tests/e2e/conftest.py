"""The whole mesh as real processes on fresh ports, once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.stack import Ports, Stack

CREDENTIAL_KEYS = ("AIOS_GRPC_", "AIOS_TOKEN", "AIOS_AUTH_")


def log_tail(path: Path, chars: int = 3000, missing: str = "") -> str:
    """The last ``chars`` characters of a service's log (``missing`` if it wrote none)."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else missing


def print_log_tails(stack: Stack) -> None:
    """Every process's log tail on the test's output, for a stack that failed to start or to serve a
    test: the process logs are in the run directory, which the failure report does not show."""
    for name, proc in stack.procs.items():
        print(f"--- {name} log tail ---\n{log_tail(Path(proc.log))}")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = Path(tmp_path_factory.mktemp("mesh"))
    stack = Stack(Ports.fresh(), run_dir=run_dir, topic_prefix="e2e.", tenant="demo")
    # Intent drift windows small enough for a few dozen routed messages (the defaults need 2,500 per
    # tenant), so the live Prometheus run sees real drift series behind the inference dashboard's panels.
    drift_windows = {"AIOS_OBSERVABILITY_DRIFT_WINDOW_RECORDS": "10", "AIOS_OBSERVABILITY_DRIFT_STEP_RECORDS": "5",
                     "AIOS_OBSERVABILITY_DRIFT_BASELINE_WINDOWS": "1"}
    saved = {k: os.environ.get(k) for k in drift_windows}
    os.environ.update(drift_windows)  # Stack.env() copies os.environ into every service it starts
    try:
        stack.up()
        # Addresses for the test code and the aios CLI; not the services' own credentials: channels to the
        # stack use the operator's (Stack.ensure_credentials registers them), and the session's later tests
        # must not inherit a credential setup.
        os.environ.update({k: v for k, v in stack.env().items()
                           if k.startswith("AIOS_") and not k.startswith(CREDENTIAL_KEYS)})
        yield stack
    except BaseException:
        print_log_tails(stack)
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stack.down()
        leftovers = [p.name for p in stack.procs.values() if p.alive()]
        assert not leftovers, f"processes left behind: {leftovers}"
