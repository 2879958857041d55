"""The Avro contract offline: the schema files parse, the history is complete, and the evolution
check accepts safe changes and rejects breaking ones with a reason a person can act on."""

from __future__ import annotations

import copy
import json
import shutil
from typing import Any

import pytest
from fastavro.schema import parse_schema

from fraudstream.errors import SchemaError
from fraudstream.schemas import SCHEMA_FILES, compatibility_problems, history, load_schemas, topic_schemas
from fraudstream.schemas_cli import check_offline
from fraudstream.settings import Settings

SETTINGS = Settings()
SCHEMAS = load_schemas(SETTINGS.schemas_dir)
TRANSACTION_V1 = dict(history(SETTINGS.schemas_dir, "Transaction"))[1]
TRANSACTION_V2 = SCHEMAS.expanded["Transaction"]


def changed(schema: dict[str, Any], change) -> dict[str, Any]:
    """A deep copy of `schema` with `change(fields_by_name, schema)` applied."""
    new = copy.deepcopy(schema)
    change({f["name"]: f for f in new["fields"]}, new)
    return new


def test_every_schema_file_parses_into_a_record_of_its_name():
    assert set(SCHEMAS.expanded) == set(SCHEMA_FILES)
    for name, parsed in SCHEMAS.parsed.items():
        assert parsed["type"] == "record"
        assert parsed["name"] == f"io.fraudstream.{name}"


def test_registered_text_is_self_contained():
    """The registry gets one schema string per subject, with no references to resolve."""
    for name in SCHEMAS.expanded:
        parse_schema(json.loads(SCHEMAS.text(name)), named_schemas={})
    assert '"name":"io.fraudstream.Transaction"' in SCHEMAS.text("FraudAlert").replace(" ", "")


def test_every_avro_topic_has_a_schema_and_the_dead_letter_topic_has_none():
    topics = topic_schemas(SETTINGS)
    assert set(topics) == set(SETTINGS.all_topics) - {SETTINGS.dlq_topic}
    assert set(topics.values()) == set(SCHEMA_FILES)


@pytest.mark.parametrize("name", list(SCHEMA_FILES))
def test_history_is_numbered_from_one_without_gaps_and_each_version_stands_alone(name):
    versions = history(SETTINGS.schemas_dir, name)
    assert [number for number, _ in versions] == list(range(1, len(versions) + 1))
    for _, schema in versions:
        parse_schema(schema, named_schemas={})  # expanded: no reference to another file


def test_the_shipped_schemas_pass_the_offline_check_at_the_configured_level():
    results = check_offline(SETTINGS)
    assert [problems for _, problems in results] == [[] for _ in SCHEMA_FILES]
    assert SETTINGS.compatibility == "FULL_TRANSITIVE"


def test_transaction_v1_to_v2_adding_an_optional_field_is_fully_compatible():
    assert "device_id" not in {f["name"] for f in TRANSACTION_V1["fields"]}
    assert compatibility_problems(TRANSACTION_V2, [TRANSACTION_V1], "FULL_TRANSITIVE") == []


def test_a_new_field_without_a_default_breaks_backward_compatibility():
    new = changed(TRANSACTION_V2, lambda fields, s: s["fields"].append({"name": "risk_score", "type": "int"}))
    problems = compatibility_problems(new, [TRANSACTION_V1], "FULL_TRANSITIVE")
    assert problems == [
        "new schema cannot read version 1 data: field risk_score: reader field missing default "
        "value (the writer has no such field)"
    ]
    # Old readers simply ignore the extra field: forward compatibility alone would allow it.
    assert compatibility_problems(new, [TRANSACTION_V1], "FORWARD") == []


def test_a_changed_type_is_rejected_in_both_directions():
    new = changed(TRANSACTION_V2, lambda fields, s: fields["amount_cents"].update(type="string"))
    assert compatibility_problems(new, [TRANSACTION_V1], "FULL_TRANSITIVE") == [
        "new schema cannot read version 1 data: field amount_cents: type mismatch: reader type: string "
        "not compatible with writer type: long",
        "version 1 readers cannot read new data: field amount_cents: type mismatch: reader type: long "
        "not compatible with writer type: string",
    ]


def test_each_of_several_problems_names_its_own_field():
    def two_changes(fields, schema):
        fields["card_id"].update(type="long")
        fields["latitude"].update(type="string")

    problems = compatibility_problems(changed(TRANSACTION_V2, two_changes), [TRANSACTION_V1], "BACKWARD")
    assert problems == [
        "new schema cannot read version 1 data: field card_id: type mismatch: reader type: long "
        "not compatible with writer type: string",
        "new schema cannot read version 1 data: field latitude: type mismatch: reader type: string "
        "not compatible with writer type: double",
    ]


def test_a_widening_type_change_is_backward_but_not_forward_compatible():
    new = changed(TRANSACTION_V2, lambda fields, s: fields["amount_cents"].update(type="double"))
    assert compatibility_problems(new, [TRANSACTION_V1], "BACKWARD") == []
    assert compatibility_problems(new, [TRANSACTION_V1], "FULL") == [
        "version 1 readers cannot read new data: field amount_cents: type mismatch: reader type: long "
        "not compatible with writer type: double"
    ]


def test_a_renamed_field_without_an_alias_is_rejected():
    new = changed(TRANSACTION_V2, lambda fields, s: fields["city"].update(name="town"))
    problems = compatibility_problems(new, [TRANSACTION_V1], "FULL_TRANSITIVE")
    assert problems == [
        "new schema cannot read version 1 data: field town: reader field missing default value "
        "(the writer has no such field)",
        "version 1 readers cannot read new data: field city: reader field missing default value "
        "(the writer has no such field)",
    ]


