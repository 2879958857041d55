"""The one writer-schema cache (fraudstream.serde.WriterSchemas), as the detector's decoder and inspect
use it: the registry is asked once per schema id, and unusable ids are remembered with their reason."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest
from confluent_kafka.schema_registry import Schema
from fastavro import parse_schema

from fraudstream.consumer.decide import DLQ_REASON, ColumnarDecider, Route
from fraudstream.consumer.inspect import console_schemas
from fraudstream.registry import Registry, UnknownSchema
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, DecodeError, WriterSchemas
from fraudstream.settings import Settings
from tests.support.decoding import FakeMessage, FakeRegistry, encode, make_tx, record_wise_decider

SCHEMAS = load_schemas(Settings().schemas_dir).expanded


class CountingRegistry:
    def __init__(self, by_id: dict[int, dict]) -> None:
        self.by_id, self.asked = by_id, Counter()

    def schema_by_id(self, schema_id: int) -> dict:
        self.asked[schema_id] += 1
        if schema_id not in self.by_id:
            raise UnknownSchema(f"schema id {schema_id} is not registered")
        return self.by_id[schema_id]


def test_the_decoder_asks_the_registry_once_per_id_even_for_ids_it_cannot_use():
    registry = CountingRegistry({7: SCHEMAS["Transaction"], 8: SCHEMAS["Label"]})
    decoder = Decoder(registry, SCHEMAS["Transaction"])
    for _ in range(3):
        assert decoder.schemas_for(7)[0]["name"].endswith("Transaction")
        with pytest.raises(DecodeError) as mismatch:
            decoder.schemas_for(8)
        assert mismatch.value.kind == "schema_mismatch"
        with pytest.raises(DecodeError) as unknown:
            decoder.schemas_for(9)
        assert unknown.value.kind == "unknown_schema_id"
    assert registry.asked == {7: 1, 8: 1, 9: 1}


def test_inspect_shares_the_cache_and_strips_logical_types():
    registry = CountingRegistry({7: SCHEMAS["Transaction"], 8: {"type": "record", "name": "Bad", "fields": "x"}})
    schemas = console_schemas(registry.schema_by_id)
    for _ in range(3):
        assert "logicalType" not in repr(schemas.get(7))
        with pytest.raises(DecodeError) as unreadable:
            schemas.get(8)
        assert unreadable.value.kind == "unreadable_writer_schema"
    assert registry.asked == {7: 1, 8: 1}
    assert "logicalType" in repr(parse_schema(SCHEMAS["Transaction"]))  # the strip above did something


def test_a_decoder_given_its_own_id_never_asks_for_it():
    registry = CountingRegistry({})
    decoder = Decoder(registry, SCHEMAS["Transaction"], reader_id=3)
    assert decoder.schemas_for(3) == (decoder.reader_parsed, None) and not registry.asked


# ----- what the registry answers is data: a schema that is not Avro never stops a reader -----
class StubClient:
    """confluent-kafka's SchemaRegistryClient as far as Registry.schema_by_id uses it."""

    def __init__(self, answers: dict) -> None:
        self.answers, self.asked = answers, Counter()

    def _answer(self, key):
        self.asked[key] += 1
        answer = self.answers[key]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get_schema(self, schema_id):
        return self._answer(schema_id)

    def get_schema_by_guid(self, guid):
        return self._answer(guid)


def registry_answering(answers: dict) -> Registry:
    registry = Registry(Settings(schema_registry_url="http://127.0.0.1:1/apis/ccompat/v7"))
    registry.client = StubClient(answers)
    return registry


