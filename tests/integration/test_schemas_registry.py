"""Schema governance against the real registry, through the CLI as a user runs it: register, check,
check-offline, and bytes any Confluent-compatible reader can decode."""

from __future__ import annotations

import io
import json
import shutil
import struct
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import to_parsing_canonical_form

from fraudstream import cli
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas, topic_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import ENV, Settings
from tests.support.kafka_io import transaction

SCHEMAS = load_schemas(Settings().schemas_dir)


def run_cli(settings: Settings, *args: str) -> int:
    """`fraudstream <args>` against the session's broker and registry, whatever the environment says."""
    return cli.main(
        [
            *args,
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--schema-registry-url",
            settings.schema_registry_url,
        ]
    )


@pytest.fixture
def topic_settings(stack_settings) -> Settings:
    """The session's services with an input topic (hence subjects) no other test uses."""
    return stack_settings.replace(transactions_topic=f"test-schemas-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def registered(topic_settings, capsys) -> Settings:
    assert run_cli(topic_settings, "schemas", "register", "--topic", topic_settings.transactions_topic) == 0
    capsys.readouterr()
    return topic_settings


@pytest.fixture
def broken_schemas_dir(tmp_path, monkeypatch) -> Path:
    """A copy of schemas/ whose transaction.avsc turns amount_cents into a string, used by the CLI."""
    target = tmp_path / "schemas"
    shutil.copytree(Settings().schemas_dir, target)
    schema = json.loads((target / "transaction.avsc").read_text())
    for field in schema["fields"]:
        if field["name"] == "amount_cents":
            field["type"] = "string"
    (target / "transaction.avsc").write_text(json.dumps(schema, indent=2))
    monkeypatch.setenv(ENV["schemas_dir"], str(target))
    return target


def one_line_error(err: str) -> str:
    """The message of the single line an expected CLI failure prints (and no traceback)."""
    [line] = err.splitlines()
    prefix = "fraudstream schemas: error: "
    assert line.startswith(prefix), line
    return line.removeprefix(prefix)


# ----- register -----
def test_register_registers_every_subject_with_its_compatibility_level(topic_settings, capsys):
    assert run_cli(topic_settings, "schemas", "register", "--topic", topic_settings.transactions_topic) == 0
    out = capsys.readouterr().out

    registry = Registry(topic_settings)
    ids = current_ids(topic_settings, registry)
    for topic, name in topic_schemas(topic_settings).items():
        subject = topic_settings.subject(topic)
        assert registry.compatibility(subject) == topic_settings.compatibility
        latest = registry.latest(subject)
        assert to_parsing_canonical_form(latest.schema) == to_parsing_canonical_form(SCHEMAS.expanded[name])
        assert f"registered {subject:32} id {ids[topic]:<6} compatibility {topic_settings.compatibility}" in out
    assert len(out.splitlines()) == len(topic_schemas(topic_settings))


def test_register_sets_the_level_on_each_subject_not_only_globally(topic_settings):
    """FULL is not the registry's global level (the stack sets FULL_TRANSITIVE): it can only come from register."""
    assert (
        run_cli(
            topic_settings,
            "schemas",
            "register",
            "--topic",
            topic_settings.transactions_topic,
            "--compatibility",
            "FULL",
        )
        == 0
    )
    registry = Registry(topic_settings)
    for topic in topic_schemas(topic_settings):
        assert registry.compatibility(topic_settings.subject(topic)) == "FULL"


def test_registering_again_is_idempotent(registered):
    registry = Registry(registered)
    before = current_ids(registered, registry)
    assert run_cli(registered, "schemas", "register", "--topic", registered.transactions_topic) == 0
    assert current_ids(registered, registry) == before
    assert all(registry.versions(registered.subject(topic)) == [1] for topic in topic_schemas(registered))


def test_register_refuses_an_incompatible_schema_with_one_line(registered, broken_schemas_dir, capsys):
    assert run_cli(registered, "schemas", "register", "--topic", registered.transactions_topic) == 1
    message = one_line_error(capsys.readouterr().err)
    assert message.startswith(
        f"{registered.subject(registered.transactions_topic)}: the registry rejected the schema as incompatible"
    )


# ----- check -----
def test_check_passes_for_the_shipped_schemas(registered, capsys):
    assert run_cli(registered, "schemas", "check", "--topic", registered.transactions_topic) == 0
    out = capsys.readouterr().out
    for topic in topic_schemas(registered):
        assert f"ok            {registered.subject(topic)}" in out.splitlines()


def test_check_fails_for_an_incompatible_schema_and_says_why(registered, broken_schemas_dir, capsys):
    assert run_cli(registered, "schemas", "check", "--topic", registered.transactions_topic) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    level = registered.compatibility
    input_subject = registered.subject(registered.transactions_topic)
    assert f"INCOMPATIBLE  {input_subject} [{level}]" in lines
    assert (
        "    - new schema cannot read version 1 data: field amount_cents: type mismatch: reader type: string "
        "not compatible with writer type: long"
    ) in lines
    # Transaction travels on the input and legit topics and inside FraudAlert; Label is untouched.
    assert f"INCOMPATIBLE  {registered.subject(registered.fraud_topic)} [{level}]" in lines
    assert f"ok            {registered.subject(registered.labels_topic)}" in lines
    assert one_line_error(captured.err) == "3 schemas are incompatible (see above)"


# ----- check-offline -----
def test_check_offline_passes_for_the_shipped_schemas(capsys):
    assert cli.main(["schemas", "check-offline"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["ok"] * len(SCHEMAS.expanded)


def test_check_offline_fails_for_an_incompatible_schema_and_says_why(broken_schemas_dir, capsys):
    assert cli.main(["schemas", "check-offline"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "INCOMPATIBLE  Transaction (vs 1 earlier version)" in lines
    assert (
        "    - version 1 readers cannot read new data: field amount_cents: type mismatch: reader type: long "
        "not compatible with writer type: string"
    ) in lines
    assert one_line_error(captured.err) == "2 schemas are incompatible (see above)"


# ----- the wire format -----
def test_our_bytes_decode_with_plain_fastavro_and_the_schema_fetched_by_id(pipeline):
    """Only the standard library and fastavro on the reading side: the Confluent framing, read by hand."""
    topic = pipeline.transactions_topic
    schema_id = current_ids(pipeline, Registry(pipeline))[topic]
    sent = transaction(99_999, event_time=datetime(2025, 2, 3, 4, 5, 6, 789_000, tzinfo=UTC), device_id="d-1")
    value = make_encoder(schema_id, SCHEMAS.parsed["Transaction"])(sent.to_dict())

    magic, framed_id = struct.unpack(">bI", value[:5])
    with urllib.request.urlopen(f"{pipeline.schema_registry_url}/schemas/ids/{framed_id}", timeout=10) as response:
        writer_schema = parse_schema(json.loads(json.load(response)["schema"]))
    decoded = schemaless_reader(io.BytesIO(value[5:]), writer_schema, None)

    assert (magic, framed_id) == (0, schema_id)
    assert decoded == sent.to_dict()
