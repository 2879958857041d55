"""Test helpers that talk to the real broker: produce framed records, read topics back to their end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone

from confluent_kafka import Consumer, Producer, TopicPartition

from fraudstream.kafka import consumer_config, producer_config
from fraudstream.records import Transaction
from fraudstream.settings import Settings


def transaction(amount_cents: int, *, account: str = "acc-1", **overrides) -> Transaction:
    # A terminal of the account's own: many accounts' cards at one terminal within minutes is what the
    # compromised_terminal rule looks for, so a test that wants it says so.
    fields = dict(
        transaction_id=str(uuid.uuid4()),
        account_id=account,
        card_id=f"card-{account}",
        merchant_id="m-1",
        merchant_category="5411",
        terminal_id=f"t-{account}",
        amount_cents=amount_cents,
        currency="USD",
        event_time=datetime.now(timezone.utc),
        channel="CARD_PRESENT",
        country="US",
        city="Springfield",
        latitude=39.8,
        longitude=-89.6,
        device_id=None,
    )
    fields.update(overrides)
    return Transaction(**fields)


def produce_raw(
    settings: Settings,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    headers=None,
    partition: int | None = None,
) -> int:
    producer = Producer(producer_config(settings))
    count = 0
    where = {} if partition is None else {"partition": partition}
    for key, value in records:
        producer.produce(topic, value, key, headers=headers, **where)
        producer.poll(0)
        count += 1
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} records not delivered"
    return count


def read_topic(settings: Settings, topic: str, *, isolation: str = "read_committed", timeout_s: float = 60.0) -> list:
    """Every record of the topic, from the beginning to the current end of each partition."""
    consumer = Consumer(consumer_config(settings, f"reader-{uuid.uuid4().hex[:8]}", **{"isolation.level": isolation}))
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        consumer.assign(partitions)
        records = []
        deadline = time.monotonic() + timeout_s
        while True:
            positions = {tp.partition: tp.offset for tp in consumer.position(partitions)}
            if all(positions[p] >= end or end == 0 for p, end in ends.items()):
                return records
            assert time.monotonic() < deadline, f"timed out reading {topic}: at {positions}, end {ends}"
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    records.append(message)
    finally:
        consumer.close()


def count_committed(settings: Settings, topics: list[str]) -> int:
    return sum(len(read_topic(settings, t)) for t in topics)


def wait_until(condition, *, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll a real condition until it holds (not a sleep standing in for readiness)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
