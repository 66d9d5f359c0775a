"""The inference application as KubeRay deploys it: ``services.inference.app:app_builder`` from a
Serve config, called the way Serve calls an application builder (binding only: no Ray starts),
and the encoder on the GPU a replica was given."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve deploy` runs

from services.inference import app, model
from tests.chart import kube

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """AIOS_CACHE_DIR with a classifier file (only its path is used: binding loads nothing)."""
    (tmp_path / model.CLASSIFIER_FILE).write_bytes(b"fitted elsewhere")
    monkeypatch.setenv("AIOS_CACHE_DIR", str(tmp_path))
    return tmp_path


def _bound(application: Any) -> Any:
    return application._bound_deployment  # Serve's Application keeps the bound deployment here


def test_serve_builds_the_router_and_both_tiers_from_the_config_args(cache: Path) -> None:
    router = _bound(call_user_app_builder_with_args_if_necessary(
        app.app_builder, {"torch_threads": 3, "cost_per_1k_texts": 0.25}))
    assert router.name == "InferenceRouter"
    low, high, cost = router.init_args
    assert cost == 0.25
    classifier = str(cache.resolve() / model.CLASSIFIER_FILE)
    assert (_bound(low).name, _bound(low).init_args) == ("LowLatencyEncoder", (classifier, 3))
    assert (_bound(high).name, _bound(high).init_args) == ("HighThroughputEncoder", (classifier, 3))


def test_defaults_apply_when_the_config_gives_no_args(cache: Path) -> None:
    router = _bound(call_user_app_builder_with_args_if_necessary(app.app_builder, {}))
    assert router.init_args[2] == 0.0 and _bound(router.init_args[0]).init_args[1] == 2


@pytest.mark.parametrize(("args", "names"), [({"torch_thread": 2}, "torch_thread"),
                                             ({"torch_threads": 0}, "torch_threads"),
                                             ({"cost_per_1k_texts": -1}, "cost_per_1k_texts")])
def test_a_bad_config_arg_fails_the_deploy_naming_it(cache: Path, args: dict[str, Any], names: str) -> None:
    with pytest.raises(ValidationError, match=names):
        call_user_app_builder_with_args_if_necessary(app.app_builder, args)


def test_a_missing_classifier_fails_the_deploy_saying_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_CACHE_DIR", str(tmp_path))
    with pytest.raises(model.ClassifierMissing, match=str(tmp_path)):
        call_user_app_builder_with_args_if_necessary(app.app_builder, {})


@pytest.mark.parametrize("preset", sorted(kube.presets()))
def test_the_charts_serve_config_args_are_accepted(preset: str) -> None:
    for rayservice in kube.by_kind(kube.render_preset(preset), "RayService"):
        for application in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]:
            assert application["import_path"] == "services.inference.app:app_builder"
            app.AppArgs.model_validate(application.get("args", {}))


@pytest.mark.parametrize(("cuda", "expected"), [(True, "cuda"), (False, "cpu")])
def test_the_encoder_computes_on_the_gpu_when_there_is_one(cuda: bool, expected: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    built: list[str] = []

    class SentenceTransformer:
        def __init__(self, _path: str, device: str) -> None:
            built.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setitem(sys.modules, "sentence_transformers",
                        types.SimpleNamespace(SentenceTransformer=SentenceTransformer))
    monkeypatch.setattr(torch, "set_num_threads", lambda _n: None)  # leave this process's threads alone
    model.load_encoder()
    assert built == [expected]
