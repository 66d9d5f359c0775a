"""Composition root of the inference process (``python -m services.inference``).

Starts a private Ray cluster on loopback (see ``cluster``), deploys the Serve
application with its HTTP proxy on AIOS_INFERENCE_HOST:AIOS_INFERENCE_PORT,
logs "inference ready" once /healthz answers 200, and on SIGTERM/SIGINT shuts
Serve and Ray down and checks that no process of its cluster is left."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from services.common.logs import configure_logging
from services.common.settings import MeshSettings, load_settings
from services.inference import model
from services.inference.cluster import (
    PORT_SPAN,
    LocalRayCluster,
    RayPorts,
    RayStartFailed,
    become_subreaper,
    reap_children,
    temp_dir_for,
)
from services.inference.tiers import DEFAULT_CACHE_ITEMS, TIER_NAMES, TierSpec, with_overrides

log = logging.getLogger("aios.inference")
KEEP_SESSIONS = 3


class InferenceSettings(MeshSettings):
    """AIOS_INFERENCE_*, AIOS_RAY_PORT_BASE, AIOS_RUN_DIR, AIOS_CACHE_DIR."""

    inference_host: str = Field("127.0.0.1", min_length=1, description="Serve HTTP proxy bind address")
    inference_port: int = Field(18000, ge=1, le=65535, description="Serve HTTP proxy port")
    ray_port_base: int = Field(16400, ge=1024, le=65535 - PORT_SPAN,
                               description=f"first of the {PORT_SPAN} ports the private Ray cluster uses")
    run_dir: Path = Field(model.REPO / ".run", description="Ray's temp dir goes under it")
    cache_dir: Path = Field(model.REPO / ".cache", description="holds intent-classifier.joblib")
    inference_ray_num_cpus: int = Field(max(1, os.cpu_count() or 1), ge=1, le=256)
    inference_torch_threads: int = Field(2, ge=1, le=64, description="torch threads per model replica, unless "
                                         "the tier sets its own")
    inference_cost_per_1k_texts: float = Field(0.0, ge=0.0, description="reported by /v1/models")
    inference_start_timeout_s: float = Field(240.0, gt=0, description="deadline for /healthz to turn 200")
    inference_embedding_cache_size: int = Field(DEFAULT_CACHE_ITEMS, ge=0, le=1_000_000,
                                                description="texts whose vectors the router keeps (0: off)")
    inference_ray_worker_niceness: int = Field(0, ge=0, le=19, description="nice value of every Ray worker "
                                               "(Ray's default, 15, lets any busy process on the box delay "
                                               "the proxy, the router and the low-latency tier)")
    # Per tier: AIOS_INFERENCE_LOW_LATENCY_<FIELD> and AIOS_INFERENCE_HIGH_THROUGHPUT_<FIELD>, one per
    # TierSpec field (services/inference/tiers.py, which holds the defaults and validates them).
    inference_low_latency_device: str | None = None
    inference_low_latency_replicas: int | None = None
    inference_low_latency_num_cpus: float | None = None
    inference_low_latency_num_gpus: float | None = None
    # One thread on the embedded stack, where the tiers share cores: torch's fork-join threads stall
    # whenever the kernel runs a bulk-tier thread on one of their cores (measured p95 106 ms with
    # two threads under bulk load, 17 ms with one), and one short text barely gains from two.
    inference_low_latency_torch_threads: int | None = 1
    inference_low_latency_max_batch_size: int | None = None
    inference_low_latency_encode_batch_size: int | None = None
    inference_low_latency_batch_wait_ms: float | None = None
    inference_low_latency_max_ongoing_requests: int | None = None
    inference_low_latency_nice: int | None = None
    inference_low_latency_sched_idle: bool | None = None
    inference_low_latency_direct_port: int | None = None
    inference_low_latency_direct_host: str | None = None
    inference_high_throughput_device: str | None = None
    inference_high_throughput_replicas: int | None = None
    inference_high_throughput_num_cpus: float | None = None
    inference_high_throughput_num_gpus: float | None = None
    inference_high_throughput_torch_threads: int | None = None
    inference_high_throughput_max_batch_size: int | None = None
    inference_high_throughput_encode_batch_size: int | None = None
    inference_high_throughput_batch_wait_ms: float | None = None
    inference_high_throughput_max_ongoing_requests: int | None = None
    inference_high_throughput_nice: int | None = None
    inference_high_throughput_sched_idle: bool | None = None
    inference_high_throughput_direct_port: int | None = None
    inference_high_throughput_direct_host: str | None = None

    @field_validator("run_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _http_port_outside_ray_ports(self) -> InferenceSettings:
        if self.ray_port_base <= self.inference_port < self.ray_port_base + PORT_SPAN:
            raise ValueError(f"AIOS_INFERENCE_PORT={self.inference_port} falls inside the Ray ports "
                             f"AIOS_RAY_PORT_BASE={self.ray_port_base}..{self.ray_port_base + PORT_SPAN - 1}; "
                             "move one of them")
        return self

    @model_validator(mode="after")
    def _tiers_valid(self) -> InferenceSettings:
        self.tier_specs()
        return self

    def tier_specs(self) -> dict[str, TierSpec]:
        """Each tier's spec: its defaults with every AIOS_INFERENCE_<TIER>_* that is set."""
        overrides = {tier: {name: value for name in TierSpec.model_fields
                            if (value := getattr(self, f"inference_{tier}_{name}")) is not None}
                     for tier in TIER_NAMES}
        try:
            return with_overrides(overrides)
        except ValueError as exc:
            raise ValueError(f"AIOS_INFERENCE_LOW_LATENCY_* / AIOS_INFERENCE_HIGH_THROUGHPUT_*: {exc}") from None


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived while starting: abandon the start and clean up."""


class _Stopper:
    """Signal handling: during start-up a signal interrupts the blocking call in
    progress (a start can take 30 s; the launcher waits ~15 s); later it only
    sets the event the main loop waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.starting = True

    def __call__(self, signum: int, _frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        self.event.set()
        if self.starting:
            self.starting = False
            raise StopRequested


def _ray_env(settings: InferenceSettings) -> dict[str, str]:
    env = dict(os.environ)
    # Replicas import services.inference.* whatever Ray's working dir is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(model.REPO), env.get("PYTHONPATH", "")) if p)
    env.update({"AIOS_CACHE_DIR": str(settings.cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                # Read by the raylet: the priority every worker (proxy, router, tiers) starts at. The
                # tiers then set their model threads' own (TierSpec.nice).
                "RAY_worker_niceness": str(settings.inference_ray_worker_niceness)})
    # Serve runs user code, and a handle's router, on event loops of their own threads by
    # default: every request then crosses threads several times, each crossing waiting for the
    # kernel to schedule the other thread. Our code never blocks its loop (the model computes on
    # its own thread), so one loop serves: measured 1-2 ms less per request through the proxy.
    env.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    env.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
    return env


def _install(stopper: _Stopper) -> None:
    signal.signal(signal.SIGTERM, stopper)
    signal.signal(signal.SIGINT, stopper)


def _deploy(settings: InferenceSettings, cluster: LocalRayCluster, classifier: Path, stopper: _Stopper) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the driver too, or it advertises a non-loopback IP
    import ray
    from ray import serve

    from services.inference.app import build_app

    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace="aios-inference",
             log_to_driver=False, logging_level=logging.WARNING)
    # ray.init replaces the SIGTERM handler (with sys.exit, and its C++ core
    # worker with a crash handler): take it back so a stop is graceful.
    _install(stopper)
    # Access logs off: a log line per request in the proxy, the router and the
    # tier costs measurable CPU on 2 cores; errors are still logged.
    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": settings.inference_host, "port": settings.inference_port},
                logging_config=quiet)
    tiers = settings.tier_specs()
    log.info("tiers: %s", {name: spec.model_dump() for name, spec in tiers.items()})
    serve.run(build_app(classifier, torch_threads=settings.inference_torch_threads,
                        cost_per_1k_texts=settings.inference_cost_per_1k_texts, tiers=tiers,
                        embedding_cache_size=settings.inference_embedding_cache_size),
              name="inference", route_prefix="/", logging_config=quiet)


