"""Follow the detector's output topics with one read_committed consumer, reading on from where it was
(never from offset 0 again): which transaction ids were routed, how often, and whether anything is stuck."""

from __future__ import annotations

import time
import uuid
from collections import Counter

from confluent_kafka import Consumer, IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from fraudstream.kafka import admin, consumer_config
from fraudstream.settings import Settings
from tests.integration.test_detector import decode


class RoutedReader:
    def __init__(self, settings: Settings, check=lambda: None) -> None:
        """`check` runs at every read: e.g. an assertion that the detector is still running, so that a
        test fails at once rather than wait for output that will never come."""
        self.settings = settings
        self.check = check
        self.consumer = Consumer(
            consumer_config(settings, f"routed-reader-{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_committed"})
        )
        topics = (settings.legit_topic, settings.fraud_topic, settings.dlq_topic)
        metadata = self.consumer.list_topics(timeout=30).topics
        self.partitions = [TopicPartition(t, p, 0) for t in topics for p in metadata[t].partitions]
        self.consumer.assign(self.partitions)
        self.ids: Counter[str] = Counter()
        self.dead_letters = 0

    @property
    def total(self) -> int:
        return sum(self.ids.values()) + self.dead_letters

    def read(self, timeout_s: float = 0.5) -> int:
        """Whatever was committed since the last call."""
        self.check()
        messages = [m for m in self.consumer.consume(5_000, timeout_s) if m.error() is None]
        for message in messages:
            topic = message.topic()
            if topic == self.settings.dlq_topic:
                self.dead_letters += 1
            elif topic == self.settings.fraud_topic:
                self.ids[decode(self.settings, message.value())["transaction"]["transaction_id"]] += 1
            else:
                self.ids[decode(self.settings, message.value())["transaction_id"]] += 1
        return len(messages)

    def wait_for(self, total: int, *, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while self.total < total:
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: {self.total} of {total} routed; {self.describe()}"
            )
            self.read()

    def describe(self) -> str:
        """Where the reader is against each output partition's last stable offset and high watermark."""
        return describe_outputs(self.settings, self.partitions, self._positions())

    def wait_for_progress(self, *, timeout_s: float, what: str) -> None:
        """Until something is committed after this call: first read all that the outputs hold now (past
        whatever transaction is still open), then wait for more. A reader lagging behind never counts old
        commits as new progress."""
        deadline = time.monotonic() + timeout_s
        ends = self._ends()
        while True:
            self.read(0.2)
            if all(self._positions()[tp] >= end for tp, end in ends.items()):
                break
            assert time.monotonic() < deadline, f"timed out waiting for {what}: outputs not readable to {ends}"
        self.wait_for(self.total + 1, timeout_s=max(0.0, deadline - time.monotonic()), what=what)

    def _ends(self) -> dict[tuple[str, int], int]:
        """High watermarks, once every partition's leader answers (just after a broker fault it may not).
        Asked with a fresh consumer when the reader's own cannot tell (seen after a frozen broker)."""
        deadline = time.monotonic() + 120
        asker, last_error = self.consumer, None
        while True:
            try:
                return {
                    (tp.topic, tp.partition): asker.get_watermark_offsets(tp, timeout=10)[1] for tp in self.partitions
                }
            except KafkaException as exc:
                last_error = exc.args[0].str()
            finally:
                if asker is not self.consumer:
                    asker.close()
            assert time.monotonic() < deadline, f"the output partitions' leaders did not answer: {last_error}"
            asker = Consumer(consumer_config(self.settings, f"routed-ends-{uuid.uuid4().hex[:8]}"))

    def _positions(self) -> dict[tuple[str, int], int]:
        # A partition never read has no position yet (a negative logical offset): it is at 0.
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in self.consumer.position(self.partitions)}

    def wait_until_at_end(self, *, timeout_s: float) -> None:
        """Read until every output partition is read to its high watermark: no transaction left open."""
        deadline = time.monotonic() + timeout_s
        while True:
            ends = self._ends()
            self.read(0.2)
            positions = self._positions()
            behind = {tp: (positions[tp], end) for tp, end in ends.items() if positions[tp] < end}
            if not behind:
                return
            assert time.monotonic() < deadline, f"output partitions stuck below their end: {behind}"

    def close(self) -> None:
        self.consumer.close()


def describe_outputs(settings: Settings, partitions: list[TopicPartition], read_to: dict | None = None) -> str:
    """Each output partition's last stable offset and high watermark as the leaders say now (and how far a
    reader got): tells a reader that stopped fetching from a transaction left open."""
    client = admin(settings)
    asked = {
        level: client.list_offsets(
            {tp: OffsetSpec.latest() for tp in partitions}, isolation_level=level, request_timeout=10
        )
        for level in (IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED)
    }
    parts = []
    for tp in partitions:
        try:
            stable, high = (asked[level][tp].result(timeout=15).offset for level in asked)
        except Exception as exc:  # noqa: BLE001 (a description for a failure message, whatever the cause)
            stable = high = f"unknown ({exc})"
        where = f" read to {read_to[(tp.topic, tp.partition)]}," if read_to is not None else ""
        parts.append(f"{tp.topic}[{tp.partition}]{where} last stable {stable}, high watermark {high}")
    return "; ".join(parts)
