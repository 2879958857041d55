"""The pipeline on `stack up --secure`: TLS, authentication and ACLs, driven as users run it.

One stack of its own for the whole module (free ports, its own folder, the fetched distribution shared)
starts with no PLAINTEXT listener: SASL_SSL with a SCRAM user per role, a mutual-TLS listener (User:producer),
the admin on its own SASL_SSL listener, and the registry on HTTPS only with users and roles. One topic gets
each role's ACLs through `fraudstream acl --apply` (as the admin), its schemas registered by the registry's
admin and its rules seeded by the rules administrator; then every role does its job, every attempt outside
a role's ACLs is refused in one line that names the missing permission, and so are the anonymous and
self-named clients of issue #20 and unauthenticated registry requests. Each TLS or credential refusal is one
clear line that names no secret.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import javaproperties
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.settings import ENV, Settings
from fraudstream.stack import LocalStack
from fraudstream.stack_secure import SecureMaterial
from tests.support.kafka_io import count_committed, read_topic, wait_until

WRONG = "Wrong-Pass-91c2"
# What a reader may meet on a topic created moments ago, until the broker's metadata settles.
NEW_TOPIC_ERRORS = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
}
# Variables of the surrounding run that would point the commands elsewhere.
CLEARED = [
    ENV[name]
    for name in ("bootstrap_servers", "schema_registry_url", "kafka_config", "registry_config", "transactions_topic")
]
PRODUCED_OVER_SCRAM, PRODUCED_OVER_MTLS = 300, 100


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class SecureStack:
    stack: LocalStack
    folder: Path
    topic: str  # the pipeline's topic: its ACLs applied, schemas registered, rules seeded (see `secure`)

    @property
    def material(self) -> SecureMaterial:
        return self.stack.secure_material

    def kafka_config(self, role: str) -> Path:
        return self.material.kafka_client_properties(role)

    def registry_config(self, role: str) -> Path:
        return self.material.registry_client_properties(role)

    def env(self, role: str, kafka_config: Path | None = None, topic: str | None = None) -> dict[str, str]:
        """The commands' environment as `role` (its Kafka and registry files); `kafka_config`: another Kafka file."""
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        topic = topic or self.topic
        env |= {
            ENV["registry_config"]: str(self.registry_config(role)),
            ENV["transactions_topic"]: topic,
            ENV["partitions"]: "3",
            ENV["group_id"]: f"{topic}-detector",
            ENV["kafka_config"]: str(kafka_config or self.kafka_config(role)),
        }
        return env

    def settings(self, role: str) -> Settings:
        return Settings.from_env(self.env(role))

    def run(
        self, role: str, *args: str, timeout_s: float = 90, kafka_config: Path | None = None, topic: str | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fraudstream.cli", *args],
            env=self.env(role, kafka_config, topic),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureStack]:
    base = Settings.from_env()
    folder = base.stack_dir / "secure-test"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh CA and users each run: first start is what is tested
    settings = base.replace(
        stack_dir=folder,
        kafka_port=free_port(),
        controller_port=free_port(),
        registry_port=free_port(),
        registry_management_port=free_port(),
        kafka_secure_port=free_port(),
        kafka_mtls_port=free_port(),
        registry_secure_port=free_port(),
        kafka_jwt_port=free_port(),
    )
    stack = LocalStack(settings, log=lambda line: None, dist=base.stack_dir / "dist")
    try:
        status = stack.up(secure=True)
        assert status.secure is not None
        secured = SecureStack(stack, folder, f"secure-{uuid.uuid4().hex[:8]}")
        # What an operator does for a new pipeline: the ACLs, the schemas, the first rules.
        for role, command in (
            ("admin", ["acl", "--apply"]),
            ("admin", ["schemas", "register"]),
            ("rules-admin", ["rules", "set", str(Settings().rules_file), "--comment", "first rules"]),
        ):
            done = secured.run(role, *command)
            assert done.returncode == 0, f"{role} {command}: {done.stderr}"
        yield secured
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


