"""The local stack and the services behind it: a record through Kafka and the registry, compatibility
enforced, schemas that outlive the registry process, and the `fraudstream stack` commands."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka.schema_registry import topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro.schema import to_parsing_canonical_form

from fraudstream import cli
from fraudstream.errors import SchemaError
from fraudstream.kafka import admin, ensure_topics
from fraudstream.records import Transaction
from fraudstream.registry import Registry
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, make_encoder, split_frame
from fraudstream.settings import ENV, Settings
from fraudstream.stack import LocalStack
from tests.support.kafka_io import produce_raw, read_topic, transaction

SCHEMAS = load_schemas(Settings().schemas_dir)
# timestamp-millis keeps milliseconds: a value that survives the trip unchanged.
EVENT_TIME = datetime(2025, 6, 1, 12, 30, 15, 250_000, tzinfo=UTC)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def canonical(schema: dict) -> str:
    """Avro's Parsing Canonical Form: registries may store a schema reformatted, never changed."""
    return to_parsing_canonical_form(schema)


def with_amount_as_string(schema: dict) -> str:
    """`schema` with amount_cents turned into a string: incompatible in both directions."""
    fields = [dict(f, type="string") if f["name"] == "amount_cents" else f for f in schema["fields"]]
    return json.dumps({**schema, "fields": fields})


# ----- Kafka + registry -----
def test_a_record_goes_through_kafka_and_is_decoded_by_its_schema_id(stack_settings):
    settings = stack_settings.replace(transactions_topic=unique("test-stack"))
    topic = settings.transactions_topic
    ensure_topics(settings, (topic,), partitions=1)
    schema_id = Registry(settings).register(settings.subject(topic), SCHEMAS.text("Transaction"))
    sent = transaction(12_345, event_time=EVENT_TIME, device_id="dev-7")
    encode = make_encoder(schema_id, SCHEMAS.parsed["Transaction"])

    produce_raw(settings, topic, [(sent.account_id.encode(), encode(sent.to_dict()))])
    [message] = read_topic(settings, topic)

    assert message.key() == sent.account_id.encode()
    assert split_frame(message.value())[0] == schema_id
    # A fresh client, so the writer schema really is fetched from the registry by its id.
    reader = Registry(settings)
    decoder = Decoder(reader, SCHEMAS.expanded["Transaction"])
    assert Transaction.from_dict(decoder.decode(message.value())) == sent
    # Confluent's own deserializer reads our bytes: the framing and the ids are the standard ones.
    confluent = AvroDeserializer(reader.client, conf={"subject.name.strategy": topic_subject_name_strategy})
    assert Transaction.from_dict(confluent(message.value(), SerializationContext(topic, MessageField.VALUE))) == sent


def test_the_registry_rejects_an_incompatible_schema_once_compatibility_is_set(stack_settings):
    registry = Registry(stack_settings)
    governed, ungoverned = unique("test-governed-value"), unique("test-ungoverned-value")
    transaction_schema = SCHEMAS.expanded["Transaction"]
    for subject, level in ((governed, "FULL_TRANSITIVE"), (ungoverned, "NONE")):
        registry.set_compatibility(subject, level)
        registry.register(subject, SCHEMAS.text("Transaction"))

    with pytest.raises(SchemaError, match=f"{governed}: the registry rejected the schema as incompatible") as error:
        registry.register(governed, with_amount_as_string(transaction_schema))
    assert error.value.__cause__.http_status_code == 409
    assert registry.versions(governed) == [1]
    assert not registry.is_compatible(governed, with_amount_as_string(transaction_schema))
    # The same change goes through where no rule applies: the rule is what rejected it.
    registry.register(ungoverned, with_amount_as_string(transaction_schema))
    assert registry.versions(ungoverned) == [1, 2]


# ----- a registry of our own, to restart -----
def local_kafka_port(settings: Settings) -> int:
    """The port of the session's broker, which a local registry can share."""
    host, _, port = settings.bootstrap_servers.partition(",")[0].rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        pytest.skip(
            f"the session's Kafka ({settings.bootstrap_servers}) is not local: the local stack's "
            "registry is not what these tests use"
        )
    return int(port)


