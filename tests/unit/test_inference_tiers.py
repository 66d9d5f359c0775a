"""Each tier's device, replicas, CPU/GPU share, threads and batching come from settings: the embedded
stack's AIOS_INFERENCE_<TIER>_* and KubeRay's Serve config args reach the same TierSpec, and
build_app turns it into Serve deployment options and replica arguments (binding only: no Ray starts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve deploy` runs

from services.common.settings import load_settings
from services.inference import app, model, tiers
from services.inference.main import InferenceSettings

pytestmark = pytest.mark.timeout(60)


def _bound(application: Any) -> Any:
    return application._bound_deployment  # Serve's Application keeps the bound deployment here


def _tiers_of(router: Any) -> dict[str, Any]:
    low, high = router.init_args[:2]
    return {"low_latency": _bound(low), "high_throughput": _bound(high)}


def test_defaults_keep_the_low_latency_tier_first() -> None:
    ll, ht = tiers.DEFAULT_TIERS["low_latency"], tiers.DEFAULT_TIERS["high_throughput"]
    assert ll.batch_wait_ms == 0 and ll.max_batch_size < ht.max_batch_size
    assert ll.nice == 0 < ht.nice and not ht.sched_idle
    # Serve caps a batch at max_ongoing_requests calls: room for the batches handed over at once.
    for spec in (ll, ht):
        assert spec.max_ongoing_requests >= spec.max_batch_size * app.HANDOVER


@pytest.mark.parametrize(("fields", "says"), [
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"max_batch_size": 512, "max_ongoing_requests": 64}, "batches can never fill"),
    ({"nice": 20}, "nice"),
    ({"replicas": 0}, "replicas"),
    ({"max_batch": 5}, "max_batch"),
])
def test_a_bad_tier_field_fails_naming_the_tier_and_field(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match="tier high_throughput") as err:
        tiers.with_overrides({"high_throughput": fields})
    assert says in str(err.value)


def test_an_unknown_tier_is_named() -> None:
    with pytest.raises(ValueError, match="unknown tier"):
        tiers.with_overrides({"bulk": {"replicas": 2}})


def test_environment_sets_each_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AIOS_INFERENCE_HIGH_THROUGHPUT_DEVICE": "cuda", "AIOS_INFERENCE_HIGH_THROUGHPUT_NUM_GPUS": "1",
                        "AIOS_INFERENCE_HIGH_THROUGHPUT_REPLICAS": "3",
                        "AIOS_INFERENCE_HIGH_THROUGHPUT_MAX_BATCH_SIZE": "256",
                        "AIOS_INFERENCE_LOW_LATENCY_TORCH_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    specs = load_settings(InferenceSettings).tier_specs()
    ht, ll = specs["high_throughput"], specs["low_latency"]
    assert (ht.device, ht.num_gpus, ht.replicas, ht.max_batch_size) == ("cuda", 1.0, 3, 256)
    assert ht.nice == tiers.DEFAULT_TIERS["high_throughput"].nice  # unset: the tier's default
    assert ll.threads(2) == 1 and ht.threads(2) == 2


def test_the_embedded_stack_gives_the_low_latency_tier_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the tiers share cores, one thread (no fork-join stalls); elsewhere the app-wide count."""
    for name in ("AIOS_INFERENCE_TORCH_THREADS", "AIOS_INFERENCE_LOW_LATENCY_TORCH_THREADS"):
        monkeypatch.delenv(name, raising=False)
    specs = load_settings(InferenceSettings).tier_specs()
    assert specs["low_latency"].threads(2) == 1 and specs["high_throughput"].threads(2) == 2
    assert tiers.DEFAULT_TIERS["low_latency"].threads(4) == 4  # KubeRay: torch_threads from the Serve args


def test_a_bad_variable_stops_the_process_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AIOS_INFERENCE_LOW_LATENCY_DEVICE", "tpu")
    with pytest.raises(SystemExit):
        load_settings(InferenceSettings)
    assert "AIOS_INFERENCE_LOW_LATENCY_" in capsys.readouterr().err


def test_build_app_applies_each_tier_as_deployment_options(tmp_path: Path) -> None:
    specs = tiers.with_overrides({"high_throughput": {"replicas": 2, "num_cpus": 4, "num_gpus": 1,
                                                      "device": "cuda", "max_batch_size": 512,
                                                      "max_ongoing_requests": 2048, "torch_threads": 4}})
    router = _bound(app.build_app(tmp_path / model.CLASSIFIER_FILE, torch_threads=2, tiers=specs,
                                  embedding_cache_size=10))
    bound = _tiers_of(router)
    ht, ll = bound["high_throughput"], bound["low_latency"]
    assert ht.num_replicas == 2 and ht.max_ongoing_requests == 2048
    assert ht.ray_actor_options["num_cpus"] == 4 and ht.ray_actor_options["num_gpus"] == 1
    assert ht.init_args[1] == 4 and ht.init_kwargs["spec"]["device"] == "cuda"
    assert ll.init_args[1] == 2 and "num_gpus" not in ll.ray_actor_options
    assert router.init_kwargs["tier_specs"]["high_throughput"]["max_batch_size"] == 512
    assert router.init_kwargs["embedding_cache_size"] == 10


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / model.CLASSIFIER_FILE).write_bytes(b"fitted elsewhere")  # binding loads nothing
    monkeypatch.setenv("AIOS_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_serve_config_args_configure_a_gpu_bulk_tier(cache: Path) -> None:
    router = _bound(call_user_app_builder_with_args_if_necessary(app.app_builder, {
        "torch_threads": 4, "high_throughput": {"device": "cuda", "max_batch_size": 512, "encode_batch_size": 512,
                                                "max_ongoing_requests": 2048}}))
    spec = _tiers_of(router)["high_throughput"].init_kwargs["spec"]
    assert (spec["device"], spec["max_batch_size"], spec["encode_batch_size"]) == ("cuda", 512, 512)


def test_a_bad_tier_arg_fails_the_deploy_naming_it(cache: Path) -> None:
    with pytest.raises(ValidationError, match="max_batch_size"):
        call_user_app_builder_with_args_if_necessary(app.app_builder, {"low_latency": {"max_batch_size": 0}})


def test_cuda_without_a_gpu_says_how_to_get_one() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="num_gpus"):
        model.device("cuda")
    assert model.device("auto") == "cpu" and model.device("cpu") == "cpu"
