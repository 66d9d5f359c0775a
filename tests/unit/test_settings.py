"""A bad setting stops a service at start-up with exit code 2 and a message
that names the variable and says how to fix it (docs/CONVENTIONS.md, Settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.settings import MeshSettings, load_settings

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _start_planner(**bad: str) -> subprocess.CompletedProcess[str]:
    # Only the bad variable is set: nothing else the planner reads can fail first, and should validation
    # wrongly pass, the planner points at nothing and the timeout below kills it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **bad})
    return subprocess.run([sys.executable, "-m", "services.planner"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("name", "value"), [
    ("AIOS_FETCH_WAIT_MS", "abc"),
    ("AIOS_PLANNER_METRICS_PORT", "-1"),
])
def test_bad_setting_exits_2_naming_the_variable_and_the_fix(name: str, value: str) -> None:
    proc = _start_planner(**{name: value})
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert name in proc.stderr, proc.stderr
    assert repr(value) in proc.stderr, f"the offending value should be shown: {proc.stderr}"
    assert "fix the environment variable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, f"a bad setting is a message, not a crash: {proc.stderr}"
    # Only the bad variable is reported, not every setting.
    flagged = [line for line in proc.stderr.splitlines() if line.strip().startswith("AIOS_")]
    assert len(flagged) == 1 and flagged[0].strip().startswith(f"{name}="), proc.stderr


# -- settings the Helm chart relies on ---------------------------------------------------------------
# In-process: load_settings with a controlled environment, the same path a service takes at start.

def _load(monkeypatch: pytest.MonkeyPatch, **env: str) -> MeshSettings:
    for name in list(os.environ):
        if name.startswith("AIOS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(MeshSettings)


def _refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], **env: str) -> str:
    with pytest.raises(SystemExit) as info:
        _load(monkeypatch, **env)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_defaults_change_nothing_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch)
    assert s.metrics_host == "127.0.0.1"
    assert s.listen_addr(s.planner_addr) == "127.0.0.1:50051"  # bind what clients dial, as before
    assert s.kafka_client_config() == {}  # PLAINTEXT: the clients get exactly the config they had
    assert s.create_topics_at_start is True


def test_listen_and_advertise_addresses_are_separate(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, AIOS_GRPC_LISTEN_ADDR="0.0.0.0:50051", AIOS_PLANNER_ADDR="aios-planner.ns.svc:50051",
              AIOS_METRICS_HOST="0.0.0.0")
    assert s.listen_addr(s.planner_addr) == "0.0.0.0:50051"
    assert s.planner_addr == "aios-planner.ns.svc:50051"
    assert s.metrics_host == "0.0.0.0"


def test_sasl_ssl_settings_become_librdkafka_config(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, AIOS_KAFKA_SECURITY_PROTOCOL="SASL_SSL", AIOS_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
              AIOS_KAFKA_SASL_USERNAME="mesh", AIOS_KAFKA_SASL_PASSWORD="pw",
              AIOS_KAFKA_SSL_CA_LOCATION="/etc/aios/kafka-tls/ca.crt")
    assert s.kafka_client_config() == {
        "security.protocol": "sasl_ssl", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "mesh",
        "sasl.password": "pw", "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": "/etc/aios/kafka-tls/ca.crt"}
    assert "pw" not in repr(s), "the password never shows in a repr or a log line"


def test_mutual_tls_settings_become_librdkafka_config(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, AIOS_KAFKA_SECURITY_PROTOCOL="SSL", AIOS_KAFKA_SSL_CERTIFICATE_LOCATION="/t/tls.crt",
              AIOS_KAFKA_SSL_KEY_LOCATION="/t/tls.key", AIOS_KAFKA_SSL_ENDPOINT_IDENTIFICATION="none")
    assert s.kafka_client_config() == {
        "security.protocol": "ssl", "ssl.endpoint.identification.algorithm": "none",
        "ssl.certificate.location": "/t/tls.crt", "ssl.key.location": "/t/tls.key"}


@pytest.mark.parametrize(("env", "named"), [
    ({"AIOS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AIOS_KAFKA_SASL_MECHANISM": "PLAIN",
      "AIOS_KAFKA_SASL_PASSWORD": "hunter2"}, "AIOS_KAFKA_SASL_USERNAME is required"),
    ({"AIOS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "AIOS_KAFKA_SASL_USERNAME": "u",
      "AIOS_KAFKA_SASL_PASSWORD": "hunter2"}, "AIOS_KAFKA_SASL_MECHANISM is required"),
    ({"AIOS_KAFKA_SASL_PASSWORD": "hunter2"}, "AIOS_KAFKA_SASL_PASSWORD is set but AIOS_KAFKA_SECURITY_PROTOCOL"),
    ({"AIOS_KAFKA_SSL_CA_LOCATION": "/ca.crt"}, "AIOS_KAFKA_SSL_CA_LOCATION is set but"),
    ({"AIOS_KAFKA_SECURITY_PROTOCOL": "SSL", "AIOS_KAFKA_SSL_CERTIFICATE_LOCATION": "/t.crt"},
     "AIOS_KAFKA_SSL_CERTIFICATE_LOCATION and AIOS_KAFKA_SSL_KEY_LOCATION go together"),
    ({"AIOS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "AIOS_KAFKA_SECURITY_PROTOCOL='TLS'"),
    ({"AIOS_KAFKA_SASL_MECHANISM": "GSSAPI"}, "AIOS_KAFKA_SASL_MECHANISM='GSSAPI'"),
    ({"AIOS_GRPC_LISTEN_ADDR": "0.0.0.0"}, "AIOS_GRPC_LISTEN_ADDR='0.0.0.0'"),
    ({"AIOS_METRICS_HOST": "everywhere"}, "AIOS_METRICS_HOST='everywhere'"),
])
def test_bad_kafka_security_or_address_settings_stop_naming_them(
        env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(monkeypatch, capsys, **env)
    assert named in err, err
    assert "hunter2" not in err, f"a password must never be printed: {err}"
    assert "fix the environment variable" in err


def test_a_bad_security_combination_stops_the_service_process() -> None:
    proc = _start_planner(AIOS_KAFKA_SECURITY_PROTOCOL="SASL_SSL", AIOS_KAFKA_SASL_PASSWORD="hunter2")
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert "AIOS_KAFKA_SASL_MECHANISM is required" in proc.stderr and "AIOS_KAFKA_SASL_USERNAME" in proc.stderr
    assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("env", "says"), [
    ({"AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS": "0"}, "AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS='0'"),
    ({"AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS": "ninety"}, "AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS='ninety'"),
    # The old count cap is refused, pointing at its replacement, instead of being ignored.
    ({"AIOS_OBSERVABILITY_RETENTION": "100000"}, "set AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS"),
])
def test_audit_retention_is_days_and_a_bad_value_stops_naming_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], says: str) -> None:
    from services.observability.settings import ObservabilitySettings

    for name in list(os.environ):
        if name.startswith("AIOS_"):
            monkeypatch.delenv(name)
    assert load_settings(ObservabilitySettings).observability_audit_retention_days == 90
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        load_settings(ObservabilitySettings)
    assert info.value.code == 2
    assert says in capsys.readouterr().err
