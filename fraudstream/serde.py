"""Confluent wire format with fastavro: magic byte 0, 4-byte big-endian schema id, Avro binary.

Writers are built once per schema id; readers cache each writer schema by id, so the registry
is asked once per id, never per message. Undecodable bytes raise DecodeError with a stable
`kind` (for the dead-letter headers) and a readable reason.
"""

from __future__ import annotations

import io
import json
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from fraudstream.registry import AvroJson, Registry, SchemaRef, UnknownSchema, UnusableSchema

if TYPE_CHECKING:
    from confluent_kafka import Message

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")
# Newer Confluent serializers can name the writer schema by GUID: in this header (the value's own bytes are then
# bare Avro), or in a prefix of magic byte 1 and the GUID's 16 bytes.
VALUE_SCHEMA_ID_HEADER = "__value_schema_id"
GUID_MAGIC_BYTE = 1
GUID_SIZE = 16


class DecodeError(Exception):
    """Bytes that are not a valid record for this reader. A fact about the data, never about infrastructure."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def frame(schema_id: int) -> bytes:
    return HEADER.pack(MAGIC_BYTE, schema_id)


def make_encoder(schema_id: int, parsed_schema: Any) -> Callable[[dict[str, Any]], bytes]:
    """A closure that frames and encodes one record dict with a fixed writer schema."""
    header = frame(schema_id)
    write = schemaless_writer
    bytes_io = io.BytesIO

    def encode(record: dict[str, Any]) -> bytes:
        out = bytes_io()
        out.write(header)
        write(out, parsed_schema, record)
        return out.getvalue()

    return encode


def consumed_headers(message: Message) -> Sequence[tuple[str, bytes | None]] | None:
    """A consumed record's headers: librdkafka gives them as (name, value) pairs (a dict is only for producing)."""
    return cast("Sequence[tuple[str, bytes | None]] | None", message.headers())


def split_frame(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None = None
) -> tuple[SchemaRef, memoryview]:
    """(schema id or GUID, Avro payload) of a framed value, or DecodeError.

    A `__value_schema_id` header wins over the value's own prefix, as confluent-kafka's deserializers
    read it; the value is then bare Avro. Otherwise the Confluent prefix: magic byte 0 and a 4-byte id, or
    magic byte 1 and a 16-byte GUID."""
    if headers:
        for name, header in headers:
            if name == VALUE_SCHEMA_ID_HEADER:
                if not value:
                    raise DecodeError("empty_value", "record value is empty (null or zero bytes)")
                return _guid(header, where=f"the {VALUE_SCHEMA_ID_HEADER} header"), memoryview(value)
    if not value:
        raise DecodeError("empty_value", "record value is empty (null or zero bytes)")
    if value[0] == GUID_MAGIC_BYTE:
        return _guid(value[: 1 + GUID_SIZE], where="the value's prefix"), memoryview(value)[1 + GUID_SIZE :]
    if value[0] != MAGIC_BYTE:
        raise DecodeError(
            "no_magic_byte",
            f"first byte is 0x{value[0]:02x}, not the Confluent magic byte 0x00 (or 0x01 with a schema GUID)",
        )
    if len(value) < HEADER.size:
        raise DecodeError("truncated_header", f"value has {len(value)} bytes, fewer than the 5-byte Confluent header")
    _, schema_id = HEADER.unpack_from(value)
    return schema_id, memoryview(value)[HEADER.size :]


def _guid(data: bytes | None, *, where: str) -> uuid.UUID:
    """A schema GUID as confluent-kafka writes it (magic byte 1, 16 bytes); Avro has no message indexes."""
    if data is None or len(data) != 1 + GUID_SIZE or data[0] != GUID_MAGIC_BYTE:
        shown = "nothing" if data is None else f"{len(data)} bytes starting 0x{bytes(data[:1]).hex() or '-'}"
        raise DecodeError("bad_schema_guid", f"{where} is not a schema GUID (magic byte 1 and 16 bytes): {shown}")
    return uuid.UUID(bytes=bytes(data[1:]))