def test_secure_stack_writes_a_private_client_file_per_role_naming_only_the_secured_endpoints(secure: SecureStack):
    settings = secure.settings("producer")
    assert settings.bootstrap_servers == f"127.0.0.1:{secure.stack.settings.kafka_secure_port}"
    assert settings.kafka_extra["security.protocol"] == "SASL_SSL"
    assert (
        settings.kafka_extra["sasl.mechanisms"] == "SCRAM-SHA-512"
        and settings.kafka_extra["sasl.username"] == "producer"
    )
    assert (secure.kafka_config("producer").stat().st_mode & 0o077) == 0, "the file holding the password is private"
    for private in (
        secure.stack.kafka_dir / "server.properties",
        secure.stack.registry_dir / "config" / "application.properties",
    ):
        assert private.stat().st_mode & 0o077 == 0, f"{private} holds passwords"
    # No password on any command line of the stack's processes (ps shows them to every user), nor in a log.
    secrets = secure.material.secrets().values()
    for pid in (secure.stack.broker_pid(), secure.stack.status().registry_pid):
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert not any(secret in command_line for secret in secrets)
    logs = [
        secure.stack.kafka_dir / "server.log",
        secure.stack.kafka_dir / "stdout.log",
        secure.stack.registry_dir / "stdout.log",
    ]
    assert all(log.stat().st_size > 0 for log in logs)
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [secret for secret in secrets if secret in text], f"a password in {log}"


def routed(settings: Settings) -> int:
    try:
        return count_committed(settings, [settings.legit_topic, settings.fraud_topic])
    except KafkaException as exc:  # the output topics are new: their leaders may not be known yet
        if exc.args[0].retriable() or exc.args[0].code() in NEW_TOPIC_ERRORS:
            return 0
        raise


