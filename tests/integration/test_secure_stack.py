"""The pipeline over TLS and SASL: `stack up --secure`, driven through client properties files and -X.

One stack of its own for the whole module (free ports, its own folder, the fetched distribution
shared) starts with a SASL_SSL listener (SCRAM-SHA-512 and OAUTHBEARER with unsecured JWTs), a
mutual-TLS listener and an HTTPS registry port, with a CA made at its first start. The registry is
reached through a proxy that demands HTTP Basic credentials (Apicurio enforces basic auth only through
an OIDC server, see tests/support/auth_proxy.py). Then produce -> detect (-> inspect) run as a user
runs them, once per way of authenticating, and each refusal (wrong password, token or client
certificate, untrusted certificate, missing CA) must be one clear line that names no secret.
"""

from __future__ import annotations

import datetime
import itertools
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

import javaproperties
import pytest
from confluent_kafka import KafkaError, KafkaException

from fraudstream.settings import ENV, Settings
from fraudstream.stack import LocalStack
from fraudstream.stack_secure import SecureMaterial
from tests.support.auth_proxy import BasicAuthProxy
from tests.support.kafka_io import count_committed, read_topic, wait_until

REGISTRY_USER = "registry-user"
REGISTRY_PASSWORD = "Registry-Pass-7f3a"
WRONG = "Wrong-Pass-91c2"
# What a reader may meet on a topic created moments ago, until the broker's metadata settles.
NEW_TOPIC_ERRORS = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION}
NO_FILE = Path("/dev/null/no-kafka-properties-file")  # env(): the Kafka settings come from -X flags alone
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

    def env(self, topic: str, kafka_config: Path | None = None) -> dict[str, str]:
        """The commands' environment; `kafka_config`: another Kafka properties file than the SCRAM one,
        or none when the command's -X flags say everything."""
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        # A group of its own per topic: a detector is a static member (group.instance.id from the host), and
        # one that stopped stays in its group until the session times out, so the next test's detector in
        # the same group would be handed the previous topic's partitions.
        env |= {ENV["registry_config"]: str(self.registry_config), ENV["transactions_topic"]: topic,
                ENV["partitions"]: "3", ENV["group_id"]: f"{topic}-detector"}
        if kafka_config != NO_FILE:
            env[ENV["kafka_config"]] = str(kafka_config or self.kafka_config)
        return env

    def settings(self, topic: str) -> Settings:
        return Settings.from_env(self.env(topic))

    def run(self, topic: str, *args: str, timeout_s: float = 90,
            kafka_config: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fraudstream.cli", *args], env=self.env(topic, kafka_config),
                              capture_output=True, text=True, timeout=timeout_s)

    @property
    def material(self) -> SecureMaterial:
        return self.stack.secure_material


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureStack]:
    base = Settings.from_env()
    folder = base.stack_dir / "secure-test"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh CA and user each run: first start is what is tested
    settings = base.replace(stack_dir=folder, kafka_port=free_port(), controller_port=free_port(),
                            registry_port=free_port(), registry_management_port=free_port(),
                            kafka_secure_port=free_port(), kafka_mtls_port=free_port(),
                            registry_secure_port=free_port())
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


