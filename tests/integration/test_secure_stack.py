"""The pipeline over TLS and SASL: `stack up --secure`, driven through client properties files.

A stack of its own (free ports, its own folder, the fetched distribution shared) starts with a
SASL_SSL listener (SCRAM-SHA-512) and an HTTPS registry port, with a CA made at its first start.
The registry is reached through a proxy that demands HTTP Basic credentials (Apicurio enforces
basic auth only through an OIDC server, see tests/support/auth_proxy.py). Then produce -> detect ->
inspect run as a user runs them, and each refusal (wrong password, untrusted certificate, missing
CA) must be one clear line that names no secret.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from fraudstream.settings import ENV, Settings
from fraudstream.stack import LocalStack
from tests.support.auth_proxy import BasicAuthProxy
from tests.support.kafka_io import count_committed, read_topic, wait_until

REGISTRY_USER = "registry-user"
REGISTRY_PASSWORD = "Registry-Pass-7f3a"
WRONG = "Wrong-Pass-91c2"
# What a reader may meet on a topic created moments ago, until the broker's metadata settles.
NEW_TOPIC_ERRORS = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION}
# Variables of the surrounding run that would point the commands elsewhere.
CLEARED = [ENV[name] for name in ("bootstrap_servers", "schema_registry_url", "kafka_config", "registry_config",
                                  "transactions_topic")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class SecureStack:
    stack: LocalStack
    kafka_config: Path  # written by the stack: SASL_SSL bootstrap, SCRAM user and password, its CA
    registry_config: Path  # ours: the proxy's HTTPS URL, the CA, basic-auth credentials
    proxy: BasicAuthProxy
    folder: Path

    def env(self, topic: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        return env | {ENV["kafka_config"]: str(self.kafka_config), ENV["registry_config"]: str(self.registry_config),
                      ENV["transactions_topic"]: topic, ENV["partitions"]: "3"}

    def settings(self, topic: str) -> Settings:
        return Settings.from_env(self.env(topic))

    def run(self, topic: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fraudstream.cli", *args], env=self.env(topic),
                              capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureStack]:
    base = Settings.from_env()
    folder = base.stack_dir / "secure-test"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh CA and user each run: first start is what is tested
    settings = base.replace(stack_dir=folder, kafka_port=free_port(), controller_port=free_port(),
                            registry_port=free_port(), registry_management_port=free_port(),
                            kafka_secure_port=free_port(), registry_secure_port=free_port())
    stack = LocalStack(settings, log=lambda line: None, dist=base.stack_dir / "dist")
    try:
        status = stack.up(secure=True)
        assert status.secure is not None
        material = stack.secure_material
        proxy = BasicAuthProxy(f"https://127.0.0.1:{settings.registry_secure_port}", user=REGISTRY_USER,
                               password=REGISTRY_PASSWORD, cert=material.cert, key=material.key, ca=material.ca)
        registry_config = folder / "registry-via-proxy.properties"
        registry_config.write_text(
            "# the registry behind a proxy that demands HTTP Basic credentials\n"
            f"schema.registry.url=https://127.0.0.1:{proxy.port}/apis/ccompat/v7\n"
            "basic.auth.credentials.source=USER_INFO\n"
            f"basic.auth.user.info={REGISTRY_USER}:{REGISTRY_PASSWORD}\n"
            f"ssl.ca.location={material.ca}\n")
        yield SecureStack(stack, status.secure.kafka_config, registry_config, proxy, folder)
        proxy.close()
    finally:
        stack.down()
        shutil.rmtree(folder, ignore_errors=True)


def one_line(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"fraudstream {command}: error: "), lines[0]
    return lines[0]


def test_secure_stack_writes_client_files_that_name_only_the_secured_endpoints(secure: SecureStack):
    settings = secure.settings("any")
    assert settings.bootstrap_servers == f"127.0.0.1:{secure.stack.settings.kafka_secure_port}"
    assert settings.kafka_extra["security.protocol"] == "SASL_SSL"
    assert settings.kafka_extra["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert (secure.kafka_config.stat().st_mode & 0o077) == 0, "the file holding the password is private"
    assert "SASL_SSL://" in (secure.stack.kafka_dir / "server.properties").read_text()


def test_produce_detect_inspect_over_sasl_ssl_with_registry_credentials(secure: SecureStack):
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    settings = secure.settings(topic)
    assert secure.run(topic, "schemas", "register").returncode == 0
    forwarded_after_register = secure.proxy.forwarded
    assert forwarded_after_register > 0 and secure.proxy.refused == 0

    produced = secure.run(topic, "produce", "--count", "300", "--rate", "0", "--quiet")
    assert produced.returncode == 0, produced.stderr
    assert count_committed(settings, [topic]) == 300

    detector = subprocess.Popen([sys.executable, "-m", "fraudstream.cli", "detect", "--log-interval", "1"],
                                env=secure.env(topic), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def routed() -> int:
        try:
            return count_committed(settings, [settings.legit_topic, settings.fraud_topic])
        except KafkaException as exc:  # the output topics are new: their leaders may not be known yet
            if exc.args[0].retriable() or exc.args[0].code() in NEW_TOPIC_ERRORS:
                return 0
            raise

    try:
        wait_until(lambda: routed() >= 300, timeout_s=90, what="all 300 transactions routed over SASL_SSL")
    finally:
        detector.send_signal(signal.SIGTERM)
        output, _ = detector.communicate(timeout=60)
    assert detector.returncode == 0, output

    inspected = secure.run(topic, "inspect", settings.fraud_topic, "--from-beginning")
    assert inspected.returncode == 0, inspected.stderr
    alerts = [json.loads(line) for line in inspected.stdout.splitlines()]
    assert len(alerts) == len(read_topic(settings, settings.fraud_topic)) > 0
    assert all(alert["rules"] for alert in alerts)  # each alert names the rules that fired
    # Every registry call of produce, detect and inspect carried the credentials.
    assert secure.proxy.forwarded > forwarded_after_register and secure.proxy.refused == 0


@pytest.mark.parametrize("command", [["produce", "--count", "1"], ["detect"], ["inspect", "--from-beginning"]])
def test_a_wrong_password_is_refused_in_one_line(secure: SecureStack, command: list[str]):
    done = secure.run("refused", *command, "-X", f"sasl.password={WRONG}", timeout_s=60)
    line = one_line(done, command[0])
    assert "refused the connection: SASL authentication error" in line and "sasl.password" in line
    assert WRONG not in done.stderr + done.stdout


def other_ca(folder: Path) -> Path:
    """A CA certificate that did not sign the stack's certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path = folder / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_an_untrusted_certificate_is_refused_in_one_line(secure: SecureStack):
    ca = other_ca(secure.folder)
    kafka = one_line(secure.run("untrusted", "produce", "--count", "1", "-X", f"ssl.ca.location={ca}"), "produce")
    assert "SSL handshake failed" in kafka and "not signed by a CA this client trusts" in kafka

    registry = one_line(secure.run("untrusted", "schemas", "register", "-R", f"ssl.ca.location={ca}"), "schemas")
    assert "refused the TLS handshake" in registry and "not signed by a CA this client trusts" in registry