@pytest.fixture
def own_registry(stack_settings, tmp_path) -> Iterator[LocalStack]:
    """A second registry process on free ports, storing its schemas in the session's Kafka under topics
    of its own: restarting it disturbs no one, and it runs from the already fetched distribution."""
    namespace = unique("test-registry")
    settings = stack_settings.replace(
        stack_dir=tmp_path / "stack",
        kafka_port=local_kafka_port(stack_settings),
        registry_port=free_port(),
        registry_management_port=free_port(),
    )
    shared_dist = LocalStack(Settings.from_env(), log=lambda *_: None).dist
    stack = LocalStack(settings, log=lambda *_: None, dist=shared_dist, registry_namespace=namespace)
    stack.fetch()
    try:
        stack.start_registry()
        yield stack
    finally:
        stack.stop_registry()
        client = admin(stack_settings)
        topics = [t for t in client.list_topics(timeout=10).topics if t.startswith(namespace)]
        if topics:
            for future in client.delete_topics(topics, operation_timeout=30).values():
                future.result()


def test_schemas_survive_a_registry_restart(own_registry, stack_settings):
    url_settings = Settings(schema_registry_url=own_registry.registry_url)
    subject = unique("test-persisted-value")
    schema_id = Registry(url_settings).register(subject, SCHEMAS.text("Transaction"))
    first_pid = own_registry.status().registry_pid

    own_registry.restart_registry()

    assert own_registry.status().registry_pid not in (None, first_pid)
    after = Registry(url_settings)  # a new client: nothing cached
    assert canonical(after.schema_by_id(schema_id)) == canonical(SCHEMAS.expanded["Transaction"])
    assert after.versions(subject) == [1]
    # Its storage is its own: the session's registry never saw the subject.
    assert Registry(stack_settings).versions(subject) == []


# ----- fraudstream stack ... -----
@pytest.fixture
def session_stack(stack_settings) -> LocalStack:
    """The local stack the session runs on (the one `fraudstream stack` manages by default)."""
    stack = LocalStack(Settings.from_env(), log=lambda *_: None)
    if stack.bootstrap_servers != stack_settings.bootstrap_servers or not stack.status().running:
        pytest.skip("this session runs on an existing Kafka and registry, not on the local stack")
    return stack


def test_stack_status_reports_both_services_running(session_stack, capsys):
    assert cli.main(["stack", "status"]) == 0
    out = capsys.readouterr().out
    status = session_stack.status()
    assert f"kafka     running (pid {status.kafka_pid})" in out
    assert f"registry  running (pid {status.registry_pid})" in out
    assert session_stack.bootstrap_servers in out and session_stack.registry_url in out


def test_stack_up_on_a_running_stack_changes_nothing(session_stack, capsys):
    before = session_stack.status()
    assert cli.main(["stack", "up"]) == 0
    out = capsys.readouterr().out
    assert "stack already running" in out
    assert f"export {ENV['bootstrap_servers']}={before.bootstrap_servers}" in out
    assert f"export {ENV['schema_registry_url']}={before.registry_url}" in out
    assert session_stack.status() == before


@pytest.fixture
def empty_stack_dir(tmp_path, monkeypatch) -> Iterator:
    """`fraudstream stack` pointed at a folder where no stack was ever started, on free ports."""
    monkeypatch.setenv(ENV["stack_dir"], str(tmp_path))
    for setting in ("kafka_port", "controller_port", "registry_port", "registry_management_port"):
        monkeypatch.setenv(ENV[setting], str(free_port()))
    yield tmp_path
    assert not (tmp_path / "kafka" / "pid").exists() and not (tmp_path / "registry" / "pid").exists(), (
        "a test of a stack that must not start left a service running"
    )


def test_stack_status_of_a_stopped_stack_exits_3(empty_stack_dir, capsys):
    assert cli.main(["stack", "status"]) == 3
    out = capsys.readouterr().out
    assert out.count("stopped") == 2


def test_stack_down_when_nothing_runs_is_a_no_op(empty_stack_dir, capsys):
    assert cli.main(["stack", "down"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("setting", "service"),
    [
        ("kafka_port", "Kafka"),
        ("registry_management_port", "the schema registry's management interface"),
    ],
)
def test_stack_up_on_a_taken_port_fails_with_one_line_and_starts_nothing(
    empty_stack_dir, monkeypatch, capsys, setting, service
):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setenv(ENV[setting], str(port))

        assert cli.main(["stack", "up"]) == 1

    captured = capsys.readouterr()
    assert captured.err == (
        f"fraudstream stack: error: port {port} (for {service}) is already in use by another "
        f"process; stop it or choose another port with {ENV[setting]}\n"
    )
    assert "Traceback" not in captured.out
    # The check comes first: nothing fetched, nothing started (not even Kafka when only a registry port is taken).
    assert not (empty_stack_dir / "dist").exists()
    assert not (empty_stack_dir / "kafka").exists()
