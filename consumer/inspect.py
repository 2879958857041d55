"""`fraudstream inspect TOPIC`: print a topic's records as JSON lines, like kafka-avro-console-consumer.

Generic: values are decoded with their own writer schema, fetched from the registry by the id
in the Confluent frame (cached per id), so any of our topics and any record type prints without
a reader schema. The output is one JSON object per line, so `jq` and scripts work:

- by default the value alone, Avro's JSON view of it: timestamp-millis as the epoch-millis long
  (as the console consumer prints it), enums as their symbol, bytes/fixed as ISO-8859-1 strings
  (Avro's JSON encoding), unions as the plain value. `--confluent-json` writes unions the way
  kafka-avro-console-consumer does, tagged with their branch: {"string": "x"}.
- `--print-key` / `--print-metadata` wrap it: {"topic", "partition", "offset", "timestamp",
  "timestamp_type", "schema_id", "headers", "key", "value"} (only the parts asked for). Unlike the
  console consumer's tab-separated `key<TAB>value`, the line stays one JSON object.
- the dead-letter topic holds raw bytes, not Avro: each line shows the reason from the error
  headers, where the record came from, and the original key and value bytes.
- a value that cannot be decoded on another topic prints an {"error": ...} line and reading goes on.

Bytes that are not text (keys, header values, raw values) appear under `<field>_hex`, or
`<field>_base64` with `--bytes base64`.

Reads with assign() (no consumer group, nothing committed) and isolation.level=read_committed
unless `--read-uncommitted`. Without --follow it stops at the end of every partition as it was
when it started (high watermarks, and end-of-partition events for read_committed, where
transaction markers and aborted records sit below the high watermark).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import io
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from fastavro import json_writer, parse_schema

from fraudstream import argtypes
from fraudstream.errors import ConfigError, FraudstreamError, KafkaUnavailable, NotAuthorized
from fraudstream.kafka import check_secured_connection, consumer_config, denied
from fraudstream.printable import printable
from fraudstream.registry import AvroJson, Registry, SchemaRef
from fraudstream.serde import DecodeError, WriterSchemas, read_payload, split_frame
from fraudstream.settings import Settings
from fraudstream.signals import stop_requests

# Header names the detector writes on every dead-letter record (the producer side of this contract).
ERROR_KIND_HEADER = "error.kind"
ERROR_REASON_HEADER = "error.reason"
SOURCE_TOPIC_HEADER = "source.topic"
SOURCE_PARTITION_HEADER = "source.partition"
SOURCE_OFFSET_HEADER = "source.offset"

BYTES_ENCODINGS = ("hex", "base64")
TIMESTAMP_TYPES = {TIMESTAMP_CREATE_TIME: "CreateTime", TIMESTAMP_LOG_APPEND_TIME: "LogAppendTime"}
METADATA_TIMEOUT_S = 10.0
CONSUME_BATCH = 500
# How long one consume() call may block: the loop checks for Ctrl-C this often.
POLL_INTERVAL_S = 0.5
# Never committed and never joined (assign() only); librdkafka still wants a group id.
INSPECT_GROUP_ID = "fraudstream-inspect"
LIBRDKAFKA_LOGGER = "fraudstream.librdkafka"  # parent of the loggers fraudstream.kafka gives every client


class TopicNotFound(FraudstreamError):
    """The topic (or partition) asked for does not exist on the cluster."""


class KafkaRecord(Protocol):
    """What the formatter needs from a consumed record (confluent_kafka.Message has it)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...
    def timestamp(self) -> tuple[int, int]: ...


