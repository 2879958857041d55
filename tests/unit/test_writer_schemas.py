"""The one writer-schema cache (fraudstream.serde.WriterSchemas), as the detector's decoder and inspect
use it: the registry is asked once per schema id, and unusable ids are remembered with their reason."""

from __future__ import annotations

from collections import Counter

import pytest
from fastavro import parse_schema

from fraudstream.consumer.inspect import console_schemas
from fraudstream.registry import UnknownSchema
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, DecodeError
from fraudstream.settings import Settings

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
