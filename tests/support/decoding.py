"""The decide stage without Kafka: fake messages and registry, both deciders built alike, and mutations
of valid Avro encodings for the decoder-agreement tests and fuzz.

Run the long fuzz (not part of the suite) with:  python -m tests.support.decoding --records 20000
"""

from __future__ import annotations

import argparse
import io
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from fastavro import schemaless_reader

from fraudstream.consumer.decide import ColumnarDecider, Decider, Decision, Route
from fraudstream.consumer.rules import rules_from_settings
from fraudstream.records import Transaction
from fraudstream.registry import UnknownSchema
from fraudstream.schemas import history, load_schemas
from fraudstream.serde import Decoder, make_encoder
from fraudstream.settings import Settings

SETTINGS = Settings()
SCHEMAS = load_schemas(SETTINGS.schemas_dir)
TRANSACTION_V1 = dict(history(SETTINGS.schemas_dir, "Transaction"))[1]
TRANSACTION_ID, FRAUD_ID, V1_ID, LABEL_ID = 11, 12, 13, 14
encode = make_encoder(TRANSACTION_ID, SCHEMAS.parsed["Transaction"])
encode_v1 = make_encoder(V1_ID, TRANSACTION_V1)


class FakeMessage:
    def __init__(self, value, key=b"acc", offset=0, headers=None):
        self._value, self._key, self._offset, self._headers = value, key, offset, headers

    def value(self):
        return self._value

    def key(self):
        return self._key

    def topic(self):
        return "transactions"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def headers(self):
        return self._headers


class FakeRegistry:
    def __init__(self, schemas: dict[int, dict] | None = None):
        self.schemas = (
            schemas
            if schemas is not None
            else {
                TRANSACTION_ID: SCHEMAS.expanded["Transaction"],
                V1_ID: TRANSACTION_V1,
                LABEL_ID: SCHEMAS.expanded["Label"],
            }
        )
        self.calls = 0

    def schema_by_id(self, schema_id: int) -> dict:
        self.calls += 1
        if schema_id not in self.schemas:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        return self.schemas[schema_id]


def record_wise_decider(registry: FakeRegistry | None = None, *, reject_trailing_bytes: bool = True) -> Decider:
    decoder = Decoder(registry or FakeRegistry(), SCHEMAS.expanded["Transaction"])
    return Decider(
        decoder,
        rules_from_settings(SETTINGS),
        legit_schema_id=TRANSACTION_ID,
        legit_schema=SCHEMAS.parsed["Transaction"],
        fraud_schema_id=FRAUD_ID,
        fraud_schema=SCHEMAS.parsed["FraudAlert"],
        reject_trailing_bytes=reject_trailing_bytes,
    )


def decider_pair(*, reject_trailing_bytes: bool = True) -> tuple[Decider, ColumnarDecider]:
    """The record-wise decider and a columnar one, each with its own decoder (no shared cache)."""
    record_wise = record_wise_decider(reject_trailing_bytes=reject_trailing_bytes)
    fallback = record_wise_decider(reject_trailing_bytes=reject_trailing_bytes)
    return record_wise, ColumnarDecider(fallback, reader_schema=SCHEMAS.expanded["Transaction"])


def make_tx(amount_cents: int = 5, **changes) -> Transaction:
    fields = dict(
        transaction_id="t-1",
        account_id="acc",
        card_id="c",
        merchant_id="m",
        merchant_category="5411",
        terminal_id="term",
        amount_cents=amount_cents,
        event_time=datetime(2026, 1, 1, tzinfo=UTC),
        channel="ONLINE",
        country="US",
        city="Austin",
        latitude=30.2,
        longitude=-97.7,
    )
    fields.update(changes)
    return Transaction(**fields)


def comparable(decision: Decision):
    """A decision without the moment it was made (FraudAlert.detected_at differs between two runs)."""
    if decision.route is not Route.FRAUD:
        return decision.route, decision.value, decision.dead_letter_kind
    alert = schemaless_reader(io.BytesIO(decision.value[5:]), SCHEMAS.parsed["FraudAlert"], None)
    # The transaction as bytes, not as a dict: a NaN latitude is not equal to itself.
    return decision.route, decision.value[:5], encode(alert["transaction"]), alert["rules"]


def messages_of(values: Iterable[bytes | None]) -> list[FakeMessage]:
    return [FakeMessage(value, offset=i) for i, value in enumerate(values)]


