"""The decide stage: raw Kafka messages in, one routing decision per message out.

Batch-shaped on purpose (the detector decides a whole batch per transaction): how a batch is
decoded can change behind `Decider.decide` without touching the transactional loop. Data problems
become dead-letter decisions; infrastructure problems (the registry not answering) raise
RegistryError so the loop can retry the whole batch.

Both deciders split the work in two named steps: a decode step (bytes to validated records,
or a dead-letter reason) and a rule step (records to routes), so that later stages can reuse
the decode step alone.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyruhvro

from fraudstream.consumer.rules import Rule, fired
from fraudstream.evaluate import SCORE_HEADER
from fraudstream.records import Transaction
from fraudstream.registry import SchemaRef
from fraudstream.serde import HEADER, MAGIC_BYTE, Decoder, DecodeError, make_encoder, read_payload, split_frame

log = logging.getLogger("fraudstream.decide")

DLQ_KIND = "error.kind"
DLQ_REASON = "error.reason"
DLQ_TOPIC = "source.topic"
DLQ_PARTITION = "source.partition"
DLQ_OFFSET = "source.offset"
# The stateless rule's score: 1.0 when it fired (the alert's `score`), 0 otherwise (the legit record's header).
STATELESS_FRAUD_SCORE = 1.0
STATELESS_LEGIT_HEADERS = [(SCORE_HEADER, b"0")]


class Route(enum.IntEnum):
    LEGIT = 0
    FRAUD = 1
    DEAD_LETTER = 2
    HELD = 3  # no output yet: held for the terminal rule's look-ahead (consumer/held.py)


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    dead_letter_kind: str | None = None
    rules: tuple[str, ...] = ()  # of a fraud decision: the rules that fired
    score: float | None = None  # of a fraud decision: the score its alert carries


@dataclass(frozen=True, slots=True)
class ReleasedRows:
    """Held records decided now, one entry per record: what their outputs would say, without the outputs."""

    positions: np.ndarray  # uint64: input partition << 40 | offset (consumer/held.py's position key)
    fraud: np.ndarray  # bool: routed to fraud (by the terminal rule, with the look-ahead)
    score: np.ndarray  # float64: the score the output would carry (the legit header's 6 digits, or the alert's)


@dataclass(slots=True)
class DecidedBatch:
    """A decided batch, without an object per forwarded record (most of them). Every message is
    forwarded to the legit topic as it came (its own key and value bytes: same schema, same id) with
    `legit_headers`, except the messages in `outputs`: fraud alerts, dead letters, and legit records
    re-encoded from another writer schema, each with its own Decision."""

    size: int  # messages in the batch
    outputs: dict[int, Decision]  # message index -> its own output
    legit_headers: list[tuple[str, bytes]] | None = None  # of every forwarded record
    # A model's score per message index (SCORE_HEADER values), when it differs record by record; without
    # a model the score of a legit record is the same for all, and sits in legit_headers.
    legit_scores: list[bytes] | None = None
    # Records held earlier and decided now (consumer/held.py): (their input record, its output), produced in
    # this batch's transaction; and the partitions whose state that changed besides the batch's own.
    released: list[tuple[Any, Decision]] = field(default_factory=list)
    state_partitions: set[int] = field(default_factory=set)
    held: int = 0  # records of this batch held (Route.HELD in outputs)
    # ShadowDifferences (key, value) for the shadow topic, in this batch's transaction (consumer/stateful.py).
    shadow: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Records held earlier and decided now, as arrays and with no output made: what a replay asks for instead of
    # `released` (StatefulDecider.make_outputs False; consumer/backtest.py).
    released_rows: list[ReleasedRows] = field(default_factory=list)

    def headers_of(self, index: int) -> list[tuple[str, bytes]] | None:
        """The headers of the forwarded record at `index`."""
        if self.legit_scores is None:
            return self.legit_headers
        return [*(self.legit_headers or ()), (SCORE_HEADER, self.legit_scores[index])]

    def decisions(self, messages: Sequence) -> list[Decision]:
        """One Decision per message, forwarded ones included (for callers that want them all)."""
        outputs, headers_of = self.outputs, self.headers_of
        return [
            outputs.get(index) or Decision(Route.LEGIT, message.key(), message.value(), headers_of(index))
            for index, message in enumerate(messages)
        ]

    def routes(self) -> Counter[Route]:
        """Records per route, the released ones included."""
        tally = Counter(decision.route for decision in self.outputs.values())
        tally.update(decision.route for _, decision in self.released)
        for rows in self.released_rows:
            fraud = int(rows.fraud.sum())
            tally[Route.FRAUD] += fraud
            tally[Route.LEGIT] += len(rows.fraud) - fraud
        tally[Route.LEGIT] += self.size - len(self.outputs)
        return tally


def invalid_values(currency: str, amount_cents: int, expected_currency: str) -> DecodeError | None:
    """Why a well-formed transaction cannot be judged, or None. One wording for both deciders."""
    if currency != expected_currency:
        return DecodeError("invalid_record", f"currency {currency!r} is not {expected_currency}")
    if amount_cents < 0:
        return DecodeError("invalid_record", f"negative amount_cents {amount_cents}")
    return None


class Decider:
    """Decode with writer schemas cached by id, apply the rules, encode the outputs.

    `legit_schema_id` and `fraud_schema_id` are the ids of our current Transaction and FraudAlert
    schemas under the output subjects. A record written with the current Transaction schema is
    forwarded to the legit topic byte for byte (same schema, same id): no re-encoding. So a record
    is accepted only in the canonical encoding every Avro writer produces (serde.read_payload): what
    fastavro reads leniently (a negative enum index, say) would stop a Java reader downstream.
    """

    def __init__(
        self,
        decoder: Decoder,
        rules: Sequence[Rule],
        *,
        legit_schema_id: int,
        legit_schema,
        fraud_schema_id: int,
        fraud_schema,
        currency: str = "USD",
        reject_trailing_bytes: bool = True,
    ) -> None:
        self.decoder = decoder
        self.rules = tuple(rules)
        self.legit_schema_id = legit_schema_id
        self.encode_legit = make_encoder(legit_schema_id, legit_schema)
        self.encode_fraud = make_encoder(fraud_schema_id, fraud_schema)
        self.currency = currency
        # Bytes after a complete record usually mean a producer framed data with the wrong schema id.
        self.reject_trailing_bytes = reject_trailing_bytes

    def decode(self, message, *, verified: bool = False) -> tuple[SchemaRef, dict[str, Any], Transaction]:
        """The decode step for one message: (writer schema id, record, transaction), or DecodeError.
        `verified`: its bytes were already found canonical (by the columnar decoder): skip that check."""
        schema_id, payload = split_frame(message.value(), message.headers())
        writer, reader = self.decoder.schemas_for(schema_id)
        record = read_payload(
            payload, schema_id, writer, reader, reject_trailing_bytes=self.reject_trailing_bytes, canonical=not verified
        )
        transaction = Transaction.from_dict(record)
        error = invalid_values(transaction.currency, transaction.amount_cents, self.currency)
        if error is not None:
            raise error
        return schema_id, record, transaction

    def decide(self, messages: Sequence, *, verified: bool = False) -> list[Decision]:
        return self.decide_batch(messages, verified=verified).decisions(messages)

    def decide_batch(self, messages: Sequence, *, verified: bool = False) -> DecidedBatch:
        """The batch's outputs; a record written with the current schema and no rule firing is forwarded."""
        # Locals: this loop runs once per record.
        decode = functools.partial(self.decode, verified=True) if verified else self.decode
        rules = self.rules
        legit_id = self.legit_schema_id
        encode_legit = self.encode_legit
        now_ms = int(time.time() * 1000)
        outputs: dict[int, Decision] = {}
        for index, message in enumerate(messages):
            try:
                schema_id, record, transaction = decode(message)
            except DecodeError as error:
                outputs[index] = dead_letter(message, error)
                continue
            rule_names = fired(rules, transaction)
            if rule_names:
                outputs[index] = self.fraud_decision(message, record, rule_names, now_ms)
            elif schema_id != legit_id:
                outputs[index] = Decision(Route.LEGIT, message.key(), encode_legit(record), STATELESS_LEGIT_HEADERS)
        return DecidedBatch(len(messages), outputs, STATELESS_LEGIT_HEADERS)

    def fraud_decision(self, message, record: dict[str, Any], rule_names: list[str], now_ms: int) -> Decision:
        """A FraudAlert carrying the whole record, the rules that fired and the stateless rule's score."""
        alert = {"transaction": record, "rules": rule_names, "detected_at": now_ms, "score": STATELESS_FRAUD_SCORE}
        return Decision(
            Route.FRAUD, message.key(), self.encode_fraud(alert), rules=tuple(rule_names), score=STATELESS_FRAUD_SCORE
        )


