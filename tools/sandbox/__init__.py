"""Sandbox third-party API (bank + shop stand-in) for tests, the demo and benchmarks.

``python -m tools.sandbox --port N`` serves it; ``tools.sandbox.api.create_app()`` gives an in-process ASGI
app; ``tools.sandbox.client.SandboxClient`` drives its control plane (effects, faults, reset)."""

from tools.sandbox.api import create_app

__all__ = ["create_app"]
