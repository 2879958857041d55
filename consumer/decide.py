"""The decide stage: raw Kafka messages in, one routing decision per message out.

Batch-shaped on purpose (see design.md): how a batch is decoded can change behind
`Decider.decide` without touching the transactional loop. Data problems become dead-letter
decisions; infrastructure problems (the registry not answering) raise RegistryError so the
loop can retry the whole batch.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.compute as pc
import pyruhvro

from consumer.rules import Rule, fired
from fraudstream.records import Transaction
import json

from fraudstream.serde import HEADER, MAGIC_BYTE, Decoder, DecodeError, make_encoder, read_payload, split_frame

DLQ_KIND = "error.kind"
DLQ_REASON = "error.reason"
DLQ_TOPIC = "source.topic"
DLQ_PARTITION = "source.partition"
DLQ_OFFSET = "source.offset"


class Route(enum.IntEnum):
    LEGIT = 0
    FRAUD = 1
    DEAD_LETTER = 2


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    dead_letter_kind: str | None = None


class Decider:
    """Decode with writer schemas cached by id, apply the rules, encode the outputs.

    `legit_schema_id` and `fraud_schema_id` are the ids of our current Transaction and FraudAlert
    schemas under the output subjects. A record written with the current Transaction schema is
    forwarded to the legit topic byte for byte (same schema, same id): no re-encoding.
    """

    def __init__(self, decoder: Decoder, rules: Sequence[Rule], *, legit_schema_id: int, legit_schema,
                 fraud_schema_id: int, fraud_schema, currency: str = "USD", reject_trailing_bytes: bool = True) -> None:
        self.decoder = decoder
        self.rules = tuple(rules)
        self.legit_schema_id = legit_schema_id
        self.encode_legit = make_encoder(legit_schema_id, legit_schema)
        self.encode_fraud = make_encoder(fraud_schema_id, fraud_schema)
        self.currency = currency
        # Bytes after a complete record usually mean a producer framed data with the wrong schema id.
        self.reject_trailing_bytes = reject_trailing_bytes

    def decide(self, messages: Sequence) -> list[Decision]:
        # Locals: this loop runs once per record.
        schemas_for = self.decoder.schemas_for
        rules = self.rules
        legit_id = self.legit_schema_id
        encode_legit = self.encode_legit
        encode_fraud = self.encode_fraud
        currency = self.currency
        reject_trailing_bytes = self.reject_trailing_bytes
        now_ms = int(time.time() * 1000)
        decisions = []
        append = decisions.append
        for message in messages:
            value = message.value()
            try:
                schema_id, payload = split_frame(value)
                writer, reader = schemas_for(schema_id)
                record = read_payload(payload, schema_id, writer, reader, reject_trailing_bytes=reject_trailing_bytes)
                transaction = Transaction.from_dict(record)
                if transaction.currency != currency:
                    raise DecodeError("invalid_record", f"currency {transaction.currency!r} is not {currency}")
                if transaction.amount_cents < 0:
                    raise DecodeError("invalid_record", f"negative amount_cents {transaction.amount_cents}")
            except DecodeError as error:
                append(dead_letter(message, error))
                continue
            rule_names = fired(rules, transaction)
            if rule_names:
                alert = {"transaction": record, "rules": rule_names, "detected_at": now_ms}
                append(Decision(Route.FRAUD, message.key(), encode_fraud(alert)))
            elif schema_id == legit_id:
                append(Decision(Route.LEGIT, message.key(), value))
            else:
                append(Decision(Route.LEGIT, message.key(), encode_legit(record)))
        return decisions


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


class ColumnarDecider:
    """Decode a batch's current-schema records together into Arrow (pyruhvro, in Rust) and run the
    rules and validity checks on columns. Clean legit records are forwarded byte for byte; only the
    few that need a record (fraud alerts, invalid rows, other writer versions, undecodable bytes)
    go through the record-wise Decider, so both produce the same decisions.

    One difference: Arrow decoding cannot see bytes left after a record, so in columnar mode a
    record followed by extra bytes is read like Confluent's own deserializer reads it (the extra
    bytes ignored), whichever path it takes; the record-wise mode dead-letters it.
    """

    def __init__(self, record_wise: Decider, *, reader_schema: dict, currency: str = "USD") -> None:
        if record_wise.reject_trailing_bytes:
            raise ValueError("the columnar decider's fallback must accept trailing bytes, as Arrow decoding does")
        self.record_wise = record_wise
        self.reader_json = json.dumps(reader_schema)
        self.currency = currency

    def decide(self, messages: Sequence) -> list[Decision]:
        current_id = self.record_wise.legit_schema_id
        header_size, unpack = HEADER.size, HEADER.unpack_from
        decisions: list[Decision | None] = [None] * len(messages)
        columnar, record_wise = [], []
        for index, message in enumerate(messages):
            value = message.value()
            if value and value[0] == MAGIC_BYTE and len(value) >= header_size and unpack(value)[1] == current_id:
                columnar.append(index)
            else:
                record_wise.append(index)
        if columnar:
            try:
                batch = pyruhvro.deserialize_array([messages[i].value()[header_size:] for i in columnar], self.reader_json)
            except ValueError:  # some record in the batch is corrupt: find it record by record
                record_wise += columnar
            else:
                needs_record = pc.or_(pc.not_equal(batch.column("currency"), self.currency),
                                      pc.less(batch.column("amount_cents"), 0))
                for rule in self.record_wise.rules:
                    needs_record = pc.or_(needs_record, rule.fires_on_columns(batch))
                for index, flagged in zip(columnar, needs_record.to_pylist(), strict=True):
                    if flagged:
                        record_wise.append(index)
                    else:
                        message = messages[index]
                        decisions[index] = Decision(Route.LEGIT, message.key(), message.value())
        if record_wise:
            record_wise.sort()
            for index, decision in zip(record_wise, self.record_wise.decide([messages[i] for i in record_wise]), strict=True):
                decisions[index] = decision
        return decisions