# ---------------------------------------------------------------- options
@dataclass(frozen=True, slots=True)
class StartOffset:
    """Where to start in each partition: 'earliest', 'latest', an absolute offset, or N before the end."""

    kind: str  # "earliest" | "latest" | "absolute" | "from_end"
    value: int = 0

    @classmethod
    def parse(cls, text: str) -> StartOffset:
        lowered = text.strip().lower()
        if lowered in ("earliest", "beginning"):
            return cls("earliest")
        if lowered in ("latest", "end"):
            return cls("latest")
        try:
            number = int(lowered)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an offset: use a number, -N (the last N records), earliest or latest"
            ) from None
        return cls("absolute", number) if number >= 0 else cls("from_end", -number)

    def resolve(self, low: int, high: int) -> int:
        """The concrete offset in a partition whose records span [low, high)."""
        if self.kind == "earliest":
            return low
        if self.kind == "latest":
            return high
        if self.kind == "from_end":
            return max(low, high - self.value)
        return max(low, self.value)  # below the log start there is nothing to read; start at its beginning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument(
        "topic",
        metavar="TOPIC",
        nargs="?",
        help="topic to print (default: the input topic); e.g. transactions.fraud, transactions.dlq",
    )
    where = parser.add_argument_group("where to start and stop")
    start = where.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest record (default: the end, waiting for new records like "
        "kafka-avro-console-consumer, which implies --follow)",
    )
    start.add_argument(
        "--offset",
        type=StartOffset.parse,
        metavar="OFFSET",
        help="start offset: N (with --partition), -N for the last N records of each partition, earliest or latest",
    )
    where.add_argument("--partition", type=int, metavar="P", help="read only this partition")
    where.add_argument("--max-messages", type=argtypes.positive_int, metavar="N", help="stop after printing N records")
    where.add_argument(
        "--follow",
        action="store_true",
        help="keep waiting for new records after the end (until Ctrl-C or --max-messages)",
    )
    where.add_argument(
        "--read-uncommitted",
        action="store_true",
        help="also show records of open and aborted transactions (default: committed only)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--print-key", action="store_true", help='wrap each value as {"key": ..., "value": ...}')
    out.add_argument(
        "--print-metadata",
        action="store_true",
        help="add topic, partition, offset, timestamp, timestamp_type, schema_id and headers",
    )
    out.add_argument(
        "--confluent-json",
        action="store_true",
        help='unions tagged with their branch, {"string": "x"}, exactly as kafka-avro-console-consumer '
        "prints them (default: plain values, friendlier for jq)",
    )
    out.add_argument(
        "--bytes",
        dest="bytes_encoding",
        choices=BYTES_ENCODINGS,
        default="hex",
        help="how raw bytes that are not text are shown (default: hex)",
    )
    add_connection_arguments(parser)


# ---------------------------------------------------------------- decoding (pure, testable offline)
def strip_logical_types(schema: Any) -> Any:
    """The schema without logicalType annotations: values decode as their Avro JSON view
    (timestamp-millis as the long, decimal as bytes), which is what the console consumer prints."""
    if isinstance(schema, dict):
        return {key: strip_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical_types(item) for item in schema]
    return schema


def console_schemas(fetch: Callable[[SchemaRef], AvroJson]) -> WriterSchemas:
    """Writer schemas by id as the console consumer reads them: logical types stripped."""
    return WriterSchemas(fetch, lambda schema_id, writer: parse_schema(strip_logical_types(writer)))


def encode_bytes(data: bytes, encoding: str) -> str:
    return data.hex() if encoding == "hex" else base64.b64encode(data).decode("ascii")


def text_or_bytes(name: str, data: bytes | None, encoding: str) -> tuple[str, str | None]:
    """(field name, value): UTF-8 text under `name`, anything else encoded under `name_<encoding>`."""
    if data is None:
        return name, None
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError:
        return f"{name}_{encoding}", encode_bytes(data, encoding)