def test_a_missing_ca_is_refused_in_one_line(secure: SecureStack):
    # No ssl.ca.location at all: the system's CAs, which never signed the stack's certificate.
    without_ca = secure.folder / "kafka-without-ca.properties"
    without_ca.write_text("".join(line for line in secure.kafka_config.read_text().splitlines(keepends=True)
                                  if not line.startswith("ssl.ca.location")))
    kafka = one_line(secure.run("missing-ca", "produce", "--count", "1", "-F", str(without_ca)), "produce")
    assert "certificate verify failed" in kafka and "set ssl.ca.location" in kafka

    registry_without_ca = secure.folder / "registry-without-ca.properties"
    registry_without_ca.write_text("".join(line for line in secure.registry_config.read_text().splitlines(keepends=True)
                                           if not line.startswith("ssl.ca.location")))
    registry = one_line(secure.run("missing-ca", "schemas", "register", "--registry-config", str(registry_without_ca)),
                        "schemas")
    assert "refused the TLS handshake" in registry and "set ssl.ca.location" in registry

    # A CA file that is not there: said before any connection is tried, exit status 2 (configuration).
    gone = secure.folder / "no-such-ca.pem"
    done = secure.run("missing-ca", "produce", "--count", "1", "-X", f"ssl.ca.location={gone}")
    assert one_line(done, "produce").endswith(f"ssl.ca.location: no such file {gone}") and done.returncode == 2


def test_wrong_registry_credentials_are_refused_in_one_line(secure: SecureStack):
    refused_before = secure.proxy.refused
    done = secure.run("bad-auth", "schemas", "register", "-R", f"basic.auth.user.info={REGISTRY_USER}:{WRONG}")
    line = one_line(done, "schemas")
    assert "refused the credentials" in line and "HTTP 401" in line and "basic.auth.user.info" in line
    assert WRONG not in done.stderr + done.stdout
    assert secure.proxy.refused > refused_before