class WriterSchemas:
    """Writer schemas by id: the one cache every reader of our topics uses (the detector's decoders, inspect,
    evaluate). The registry is asked once per id, never per message. `parse(schema_id, schema)` makes what
    is kept from the registry's JSON: fastavro's parsed schema unless the caller needs more.

    Ids that cannot be used are remembered as their DecodeError, in a bounded map (a stream of made-up ids
    must not grow it without end): a schema the registry served but we cannot use is a fact about an
    immutable id, kept until the bound pushes it out; an id the registry did not know is asked again after
    `unknown_ttl_s` (it may have been registered since)."""

    def __init__(
        self,
        fetch: Callable[[SchemaRef], AvroJson],
        parse: Callable[[SchemaRef, AvroJson], Any] | None = None,
        *,
        max_refused: int = 10_000,
        unknown_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._parse = parse or (lambda schema_id, schema: parse_schema(schema))
        self._by_id: dict[SchemaRef, Any] = {}
        # id -> (its DecodeError, when to ask again or None), oldest first
        self._refused: OrderedDict[SchemaRef, tuple[DecodeError, float | None]] = OrderedDict()
        self._max_refused = max_refused
        self._unknown_ttl_s = unknown_ttl_s
        self._clock = clock
        self.lookups = 0  # registry asks, for tests and metrics

    def put(self, schema_id: SchemaRef, value: Any) -> None:
        """Known without asking (a reader's own schema id)."""
        self._by_id[schema_id] = value

    def get(self, schema_id: SchemaRef) -> Any:
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        refused = self._refused.get(schema_id)
        if refused is not None:
            error, ask_again_at = refused
            if ask_again_at is None or self._clock() < ask_again_at:
                raise error
            del self._refused[schema_id]
        resolved = self._resolve(schema_id)
        if isinstance(resolved, DecodeError):
            unknown = resolved.kind == "unknown_schema_id"
            self._refused[schema_id] = (resolved, self._clock() + self._unknown_ttl_s if unknown else None)
            if len(self._refused) > self._max_refused:
                self._refused.popitem(last=False)
            raise resolved
        self._by_id[schema_id] = resolved
        return resolved

    def _resolve(self, schema_id: SchemaRef) -> Any:
        self.lookups += 1
        try:
            schema = self._fetch(schema_id)  # RegistryError (no answer) propagates: infrastructure, not data
        except UnknownSchema as exc:
            return DecodeError("unknown_schema_id", str(exc))
        except UnusableSchema as exc:
            return DecodeError(exc.kind, exc.reason)
        try:
            return self._parse(schema_id, schema)
        except DecodeError as exc:
            return exc
        except Exception as exc:  # fastavro raises several types for a schema it cannot use
            return DecodeError("unreadable_writer_schema", f"schema id {schema_id} cannot be parsed: {exc}")


class Decoder:
    """Decode framed Avro into dicts of the reader schema, resolving any registered writer version."""

    def __init__(self, registry: Registry, reader_schema: dict[str, Any], *, reader_id: int | None = None) -> None:
        self.registry = registry
        self.reader_parsed = cast(dict[str, Any], parse_schema(reader_schema))  # a record schema parses to a dict
        self.reader_name = self.reader_parsed["name"]
        # schema id -> (writer, reader or None when identical)
        schemas = WriterSchemas(registry.schema_by_id, self._writer_and_reader)
        if reader_id is not None:
            schemas.put(reader_id, (self.reader_parsed, None))
        # Writer and reader schema for an id; asks the registry once per id (RegistryError propagates).
        self.schemas_for: Callable[[SchemaRef], tuple[Any, Any]] = schemas.get

    def _writer_and_reader(self, schema_id: SchemaRef, writer_json: AvroJson) -> tuple[Any, Any]:
        writer = parse_schema(writer_json)
        name = writer.get("name") if isinstance(writer, dict) else None
        if name != self.reader_name:
            shown = name or (writer.get("type") if isinstance(writer, dict) else writer)
            raise DecodeError("schema_mismatch", f"schema id {schema_id} is {str(shown)[:200]}, not {self.reader_name}")
        return writer, (None if writer == self.reader_parsed else self.reader_parsed)

    def decode(
        self,
        value: bytes | None,
        *,
        reject_trailing_bytes: bool = True,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
    ) -> dict[str, Any]:
        schema_id, payload = split_frame(value, headers)
        writer, reader = self.schemas_for(schema_id)
        return read_payload(payload, schema_id, writer, reader, reject_trailing_bytes=reject_trailing_bytes)


def read_payload(
    payload: bytes | memoryview,
    schema_id: SchemaRef,
    writer: Any,
    reader: Any = None,
    *,
    reject_trailing_bytes: bool = True,
    canonical: bool = False,
) -> dict[str, Any]:
    """One Avro record from the bytes after the Confluent header, or DecodeError.

    `canonical=True` also requires the bytes to be exactly what an Avro writer produces for the record
    they decode to. fastavro reads a negative enum or union index as a Python list index (-1 is the
    last symbol or branch) and accepts integers of more than 10 bytes; Java readers reject all of
    them, so such bytes must never be forwarded as they are. Every writer we know emits the
    canonical form, so re-encoding the record and comparing finds them without a reader of our own.
    """
    stream = io.BytesIO(payload)
    try:
        # The check compares against the writer's own encoding: resolve to the reader afterwards.
        # Records: a record schema reads to a dict.
        record = cast(dict[str, Any], schemaless_reader(stream, writer, None if canonical else reader))
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, UnicodeDecodeError, ...
        raise _corrupt(schema_id, exc) from None
    end = stream.tell()
    if reject_trailing_bytes and end != len(payload):
        # Usually a producer that framed its data with the wrong schema id.
        raise DecodeError("trailing_bytes", f"{len(payload) - end} bytes left after the record (schema id {schema_id})")
    if not canonical:
        return record
    out = io.BytesIO()
    try:
        schemaless_writer(out, writer, record)
    except Exception as exc:  # a value fastavro reads but cannot write back: not a record any writer made
        raise DecodeError(
            "noncanonical_avro",
            f"the record read with schema id {schema_id} cannot be written back: {type(exc).__name__}: {exc}",
        ) from None
    encoded = out.getbuffer()
    read = memoryview(payload)[:end]
    if encoded != read:
        at = next((i for i, (a, b) in enumerate(zip(encoded, read)) if a != b), min(len(encoded), end))
        raise DecodeError(
            "noncanonical_avro",
            f"byte {at} of the payload differs from the record's Avro encoding "
            f"(schema id {schema_id}): a negative enum or union index, or an "
            "integer written in more bytes than it needs",
        )
    if reader is None:
        return record
    try:
        return cast(dict[str, Any], schemaless_reader(io.BytesIO(read), writer, reader))
    except Exception as exc:  # e.g. an enum symbol the reader does not know and no default
        raise _corrupt(schema_id, exc) from None


def _corrupt(schema_id: SchemaRef, exc: Exception) -> DecodeError:
    return DecodeError(
        "corrupt_avro", f"Avro payload does not match schema id {schema_id}: {type(exc).__name__}: {exc}"
    )


class BatchEncoder:
    """Frames and encodes a whole Arrow record batch at once (pyruhvro, in Rust): the producer's hot path.
    The bytes are the same as make_encoder's for the same records (Avro's binary encoding is canonical)."""

    def __init__(self, schema_id: int, schema: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyruhvro

        self.schema_json = json.dumps(schema)
        self.arrow_schema = pyruhvro.avro_to_arrow_schema(self.schema_json)
        self._header = pa.scalar(frame(schema_id), pa.binary())
        self._serialize = pyruhvro.serialize_record_batch

    def __call__(self, batch) -> list[bytes]:
        import pyarrow as pa
        import pyarrow.compute as pc

        chunks = self._serialize(batch, self.schema_json, 1)
        payloads = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
        return pc.binary_join_element_wise(self._header, payloads, b"").to_pylist()
