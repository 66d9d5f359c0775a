"""What the chart sets must be used by code outside the chart's files. Each
check names the change it needs when it fails. The chart works end to end only
when all of them pass (the behaviour behind each is tested in tests/unit and
tests/integration: test_runtime_settings, test_kafka_clients, test_consumer_lag,
test_topics_apply, test_inference_app_builder)."""

from __future__ import annotations

import ast

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
