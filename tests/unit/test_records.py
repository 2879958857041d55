"""The typed records mirror the .avsc files (names, order, types, defaults) and round-trip through Avro."""

from __future__ import annotations

import dataclasses
import functools
import io
import operator
import typing
from datetime import UTC, datetime
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer

from fraudstream.records import RECORD_TYPES, FiredRule, FraudAlert, Label, Rule, Transaction
from fraudstream.schemas import history, load_schemas
from fraudstream.settings import Settings

SETTINGS = Settings()
SCHEMAS = load_schemas(SETTINGS.schemas_dir)
BY_AVRO_NAME = {cls.avro_name: cls for cls in RECORD_TYPES}
AVRO_PRIMITIVES = {"string": str, "long": int, "int": int, "double": float, "float": float, "boolean": bool}


def python_type(avro_type: Any) -> Any:
    """The annotation a dataclass field must carry for this Avro type."""
    if isinstance(avro_type, str):
        if avro_type in AVRO_PRIMITIVES:
            return AVRO_PRIMITIVES[avro_type]
        return BY_AVRO_NAME[avro_type.rsplit(".", 1)[-1]]  # a named type defined earlier
    if isinstance(avro_type, list):
        branches = [python_type(branch) for branch in avro_type if branch != "null"]
        union = functools.reduce(operator.or_, branches)
        return union | None if "null" in avro_type else union
    kind = avro_type["type"]
    if avro_type.get("logicalType") == "timestamp-millis":
        return datetime
    if kind == "enum":
        return str
    if kind == "array":
        return tuple[python_type(avro_type["items"]), ...]
    if kind == "map":
        return dict[str, python_type(avro_type["values"])]
    if kind == "record":
        return BY_AVRO_NAME[avro_type["name"].rsplit(".", 1)[-1]]
    return python_type(kind)


def test_the_mapping_itself_distinguishes_types():
    """Guards the guard: a mapping that answered the same for everything would pass every drift test."""
    assert python_type("string") is str and python_type("long") is int and python_type("double") is float
    assert python_type(["null", "string"]) == str | None
    assert python_type({"type": "array", "items": "string"}) == tuple[str, ...]
    assert python_type({"type": "long", "logicalType": "timestamp-millis"}) is datetime
    assert python_type({"type": "enum", "name": "E", "symbols": ["A"]}) is str


def test_every_schema_has_a_record_class_and_back():
    named = {t["name"].rsplit(".", 1)[-1] for schema in SCHEMAS.expanded.values() for t in _named_records(schema)}
    assert set(BY_AVRO_NAME) == named


def _named_records(schema: Any):
    """Every record defined in a schema, itself and nested ones (FiredRule inside FraudAlert)."""
    if isinstance(schema, dict):
        if schema.get("type") == "record":
            yield schema
            for field in schema["fields"]:
                yield from _named_records(field["type"])
        elif schema.get("type") in ("array", "map"):
            yield from _named_records(schema.get("items", schema.get("values")))
    elif isinstance(schema, list):
        for branch in schema:
            yield from _named_records(branch)


RECORD_SCHEMAS = {t["name"].rsplit(".", 1)[-1]: t for s in SCHEMAS.expanded.values() for t in _named_records(s)}


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda cls: cls.__name__)
def test_dataclass_fields_match_the_avsc_in_name_order_and_type(cls):
    avro_fields = RECORD_SCHEMAS[cls.avro_name]["fields"]
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    assert [f.name for f in fields] == [f["name"] for f in avro_fields]
    for field, avro_field in zip(fields, avro_fields, strict=True):
        assert hints[field.name] == python_type(avro_field["type"]), field.name


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda cls: cls.__name__)
def test_dataclass_defaults_match_the_avsc(cls):
    for field, avro_field in zip(dataclasses.fields(cls), RECORD_SCHEMAS[cls.avro_name]["fields"], strict=True):
        if "default" in avro_field:
            default = avro_field["default"]  # an array's default is a tuple here, as its values are
            assert field.default == (tuple(default) if isinstance(default, list) else default), field.name
        else:
            assert field.default is dataclasses.MISSING, f"{field.name} has a default the schema does not"


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda cls: cls.__name__)
def test_records_are_frozen_and_slotted(cls):
    assert cls.__dataclass_params__.frozen
    assert hasattr(cls, "__slots__")


# Timestamps at millisecond precision and in UTC: what timestamp-millis carries and fastavro gives back.
EVENT_TIME = datetime(2025, 3, 14, 15, 9, 26, 535_000, tzinfo=UTC)

TRANSACTION = Transaction(
    transaction_id="4b7c6a0e-2f55-4a8e-9d5e-0c1f6d9b1a11",
    account_id="acct-0042",
    card_id="card-7f3a",
    merchant_id="m-1009",
    merchant_category="5411",
    terminal_id="pos-77",
    amount_cents=123_456,
    currency="EUR",
    event_time=EVENT_TIME,
    channel="CONTACTLESS",
    country="FR",
    city="Lyon",
    latitude=45.764,
    longitude=4.8357,
    device_id="dev-1",
)
SAMPLES = [
    TRANSACTION,
    dataclasses.replace(TRANSACTION, device_id=None, channel="UNKNOWN"),
    FraudAlert(
        transaction=TRANSACTION,
        rules=("amount_over_threshold", "new_device"),
        detected_at=datetime(2025, 3, 14, 15, 9, 27, 1_000, tzinfo=UTC),
    ),
    Label(transaction_id=TRANSACTION.transaction_id, is_fraud=True, scenario="card_testing"),
    FraudAlert(
        transaction=TRANSACTION,
        rules=("big",),
        detected_at=EVENT_TIME,
        fired=(FiredRule(id="big", version=3),),
        rule_set_version="17",
    ),
    Rule(
        id="big",
        version=3,
        kind="large_amount",
        enabled=True,
        author="analyst",
        comment="",
        written_at=EVENT_TIME,
        parameters={
            "threshold_cents": 50_000,
            "exempt_unless_known_terminal": False,
            "exempt_categories": ("5311",),
            "away_km": 300.0,
        },
    ),
]


def avro_round_trip(schema: Any, record: dict[str, Any], reader: Any = None) -> dict[str, Any]:
    out = io.BytesIO()
    schemaless_writer(out, schema, record)
    out.seek(0)
    return schemaless_reader(out, schema, reader)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_to_dict_and_from_dict_round_trip_through_avro(record):
    schema = SCHEMAS.parsed[record.avro_name]
    decoded = avro_round_trip(schema, record.to_dict())
    assert type(record).from_dict(decoded) == record


def test_from_dict_of_an_older_version_fills_the_new_fields_with_their_defaults():
    v1 = dict(history(SETTINGS.schemas_dir, "Transaction"))[1]
    data = {k: v for k, v in TRANSACTION.to_dict().items() if k != "device_id"}
    decoded = avro_round_trip(v1, data)
    assert "device_id" not in decoded
    assert Transaction.from_dict(decoded) == dataclasses.replace(TRANSACTION, device_id=None)


def test_to_dict_gives_avro_ready_values():
    alert = SAMPLES[2]
    data = alert.to_dict()
    assert data["rules"] == ["amount_over_threshold", "new_device"]  # a list, as Avro arrays are
    assert data["transaction"] == TRANSACTION.to_dict()
    assert list(TRANSACTION.to_dict()) == [f["name"] for f in SCHEMAS.expanded["Transaction"]["fields"]]