def dead_letter(message, error: DecodeError) -> Decision:
    """Original key and value, untouched, with the reason and the source position in headers."""
    headers = list(message.headers() or [])
    headers += [
        (DLQ_KIND, error.kind.encode()),
        (DLQ_REASON, error.reason.encode()),
        (DLQ_TOPIC, message.topic().encode()),
        (DLQ_PARTITION, str(message.partition()).encode()),
        (DLQ_OFFSET, str(message.offset()).encode()),
    ]
    return Decision(Route.DEAD_LETTER, message.key(), message.value(), headers, error.kind)


# What Python's datetime (so fastavro, and every reader built on it) can hold: years 1 to 9999.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIMESTAMP_RANGE = {
    unit: ((datetime.min.replace(tzinfo=UTC) - _EPOCH) // step, (datetime.max.replace(tzinfo=UTC) - _EPOCH) // step)
    for unit, step in (("ms", timedelta(milliseconds=1)), ("us", timedelta(microseconds=1)))
}


def _is_rust_panic(exc: BaseException) -> bool:
    """pyo3 raises a Rust panic as pyo3_runtime.PanicException, a BaseException that no module exports."""
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """The columnar decode step's answer for a batch. Each message index is in exactly one of:

    - `rows`: written with the current schema and valid; row i of `columns` is message `rows[i]`
      (ascending, so in offset order per partition);
    - `dead`: well-formed but invalid values, with the reason (the same DecodeError the record-wise
      decoder raises);
    - `fallback`: for the record-wise decoder: other writer versions, framing errors, and bytes the
      Arrow decode or its checks refused (it gives the precise reason, or reads them).
    """

    columns: pa.RecordBatch | None
    rows: list[int]
    dead: dict[int, DecodeError]
    fallback: list[int]