def test_an_alias_lets_new_readers_follow_a_rename_but_old_readers_still_break():
    new = changed(TRANSACTION_V2, lambda fields, s: fields["city"].update(name="town", aliases=["city"]))
    assert compatibility_problems(new, [TRANSACTION_V1], "BACKWARD") == []
    assert compatibility_problems(new, [TRANSACTION_V1], "FULL") == [
        "version 1 readers cannot read new data: field city: reader field missing default value "
        "(the writer has no such field)"
    ]


def test_a_renamed_record_is_reported_as_such():
    new = changed(TRANSACTION_V2, lambda fields, s: s.update(name="io.fraudstream.Payment"))
    assert compatibility_problems(new, [TRANSACTION_V1], "BACKWARD") == [
        "new schema cannot read version 1 data: record io.fraudstream.Payment cannot read "
        "io.fraudstream.Transaction: different name, no alias"
    ]


def test_removing_a_symbol_from_an_enum_without_a_default_is_rejected():
    without_default = changed(TRANSACTION_V2, lambda fields, s: fields["channel"]["type"].pop("default"))
    new = changed(without_default, lambda fields, s: fields["channel"]["type"]["symbols"].remove("ATM"))
    assert compatibility_problems(new, [without_default], "FULL_TRANSITIVE") == [
        "new schema cannot read version 1 data: field channel: missing enum symbols: {'ATM'}"
    ]


def test_our_channel_enum_has_a_default_so_removing_a_symbol_is_compatible():
    channel = next(f["type"] for f in TRANSACTION_V2["fields"] if f["name"] == "channel")
    assert channel["default"] == "UNKNOWN"
    new = changed(TRANSACTION_V2, lambda fields, s: fields["channel"]["type"]["symbols"].remove("ATM"))
    # A new reader meeting an old ATM record reads it as the default, UNKNOWN.
    assert compatibility_problems(new, [TRANSACTION_V1, TRANSACTION_V2], "FULL_TRANSITIVE") == []


def test_transitive_levels_check_every_earlier_version_not_only_the_latest():
    with_default = changed(
        TRANSACTION_V2, lambda fields, s: s["fields"].append({"name": "risk_score", "type": "int", "default": 0})
    )
    without_default = changed(
        TRANSACTION_V2, lambda fields, s: s["fields"].append({"name": "risk_score", "type": "int"})
    )
    versions = [TRANSACTION_V1, with_default]
    assert compatibility_problems(without_default, versions, "FULL") == []
    problems = compatibility_problems(without_default, versions, "FULL_TRANSITIVE")
    assert problems == [
        "new schema cannot read version 1 data: field risk_score: reader field missing default "
        "value (the writer has no such field)"
    ]


def test_level_none_and_an_empty_history_accept_anything():
    new = changed(TRANSACTION_V2, lambda fields, s: fields["amount_cents"].update(type="string"))
    assert compatibility_problems(new, [TRANSACTION_V1], "NONE") == []
    assert compatibility_problems(new, [], "FULL_TRANSITIVE") == []


@pytest.fixture
def schemas_copy(tmp_path):
    target = tmp_path / "schemas"
    shutil.copytree(SETTINGS.schemas_dir, target)
    return target


def test_a_schema_file_that_is_not_json_names_the_file(schemas_copy):
    (schemas_copy / "label.avsc").write_text("{not json")
    with pytest.raises(SchemaError, match=r"label\.avsc is not valid JSON"):
        load_schemas(schemas_copy)


def test_a_schema_file_defining_another_record_is_rejected(schemas_copy):
    label = json.loads((schemas_copy / "label.avsc").read_text())
    label["name"] = "Labels"
    (schemas_copy / "label.avsc").write_text(json.dumps(label))
    with pytest.raises(SchemaError, match="label.avsc defines io.fraudstream.Labels, expected a record named Label"):
        load_schemas(schemas_copy)


def test_a_missing_schema_file_is_reported(schemas_copy):
    (schemas_copy / "fraud_alert.avsc").unlink()
    with pytest.raises(SchemaError, match=r"cannot read .*fraud_alert\.avsc"):
        load_schemas(schemas_copy)


def test_the_offline_check_reports_a_broken_schema_against_its_history(schemas_copy):
    broken = changed(TRANSACTION_V2, lambda fields, s: fields["amount_cents"].update(type="string"))
    (schemas_copy / "transaction.avsc").write_text(json.dumps(broken))
    results = dict(check_offline(SETTINGS.replace(schemas_dir=schemas_copy)))
    assert results["Transaction (vs 1 earlier version)"][0] == (
        "new schema cannot read version 1 data: field amount_cents: type mismatch: reader type: string "
        "not compatible with writer type: long"
    )
    # FraudAlert embeds Transaction, so the same break shows there, under the nested field's path.
    assert results["FraudAlert (vs 2 earlier versions)"][0] == (
        "new schema cannot read version 1 data: field transaction.amount_cents: type mismatch: reader type: "
        "string not compatible with writer type: long"
    )
    assert results["Label (vs 2 earlier versions)"] == []


def test_a_registered_version_avro_cannot_parse_is_a_schema_error():
    # Found by mypy: the handler named avro.schema.SchemaParseException, which does not exist (AttributeError).
    unparsable = {"type": "record", "name": "Transaction", "fields": [{"name": "a", "type": "no_such_type"}]}
    with pytest.raises(SchemaError, match="invalid schema"):
        compatibility_problems(TRANSACTION_V2, [unparsable], "BACKWARD")
