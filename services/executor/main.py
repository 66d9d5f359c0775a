"""The executor's composition root."""

from __future__ import annotations

import importlib
import os

from pydantic import Field

from services.common.runtime import ServiceRuntime
from services.common.settings import MeshSettings, load_settings
from services.executor.connectors import HttpConnectors
from services.executor.generator import ExtractiveGenerator, OpenAICompatibleGenerator, ReplyGenerator
from services.executor.handlers import Executor
from services.executor.tools import Toolbox


class ExecutorSettings(MeshSettings):
    executor_metrics_port: int = Field(9102, ge=0, le=65535)
    executor_workers: int = Field(16, ge=1, le=256, description="steps run concurrently per replica")
    executor_batch_size: int = Field(32, ge=1, le=1000)
    executor_generator_url: str = Field("", description="OpenAI-compatible endpoint; empty = offline extractive")
    executor_generator_model: str = Field("", description="model name for the generator endpoint")
    executor_plugins: str = Field("", description="comma list of Python modules that register extra tools")
    sandbox_url: str = Field("http://127.0.0.1:18100", description="sandbox third-party API (demo, tests)")


def make_generator(settings: ExecutorSettings) -> ReplyGenerator:
    if settings.executor_generator_url:
        return OpenAICompatibleGenerator(settings.executor_generator_url, settings.executor_generator_model or "default",
                                         os.environ.get("AIOS_EXECUTOR_GENERATOR_API_KEY", ""))
    return ExtractiveGenerator()


def bootstrap(settings: ExecutorSettings) -> ServiceRuntime:
    os.environ.setdefault("AIOS_SANDBOX_URL", settings.sandbox_url)
    for module in filter(None, (m.strip() for m in settings.executor_plugins.split(","))):
        importlib.import_module(module)  # registers its @tool functions
    rt = ServiceRuntime("executor", settings, metrics_port=settings.executor_metrics_port)
    rt.ensure_topics()
    toolbox = Toolbox(HttpConnectors(rt.redis), settings.memory_addr, make_generator(settings))
    executor = Executor(toolbox=toolbox, producer=rt.producer, redis_client=rt.redis,
                        name=f"executor-{os.getpid()}", workers=settings.executor_workers)
    rt.serve(settings.executor_addr, [])  # health and reflection only
    rt.consume("executor", ["step_requests"], executor.handle, batch_size=settings.executor_batch_size)
    rt.on_stop(executor.close)
    return rt


def main() -> None:
    bootstrap(load_settings(ExecutorSettings)).run_until_stopped()