# binary_slice's stop for "to the end" (pyarrow 26 fails on an omitted stop: "Negative buffer resize").
_TO_THE_END = (1 << 31) - 1

# Arrow types whose every value the checks below prove readable by fastavro. A schema with any
# other type is refused at start-up, so that a new field cannot slip past the checks unnoticed.
_CHECKED_TYPES = (
    pa.types.is_string,
    pa.types.is_int64,
    pa.types.is_float64,
    lambda t: pa.types.is_timestamp(t) and t.unit in _TIMESTAMP_RANGE,
)


class ColumnarDecider:
    """Decode a batch's current-schema records together into Arrow (pyruhvro, in Rust) and run the
    rules and validity checks on columns. Clean legit records are forwarded byte for byte; only the
    few that need a record (fraud alerts, other writer versions, bytes the checks refuse) go through
    the record-wise Decider, so both decide alike: a record is forwarded only if the record-wise
    decoder would accept it (UTF-8, timestamp ranges, canonical encoding, trailing bytes).

    A corrupt record makes pyruhvro refuse the whole batch: the batch is split in halves, and
    halves again, so that only the refused records go record-wise.
    """

    def __init__(
        self,
        record_wise: Decider,
        *,
        reader_schema: dict,
        deserialize: Callable[[list, str], pa.RecordBatch] = pyruhvro.deserialize_array,
    ) -> None:
        self.record_wise = record_wise
        self.reader_json = json.dumps(reader_schema)
        arrow_schema = pyruhvro.avro_to_arrow_schema(self.reader_json)
        unchecked = [
            f"{f.name} ({f.type})" for f in arrow_schema if not any(is_type(f.type) for is_type in _CHECKED_TYPES)
        ]
        if unchecked:
            raise ValueError(
                f"the columnar decoder cannot yet prove these fields readable: {', '.join(unchecked)}; "
                "extend its checks or use the record decoder"
            )
        self.timestamp_columns = [
            (f.name, _TIMESTAMP_RANGE[f.type.unit]) for f in arrow_schema if pa.types.is_timestamp(f.type)
        ]
        self.deserialize = deserialize
        self._current_header = pa.scalar(HEADER.pack(MAGIC_BYTE, record_wise.legit_schema_id), pa.binary())
        # Totals for tests and profiling: rows decoded in Arrow, rows handed to the record-wise
        # decider, calls into pyruhvro, and Rust panics caught.
        self.counts: Counter[str] = Counter()

    # ----- the decode step -----
    def decode(self, messages: Sequence) -> DecodedBatch:
        header_size = HEADER.size
        values = [message.value() for message in messages]
        # Framed with our current schema's id: the 5-byte header compared in Arrow, not record by record.
        column = pa.array(values, pa.binary())
        current = pc.fill_null(pc.equal(pc.binary_slice(column, 0, header_size), self._current_header), False)
        dead: dict[int, DecodeError] = {}
        if current.true_count == len(values):  # the usual case: no index lists to build
            candidates, fallback = range(len(values)), []
            payloads = [value[header_size:] for value in values]
            payload_column = pc.binary_slice(column, header_size, _TO_THE_END)
        else:
            candidates = pc.indices_nonzero(current).to_pylist()
            fallback = pc.indices_nonzero(pc.invert(current)).to_pylist()
            if not candidates:
                return DecodedBatch(None, [], dead, fallback)
            payloads = [values[i][header_size:] for i in candidates]
            payload_column = pc.binary_slice(column.filter(current), header_size, _TO_THE_END)
        batch, accepted = self._arrow(payloads)
        if len(accepted) < len(payloads):
            refused = set(range(len(payloads))) - set(accepted)
            fallback += (candidates[p] for p in refused)
        if batch is None:
            fallback.sort()
            return DecodedBatch(None, [], dead, fallback)
        if len(accepted) < len(payloads):
            payloads = [payloads[p] for p in accepted]
            payload_column = payload_column.take(pa.array(accepted, pa.int64()))
            rows = [candidates[p] for p in accepted]
        else:
            rows = list(candidates)
        keep = self._readable(batch, payloads, payload_column)
        invalid = pc.or_(
            pc.not_equal(batch.column("currency"), self.record_wise.currency), pc.less(batch.column("amount_cents"), 0)
        )
        if keep is not None or invalid.true_count:
            keep_list = keep.to_pylist() if keep is not None else [True] * len(rows)
            currencies, amounts = batch.column("currency"), batch.column("amount_cents")
            for position in pc.indices_nonzero(invalid).to_pylist():
                if keep_list[position]:
                    error = invalid_values(
                        currencies[position].as_py(), amounts[position].as_py(), self.record_wise.currency
                    )
                    assert error is not None  # `invalid` holds the same two tests
                    dead[rows[position]] = error
                    keep_list[position] = False
            fallback += (index for index, kept in zip(rows, keep_list, strict=True) if not kept and index not in dead)
            rows = [index for index, kept in zip(rows, keep_list, strict=True) if kept]
            batch = batch.filter(pa.array(keep_list, pa.bool_()))
        fallback.sort()
        self.counts["arrow_rows"] += len(rows)
        return DecodedBatch(batch, rows, dead, fallback)

    def _arrow(self, payloads: list) -> tuple[pa.RecordBatch | None, list[int]]:
        """Decode into one valid Arrow batch, halving around the records pyruhvro or Arrow's full
        validation (UTF-8) refuses. Returns the batch and the payload positions it holds."""
        deserialize, schema = self.deserialize, self.reader_json
        pieces: list[pa.RecordBatch] = []
        accepted: list[int] = []
        pending = [(0, len(payloads))]
        panics_left = len(payloads).bit_length() + 1  # enough to isolate one panicking record
        while pending:
            low, high = pending.pop()
            self.counts["arrow_calls"] += 1
            try:
                piece = deserialize(payloads[low:high], schema)
                piece.validate(full=True)  # UTF-8 of every string: pyruhvro does not check it
            except ValueError:  # pyruhvro's errors and pyarrow's ArrowInvalid alike
                pass
            except BaseException as exc:
                if not _is_rust_panic(exc):
                    raise
                self.counts["panics"] += 1
                panics_left -= 1
                log.warning("pyruhvro panicked on %d records (%s): decoding them record by record", high - low, exc)
                if panics_left <= 0:  # never loop on a decoder that panics on everything
                    pending.clear()
                    continue
            else:
                pieces.append(piece)
                accepted.extend(range(low, high))
                continue
            if high - low > 1:
                middle = (low + high) // 2
                pending += ((middle, high), (low, middle))  # the first half is popped first: order kept
        if not pieces:
            return None, accepted
        if len(pieces) == 1:
            return pieces[0], accepted
        return pa.Table.from_batches(pieces).combine_chunks().to_batches()[0], accepted

    def _readable(
        self, batch: pa.RecordBatch, payloads: list, payload_column: pa.BinaryArray
    ) -> pa.BooleanArray | None:
        """Rows the record-wise decoder would read exactly as Arrow did (None: all of them): timestamps
        a Python datetime can hold, and bytes equal to the record's own canonical encoding (which
        also rules out bytes after the record, unless those are allowed)."""
        keep = None
        for name, (low, high) in self.timestamp_columns:
            values = batch.column(name).cast(pa.int64())
            extremes = pc.min_max(values)
            least, most = extremes["min"].as_py(), extremes["max"].as_py()
            if least is None or (least >= low and most <= high):
                continue  # the usual case: one call, no mask (None: every value is null)
            in_range = pc.fill_null(pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high)), True)
            keep = in_range if keep is None else pc.and_(keep, in_range)
        try:
            encoded = pyruhvro.serialize_record_batch(batch, self.reader_json, 1)
        except BaseException as exc:
            if not (isinstance(exc, ValueError) or _is_rust_panic(exc)):
                raise
            log.warning(
                "pyruhvro could not re-encode %d records (%s): decoding them record by record", len(payloads), exc
            )
            return pa.array([False] * len(payloads), pa.bool_())
        encoded = encoded[0] if len(encoded) == 1 else pa.concat_arrays(encoded)
        same = pc.equal(encoded, payload_column)
        if same.false_count and not self.record_wise.reject_trailing_bytes:
            # Bytes after a complete record are allowed: a payload that starts with the record's
            # encoding is that record (the decode is a prefix parse, so it stopped right there).
            own = encoded.to_pylist()
            same = pa.array([ok or payloads[i].startswith(own[i]) for i, ok in enumerate(same.to_pylist())], pa.bool_())
        keep = same if keep is None else pc.and_(keep, same)
        return None if keep.false_count == 0 else keep

    # ----- the rule step -----
    def decide(self, messages: Sequence) -> list[Decision]:
        return self.decide_batch(messages).decisions(messages)

    def decide_batch(self, messages: Sequence) -> DecidedBatch:
        """Rows where no rule fires are forwarded with no per-record work here; only the dead letters, the
        fraud alerts and the fallback records get a Decision."""
        decoded = self.decode(messages)
        outputs = {index: dead_letter(messages[index], error) for index, error in decoded.dead.items()}
        if decoded.rows:
            assert decoded.columns is not None  # its rows were decoded in Arrow
            rules = self.record_wise.rules
            columns = [rule.fires_on_columns(decoded.columns) for rule in rules]
            fires = functools.reduce(pc.or_, columns) if columns else None
            if fires is not None and fires.true_count:
                # A fraud alert carries the whole record: the few flagged rows are taken from Arrow as
                # records (the bytes were proven canonical, so they read as the record-wise decoder reads them).
                positions = pc.indices_nonzero(fires)
                records = decoded.columns.take(positions).to_pylist()
                flags = [column.take(positions).to_pylist() for column in columns]
                now_ms = int(time.time() * 1000)
                fraud_decision = self.record_wise.fraud_decision
                for k, (position, record) in enumerate(zip(positions.to_pylist(), records, strict=True)):
                    index = decoded.rows[position]
                    names = [rule.name for rule, flagged in zip(rules, flags, strict=True) if flagged[k]]
                    outputs[index] = fraud_decision(messages[index], record, names, now_ms)
                self.counts["alerts_from_arrow"] += len(records)
        if decoded.fallback:
            indices = decoded.fallback
            self.counts["record_rows"] += len(indices)
            decided = self.record_wise.decide_batch([messages[i] for i in indices])
            for position, decision in decided.outputs.items():  # the others are forwarded as they came
                outputs[indices[position]] = decision
        return DecidedBatch(len(messages), outputs, STATELESS_LEGIT_HEADERS)