def test_every_role_does_its_job_with_its_own_acls(secure: SecureStack):
    """producer (over SCRAM and over mutual TLS) -> detector -> inspector and analyst, each as itself."""
    inspector = secure.settings("inspector")  # counts are read as the read-only inspector
    produced = secure.run("producer", "produce", "--count", str(PRODUCED_OVER_SCRAM), "--rate", "0", "--quiet")
    assert produced.returncode == 0, produced.stderr
    over_mtls = secure.run(
        "producer",
        "produce",
        "--count",
        str(PRODUCED_OVER_MTLS),
        "--rate",
        "0",
        "--quiet",
        kafka_config=secure.material.kafka_mtls_client_properties,
    )
    assert over_mtls.returncode == 0, over_mtls.stderr
    total = PRODUCED_OVER_SCRAM + PRODUCED_OVER_MTLS
    assert count_committed(inspector, [secure.topic]) == total

    detector = subprocess.Popen(
        [sys.executable, "-m", "fraudstream.cli", "detect", "--log-interval", "1"],
        env=secure.env("detector"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    routed_in_time = True
    try:
        wait_until(lambda: routed(inspector) >= total, timeout_s=90, what=f"all {total} transactions routed")
    except AssertionError:
        routed_in_time = False
    finally:
        detector.send_signal(signal.SIGTERM)
        output, _ = detector.communicate(timeout=60)
    assert routed_in_time, f"not all {total} transactions routed within 90 s; the detector said:\n{output}"
    assert detector.returncode == 0, output
    assert "changelog=" in output  # its state went to its own changelog topics, within its ACLs

    for role in ("inspector", "analyst"):  # both read the alerts
        inspected = secure.run(role, "inspect", inspector.fraud_topic, "--from-beginning")
        assert inspected.returncode == 0, inspected.stderr
        alerts = [json.loads(line) for line in inspected.stdout.splitlines()]
        assert len(alerts) == len(read_topic(inspector, inspector.fraud_topic)) > 0
        assert all(alert["rules"] for alert in alerts)
    # The analyst writes a verdict (a label); the count proves it landed.
    labels_before = count_committed(inspector, [inspector.labels_topic])
    analyst = secure.settings("analyst")
    delivered = []
    verdicts = Producer({"bootstrap.servers": analyst.bootstrap_servers, **analyst.kafka_extra})
    verdicts.produce(analyst.labels_topic, b"verdict", b"review-1", on_delivery=lambda err, msg: delivered.append(err))
    verdicts.flush(30)
    assert delivered == [None]
    assert count_committed(inspector, [inspector.labels_topic]) == labels_before + 1


DENIED = "no ACL grants it (`fraudstream acl` lists what each role may do)"


@pytest.mark.parametrize(
    ("role", "command", "expected"),
    [
        (
            "producer",
            ["rules", "set", "RULES", "--comment", "x"],
            "Kafka denied User:producer Create on topic {t}.rules",
        ),
        ("producer", ["detect"], "Kafka denied User:producer Create on topic {t}.legit"),
        ("inspector", ["produce", "--count", "1"], "Kafka denied User:inspector IdempotentWrite on the cluster"),
        ("analyst", ["inspect", "{t}", "--from-beginning"], "Kafka denied User:analyst Describe and Read on topic {t}"),
        (
            "rules-admin",
            ["inspect", "{t}.fraud", "--from-beginning"],
            "Kafka denied User:rules-admin Describe and Read on topic {t}.fraud",
        ),
        (
            "detector",
            ["rules", "set", "RULES", "--comment", "x"],
            # Each change is one transaction of {t}.rules.cli, an id only the rules administrator may use.
            "Kafka denied User:detector Write on transactional id {t}.rules.cli",
        ),
        (
            "inspector",
            ["schemas", "register"],
            "denied user inspector the permission for setting compatibility of {t}-value (HTTP 403)",
        ),
    ],
)
def test_an_attempt_outside_a_roles_acls_is_refused_in_one_line_naming_the_permission(
    secure: SecureStack, role: str, command: list[str], expected: str
):
    command = [item.replace("{t}", secure.topic).replace("RULES", str(Settings().rules_file)) for item in command]
    line = one_line(secure.run(role, *command, timeout_s=60), command[0])
    assert expected.replace("{t}", secure.topic) in line
    if line.startswith(f"fraudstream {command[0]}: error: Kafka denied"):
        assert line.endswith(DENIED)


def test_anonymous_and_self_named_clients_are_refused(secure: SecureStack):
    """Issue #20: an anonymous PLAINTEXT client created a topic and wrote the rules topic; `mallory`, named by an
    unsecured JWT on the SCRAM listener, wrote to it too."""
    s = secure.stack.settings
    server = javaproperties.loads((secure.stack.kafka_dir / "server.properties").read_text())
    assert "PLAINTEXT" not in server["listener.security.protocol.map"].replace("SASL_", "")
    # A client with no credentials, on every port the broker opens: it cannot create a topic anywhere.
    intruder_topic = f"anonymous-{uuid.uuid4().hex[:6]}"
    ports = (s.kafka_port, s.controller_port, s.kafka_secure_port, s.kafka_mtls_port)
    clients = [AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0}) for port in ports]
    futures = [
        client.create_topics([NewTopic(intruder_topic, 1, 1)], request_timeout=5, operation_timeout=5)
        for client in clients
    ]
    for future in futures:
        with pytest.raises(KafkaException):
            future[intruder_topic].result()
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{s.kafka_port}", **secure.stack._admin_properties()})
    assert intruder_topic not in admin.list_topics(timeout=10).topics
    # And no anonymous write to the rules topic.
    anonymous = secure.run(
        "producer",
        "produce",
        "--count",
        "1",
        "--bootstrap-servers",
        f"127.0.0.1:{s.kafka_secure_port}",
        "-X",
        "security.protocol=PLAINTEXT",
        kafka_config=Path(os.devnull),
        topic=f"{secure.topic}.rules",
        timeout_s=60,
    )
    assert "did not answer" in one_line(anonymous, "produce")

    # mallory through the unsecured JWT, on the SCRAM listener: the mechanism is not offered there.
    mallory = secure.run(
        "producer",
        "produce",
        "--count",
        "1",
        "-X",
        "sasl.mechanisms=OAUTHBEARER",
        "-X",
        "enable.sasl.oauthbearer.unsecure.jwt=true",
        "-X",
        "sasl.username=",
        "-X",
        "sasl.password=",
        "-X",
        "sasl.oauthbearer.config=principal=mallory scope=fraudstream.pipeline",
        topic=f"{secure.topic}.rules",
        timeout_s=60,
    )
    assert "Unsupported SASL mechanism" in one_line(mallory, "produce")
    # mallory with a SCRAM user that does not exist.
    scram = secure.run(
        "producer",
        "produce",
        "--count",
        "1",
        "-X",
        "sasl.username=mallory",
        "-X",
        f"sasl.password={WRONG}",
        topic=f"{secure.topic}.rules",
        timeout_s=60,
    )
    assert "SASL authentication error" in one_line(scram, "produce")
    inspector = secure.settings("inspector")
    assert count_committed(inspector, [inspector.rules_topic]) == rules_written(secure)