# ----- mutations of a valid encoding -----
# Bytes that hit the decoders' edges: zigzag -1 and -2 (negative enum/union index or length), a
# continuation byte (longer varints), 0xff (invalid UTF-8, huge varints), NUL.
SPECIAL_BYTES = (0x00, 0x01, 0x02, 0x03, 0x0A, 0x7F, 0x80, 0xC0, 0xED, 0xF4, 0xFE, 0xFF)


def mutate(payload: bytes, rng: random.Random) -> bytes:
    """One random change to an Avro payload (the bytes after the Confluent header)."""
    data = bytearray(payload)
    position = rng.randrange(len(data) + 1)
    op = rng.randrange(9)
    if op == 0 and data:  # replace a byte
        data[min(position, len(data) - 1)] = rng.randrange(256)
    elif op == 1 and data:  # an edge byte
        data[min(position, len(data) - 1)] = rng.choice(SPECIAL_BYTES)
    elif op == 2 and data:  # flip one bit
        data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
    elif op == 3:  # insert bytes
        data[position:position] = bytes(rng.choice(SPECIAL_BYTES) for _ in range(rng.randint(1, 3)))
    elif op == 4:  # delete bytes
        del data[position : position + rng.randint(1, 3)]
    elif op == 5:  # truncate
        del data[position:]
    elif op == 6:  # extend
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    elif op == 7:  # a run of continuation bytes: an over-long or huge integer
        data[position:position] = b"\x80" * rng.randint(1, 10)
    else:  # overwrite a run with 0xff
        data[position : position + rng.randint(1, 4)] = b"\xff" * rng.randint(1, 4)
    return bytes(data)


def mutated_values(count: int, seed: int) -> list[bytes]:
    """`count` framed values: current- and v1-schema transactions from the generator, each mutated once or twice."""
    from fraudstream.producer.generator import Generator

    rng = random.Random(seed)
    pairs = Generator(seed).next_batch(count, 1_700_000_000_000)
    values = []
    for tx, _ in pairs:
        record = tx.to_dict()
        if rng.random() < 0.15:
            del record["device_id"]
            value = encode_v1(record)
        else:
            value = encode(record)
        payload = value[5:]
        for _ in range(rng.choice((1, 1, 1, 2))):
            payload = mutate(payload, rng)
        values.append(value[:5] + payload)
    return values


@dataclass
class FuzzResult:
    found: list  # (value, record-wise decision, columnar decision) where they differ
    columnar: ColumnarDecider  # its counts say which path the rows took
    tally: Counter  # record-wise decisions: route name or dead-letter kind
    accepted_current: int  # records accepted with the current schema id: what Arrow should have decoded


def disagreements(
    values: list[bytes | None], *, batch_size: int = 500, reject_trailing_bytes: bool = True
) -> FuzzResult:
    """Decide the values with both deciders, in batches, and compare."""
    record_wise, columnar = decider_pair(reject_trailing_bytes=reject_trailing_bytes)
    result = FuzzResult([], columnar, Counter(), 0)
    current = TRANSACTION_ID.to_bytes(4, "big")
    for start in range(0, len(values), batch_size):
        messages = messages_of(values[start : start + batch_size])
        expected = record_wise.decide(messages)
        actual = columnar.decide(messages)
        for message, want, got in zip(messages, expected, actual, strict=True):
            result.tally[want.dead_letter_kind or want.route.name] += 1
            if want.route is not Route.DEAD_LETTER and message.value()[1:5] == current:
                result.accepted_current += 1
            if comparable(want) != comparable(got):
                result.found.append((message.value(), want, got))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Fuzz: do the columnar and record-wise deciders agree on mutated records?"
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    values = mutated_values(args.records, args.seed)
    for strict in (True, False):
        result = disagreements(values, reject_trailing_bytes=strict)
        print(
            f"reject_trailing_bytes={strict}: {len(result.found)} disagreements in {len(values)} mutated records; "
            f"decisions {dict(result.tally.most_common())}; accepted with the current schema "
            f"{result.accepted_current}; columnar counts {dict(result.columnar.counts)}"
        )
        for value, want, got in result.found[:10]:
            print(
                f"  {value.hex()}: record-wise {want.route.name}/{want.dead_letter_kind}, "
                f"columnar {got.route.name}/{got.dead_letter_kind}"
            )


if __name__ == "__main__":
    main()
