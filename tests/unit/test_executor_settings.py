"""The generator's API key is a setting (AIOS_EXECUTOR_GENERATOR_API_KEY, from a Secret in the
chart) that never shows in a repr or a log line, and reaches the generator's requests."""

from __future__ import annotations

import pytest

from services.executor.adapters.generator import ExtractiveGenerator, OpenAICompatibleGenerator
from services.executor.main import ExecutorSettings, make_generator

pytestmark = pytest.mark.timeout(30)


def test_the_api_key_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOS_EXECUTOR_GENERATOR_API_KEY", raising=False)
    settings = ExecutorSettings(executor_generator_url="http://127.0.0.1:9/v1", executor_generator_api_key="k-123")
    generator = make_generator(settings)
    assert isinstance(generator, OpenAICompatibleGenerator)
    assert generator.client.headers["Authorization"] == "Bearer k-123"
    assert "k-123" not in repr(settings) and "k-123" not in str(settings.model_dump())


def test_the_api_key_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_EXECUTOR_GENERATOR_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("AIOS_EXECUTOR_GENERATOR_API_KEY", "k-from-secret")
    generator = make_generator(ExecutorSettings())
    assert isinstance(generator, OpenAICompatibleGenerator)
    assert generator.client.headers["Authorization"] == "Bearer k-from-secret"


def test_no_key_sends_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOS_EXECUTOR_GENERATOR_API_KEY", raising=False)
    generator = make_generator(ExecutorSettings(executor_generator_url="http://127.0.0.1:9/v1"))
    assert isinstance(generator, OpenAICompatibleGenerator) and "Authorization" not in generator.client.headers
    monkeypatch.delenv("AIOS_EXECUTOR_GENERATOR_URL", raising=False)
    assert isinstance(make_generator(ExecutorSettings(executor_generator_url="")), ExtractiveGenerator)