def _wait_healthy(settings: InferenceSettings, stop: threading.Event) -> bool:
    import httpx

    url = f"http://{settings.inference_host}:{settings.inference_port}/healthz"
    deadline = time.monotonic() + settings.inference_start_timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if httpx.get(url, timeout=3.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(0.25)
    return False


def _bounded(step: str, fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run a shutdown step in a thread with a deadline, so a hung Ray call
    cannot block the exit (the launcher SIGKILLs us ~15 s after SIGTERM)."""
    ok = threading.Event()

    def run() -> None:
        try:
            fn()
            ok.set()
        except Exception as exc:  # shutdown goes on regardless: the PIDs are killed next
            log.warning("%s failed: %s", step, exc)

    worker = threading.Thread(target=run, name=step, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("%s did not finish within %.0f s; killing Ray by PID", step, timeout_s)
    return ok.is_set()


def shutdown(cluster: LocalRayCluster, deployed: bool) -> bool:
    """Serve, then the driver, then every process of the cluster by PID; True if none is left.

    The launcher signals our whole process group, which holds the Ray daemons:
    then the cluster is already collapsing and we go straight to the PIDs
    (a graceful Serve shutdown would only wait out its timeout)."""
    import ray

    time.sleep(0.3)  # let the daemons that share our group's signal react to it
    graceful = deployed and ray.is_initialized() and not cluster.daemons_signalled()
    if graceful:
        from ray import serve

        graceful = _bounded("serve.shutdown", serve.shutdown, 5.0)
    if graceful:
        _bounded("ray.shutdown", ray.shutdown, 2.0)
    started = len(cluster.pids())
    left = cluster.stop(grace_s=2.0)
    if left:
        log.error("Ray processes still alive after SIGKILL: %s", left)
        return False
    log.info("inference stopped; %d Ray process(es) of %s stopped, none left (graceful serve shutdown: %s)",
             started, cluster.temp_dir, "yes" if graceful else "no")
    (cluster.temp_dir / "owner.pid").unlink(missing_ok=True)
    return True


def _claim_temp_dir(cluster: LocalRayCluster) -> None:
    """One owner per Ray temp dir. Processes left there by an owner that died
    (kill -9) hold our ports: stop them by PID before starting."""
    owner_file = cluster.temp_dir / "owner.pid"
    if owner_file.exists():
        try:
            owner = int(owner_file.read_text().strip())
        except ValueError:
            owner = 0
        if owner and owner != os.getpid() and Path(f"/proc/{owner}").exists() and \
                "services.inference" in Path(f"/proc/{owner}/cmdline").read_bytes().decode(errors="replace"):
            raise RayStartFailed(f"another inference process (pid {owner}) owns {cluster.temp_dir}; "
                                 "stop it or use another AIOS_RAY_PORT_BASE")
    stale = cluster.pids()
    if stale:
        log.warning("stopping %d Ray process(es) left in %s by a previous run: %s", len(stale),
                    cluster.temp_dir, stale)
        cluster.stop(grace_s=2.0)
    cluster.temp_dir.mkdir(parents=True, exist_ok=True)
    owner_file.write_text(str(os.getpid()))
    # Every start leaves a session dir of Ray logs (~1-5 MB): keep the last few.
    sessions = sorted(cluster.temp_dir.glob("session_2*"), key=lambda p: p.stat().st_mtime)
    for old in sessions[:-KEEP_SESSIONS]:
        shutil.rmtree(old, ignore_errors=True)


def _serve_until_stopped(settings: InferenceSettings, cluster: LocalRayCluster, stopper: _Stopper) -> int:
    started = time.monotonic()
    if not _wait_healthy(settings, stopper.event):
        if stopper.event.is_set():
            return 0
        log.error("inference not healthy after %.0f s; see Ray logs in %s",
                  settings.inference_start_timeout_s, cluster.temp_dir)
        return 1
    log.info("inference ready", extra={"fields": {
        "url": f"http://{settings.inference_host}:{settings.inference_port}",
        "healthy_after_s": round(time.monotonic() - started, 1), "ray_temp_dir": str(cluster.temp_dir)}})
    while not stopper.event.wait(2.0):
        reap_children()
        if not cluster.core_alive():  # exit so the launcher sees we are down
            log.error("Ray GCS or raylet died; stopping")
            return 1
    return 0


def main() -> int:
    settings = load_settings(InferenceSettings)
    configure_logging("inference", settings.log_level, settings.log_format)
    os.environ["AIOS_CACHE_DIR"] = str(settings.cache_dir)
    classifier = model.classifier_path(settings.cache_dir)
    if not classifier.exists():
        log.error("intent classifier cache not found at %s: run `make model` / "
                  "`python -m services.inference.fit` first", classifier)
        return 1
    ports = RayPorts(settings.ray_port_base)
    cluster = LocalRayCluster(ports, temp_dir_for(settings.run_dir, ports.base),
                              num_cpus=settings.inference_ray_num_cpus, env=_ray_env(settings))
    stopper = _Stopper()
    _install(stopper)
    become_subreaper()
    deployed = False
    t0 = time.monotonic()
    try:
        _claim_temp_dir(cluster)
        cluster.check_ports({"inference_http": settings.inference_port})
        cluster.start()
        log.info("ray cluster up at %s in %.1f s (temp dir %s)", cluster.address, time.monotonic() - t0,
                 cluster.temp_dir)
        deployed = True
        _deploy(settings, cluster, classifier, stopper)
        stopper.starting = False
        log.info("serve application deployed in %.1f s", time.monotonic() - t0)
        code = _serve_until_stopped(settings, cluster, stopper)
    except StopRequested:
        code = 0
    except RayStartFailed as exc:
        log.error("%s", exc)
        code = 1
    except Exception:
        log.exception("inference failed")
        code = 1
    finally:
        stopper.starting = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
    clean = shutdown(cluster, deployed)
    return code if clean else 1