def headers_object(headers: list[tuple[str, bytes | None]] | None, encoding: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, raw in headers or ():
        field, value = text_or_bytes(name, raw, encoding)
        if field in result:  # Kafka allows a header name twice: keep every value
            previous = result[field]
            result[field] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            result[field] = value
    return result


def _header_text(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, raw in headers or ():
        if key == name and raw is not None:
            return raw.decode("utf-8", errors="replace")
    return None


def _as_int(text: str | None) -> int | str | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return text


def _json_safe(value: Any) -> Any:
    """Slow path for values json cannot write as they are: bytes (Avro's JSON view) and NaN/infinity."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("iso-8859-1")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")  # as Java's JSON writers spell them
    return value


def _bytes_as_avro_json(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("iso-8859-1")  # Avro's JSON encoding of bytes and fixed
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    """Compact JSON, one line, UTF-8 text (like the console consumer), with no control character a terminal
    would act on (bytes shown as ISO-8859-1 carry C1 controls; text, bidi controls): those are \\u escapes."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_bytes_as_avro_json)
    except ValueError:  # a NaN or infinity somewhere: rare, so checked only when it happens
        text = json.dumps(_json_safe(obj), ensure_ascii=False, separators=(",", ":"))
    return printable(text, json=True)


class RecordFormatter:
    """One record -> one JSON line, per the output options."""

    def __init__(
        self,
        schemas: WriterSchemas,
        *,
        dead_letter: bool,
        print_key: bool = False,
        print_metadata: bool = False,
        confluent_json: bool = False,
        bytes_encoding: str = "hex",
    ) -> None:
        self.schemas = schemas
        self.dead_letter = dead_letter
        self.print_key = print_key
        self.print_metadata = print_metadata
        self.confluent_json = confluent_json
        self.bytes_encoding = bytes_encoding
        self.undecodable = 0  # values on a non-dead-letter topic printed as error lines

    def format(self, record: KafkaRecord) -> str:
        if self.dead_letter:
            return dumps(self._dead_letter_object(record))
        try:
            schema_id, value = self.decode(record.value(), record.headers())
        except DecodeError as exc:
            self.undecodable += 1
            return dumps(self._error_object(record, exc))
        if not (self.print_key or self.print_metadata):
            return dumps(value)
        envelope = self._metadata(record, schema_id) if self.print_metadata else {}
        if self.print_key:
            envelope.update((text_or_bytes("key", record.key(), self.bytes_encoding),))
        envelope["value"] = value
        return dumps(envelope)

    def decode(self, value: bytes | None, headers=None) -> tuple[SchemaRef, Any]:
        """(schema id, JSON-ready value) of a Confluent-framed Avro value, or DecodeError."""
        schema_id, payload = split_frame(value, headers)
        writer = self.schemas.get(schema_id)
        record = read_payload(payload, schema_id, writer)
        if self.confluent_json:
            # fastavro's Avro JSON encoder tags union branches exactly as the Java encoder does.
            text = io.StringIO()
            json_writer(text, writer, [record])
            record = json.loads(text.getvalue())
        return schema_id, record

    def _metadata(self, record: KafkaRecord, schema_id: SchemaRef | None) -> dict[str, Any]:
        timestamp_type, timestamp = record.timestamp()
        metadata: dict[str, Any] = {
            "topic": record.topic(),
            "partition": record.partition(),
            "offset": record.offset(),
            "timestamp": timestamp if timestamp_type in TIMESTAMP_TYPES else None,
            "timestamp_type": TIMESTAMP_TYPES.get(timestamp_type, "NotAvailable"),
        }
        if schema_id is not None:
            metadata["schema_id"] = schema_id if isinstance(schema_id, int) else str(schema_id)  # a GUID
        metadata["headers"] = headers_object(record.headers(), self.bytes_encoding)
        return metadata

    def _raw_value(self, record: KafkaRecord) -> tuple[str, str | None]:
        raw = record.value()
        return f"value_{self.bytes_encoding}", None if raw is None else encode_bytes(raw, self.bytes_encoding)

    def _dead_letter_object(self, record: KafkaRecord) -> dict[str, Any]:
        headers = record.headers()
        line: dict[str, Any] = {
            "error": {
                "kind": _header_text(headers, ERROR_KIND_HEADER),
                "reason": _header_text(headers, ERROR_REASON_HEADER),
            },
            "source": {
                "topic": _header_text(headers, SOURCE_TOPIC_HEADER),
                "partition": _as_int(_header_text(headers, SOURCE_PARTITION_HEADER)),
                "offset": _as_int(_header_text(headers, SOURCE_OFFSET_HEADER)),
            },
        }
        if self.print_metadata:
            line.update(self._metadata(record, None))
        # The original key and bytes are the evidence: always shown, never decoded.
        line.update((text_or_bytes("key", record.key(), self.bytes_encoding), self._raw_value(record)))
        return line

    def _error_object(self, record: KafkaRecord, error: DecodeError) -> dict[str, Any]:
        line: dict[str, Any] = {"error": {"kind": error.kind, "reason": error.reason}}
        # Where the bad record is, always: without it nobody can find it again.
        line.update(
            self._metadata(record, None)
            if self.print_metadata
            else {"topic": record.topic(), "partition": record.partition(), "offset": record.offset()}
        )
        line.update((text_or_bytes("key", record.key(), self.bytes_encoding), self._raw_value(record)))
        return line


def is_dead_letter_topic(topic: str, settings: Settings) -> bool:
    """The dead-letter topic of any input topic, by the naming rule Settings defines (T -> T.dlq)."""
    suffix = settings.dlq_topic.removeprefix(settings.transactions_topic)
    if topic == settings.dlq_topic:
        return True
    base = topic.removesuffix(suffix)
    return bool(suffix) and base != topic and settings.replace(transactions_topic=base).dlq_topic == topic


# ---------------------------------------------------------------- reading
@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Partitions to read, where each starts, and (unless following) where each ends."""

    starts: dict[int, int]
    ends: dict[int, int]  # high watermarks when the read began

    def unfinished(self) -> set[int]:
        return {p for p, start in self.starts.items() if start < self.ends[p]}


def plan_read(
    consumer: Consumer, topic: str, *, partition: int | None, start: StartOffset, settings: Settings
) -> ReadPlan:
    try:
        metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
    except KafkaException as exc:
        raise KafkaUnavailable(f"Kafka did not answer a metadata request: {exc.args[0].str()}") from exc
    found = metadata.topics.get(topic)
    if found is None:  # a listing leaves out the topics this principal may not Describe: ask for this one
        try:
            found = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
        except KafkaException:
            found = None
    if found is not None and found.error is not None and found.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        raise NotAuthorized(denied(settings, f"Describe and Read on topic {topic}"))
    if found is None or found.error is not None:
        close = difflib.get_close_matches(topic, [t for t in metadata.topics if not t.startswith("__")], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TopicNotFound(f"topic {topic!r} does not exist{hint}")
    partitions = sorted(found.partitions)
    if partition is not None:
        if partition not in found.partitions:
            raise TopicNotFound(f"topic {topic!r} has no partition {partition} (it has 0..{len(partitions) - 1})")
        partitions = [partition]
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for p in partitions:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"could not read the offsets of {topic}[{p}]: {exc.args[0].str()}") from exc
        starts[p] = start.resolve(low, high)
        ends[p] = high
    return ReadPlan(starts=starts, ends=ends)


@dataclass(frozen=True, slots=True)
class InspectReport:
    printed: int
    undecodable: int


def inspect_topic(
    settings: Settings,
    topic: str,
    *,
    out: IO[str],
    start: StartOffset,
    follow: bool,
    partition: int | None = None,
    max_messages: int | None = None,
    read_uncommitted: bool = False,
    formatter_options: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
) -> InspectReport:
    """Print `topic`'s records to `out`, one JSON line each; returns how many lines were printed."""
    stop = stop or threading.Event()
    registry = Registry(settings)
    formatter = RecordFormatter(
        console_schemas(registry.schema_by_id),
        dead_letter=is_dead_letter_topic(topic, settings),
        **(formatter_options or {}),
    )
    consumer = Consumer(
        consumer_config(
            settings,
            INSPECT_GROUP_ID,
            **{
                "isolation.level": "read_uncommitted" if read_uncommitted else "read_committed",
                # End-of-partition events: how a read_committed reader knows it reached the last stable offset.
                "enable.partition.eof": True,
                "partition.assignment.strategy": "range",
            },
        )
    )
    printed = 0
    try:
        plan = plan_read(consumer, topic, partition=partition, start=start, settings=settings)
        remaining = plan.unfinished()
        if not follow and not remaining:
            return InspectReport(0, 0)
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in plan.starts.items()])
        while not stop.is_set() and (follow or remaining):
            batch = consumer.consume(num_messages=CONSUME_BATCH, timeout=POLL_INTERVAL_S)
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(message.partition())
                        continue
                    _raise_if_fatal(error)
                    continue
                p, offset = message.partition(), message.offset()
                assert p is not None and offset is not None  # a record, not an error: both are set
                if not follow:
                    if offset >= plan.ends[p]:
                        remaining.discard(p)
                        continue  # arrived after we started: not part of this read
                    if offset + 1 >= plan.ends[p]:
                        remaining.discard(p)
                # confluent-kafka types headers() with the producing form too (a dict); a consumed record's are pairs
                out.write(formatter.format(message))  # type: ignore[arg-type]
                out.write("\n")
                printed += 1
                if max_messages is not None and printed >= max_messages:
                    stop.set()
                    break
            out.flush()  # a pipe to jq sees each batch as it comes, not when a buffer fills
    finally:
        consumer.close()
    return InspectReport(printed, formatter.undecodable)


