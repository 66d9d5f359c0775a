"""How each tier runs: device, replicas, CPU/GPU share, torch threads and batching.

Pure (pydantic only, no Ray or torch) so settings, the Serve app builder and the
unit tests share one definition. The embedded stack fills a ``TierSpec`` per
tier from ``AIOS_INFERENCE_<TIER>_*`` (``services.inference.main``); KubeRay
fills it from the Serve config's ``args`` (``services.inference.app:AppArgs``).
The same code path serves a CPU box and a GPU pool: only these values change.

Why the two tiers differ:

- low_latency answers one interactive request at a time: it never waits to
  fill a batch (``batch_wait_ms`` 0) and its batches stay small, so a request
  never queues behind a big one.
- high_throughput packs texts of concurrent requests into one model call
  (``max_batch_size`` texts, waiting at most ``batch_wait_ms`` for more) and
  runs its model thread at a lower CPU priority (``nice`` 10): where both tiers
  share cores (the embedded stack), the kernel gives the low-latency tier, and
  the proxy and router in front of it, ~90% of a core they contend for, and the
  bulk tier takes what is left. ``sched_idle`` goes further (the bulk tier gets
  only CPU nothing else wants, and yields at once) but costs it dearly: torch's
  threads meet at a barrier after every operation, so each wake-up of any other
  thread stalls them all (measured once, in the embedded stack on a busy 2-core
  box: the bulk tier at 48% of the in-process ceiling).
  On Kubernetes each tier has its own worker pods, so neither matters there."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TIER_NAMES = ("low_latency", "high_throughput")
DEFAULT_CACHE_ITEMS = 4096  # the router's embedding cache (services.inference.cache)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class TierSpec(BaseModel):
    """One tier's deployment and batching. ``torch_threads`` None means the app-wide value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="auto (cuda when the replica was given a GPU), cpu, cuda or cuda:N")
    replicas: int = Field(1, ge=1, le=256, description="Serve replicas of this tier")
    num_cpus: float = Field(1.0, ge=0, le=256, description="Ray CPUs reserved per replica (placement only)")
    num_gpus: float = Field(0.0, ge=0, le=16, description="Ray GPUs per replica; > 0 puts the model on a GPU")
    torch_threads: int | None = Field(None, ge=1, le=256, description="intra-op threads per replica")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most texts in one model call")
    encode_batch_size: int = Field(32, ge=1, le=4096, description="texts per forward pass inside a model call "
                                   "(sorted by length first, which cuts padding); on a GPU use max_batch_size")
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="longest wait for more texts to fill a batch")
    max_ongoing_requests: int = Field(256, ge=1, le=100_000, description="calls a replica holds (queued + running)")
    nice: int = Field(0, ge=0, le=19, description="CPU priority of the model thread (higher yields more)")
    sched_idle: bool = Field(False, description="run the model thread under SCHED_IDLE: only CPU nothing else "
                             "wants, and any other thread that wakes takes the core at once (nice is then moot)")
    direct_port: int = Field(0, ge=0, le=65535, description="the tier's own HTTP door: each replica also answers "
                             "/v1/classify and /v1/embed of its latency class on this port, past Serve's proxy "
                             "and router (replicas on one host share it, SO_REUSEPORT); 0 = none")
    direct_host: str = Field("127.0.0.1", min_length=1, description="address the direct door binds "
                             "(0.0.0.0 in a pod, so a Kubernetes Service reaches it)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {value!r}")
        return value

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> TierSpec:
        # A batch may be made of single-text calls: a replica holding fewer calls
        # than max_batch_size could never fill one (Serve's default cap is 5).
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        return self

    def threads(self, default: int) -> int:
        return self.torch_threads or default

    def actor_options(self) -> dict[str, Any]:
        """Serve deployment options of this tier (a Serve config's ``deployments`` entry overrides them)."""
        ray_actor_options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            ray_actor_options["num_gpus"] = self.num_gpus
        return {"num_replicas": self.replicas, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": ray_actor_options}


# The defaults fit the embedded stack on a 2-core box: both tiers on the same
# cores, the low-latency tier first. The bulk tier's model calls are large
# because MiniLM on CPU gains from them: the texts of one call are sorted by
# length before the forward passes, so a bigger call pads less (measured
# in-process, forward passes of 32: 130 texts/s in calls of 64, 185 in calls of
# 128, 225 in calls of 256, 255 in calls of 512). On a GPU pool raise
# max_batch_size and encode_batch_size together (512-1024) and give the tier
# num_gpus 1. The bulk tier's 10 ms wait catches the burst of requests its
# callers send as a model call's answers reach them, so the next Serve batch
# carries most of a model call instead of one request.
DEFAULT_TIERS: dict[str, TierSpec] = {
    "low_latency": TierSpec.model_validate({"num_cpus": 0.5, "max_batch_size": 8, "batch_wait_ms": 0.0,
                                            "max_ongoing_requests": 32, "nice": 0}),
    "high_throughput": TierSpec.model_validate({"num_cpus": 1.0, "max_batch_size": 512, "batch_wait_ms": 10.0,
                                                "max_ongoing_requests": 2048, "nice": 10}),
}


def with_overrides(overrides: dict[str, dict[str, Any]] | None) -> dict[str, TierSpec]:
    """The default specs with some fields replaced, validated; unknown tiers or fields fail naming them."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(TIER_NAMES))
    if unknown:
        raise ValueError(f"unknown tier(s) {unknown}; the tiers are {list(TIER_NAMES)}")
    specs = {}
    for name in TIER_NAMES:
        try:
            specs[name] = TierSpec.model_validate({**DEFAULT_TIERS[name].model_dump(exclude_unset=True),
                                                   **overrides.get(name, {})})
        except ValueError as exc:  # pydantic's ValidationError is one
            raise ValueError(f"tier {name}: {exc}") from None
    return specs
