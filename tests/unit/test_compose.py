"""Drift test for the Docker path: docker-compose.yml and the Dockerfile must agree with the code.

Docker cannot run on our machines, so nothing else would notice when a setting, a port or a
subcommand changes on one side only. The file is also validated against the Compose
specification's JSON schema, as shipped by check-jsonschema (its `vendor.compose-spec` schema):
that catches what Compose itself would refuse to load (a misspelt key, a wrong type), though not
what only a running engine finds (an image that does not exist, a build that fails).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from fraudstream.cli import COMMANDS, build_parser
from fraudstream.settings import APICURIO_CCOMPAT_PATH, ENV, PROJECT_ROOT, Settings

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
OUR_PREFIXES = ("FRAUDSTREAM_", "KAFKA_", "SCHEMA_")
DEFAULTS = Settings()


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.fixture(scope="module")
def ours(services) -> dict[str, dict]:
    """The services running our image (built from the Dockerfile)."""
    found = {name: service for name, service in services.items() if service.get("build") == "."}
    assert found, "no service is built from our Dockerfile"
    return found


def _published(service: dict) -> dict[int, int]:
    """container port -> host port."""
    result = {}
    for mapping in service.get("ports", []):
        host, container = str(mapping).rsplit(":", 2)[-2:]
        result[int(container)] = int(host)
    return result


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)}."""
    result = {}
    for item in value.split(","):
        name, address = item.split("://", 1)
        host, port = address.rsplit(":", 1)
        result[name] = (host, int(port))
    return result


def validate_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_yml_is_valid_against_the_compose_specification():
    done = validate_compose(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validation done" in done.stdout


def test_the_compose_specification_check_refuses_what_compose_would_refuse(tmp_path):
    """The same check on a copy with a key Compose does not know (restart_policy belongs under deploy)."""
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["detector"]["restart_policy"] = {"condition": "on-failure"}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    done = validate_compose(path)
    assert done.returncode == 1
    assert "$.services.detector" in done.stdout and "'restart_policy' was unexpected" in done.stdout


def test_the_expected_services_exist(services):
    assert set(services) == {"kafka", "schema-registry", "schemas", "producer", "detector"}


def test_each_of_our_services_runs_a_real_subcommand(ours):
    parser = build_parser()
    for name, service in ours.items():
        command = service["command"]
        assert command[0] in COMMANDS, f"{name}: {command[0]!r} is not a fraudstream subcommand"
        parser.parse_args(command)  # exits (SystemExit) if the arguments no longer parse


def test_our_services_use_only_environment_variables_the_code_reads(ours):
    known = set(ENV.values())
    for name, service in ours.items():
        env = service["environment"]
        assert env, f"{name} has no environment"
        for variable in env:
            assert variable.startswith(OUR_PREFIXES), f"{name}: {variable} is not one of our variables"
            assert variable in known, f"{name}: {variable} is not in fraudstream.settings.ENV"


def test_our_services_environment_makes_valid_settings(ours):
    for service in ours.values():
        Settings.from_env({key: str(value) for key, value in service["environment"].items()})


def test_the_dockerfile_sets_only_variables_the_code_reads_and_installs_every_package_folder():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    env_block = " ".join(re.findall(r"^ENV (.+?)(?<!\\)$", text, re.M | re.S))
    assigned = dict(re.findall(r"(\w+)=(\S+)", env_block))
    project_vars = {key: value for key, value in assigned.items() if key.startswith(OUR_PREFIXES)}
    assert set(project_vars) <= set(ENV.values())
    # Everything pyproject.toml installs (code and package data: schemas, templates, rules) is copied
    # into the image before `pip install .`, under its own name.
    before_install = text[: text.index("RUN pip install")]
    copied = {
        src.rstrip("/")
        for src, dst in re.findall(r"^COPY (\S+) (\S+)$", before_install, re.M)
        if src.rstrip("/") == dst.rstrip("/")
    }
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"fraudstream", *setuptools["package-dir"].values()}
    assert folders <= copied, f"not copied before the install: {sorted(folders - copied)}"
    assert re.search(r'^ENTRYPOINT \["fraudstream"\]$', text, re.M)


def test_kafka_is_published_on_the_default_port_for_clients_on_the_host(services):
    kafka = services["kafka"]["environment"]
    advertised = _listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
    bound = _listeners(kafka["KAFKA_LISTENERS"])
    host_listeners = [name for name, (host, _) in advertised.items() if host in ("localhost", "127.0.0.1")]
    assert len(host_listeners) == 1
    host_listener = host_listeners[0]
    assert advertised[host_listener][1] == DEFAULTS.kafka_port
    assert _published(services["kafka"])[bound[host_listener][1]] == DEFAULTS.kafka_port


def test_the_kraft_controller_uses_the_default_controller_port(services):
    kafka = services["kafka"]["environment"]
    voters = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters.endswith(f":{DEFAULTS.controller_port}")
    controller = kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert _listeners(kafka["KAFKA_LISTENERS"])[controller][1] == DEFAULTS.controller_port


def test_the_single_broker_can_run_transactions(services):
    kafka = services["kafka"]["environment"]
    assert "broker" in kafka["KAFKA_PROCESS_ROLES"] and "controller" in kafka["KAFKA_PROCESS_ROLES"]
    for setting in (
        "OFFSETS_TOPIC_REPLICATION_FACTOR",
        "TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert int(kafka[f"KAFKA_{setting}"]) == 1, setting


def test_our_services_reach_kafka_on_its_in_network_listener(services, ours):
    advertised = _listeners(services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    kafka_names = {"kafka", services["kafka"].get("hostname")}
    in_network = {f"{host}:{port}" for host, port in advertised.values() if host in kafka_names}
    for name, service in ours.items():
        assert service["environment"][ENV["bootstrap_servers"]] in in_network, name


def test_the_registry_is_published_on_the_default_port(services):
    registry = services["schema-registry"]
    listener = urlsplit(registry["environment"]["SCHEMA_REGISTRY_LISTENERS"])
    assert _published(registry)[listener.port] == DEFAULTS.registry_port


def test_our_services_use_the_confluent_registry_at_its_root(services, ours):
    listener = urlsplit(services["schema-registry"]["environment"]["SCHEMA_REGISTRY_LISTENERS"])
    for name, service in ours.items():
        url = urlsplit(service["environment"][ENV["schema_registry_url"]])
        assert url.hostname in ("schema-registry", services["schema-registry"].get("hostname")), name
        assert url.port == listener.port, name
        # Confluent's registry serves its API at the root; the /apis/ccompat/v7 path is Apicurio's.
        assert url.path in ("", "/"), name
        assert APICURIO_CCOMPAT_PATH not in url.geturl()


def test_the_registry_stores_its_schemas_in_the_composed_kafka(services):
    store = services["schema-registry"]["environment"]["SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"]
    advertised = _listeners(services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    assert store.split("://", 1)[1] in {f"{host}:{port}" for host, port in advertised.values()}


def test_schemas_are_registered_once_before_the_producer_and_detector_start(ours):
    schemas = ours["schemas"]
    assert schemas["command"][:2] == ["schemas", "register"]
    assert schemas.get("restart") == "no"
    for name in ("producer", "detector"):
        assert ours[name]["depends_on"]["schemas"]["condition"] == "service_completed_successfully", name
