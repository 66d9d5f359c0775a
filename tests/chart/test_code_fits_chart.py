"""What the chart sets must be used by code outside the chart's files. Each
check names the change it needs when it fails. The chart works end to end only
when all of them pass (the behaviour behind each is tested in tests/unit and
tests/integration: test_runtime_settings, test_kafka_clients, test_consumer_lag,
test_topics_apply, test_inference_app_builder)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import yaml

from tests.chart import kube


def _source(path: str) -> str:
    return (kube.REPO / path).read_text()


def _need(condition: bool, change: str) -> None:
    assert condition, f"code change needed: {change}"


def test_grpc_servers_bind_the_listen_address() -> None:
    _need("listen_addr(" in _source("services/common/runtime.py"),
          "services/common/runtime.py ServiceRuntime.serve: serve_grpc(self.settings.listen_addr(address), ...) "
          "so a pod binds AIOS_GRPC_LISTEN_ADDR while clients dial AIOS_<SERVICE>_ADDR")


def test_metrics_bind_the_configured_host() -> None:
    _need("metrics_host" in _source("services/common/runtime.py"),
          "services/common/runtime.py: metrics.start_metrics_server(metrics_port, host=settings.metrics_host), "
          "or Prometheus cannot scrape a pod")


def test_kafka_clients_use_the_security_settings() -> None:
    sources = _source("services/common/kafka.py") + _source("services/common/runtime.py")
    _need("kafka_client_config(" in sources,
          "every Producer/Consumer/AdminClient conf gets **settings.kafka_client_config() "
          "(services/common/kafka.py via runtime.py; also tools/aios/clients.py and dlq.py)")


def test_services_leave_topic_creation_to_the_job() -> None:
    _need("create_topics_at_start" in _source("services/common/runtime.py"),
          "services/common/runtime.py ensure_topics: return when not settings.create_topics_at_start")


def test_inference_app_is_importable_by_a_serve_config() -> None:
    tree = ast.parse(_source("services/inference/app.py"))
    ray = kube.by_kind(kube.render_preset("default"), "RayService")[0]
    module, target = yaml.safe_load(ray["spec"]["serveConfigV2"])["applications"][0]["import_path"].split(":")
    assert module == "services.inference.app"
    _need(any(isinstance(n, ast.FunctionDef) and n.name == target for n in tree.body),
          f"services/inference/app.py: def {target}(args: dict) -> Application (a Serve application builder "
          "returning build_app(classifier path from AIOS_CACHE_DIR, torch_threads=args['torch_threads'], "
          "cost_per_1k_texts=args['cost_per_1k_texts']))")


def test_bulk_tier_can_use_the_gpu_it_is_given() -> None:
    _need("cuda" in _source("services/inference/model.py"),
          "services/inference/model.py load_encoder: device='cuda' when torch.cuda.is_available() "
          "(today always 'cpu', so a GPU worker computes on CPU)")


_IMAGE_ONLY = """
import sys
# The image's /app only: no repository checkout, no editable install of it.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__") and p not in ("", {repo!r})]
from services.common.settings import MeshSettings
from tools.aios.clients import load_cli_settings
print(load_cli_settings(MeshSettings).grpc_auth)
"""


def test_cli_loads_its_settings_from_the_image_contents(tmp_path: Path) -> None:
    """The helm test pod runs `aios status` from the image: lay out what the Dockerfile copies to /app
    and load the CLI's settings as the test pod's environment gives them."""
    import shutil
    import subprocess
    import sys

    app = tmp_path / "app"
    for line in (kube.REPO / "docker" / "aios-mesh.Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--") and len(parts) == 3 and parts[1] != "proto/":
            source, target = kube.REPO / parts[1], app / parts[2]
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            elif "requirements" not in parts[1] and "constraints" not in parts[1]:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}
    env.update(PYTHONPATH=f"{app}:{kube.REPO / 'gen'}", AIOS_GRPC_AUTH="none", HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _IMAGE_ONLY.format(repo=str(kube.REPO))], cwd=app, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "none", done.stderr[-600:]
