"""A corpus of malformed input values, each with the dead-letter kind both decoders must give it.

Avro payloads are assembled field by field (canonical encodings, with one field's bytes replaced),
so each case breaks exactly one thing at a known place. Used by the unit test (both deciders, no
broker) and by the detector's integration test (real broker and registry).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fraudstream.records import Transaction

Encoder = Callable[[dict[str, Any]], bytes]
CHANNELS = ("UNKNOWN", "CARD_PRESENT", "CONTACTLESS", "ONLINE", "ATM")  # transaction.avsc, asserted below
YEAR_33000_MS = 979_203_225_600_000  # 33000-01-01T00:00:00Z


def varint(n: int) -> bytes:
    """Avro's zigzag varint, canonical (as short as possible)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def string(data: bytes) -> bytes:
    return varint(len(data)) + data


def field_bytes(tx: Transaction, *, v1: bool = False) -> dict[str, bytes]:
    """Each field's canonical Avro encoding, in schema order (v1 has no device_id)."""
    millis = (tx.event_time - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    fields = {
        "transaction_id": string(tx.transaction_id.encode()),
        "account_id": string(tx.account_id.encode()),
        "card_id": string(tx.card_id.encode()),
        "merchant_id": string(tx.merchant_id.encode()),
        "merchant_category": string(tx.merchant_category.encode()),
        "terminal_id": string(tx.terminal_id.encode()),
        "amount_cents": varint(tx.amount_cents),
        "currency": string(tx.currency.encode()),
        "event_time": varint(millis),
        "channel": varint(CHANNELS.index(tx.channel)),
        "country": string(tx.country.encode()),
        "city": string(tx.city.encode()),
        "latitude": struct.pack("<d", tx.latitude),
        "longitude": struct.pack("<d", tx.longitude),
    }
    if not v1:
        fields["device_id"] = b"\x00" if tx.device_id is None else b"\x02" + string(tx.device_id.encode())
    return fields


def field_payload(tx: Transaction, *, v1: bool = False, **replaced: bytes) -> bytes:
    fields = field_bytes(tx, v1=v1)
    unknown = set(replaced) - set(fields)
    assert not unknown, unknown
    return b"".join(replaced.get(name, raw) for name, raw in fields.items())


def corpus(
    tx: Transaction, *, encode: Encoder, encode_v1: Encoder, encode_label: Encoder, unknown_id: int = 987_654_321
) -> dict[str, tuple[bytes | None, str]]:
    """name -> (record value, dead-letter kind). `tx` must be a valid, legit transaction with device_id None."""
    good = encode(tx.to_dict())
    header = good[:5]
    v1_record = {k: v for k, v in tx.to_dict().items() if k != "device_id"}
    v1_good = encode_v1(v1_record)
    v1_header = v1_good[:5]
    assert good[5:] == field_payload(tx) and v1_good[5:] == field_payload(tx, v1=True), (
        "the corpus builder drifted from the schema"
    )

    def current(**replaced: bytes) -> bytes:
        return header + field_payload(tx, **replaced)

    def v1(**replaced: bytes) -> bytes:
        return v1_header + field_payload(tx, v1=True, **replaced)

    id_text = tx.transaction_id.encode()
    cases = {
        # framing
        "empty_value": (b"", "empty_value"),
        "null_value": (None, "empty_value"),
        "json_not_avro": (b'{"amount_cents": 5}', "no_magic_byte"),
        "magic_byte_2": (b"\x02" + good[1:], "no_magic_byte"),
        # magic byte 1: a schema GUID follows (newer Confluent serializers); nobody knows this one
        "unknown_schema_guid": (b"\x01" + bytes(range(16)) + good[5:], "unknown_schema_id"),
        "truncated_schema_guid": (b"\x01" + bytes(range(10)), "bad_schema_guid"),
        "truncated_header": (b"\x00\x00\x01", "truncated_header"),
        "unknown_schema_id": (b"\x00" + unknown_id.to_bytes(4, "big") + good[5:], "unknown_schema_id"),
        "other_record_type": (
            encode_label({"transaction_id": "x", "is_fraud": False, "scenario": "legit"}),
            "schema_mismatch",
        ),
        "header_only": (header, "corrupt_avro"),
        # structure
        "truncated_avro": (good[: len(good) // 2], "corrupt_avro"),
        "truncated_last_byte": (good[:-1], "corrupt_avro"),
        "truncated_in_double": (current(longitude=b"\x00\x00\x00", device_id=b""), "corrupt_avro"),
        "garbage_payload": (header + b"\xff" * 40, "corrupt_avro"),
        "string_length_negative": (current(account_id=varint(-3) + b"acc"), "corrupt_avro"),
        "string_length_past_end": (current(city=varint(1_000_000) + b"Austin"), "corrupt_avro"),
        "enum_index_out_of_range": (current(channel=varint(len(CHANNELS))), "corrupt_avro"),
        "enum_index_negative": (current(channel=varint(-1)), "noncanonical_avro"),
        "union_index_out_of_range": (current(device_id=varint(2)), "corrupt_avro"),
        "union_index_negative": (current(device_id=varint(-1) + string(b"dev")), "noncanonical_avro"),
        "varint_11_bytes": (current(amount_cents=b"\xd0\x8f" + b"\x80" * 8 + b"\x00"), "noncanonical_avro"),
        "varint_overlong": (
            current(amount_cents=varint(tx.amount_cents)[:-1] + bytes([varint(tx.amount_cents)[-1] | 0x80, 0x00])),
            "noncanonical_avro",
        ),
        "varint_10th_byte_overflow": (current(amount_cents=b"\xfe" + b"\xff" * 8 + b"\x7f"), "noncanonical_avro"),
        "trailing_bytes": (good + b"extra", "trailing_bytes"),
        "trailing_zero_byte": (good + b"\x00", "trailing_bytes"),
        # strings
        "invalid_utf8": (current(transaction_id=string(b"\xff\xfe" + id_text)), "corrupt_avro"),
        "invalid_utf8_after_enum": (current(city=string(b"Aus\xfftin")), "corrupt_avro"),
        "invalid_utf8_in_union": (current(device_id=b"\x02" + string(b"\xc3")), "corrupt_avro"),
        "utf8_surrogate": (current(merchant_id=string(b"\xed\xa0\x80")), "corrupt_avro"),
        "utf8_overlong": (current(card_id=string(b"\xc0\xaf")), "corrupt_avro"),
        "utf8_above_u10ffff": (current(country=string(b"\xf4\x90\x80\x80")), "corrupt_avro"),
        "utf8_cut_sequence": (current(terminal_id=string(b"t\xe2\x82")), "corrupt_avro"),
        # timestamps a Python reader cannot hold (datetime: years 1 to 9999)
        "timestamp_year_33000": (current(event_time=varint(YEAR_33000_MS)), "corrupt_avro"),
        "timestamp_after_9999": (current(event_time=varint(253_402_300_800_000)), "corrupt_avro"),
        "timestamp_before_year_1": (current(event_time=varint(-62_135_596_800_001)), "corrupt_avro"),
        "timestamp_int64_min": (current(event_time=varint(-(2**63))), "corrupt_avro"),
        # values
        "negative_amount": (current(amount_cents=varint(-5)), "invalid_record"),
        "not_usd": (current(currency=string(b"EUR")), "invalid_record"),
        "empty_currency": (current(currency=string(b"")), "invalid_record"),
        # an earlier writer version (read record by record in either decoder)
        "v1_truncated": (v1_good[:-3], "corrupt_avro"),
        "v1_invalid_utf8": (v1(city=string(b"\xff")), "corrupt_avro"),
        "v1_enum_index_negative": (v1(channel=varint(-2)), "noncanonical_avro"),
        "v1_timestamp_year_33000": (v1(event_time=varint(YEAR_33000_MS)), "corrupt_avro"),
        "v1_trailing_bytes": (v1_good + b"\x02", "trailing_bytes"),
    }
    return cases