def rules_written(secure: SecureStack) -> int:
    """Records in the rules topic: the seeded rules alone (nobody else wrote)."""
    import tomllib

    with open(Settings().rules_file, "rb") as f:
        return len(tomllib.load(f))  # one table per rule


def registry_request(
    url: str,
    method: str = "GET",
    *,
    user: str | None = None,
    password: str | None = None,
    body: dict | None = None,
    ca: Path | None = None,
) -> int:
    import base64

    headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        url, method=method, headers=headers, data=json.dumps(body).encode() if body is not None else None
    )
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unauthenticated_registry_requests_are_refused_and_a_reader_cannot_register(secure: SecureStack):
    s, ca = secure.stack.settings, secure.material.ca
    base = f"https://127.0.0.1:{s.registry_secure_port}/apis/ccompat/v7"
    subject = f"{secure.topic}-value"
    schema = {"schema": json.dumps({"type": "record", "name": "Intruder", "fields": []})}
    attempts = [
        ("GET", "/subjects", None),
        ("GET", f"/subjects/{subject}/versions/latest", None),
        ("GET", "/schemas/ids/1", None),
        ("GET", "/config", None),
        ("POST", f"/subjects/{subject}/versions", schema),
        ("POST", "/subjects/intruder-value/versions", schema),
        ("PUT", "/config", {"compatibility": "NONE"}),
        ("DELETE", f"/subjects/{subject}", None),
    ]
    for method, path, body in attempts:
        assert registry_request(base + path, method, body=body, ca=ca) == 401, f"{method} {path}"
        assert registry_request(base + path, method, body=body, ca=ca, user="admin", password=WRONG) == 401
    # The plain HTTP port is closed.
    with pytest.raises(urllib.error.URLError):
        registry_request(f"http://127.0.0.1:{s.registry_port}/apis/ccompat/v7/subjects")
    # A read-only identity reads, looks up and checks compatibility, never registers or changes settings.
    inspector = secure.material.secrets()["inspector.password"]
    reader = {"user": "inspector", "password": inspector, "ca": ca}
    assert registry_request(base + "/subjects", **reader) == 200
    assert registry_request(base + f"/subjects/{subject}/versions/latest", **reader) == 200
    assert registry_request(base + "/subjects/intruder-value/versions", "POST", body=schema, **reader) == 403
    assert registry_request(base + "/config", "PUT", body={"compatibility": "NONE"}, **reader) == 403
    assert registry_request(base + f"/subjects/{subject}", "DELETE", **reader) == 403
    admin = {"user": "admin", "password": secure.material.secrets()["admin.password"], "ca": ca}
    assert registry_request(base + "/subjects/intruder-value/versions", **admin) == 404  # nothing was registered


