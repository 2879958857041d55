"""Confluent framing and the Decoder, with an in-memory registry: every way bytes can be bad has its
own DecodeError kind, registry trouble is never mistaken for bad data, and the registry is asked
once per schema id."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from fraudstream.errors import RegistryError
from fraudstream.records import Label, Transaction
from fraudstream.registry import UnknownSchema
from fraudstream.schemas import history, load_schemas
from fraudstream.serde import MAGIC_BYTE, DecodeError, Decoder, frame, make_encoder, read_payload, split_frame
from fraudstream.settings import Settings

SETTINGS = Settings()
SCHEMAS = load_schemas(SETTINGS.schemas_dir)
TRANSACTION_V1 = dict(history(SETTINGS.schemas_dir, "Transaction"))[1]
V1_ID, V2_ID, LABEL_ID, UNKNOWN_ID = 11, 12, 13, 99

TRANSACTION = Transaction(
    transaction_id="t-1",
    account_id="acct-1",
    card_id="card-1",
    merchant_id="m-1",
    merchant_category="5812",
    terminal_id="pos-1",
    amount_cents=4_250,
    event_time=datetime(2025, 1, 2, 3, 4, 5, 6_000, tzinfo=UTC),
    channel="ONLINE",
    country="US",
    city="Boston",
    latitude=42.36,
    longitude=-71.06,
    device_id="dev-9",
)


class FakeRegistry:
    """The part of fraudstream.registry.Registry the Decoder uses, counting lookups."""

    def __init__(self, schemas: dict[int, dict[str, Any]], *, down: bool = False) -> None:
        self.schemas = schemas
        self.down = down
        self.lookups: list[int] = []

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        self.lookups.append(schema_id)
        if self.down:
            raise RegistryError("schema registry at http://registry.invalid unreachable")
        if schema_id not in self.schemas:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        return self.schemas[schema_id]


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry(
        {V1_ID: TRANSACTION_V1, V2_ID: SCHEMAS.expanded["Transaction"], LABEL_ID: SCHEMAS.expanded["Label"]}
    )


@pytest.fixture
def decoder(registry) -> Decoder:
    return Decoder(registry, SCHEMAS.expanded["Transaction"])


encode_v2 = make_encoder(V2_ID, SCHEMAS.parsed["Transaction"])


# ----- framing -----
def test_a_frame_is_the_magic_byte_then_the_big_endian_schema_id():
    assert frame(258) == bytes([MAGIC_BYTE, 0, 0, 1, 2])
    value = encode_v2(TRANSACTION.to_dict())
    assert value[:5] == frame(V2_ID)


def test_split_frame_returns_the_schema_id_and_the_avro_payload():
    schema_id, payload = split_frame(frame(70_000) + b"avro")
    assert schema_id == 70_000
    assert bytes(payload) == b"avro"


@pytest.mark.parametrize("value", [None, b""], ids=["null", "zero-bytes"])
def test_an_empty_value_is_its_own_kind(value):
    with pytest.raises(DecodeError) as error:
        split_frame(value)
    assert error.value.kind == "empty_value"


def test_a_value_without_the_magic_byte_says_what_it_found():
    with pytest.raises(DecodeError) as error:
        split_frame(b'{"amount": 1}')
    assert error.value.kind == "no_magic_byte"
    assert "0x7b" in error.value.reason


def test_a_value_shorter_than_the_header_is_truncated():
    with pytest.raises(DecodeError) as error:
        split_frame(bytes([MAGIC_BYTE, 0, 0]))
    assert error.value.kind == "truncated_header"
    assert "3 bytes" in error.value.reason


# ----- decoding -----
def test_a_record_decodes_to_what_was_encoded(decoder):
    assert Transaction.from_dict(decoder.decode(encode_v2(TRANSACTION.to_dict()))) == TRANSACTION


def test_the_registry_is_asked_once_per_schema_id(decoder, registry):
    value = encode_v2(TRANSACTION.to_dict())
    for _ in range(5):
        decoder.decode(value)
    assert registry.lookups == [V2_ID]


def test_the_readers_own_id_needs_no_lookup(registry):
    decoder = Decoder(registry, SCHEMAS.expanded["Transaction"], reader_id=V2_ID)
    decoder.decode(encode_v2(TRANSACTION.to_dict()))
    assert registry.lookups == []


def test_an_unknown_schema_id_is_a_data_error_remembered_for_next_time(decoder, registry):
    value = frame(UNKNOWN_ID) + b"\x00"
    for _ in range(2):
        with pytest.raises(DecodeError) as error:
            decoder.decode(value)
        assert error.value.kind == "unknown_schema_id"
        assert f"schema id {UNKNOWN_ID}" in error.value.reason
    assert registry.lookups == [UNKNOWN_ID]


def test_a_registry_that_does_not_answer_is_not_a_data_error():
    decoder = Decoder(FakeRegistry({}, down=True), SCHEMAS.expanded["Transaction"])
    with pytest.raises(RegistryError):
        decoder.decode(encode_v2(TRANSACTION.to_dict()))


def test_a_schema_of_another_record_type_is_a_mismatch(decoder):
    label = Label(transaction_id="t-1", is_fraud=False, scenario="legit")
    value = make_encoder(LABEL_ID, SCHEMAS.parsed["Label"])(label.to_dict())
    with pytest.raises(DecodeError) as error:
        decoder.decode(value)
    assert error.value.kind == "schema_mismatch"
    assert "io.fraudstream.Label" in error.value.reason and "io.fraudstream.Transaction" in error.value.reason


def test_a_corrupt_payload_names_the_schema_id(decoder):
    value = encode_v2(TRANSACTION.to_dict())
    with pytest.raises(DecodeError) as error:
        decoder.decode(value[:12])  # the record stops in the middle of a string
    assert error.value.kind == "corrupt_avro"
    assert f"schema id {V2_ID}" in error.value.reason


def test_bytes_left_after_the_record_are_rejected(decoder):
    with pytest.raises(DecodeError) as error:
        decoder.decode(encode_v2(TRANSACTION.to_dict()) + b"\x00\x01")
    assert error.value.kind == "trailing_bytes"
    assert error.value.reason.startswith("2 bytes left")


def test_a_v1_record_read_with_the_v2_schema_gets_no_device_id(decoder):
    encode_v1 = make_encoder(V1_ID, TRANSACTION_V1)
    v1_record = {k: v for k, v in TRANSACTION.to_dict().items() if k != "device_id"}
    decoded = decoder.decode(encode_v1(v1_record))
    assert decoded["device_id"] is None
    assert Transaction.from_dict(decoded) == dataclasses.replace(TRANSACTION, device_id=None)


def test_schema_ids_are_unsigned_32_bit():
    assert split_frame(b"\x00\xff\xff\xff\xff")[0] == 2**32 - 1


# ----- the canonical check (what the detector requires before forwarding bytes as they are) -----
def _with(field: str, raw: bytes) -> bytes:
    from tests.support.malformed import field_payload

    return frame(V2_ID) + field_payload(dataclasses.replace(TRANSACTION, device_id=None), **{field: raw})


@pytest.mark.parametrize(
    "field, raw",
    [
        ("channel", b"\x01"),  # enum index -1: fastavro reads the last symbol
        ("device_id", b"\x01\x06dev"),  # union index -1: fastavro reads the last branch
        ("amount_cents", b"\xd4\xc2\x80\x00"),  # 4,250 in 4 bytes instead of 2
        ("amount_cents", b"\xfe" + b"\xff" * 8 + b"\x7f"),  # bits past 64 dropped
    ],
    ids=["negative-enum-index", "negative-union-index", "over-long-integer", "integer-past-64-bits"],
)
def test_bytes_fastavro_reads_but_no_writer_makes_are_not_canonical(decoder, field, raw):
    value = _with(field, raw)
    decoder.decode(value)  # fastavro alone reads them
    schema_id, payload = split_frame(value)
    with pytest.raises(DecodeError) as error:
        read_payload(payload, schema_id, *decoder.schemas_for(schema_id), canonical=True)
    assert error.value.kind == "noncanonical_avro"
    assert f"schema id {V2_ID}" in error.value.reason


def test_a_canonical_record_passes_the_check_and_reads_alike(decoder):
    value = encode_v2(TRANSACTION.to_dict())
    schema_id, payload = split_frame(value)
    assert read_payload(payload, schema_id, *decoder.schemas_for(schema_id), canonical=True) == decoder.decode(value)


def test_the_check_compares_with_the_writer_then_resolves_to_the_reader(decoder):
    encode_v1 = make_encoder(V1_ID, TRANSACTION_V1)
    value = encode_v1({k: v for k, v in TRANSACTION.to_dict().items() if k != "device_id"})
    schema_id, payload = split_frame(value)
    record = read_payload(payload, schema_id, *decoder.schemas_for(schema_id), canonical=True)
    assert record["device_id"] is None
    assert Transaction.from_dict(record) == dataclasses.replace(TRANSACTION, device_id=None)


def test_a_newer_writers_enum_symbol_is_canonical_and_read_as_the_readers_default():
    import copy

    newer = copy.deepcopy(SCHEMAS.expanded["Transaction"])
    channel = next(f for f in newer["fields"] if f["name"] == "channel")
    channel["type"]["symbols"].append("WALLET")  # a symbol added later: our reader falls back to UNKNOWN
    newer_id = 21
    decoder = Decoder(FakeRegistry({newer_id: newer}), SCHEMAS.expanded["Transaction"])
    value = make_encoder(newer_id, newer)({**TRANSACTION.to_dict(), "channel": "WALLET"})
    schema_id, payload = split_frame(value)
    record = read_payload(payload, schema_id, *decoder.schemas_for(schema_id), canonical=True)
    assert record["channel"] == "UNKNOWN"