PROTOBUF = Schema('syntax = "proto3";\nmessage M { string a = 1; }', "PROTOBUF")
JSON_SCHEMA = Schema('{"type": "object", "properties": {"a": {"type": "string"}}}', "JSON")


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (PROTOBUF, "not_avro_schema"),
        (JSON_SCHEMA, "not_avro_schema"),
        (Schema("this is not JSON", "AVRO"), "unreadable_writer_schema"),
        (Schema("12", "AVRO"), "unreadable_writer_schema"),
        (Schema('{"type": "record", "name": "Bad", "fields": "x"}', "AVRO"), "unreadable_writer_schema"),
        (Schema('["null", "string"]', "AVRO"), "schema_mismatch"),
        (ValueError("Expecting value: line 1 column 1"), "unreadable_writer_schema"),  # a body the client cannot read
    ],
    ids=["protobuf", "json-schema", "text-not-json", "json-number", "bad-avro", "avro-union", "unreadable-answer"],
)
def test_a_schema_id_that_is_not_a_usable_avro_schema_is_a_dead_letter_never_an_error(answer, kind):
    registry = registry_answering({7: answer, 8: Schema(json.dumps(SCHEMAS["Transaction"]), "AVRO")})
    decoder = Decoder(registry, SCHEMAS["Transaction"])
    for _ in range(2):
        with pytest.raises(DecodeError) as refused:
            decoder.schemas_for(7)
        assert refused.value.kind == kind
    assert decoder.schemas_for(8)[0]["name"].endswith("Transaction")  # the good id still decodes
    assert registry.client.asked[7] == 1  # remembered: the registry is not asked per record


def test_the_detectors_decider_dead_letters_a_record_framed_with_a_protobuf_schema_id():
    registry = registry_answering({7: PROTOBUF})
    decider = record_wise_decider(registry)
    columnar = ColumnarDecider(record_wise_decider(registry), reader_schema=SCHEMAS["Transaction"])
    value = b"\x00" + (7).to_bytes(4, "big") + encode(make_tx(5).to_dict())[5:]
    for decide in (decider, columnar):
        [decision] = decide.decide([FakeMessage(value)])
        assert decision.route is Route.DEAD_LETTER and decision.dead_letter_kind == "not_avro_schema"
        assert b"PROTOBUF" in dict(decision.headers)[DLQ_REASON]


def test_ids_the_registry_did_not_know_are_asked_again_after_a_while_and_refusals_are_bounded():
    now = [0.0]
    registry = CountingRegistry({7: SCHEMAS["Transaction"]})
    schemas = WriterSchemas(registry.schema_by_id, max_refused=3, unknown_ttl_s=60, clock=lambda: now[0])
    for _ in range(2):
        with pytest.raises(DecodeError):
            schemas.get(9)
    assert registry.asked[9] == 1
    now[0] = 61.0  # registered since, perhaps: asked again
    registry.by_id[9] = SCHEMAS["Transaction"]
    assert schemas.get(9) is not None and registry.asked[9] == 2
    for schema_id in range(100, 110):  # a flood of made-up ids keeps at most max_refused of them
        with pytest.raises(DecodeError):
            schemas.get(schema_id)
    assert len(schemas._refused) == 3 and schemas.lookups == 12


# ----- newer Confluent framing: the schema named by GUID, in a header or a magic-byte-1 prefix -----
GUID = uuid.UUID("0b3a5c1e-1111-4000-8000-00000000abcd")


def test_a_record_named_by_guid_in_a_header_or_prefix_is_decoded_and_forwarded_in_our_framing():
    registry = FakeRegistry({**FakeRegistry().schemas, GUID: SCHEMAS["Transaction"]})
    decider = record_wise_decider(registry)
    tx = make_tx(5)
    bare = encode(tx.to_dict())[5:]  # the Avro payload alone
    header = [("__value_schema_id", b"\x01" + GUID.bytes)]
    messages = [FakeMessage(bare, headers=header), FakeMessage(b"\x01" + GUID.bytes + bare)]
    for decision in decider.decide(messages):
        assert decision.route is Route.LEGIT
        assert decision.value == encode(tx.to_dict())  # re-encoded with our schema id, readable by every reader
    assert registry.calls == 1


@pytest.mark.parametrize(
    "header", [b"\x01" + GUID.bytes[:8], b"\x00" + GUID.bytes, None], ids=["short", "wrong-magic", "null"]
)
def test_a_malformed_schema_guid_header_is_a_dead_letter(header):
    value = encode(make_tx(5).to_dict())
    [decision] = record_wise_decider().decide([FakeMessage(value, headers=[("__value_schema_id", header)])])
    assert decision.route is Route.DEAD_LETTER and decision.dead_letter_kind == "bad_schema_guid"