def _raise_if_fatal(error: KafkaError) -> None:
    """Transient errors are librdkafka's to retry; these ones mean nothing more will come."""
    if error.fatal() or error.code() in (
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    ):
        raise KafkaUnavailable(f"reading stopped: {error.str()}")


# ---------------------------------------------------------------- CLI
def run(args: argparse.Namespace, settings: Settings) -> int:
    # librdkafka retries on its own and logs every attempt; an unreachable broker becomes our one-line error.
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL)
    topic = args.topic or settings.transactions_topic
    if args.offset is not None and args.offset.kind == "absolute" and args.partition is None:
        raise ConfigError("--offset N needs --partition (offsets are per partition); -N, earliest and latest do not")
    if args.from_beginning:
        start = StartOffset("earliest")
    elif args.offset is not None:
        start = args.offset
    else:
        start = StartOffset("latest")
    # Like kafka-avro-console-consumer: with no start position given, wait for new records.
    follow = args.follow or (not args.from_beginning and args.offset is None)
    options = {
        "print_key": args.print_key,
        "print_metadata": args.print_metadata,
        "confluent_json": args.confluent_json,
        "bytes_encoding": args.bytes_encoding,
    }
    check_secured_connection(settings)
    with stop_requests(exit_on_second="fraudstream inspect") as (stop, _):
        try:
            report = inspect_topic(
                settings,
                topic,
                out=sys.stdout,
                start=start,
                follow=follow,
                partition=args.partition,
                max_messages=args.max_messages,
                read_uncommitted=args.read_uncommitted,
                formatter_options=options,
                stop=stop,
            )
        except BrokenPipeError:
            # The reader went away (`| head`): not an error. Point stdout at nothing so exit does not complain.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if report.undecodable:
        print(
            f"fraudstream inspect: {report.undecodable} of {report.printed} records could not be decoded "
            '(printed as {"error": ...} lines)',
            file=sys.stderr,
        )
    return 0