def produce_and_detect(secure: SecureStack, topic: str, count: int, *flags: str,
                       kafka_config: Path | None = None) -> Settings:
    """`produce` then `detect` until every record is routed, both with `flags` and `kafka_config`
    (see SecureStack.env); the counts are read over SCRAM. Returns the topic's settings."""
    settings = secure.settings(topic)
    produced = secure.run(topic, "produce", "--count", str(count), "--rate", "0", "--quiet", *flags,
                          kafka_config=kafka_config)
    assert produced.returncode == 0, produced.stderr
    assert count_committed(settings, [topic]) == count

    detector = subprocess.Popen([sys.executable, "-m", "fraudstream.cli", "detect", "--log-interval", "1", *flags],
                                env=secure.env(topic, kafka_config), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def routed() -> int:
        try:
            return count_committed(settings, [settings.legit_topic, settings.fraud_topic])
        except KafkaException as exc:  # the output topics are new: their leaders may not be known yet
            if exc.args[0].retriable() or exc.args[0].code() in NEW_TOPIC_ERRORS:
                return 0
            raise

    routed_in_time = True
    try:
        wait_until(lambda: routed() >= count, timeout_s=90, what=f"all {count} transactions routed")
    except AssertionError:
        routed_in_time = False
    finally:
        detector.send_signal(signal.SIGTERM)
        output, _ = detector.communicate(timeout=60)
    assert routed_in_time, f"not all {count} transactions routed within 90 s; the detector said:\n{output}"
    assert detector.returncode == 0, output
    return settings


def test_produce_detect_inspect_over_sasl_ssl_with_registry_credentials(secure: SecureStack):
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    assert secure.run(topic, "schemas", "register").returncode == 0
    forwarded_after_register = secure.proxy.forwarded
    assert forwarded_after_register > 0 and secure.proxy.refused == 0

    settings = produce_and_detect(secure, topic, 300)

    inspected = secure.run(topic, "inspect", settings.fraud_topic, "--from-beginning")
    assert inspected.returncode == 0, inspected.stderr
    alerts = [json.loads(line) for line in inspected.stdout.splitlines()]
    assert len(alerts) == len(read_topic(settings, settings.fraud_topic)) > 0
    assert all(alert["rules"] for alert in alerts)  # each alert names the rules that fired
    # Every registry call of produce, detect and inspect carried the credentials.
    assert secure.proxy.forwarded > forwarded_after_register and secure.proxy.refused == 0


def oauthbearer_flags(secure: SecureStack, **overrides: str) -> list[str]:
    """The stack's OAUTHBEARER client file as -X flags (a client configured on the command line alone),
    with `overrides` (keys with _ for .)."""
    with open(secure.material.kafka_oauthbearer_client_properties, encoding="utf-8") as f:
        properties = dict(javaproperties.load(f)) | {k.replace("_", "."): v for k, v in overrides.items()}
    return list(itertools.chain.from_iterable(("-X", f"{k}={v}") for k, v in properties.items()))


@pytest.mark.parametrize("way", ["mutual TLS, properties file", "OAUTHBEARER, -X flags"])
def test_produce_and_detect_with_a_client_certificate_or_a_bearer_token(secure: SecureStack, way: str):
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    assert secure.run(topic, "schemas", "register").returncode == 0
    if way.startswith("mutual TLS"):
        # The MTLS listener speaks TLS without SASL and demands a certificate signed by the stack's CA.
        config = Settings.from_env({}, kafka_config=secure.material.kafka_mtls_client_properties)
        assert config.kafka_extra["security.protocol"] == "SSL" and "sasl.mechanisms" not in config.kafka_extra
        assert config.bootstrap_servers == f"127.0.0.1:{secure.stack.settings.kafka_mtls_port}"
        produce_and_detect(secure, topic, 100, kafka_config=secure.material.kafka_mtls_client_properties)
    else:
        flags = oauthbearer_flags(secure)
        assert "sasl.mechanisms=OAUTHBEARER" in flags and not any("sasl.password" in flag for flag in flags)
        produce_and_detect(secure, topic, 100, *flags, kafka_config=NO_FILE)


@pytest.mark.parametrize("command", [["produce", "--count", "1"], ["detect"], ["inspect", "--from-beginning"]])
def test_a_wrong_password_is_refused_in_one_line(secure: SecureStack, command: list[str]):
    done = secure.run("refused", *command, "-X", f"sasl.password={WRONG}", timeout_s=60)
    line = one_line(done, command[0])
    assert "refused the connection: SASL authentication error" in line and "sasl.password" in line
    assert WRONG not in done.stderr + done.stdout


@pytest.mark.parametrize("command", [["produce", "--count", "1"], ["detect"]])
def test_a_token_without_the_required_scope_is_refused_in_one_line(secure: SecureStack, command: list[str]):
    flags = oauthbearer_flags(secure, sasl_oauthbearer_config="principal=intruder scope=other")
    done = secure.run("refused-token", *command, *flags, kafka_config=NO_FILE, timeout_s=60)
    line = one_line(done, command[0])
    assert "refused the connection" in line and "insufficient_scope" in line
    assert "check sasl.oauthbearer.config" in line


@pytest.mark.parametrize("command", [["produce", "--count", "1"], ["detect"]])
def test_a_client_certificate_from_another_ca_is_refused_in_one_line(secure: SecureStack, command: list[str]):
    cert, key = self_signed(secure.folder, "intruder")
    done = secure.run("refused-cert", *command, "-X", f"ssl.certificate.location={cert}",
                      "-X", f"ssl.key.location={key}", kafka_config=secure.material.kafka_mtls_client_properties,
                      timeout_s=60)
    line = one_line(done, command[0])
    assert "refused the connection" in line and "alert certificate required" in line
    assert "wants a client certificate signed by a CA it trusts" in line


def self_signed(folder: Path, name: str, *, ca: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate and its key, which the stack's CA never signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def other_ca(folder: Path) -> Path:
    """A CA certificate that did not sign the stack's certificates."""
    return self_signed(folder, "some-other-ca", ca=True)[0]


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