@pytest.mark.parametrize("command", [["produce", "--count", "1"], ["detect"], ["inspect", "--from-beginning"]])
def test_a_wrong_password_is_refused_in_one_line(secure: SecureStack, command: list[str]):
    done = secure.run("producer", *command, "-X", f"sasl.password={WRONG}", timeout_s=60, topic="refused")
    line = one_line(done, command[0])
    assert "refused the connection: SASL authentication error" in line and "sasl.password" in line
    assert WRONG not in done.stderr + done.stdout


@pytest.mark.parametrize("command", [["produce", "--count", "1"], ["detect"]])
def test_a_client_certificate_from_another_ca_is_refused_in_one_line(secure: SecureStack, command: list[str]):
    cert, key = self_signed(secure.folder, "intruder")
    done = secure.run(
        "producer",
        *command,
        "-X",
        f"ssl.certificate.location={cert}",
        "-X",
        f"ssl.key.location={key}",
        kafka_config=secure.material.kafka_mtls_client_properties,
        timeout_s=60,
        topic="refused-cert",
    )
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
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def other_ca(folder: Path) -> Path:
    """A CA certificate that did not sign the stack's certificates."""
    return self_signed(folder, "some-other-ca", ca=True)[0]


def test_an_untrusted_certificate_is_refused_in_one_line(secure: SecureStack):
    ca = other_ca(secure.folder)
    kafka = one_line(secure.run("producer", "produce", "--count", "1", "-X", f"ssl.ca.location={ca}"), "produce")
    assert "SSL handshake failed" in kafka and "not signed by a CA this client trusts" in kafka

    registry = one_line(secure.run("admin", "schemas", "register", "-R", f"ssl.ca.location={ca}"), "schemas")
    assert "refused the TLS handshake" in registry and "not signed by a CA this client trusts" in registry


def without_line(source: Path, prefix: str, target: Path) -> Path:
    target.write_text(
        "".join(line for line in source.read_text().splitlines(keepends=True) if not line.startswith(prefix))
    )
    return target


def test_a_missing_ca_is_refused_in_one_line(secure: SecureStack):
    # No ssl.ca.location at all: the system's CAs, which never signed the stack's certificate.
    without_ca = without_line(secure.kafka_config("producer"), "ssl.ca.location", secure.folder / "kafka-without-ca")
    kafka = one_line(secure.run("producer", "produce", "--count", "1", "-F", str(without_ca)), "produce")
    assert "certificate verify failed" in kafka and "set ssl.ca.location" in kafka

    registry_without_ca = without_line(
        secure.registry_config("admin"), "ssl.ca.location", secure.folder / "registry-without-ca"
    )
    registry = one_line(
        secure.run("admin", "schemas", "register", "--registry-config", str(registry_without_ca)), "schemas"
    )
    assert "refused the TLS handshake" in registry and "set ssl.ca.location" in registry

    # A CA file that is not there: said before any connection is tried, exit status 2 (configuration).
    gone = secure.folder / "no-such-ca.pem"
    done = secure.run("producer", "produce", "--count", "1", "-X", f"ssl.ca.location={gone}")
    assert one_line(done, "produce").endswith(f"ssl.ca.location: no such file {gone}") and done.returncode == 2


def test_wrong_or_missing_registry_credentials_are_refused_in_one_line(secure: SecureStack):
    done = secure.run("admin", "schemas", "register", "-R", f"basic.auth.user.info=admin:{WRONG}")
    line = one_line(done, "schemas")
    assert "refused the credentials" in line and "HTTP 401" in line and "basic.auth.user.info" in line
    assert WRONG not in done.stderr + done.stdout
    no_credentials = without_line(secure.registry_config("admin"), "basic.auth", secure.folder / "registry-anonymous")
    done = secure.run("admin", "schemas", "register", "--registry-config", str(no_credentials))
    assert "refused the credentials" in one_line(done, "schemas") and "HTTP 401" in done.stderr
