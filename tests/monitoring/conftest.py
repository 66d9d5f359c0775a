"""Prometheus and promtool from Debian's `prometheus` package, unpacked under .cache by
tools/dashboards/fetch-prometheus.sh (which `make prometheus` runs); fetched here too when
missing, so these tests never pass by skipping."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = Path(os.environ.get("AIOS_PROMETHEUS_DIR", REPO / ".cache" / "prometheus"))


def prometheus_binary(name: str) -> Path:
    """``prometheus`` or ``promtool``, fetched and unpacked if missing."""
    path = PROM_DIR / "usr" / "bin" / name
    if not path.exists():
        fetch = subprocess.run(["bash", str(REPO / "tools" / "dashboards" / "fetch-prometheus.sh"), str(PROM_DIR)],
                               capture_output=True, text=True, timeout=300)
        if fetch.returncode != 0:
            pytest.fail(f"cannot fetch Debian's prometheus package (make prometheus):\n{fetch.stderr}")
    return path


@pytest.fixture(scope="session")
def promtool() -> Path:
    return prometheus_binary("promtool")


@pytest.fixture(scope="session")
def prometheus() -> Path:
    return prometheus_binary("prometheus")
