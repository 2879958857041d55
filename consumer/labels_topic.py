"""The labels topic as delayed feedback: every detector holds a LabelTable of all labels received.

The input is keyed by account, per-terminal fraud counts need every account's labels: a repartition by
terminal would give each terminal one owner, but the labels topic is small (one short record per
transaction, a week late) and only ever read, so every detector simply reads all of it, the way it reads
the rules topic: a global reader (consumer/global_reader.py: outside the consumer group, assign mode,
read_committed), to the end at start-up, then between batches without waiting. What a label may change is bounded by event time
(see LabelTable): a label counts for a transaction only once its event time plus the delay is at or before
the transaction's, however early it was read.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from fastavro import schemaless_reader

from fraudstream.consumer.global_reader import GlobalReader
from fraudstream.consumer.inspect import console_schemas
from fraudstream.consumer.model import LabelTable
from fraudstream.errors import KafkaUnavailable, RegistryError
from fraudstream.kafka import consumer_config, ensure_topics
from fraudstream.registry import Registry
from fraudstream.serde import DecodeError, consumed_headers, split_frame
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.labels")

READ_BATCH = 5_000
CATCH_UP_WAIT_S = 1.0  # at most this long per batch for labels that should have arrived, then decide anyway


def _high_watermark(consumer: Consumer, topic: str, partition: int) -> int:
    return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]


class LabelsReader(GlobalReader):
    """One detector's reader of `<topic>.labels` into a LabelTable."""

    name = "labels reader"

    def __init__(
        self,
        settings: Settings,
        table: LabelTable,
        *,
        registry: Registry | None = None,
        on_log: Callable[[str], None] | None = None,
        keep_verdicts: bool = False,
    ) -> None:
        super().__init__(settings)
        self.table = table
        # keep_verdicts: also transaction id -> (is fraud, scenario), the latest label's, for a report (a backtest
        # reads the labels once for its model and its report).
        self.verdicts: dict[str, tuple[bool, str]] | None = {} if keep_verdicts else None
        self.on_log = on_log or log.info
        self._schemas = console_schemas((registry or Registry(settings)).schema_by_id)
        self.partitions: list[TopicPartition] = []
        self.unreadable = 0  # label records that do not decode: counted, logged once, never used
        self.read = 0
        self.delay_ms = round(settings.label_delay_days * 86_400_000)
        # Per partition: the producer's clock as its labels show it (latest event time + delay read). Labels
        # are written as the clock passes event time + delay, so each partition's labels come in that order.
        self.clock_ms: dict[int, int] = {}
        self.behind = 0  # batches decided before the labels due for them had all been read

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Assign every partition from the beginning and read up to the end taken now."""
        s = self.settings
        ensure_topics(s, (s.labels_topic,))
        self.consumer = consumer = Consumer(
            consumer_config(s, f"{s.group_id}.labels-reader", **{"auto.offset.reset": "earliest"})
        )
        metadata = self.call(
            "reading the labels topic's partitions", lambda: consumer.list_topics(s.labels_topic, timeout=10)
        ).topics[s.labels_topic]
        self.partitions = [TopicPartition(s.labels_topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        consumer.assign(self.partitions)
        ends: dict[int, int] = {}
        for tp in self.partitions:
            ends[tp.partition] = self.call(
                f"reading the end of labels topic {s.labels_topic}[{tp.partition}]",
                functools.partial(_high_watermark, consumer, tp.topic, tp.partition),
                topic=s.labels_topic,
            )
        deadline = time.monotonic() + timeout_s
        while any(self._position(p) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read labels topic {s.labels_topic} to its end within {timeout_s:g} s"
                )
            self._read(0.2)
        self.on_log(
            f"labels: {self.table.count:,} read from {s.labels_topic}"
            + (f" ({self.table.unplaced:,} without terminal or event time, not used)" if self.table.unplaced else "")
        )

    def _position(self, partition: int) -> int:
        return self.position(self.settings.labels_topic, partition)

    def catch_up(self, until_ms: int) -> bool:
        """Before a batch whose latest event time is until_ms: read the labels due by then. A partition is
        caught up when its labels' clock has passed until_ms, or when everything the broker had for it
        (its high watermark as last fetched) is read. Waits at most CATCH_UP_WAIT_S; False if it gave up."""
        deadline = None
        while True:
            lagging = [
                tp.partition
                for tp in self.partitions
                if self.clock_ms.get(tp.partition, -1) < until_ms
                and self._position(tp.partition) < self._cached_end(tp.partition)
            ]
            if not lagging:
                return True
            if deadline is None:
                deadline = time.monotonic() + CATCH_UP_WAIT_S
            elif time.monotonic() > deadline:
                self.behind += 1
                if self.behind == 1:
                    self.on_log(
                        f"labels: partitions {lagging} of {self.settings.labels_topic} still behind event time "
                        f"{until_ms} after {CATCH_UP_WAIT_S:g} s: deciding with the labels read so far "
                        "(further ones counted)"
                    )
                return False
            self._read(0.05)

    def _cached_end(self, partition: int) -> int:
        try:
            return self._client().get_watermark_offsets(
                TopicPartition(self.settings.labels_topic, partition), cached=True
            )[1]
        except KafkaException:
            return 0

    def _read(self, timeout_s: float) -> int:
        consumer = self._client()
        messages = consumer.consume(READ_BATCH, timeout_s)
        terminals, times, frauds, transactions = [], [], [], []
        clock, delay = self.clock_ms, self.delay_ms
        for message in messages:
            error = message.error()
            if error is not None:
                log.warning("labels reader: %s", error.str())
                continue
            # A record (not an error): its topic, partition and offset are set.
            topic, p, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and p is not None and offset is not None
            try:
                schema_id, payload = split_frame(message.value(), consumed_headers(message))
                # A record schema decodes to a dict.
                label = cast(dict[str, Any], schemaless_reader(io.BytesIO(payload), self._schemas.get(schema_id), None))
                fraud, transaction = bool(label["is_fraud"]), str(label["transaction_id"])
                terminals.append(label.get("terminal_id"))
                times.append(label.get("event_time"))
                frauds.append(fraud)
                transactions.append(transaction)
                if label.get("event_time") is not None:
                    clock[p] = max(clock.get(p, -1), label["event_time"] + delay)
                if self.verdicts is not None:
                    self.verdicts[transaction] = (fraud, str(label.get("scenario") or ""))
            except RegistryError:
                # Infrastructure: read this record again next time (the registry is retried like the input's).
                consumer.seek(TopicPartition(topic, p, offset))
                break
            except (DecodeError, KeyError, TypeError, ValueError, EOFError) as exc:
                if not self.unreadable:
                    self.on_log(
                        f"labels: record at {topic}[{p}]@{offset} "
                        f"cannot be read ({exc}): not used (further ones counted)"
                    )
                self.unreadable += 1
        self.table.add(terminals, times, frauds, transactions)  # by transaction: a changed verdict replaces
        self.read += len(terminals)
        return len(messages)
