"""How `fraudstream inspect` turns records into JSON lines: offline, with records framed here."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message
from fastavro import parse_schema

from fraudstream.consumer.inspect import (
    RecordFormatter,
    StartOffset,
    console_schemas,
    dumps,
    headers_object,
    is_dead_letter_topic,
    strip_logical_types,
)
from fraudstream.registry import UnknownSchema
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings

SETTINGS = Settings()
SCHEMAS = load_schemas(SETTINGS.schemas_dir)
TRANSACTION_ID = 7
WHEN = datetime(2024, 5, 1, 12, 30, 15, 250_000, tzinfo=timezone.utc)
WHEN_MILLIS = 1_714_566_615_250
RAW_SCHEMA_ID = 9
RAW_SCHEMA = {
    "type": "record",
    "name": "Blob",
    "fields": [
        {"name": "data", "type": "bytes"},
        {"name": "ratio", "type": "double"},
        {"name": "note", "type": ["null", "string", "long"]},
    ],
}


def transaction_dict(**overrides: Any) -> dict[str, Any]:
    record = {
        "transaction_id": "tx-1",
        "account_id": "acc-1",
        "card_id": "card-1",
        "merchant_id": "m-1",
        "merchant_category": "5411",
        "terminal_id": "t-1",
        "amount_cents": 123_45,
        "currency": "EUR",
        "event_time": WHEN,
        "channel": "ONLINE",
        "country": "FR",
        "city": "Lyon",
        "latitude": 45.76,
        "longitude": 4.84,
        "device_id": "dev-9",
    }
    return record | overrides


class FakeRegistry:
    """Writer schemas by id, counting how often each is asked for."""

    def __init__(self) -> None:
        self.known = {TRANSACTION_ID: SCHEMAS.expanded["Transaction"], RAW_SCHEMA_ID: RAW_SCHEMA}
        self.asked: list[int] = []

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        self.asked.append(schema_id)
        if schema_id not in self.known:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        return self.known[schema_id]


def message(
    value: bytes | None,
    *,
    key: bytes | None = b"acc-1",
    headers: list | None = None,
    topic: str = "transactions.legit",
    partition: int = 2,
    offset: int = 41,
) -> Message:
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=headers,
        timestamp=(TIMESTAMP_CREATE_TIME, 1_700_000_000_000),
    )


def formatter(registry: FakeRegistry | None = None, **options: Any) -> RecordFormatter:
    registry = registry or FakeRegistry()
    return RecordFormatter(console_schemas(registry.schema_by_id), **({"dead_letter": False} | options))


ENCODE_TRANSACTION = make_encoder(TRANSACTION_ID, SCHEMAS.parsed["Transaction"])
ENCODE_BLOB = make_encoder(RAW_SCHEMA_ID, parse_schema(RAW_SCHEMA))


def test_value_prints_like_the_console_consumer_with_plain_unions() -> None:
    line = formatter().format(message(ENCODE_TRANSACTION(transaction_dict())))

    assert json.loads(line) == transaction_dict(event_time=WHEN_MILLIS)
    assert "\n" not in line and ": " not in line  # one compact line


def test_confluent_json_tags_unions_with_their_branch() -> None:
    tagged = formatter(confluent_json=True)
    with_device = json.loads(tagged.format(message(ENCODE_TRANSACTION(transaction_dict()))))
    without_device = json.loads(tagged.format(message(ENCODE_TRANSACTION(transaction_dict(device_id=None)))))

    assert with_device["device_id"] == {"string": "dev-9"}
    assert without_device["device_id"] is None
    assert with_device["event_time"] == WHEN_MILLIS and with_device["channel"] == "ONLINE"


def test_bytes_print_as_avro_json_strings_and_non_finite_doubles_as_text() -> None:
    blob = {"data": b"\x00\xffA", "ratio": float("nan"), "note": 5}

    printed = json.loads(formatter().format(message(ENCODE_BLOB(blob))))
    tagged = json.loads(formatter(confluent_json=True).format(message(ENCODE_BLOB(blob | {"ratio": 0.5}))))

    assert printed == {"data": "\u0000\u00ffA", "ratio": "NaN", "note": 5}
    assert tagged == {"data": "\u0000\u00ffA", "ratio": 0.5, "note": {"long": 5}}


def test_key_and_metadata_wrap_the_value() -> None:
    record = message(ENCODE_TRANSACTION(transaction_dict()), headers=[("trace", b"t-1"), ("bin", b"\x80")])

    line = json.loads(formatter(print_key=True, print_metadata=True).format(record))

    assert line == {
        "topic": "transactions.legit",
        "partition": 2,
        "offset": 41,
        "timestamp": 1_700_000_000_000,
        "timestamp_type": "CreateTime",
        "schema_id": TRANSACTION_ID,
        "headers": {"trace": "t-1", "bin_hex": "80"},
        "key": "acc-1",
        "value": transaction_dict(event_time=WHEN_MILLIS),
    }
    assert (
        json.loads(formatter(print_key=True).format(message(ENCODE_TRANSACTION(transaction_dict()), key=b"\xfe")))[
            "key_hex"
        ]
        == "fe"
    )


def test_dead_letter_records_show_reason_source_and_raw_bytes() -> None:
    headers = [
        ("error.kind", b"no_magic_byte"),
        ("error.reason", b"first byte is 0x7b"),
        ("source.topic", b"transactions"),
        ("source.partition", b"3"),
        ("source.offset", b"17"),
    ]
    raw = b'{"amount": 1}'

    line = json.loads(formatter(dead_letter=True).format(message(raw, headers=headers, topic="transactions.dlq")))
    as_base64 = json.loads(formatter(dead_letter=True, bytes_encoding="base64").format(message(raw, headers=headers)))

    assert line == {
        "error": {"kind": "no_magic_byte", "reason": "first byte is 0x7b"},
        "source": {"topic": "transactions", "partition": 3, "offset": 17},
        "key": "acc-1",
        "value_hex": raw.hex(),
    }
    assert as_base64["value_base64"] == "eyJhbW91bnQiOiAxfQ=="


def test_dead_letter_record_without_error_headers_still_prints() -> None:
    line = json.loads(formatter(dead_letter=True).format(message(None, key=None)))

    assert line["error"] == {"kind": None, "reason": None} and line["value_hex"] is None and line["key"] is None


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"plain text", "no_magic_byte"),
        (b"", "empty_value"),
        (b"\x00\x00\x00\x00\x63" + b"\x02", "unknown_schema_id"),
        (b"\x00\x00\x00\x00\x07" + b"\x02", "corrupt_avro"),
    ],
)
def test_undecodable_values_become_error_lines_with_their_position(value: bytes, kind: str) -> None:
    printer = formatter()

    line = json.loads(printer.format(message(value)))

    assert line["error"]["kind"] == kind and line["error"]["reason"]
    assert (line["topic"], line["partition"], line["offset"]) == ("transactions.legit", 2, 41)
    assert line["value_hex"] == value.hex()
    assert printer.undecodable == 1


def test_writer_schemas_are_fetched_once_per_id_even_unknown_ones() -> None:
    registry = FakeRegistry()
    printer = formatter(registry)
    unknown = b"\x00\x00\x00\x00\x63\x02"

    for _ in range(3):
        printer.format(message(ENCODE_TRANSACTION(transaction_dict())))
        printer.format(message(unknown))

    assert sorted(registry.asked) == [TRANSACTION_ID, 99]


def test_logical_types_are_stripped_everywhere() -> None:
    stripped = strip_logical_types(SCHEMAS.expanded["FraudAlert"])

    assert "logicalType" not in json.dumps(stripped)
    assert "logicalType" in json.dumps(SCHEMAS.expanded["FraudAlert"])  # the original is untouched


def test_repeated_header_names_keep_every_value() -> None:
    assert headers_object([("a", b"1"), ("a", b"2"), ("a", None)], "hex") == {"a": ["1", "2", None]}


@pytest.mark.parametrize(
    ("text", "low", "high", "start"),
    [
        ("earliest", 5, 20, 5),
        ("latest", 5, 20, 20),
        ("12", 5, 20, 12),
        ("0", 5, 20, 5),
        ("-3", 5, 20, 17),
        ("-100", 5, 20, 5),
    ],
)
def test_start_offsets_resolve_within_the_partition(text: str, low: int, high: int, start: int) -> None:
    assert StartOffset.parse(text).resolve(low, high) == start


def test_start_offset_rejects_words_it_does_not_know() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not an offset"):
        StartOffset.parse("yesterday")


@pytest.mark.parametrize(
    ("topic", "dead_letter"),
    [
        ("transactions.dlq", True),
        ("test-abc.dlq", True),
        ("transactions", False),
        ("transactions.fraud", False),
        ("dlq", False),
    ],
)
def test_dead_letter_topics_follow_the_settings_naming_rule(topic: str, dead_letter: bool) -> None:
    assert is_dead_letter_topic(topic, SETTINGS) is dead_letter


def test_dumps_is_one_compact_utf8_line() -> None:
    assert dumps({"city": "Zürich", "n": [1, 2]}) == '{"city":"Zürich","n":[1,2]}'
