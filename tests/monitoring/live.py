"""A real Prometheus on loopback for the end-to-end run: a scrape config generated from the
stack's metrics ports (job = service, as the chart's ServiceMonitor names them; job
``inference`` = Ray's metrics export port), the chart's rules loaded, started as a child
process and stopped by its PID."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from infra.stack import Stack, procs
from services.inference.cluster import RayPorts
from tests.monitoring.promql import FILES

SCRAPE_INTERVAL = "1s"


def scrape_config(stack: Stack) -> dict[str, Any]:
    """Prometheus's configuration for every metrics port of ``stack``."""
    jobs = [{"job_name": service, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for service, port in sorted(stack.ports.metrics.items())]
    ray = RayPorts(stack.ports.ray_base).named()["metrics_export"]
    jobs.append({"job_name": "inference", "static_configs": [{"targets": [f"127.0.0.1:{ray}"]}]})
    return {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(p) for p in sorted((FILES / "rules").glob("*.yaml"))], "scrape_configs": jobs}


class Prometheus:
    """The HTTP API of one running server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        """The raw answer of an instant query (``status`` success or error)."""
        answer: dict[str, Any] = self.http.get("/api/v1/query", params={"query": expr}).json()
        return answer

    def series(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def get(self, path: str) -> Any:
        answer = self.http.get(path).json()
        assert answer["status"] == "success", answer
        return answer["data"]


@contextmanager
def running(binary: Path, stack: Stack, workdir: Path) -> Iterator[Prometheus]:
    """Prometheus scraping ``stack`` until the block ends; stopped by PID (SIGTERM, then SIGKILL)."""
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(stack)))
    port = procs.free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen([str(binary), f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if prom.http.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start; see {workdir / 'prometheus.log'}")
            time.sleep(0.2)
        yield prom
    finally:
        prom.http.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
