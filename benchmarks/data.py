"""The records every contender sees: one seeded stream of transactions, pre-filled once per run.

The Avro input topic (Confluent framing, written with our encoder) feeds ours and the
confluent-kafka peer; a JSON copy of the same transactions (same keys, same amounts) feeds the
kafka-python peer. Pre-filling streams: nothing is held in memory but counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from confluent_kafka import Producer

from fraudstream.consumer.features import SESSION_GAP_MS
from fraudstream.demo.options import DEFAULT_RATE, DEFAULT_SPEEDUP
from fraudstream.kafka import produce_or_wait, producer_config
from fraudstream.records import Transaction
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings
from fraudstream.producer.generator import Generator

# Event time of the pre-filled records: a simulated clock, so the same seed gives the same bytes.
PREFILL_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
# Transactions per second of event time: the demo's clock (1,000 per wall-clock second, event time 3,600x
# faster), which the generator's population (5,000 accounts, a few thousand terminals) is sized for: each card
# pays every few hours. A denser clock on the same population is no real stream: at 2,000 per second of event
# time each account paid every 2.5 s, a terminal took a dozen cards in 10 minutes, and the default
# compromised-terminal rule flagged 62% of the records (3.6% on this clock).
PREFILL_EVENT_RATE = DEFAULT_RATE / DEFAULT_SPEEDUP
# The velocity rule of the stateful contenders: more than VELOCITY_MAX transactions of one card in its
# session (payments at most VELOCITY_GAP_MS of event time apart, this one included), or the amount rule,
# is fraud. Ours runs it as its `velocity` rule, whose session gap is the card features' SESSION_GAP_MS;
# quixstreams as a session window with that inactivity gap. The rule is there for what state costs.
VELOCITY_GAP_MS = SESSION_GAP_MS
VELOCITY_MAX = 3


def transactions(count: int, seed: int, event_rate: float = PREFILL_EVENT_RATE) -> Iterator[Transaction]:
    """`count` transactions from the product's seeded generator (labels are not needed here)."""
    for transaction, _label in islice(Generator(seed).stream(PREFILL_START_MS, event_rate), count):
        yield transaction


def json_form(transaction: Transaction) -> dict:
    """The JSON the seed's detector reads: the same fields, event_time in epoch milliseconds."""
    record = transaction.to_dict()
    record["event_time"] = int(transaction.event_time.timestamp() * 1000)
    return record


@dataclass(frozen=True, slots=True)
class Prefill:
    count: int
    fraud: int  # how many of them the rule routes to the fraud topic
    velocity_fraud: int  # how many the velocity rule (with the amount rule) routes there
    elapsed_s: float


def prefill(
    settings: Settings,
    *,
    count: int,
    seed: int,
    json_topic: str | None,
    velocity_max: int = VELOCITY_MAX,
    event_rate: float = PREFILL_EVENT_RATE,
) -> Prefill:
    """Write `count` transactions to settings.transactions_topic (Avro) and, when given, json_topic (JSON)."""
    started = time.perf_counter()
    schema_id = current_ids(settings, Registry(settings))[settings.transactions_topic]
    encode = make_encoder(schema_id, load_schemas(settings.schemas_dir).parsed["Transaction"])
    failures: list[str] = []

    def on_delivery(error, _message) -> None:
        if error is not None:
            failures.append(error.str())

    producer = Producer(
        producer_config(
            settings,
            **{
                "queue.buffering.max.messages": 1_000_000,  # the loop below outruns one broker on loopback
                "compression.type": "none",  # kafka-python reads lz4 only with an extra package: keep the inputs plain
                "on_delivery": on_delivery,
            },
        )
    )
    avro_topic, threshold, fraud, velocity_fraud = settings.transactions_topic, settings.fraud_threshold_cents, 0, 0
    sessions: dict[str, tuple[int, int]] = {}  # card -> (its latest event time, payments in its session)
    dumps = json.dumps

    def produce(topic: str, value: bytes, key: bytes) -> None:
        produce_or_wait(producer, topic, value, key)

    for index, transaction in enumerate(transactions(count, seed, event_rate)):
        key = transaction.account_id.encode()
        produce(avro_topic, encode(transaction.to_dict()), key)
        if json_topic:
            produce(json_topic, dumps(json_form(transaction)).encode(), key)
        large = transaction.amount_cents > threshold
        fraud += large
        event_ms = int(transaction.event_time.timestamp() * 1000)
        last_ms, in_session = sessions.get(transaction.card_id, (None, 0))
        # The same session as ours' card features: at most the gap after the card's previous payment
        # (a record out of order counts as "at once").
        in_session = in_session + 1 if last_ms is not None and max(event_ms - last_ms, 0) <= VELOCITY_GAP_MS else 1
        sessions[transaction.card_id] = (event_ms, in_session)
        velocity_fraud += large or in_session > velocity_max
        if index % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or failures:
        raise RuntimeError(
            f"pre-fill failed: {left} records not delivered, {len(failures)} errors ({failures[:1] or 'timed out'})"
        )
    return Prefill(count=count, fraud=fraud, velocity_fraud=velocity_fraud, elapsed_s=time.perf_counter() - started)
