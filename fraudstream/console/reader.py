"""The console's reader: one thread that reads the fraud, labels, legit and rules topics into the index.

A consumer outside any group (assign mode, from the beginning, read_committed, like `fraudstream inspect`
and the detector's own rules and labels readers), with inspect's decoding: each value by its own writer
schema from the registry (cached per id). A record that does not decode is counted and skipped, never
indexed, never fatal. Until every partition has been read to the end it had at start, the index is
"catching up" (the pages say so). New alerts and verdicts are handed to `on_alerts` and `on_verdicts` (the
live updates) after their
SQLite transaction commits, so a page opened on an event finds its alert.

Every STATS_INTERVAL_S a second thread measures the detectors: their group's committed offsets against the input
topic's ends (consumer lag), and how fast the committed offsets move (throughput).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from fraudstream.console.index import Index
from fraudstream.consumer.inspect import console_schemas
from fraudstream.consumer.rules_topic import RulesCodec
from fraudstream.errors import RegistryError
from fraudstream.kafka import admin, consumer_config
from fraudstream.registry import Registry
from fraudstream.serde import DecodeError, read_payload, split_frame
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.console")

READ_BATCH = 2_000
POLL_S = 0.1  # a new alert reaches the pages within about this long after it is committed
STATS_INTERVAL_S = 5.0
STATS_KEPT = 720  # an hour of samples
READER_GROUP_ID = "fraudstream-console"  # never joined, never committed (assign mode)
# Errors after which nothing more arrives until Kafka is back: the pages show them.
CONNECTION_ERRORS = (
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TRANSPORT,
    KafkaError._AUTHENTICATION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError._RESOLVE,
)


@dataclass
class DetectorSample:
    at: float  # wall clock, seconds
    committed: int  # the detectors' committed offsets, summed over the input's partitions
    lag: int  # the input's end offsets minus those


@dataclass
class ReaderState:
    caught_up: bool = False
    kafka_error: str | None = None  # the last connection problem, None once records flow again
    kafka_error_at: float = 0.0
    indexed: dict[str, int] = field(default_factory=dict)
    undecodable: int = 0
    samples: deque = field(default_factory=lambda: deque(maxlen=STATS_KEPT))


# What the index reads of each record, with its type: a record written with another schema (a Transaction on
# the fraud topic, say) decodes fine and must still be skipped, not stop the reader.
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "transaction": {
        "transaction_id": str,
        "card_id": str,
        "account_id": str,
        "merchant_id": str,
        "terminal_id": str,
        "amount_cents": int,
        "event_time": int,
    },
    "alert": {"transaction": dict, "rules": list, "detected_at": int},
    "labels": {"transaction_id": str, "is_fraud": bool, "scenario": str},
}


def check_record(kind: str, value: Any) -> None:
    """ValueError unless `value` has what the index reads from a record of that topic."""
    wanted = (
        [("alert", value), ("transaction", value.get("transaction") if isinstance(value, dict) else None)]
        if kind == "fraud"
        else [("transaction" if kind == "legit" else kind, value)]
    )
    for name, record in wanted:
        if not isinstance(record, dict):
            raise ValueError(f"not a {name} record")
        for key, types in REQUIRED[name].items():
            if not isinstance(record.get(key), types) or (types is int and isinstance(record.get(key), bool)):
                raise ValueError(f"not a {name} record: field {key} missing or not {getattr(types, '__name__', types)}")


class TopicReader:
    def __init__(
        self,
        settings: Settings,
        index: Index,
        *,
        on_alerts: Callable[[list[dict[str, Any]]], None],
        on_verdicts: Callable[[list[str]], None] = lambda transaction_ids: None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.on_alerts = on_alerts
        self.on_verdicts = on_verdicts
        self.state = ReaderState()
        self._registry = Registry(settings)
        self._schemas = console_schemas(self._registry.schema_by_id)
        self._rules = RulesCodec(settings, self._registry)
        self._admin = admin(settings)  # kept: a collected client fails its pending futures (pitfall 22)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-reader", daemon=True)
        # The detectors' lag takes admin and metadata requests that may wait on a coordinator: a thread of
        # their own, so that they never hold up a new alert.
        self._stats_thread = threading.Thread(target=self._sample_loop, name="console-detector-stats", daemon=True)
        s = settings
        self.missing: set[str] = set()
        self.topics = {s.fraud_topic: "fraud", s.labels_topic: "labels", s.legit_topic: "legit", s.rules_topic: "rules"}

    def start(self) -> None:
        self._thread.start()
        self._stats_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._stats_thread.is_alive():
            self._stats_thread.join(10)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        consumer = Consumer(
            consumer_config(
                self.settings, READER_GROUP_ID, **{"enable.partition.eof": True, "error_cb": self._on_error}
            )
        )
        try:
            ends = self._assign(consumer)
            last_stats = 0.0
            while not self._stop.is_set():
                messages = consumer.consume(READ_BATCH, POLL_S)
                if messages:
                    self._index(consumer, messages, ends)
                if not self.state.caught_up and not ends:
                    self.state.caught_up = True
                    log.info("console: index rebuilt from the topics (%s)", self.state.indexed)
                if self.missing and time.monotonic() - last_stats > STATS_INTERVAL_S:
                    last_stats = time.monotonic()
                    self._assign_created(consumer)
        except Exception as exc:  # the thread must say why it stopped: the pages show it
            log.exception("console reader stopped")
            self.state.kafka_error, self.state.kafka_error_at = f"the console's reader stopped: {exc}", time.time()
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer) -> dict[tuple[str, int], int]:
        """Assign every partition of the four topics from the beginning; returns the ends to catch up to."""
        while True:
            try:
                metadata = consumer.list_topics(timeout=3)
                break
            except KafkaException as exc:
                self._on_error(exc.args[0])
                if self._stop.wait(1.0):
                    return {}
        partitions, ends = [], {}
        for topic in self.topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                self.missing.add(topic)  # not created yet: looked for again every STATS_INTERVAL_S
                continue
            for p in sorted(found.partitions):
                partitions.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    ends[(topic, p)] = high
        consumer.assign(partitions)
        return ends

    def _assign_created(self, consumer: Consumer) -> None:
        """Topics missing at start (a console started before the first detector): read them once created."""
        try:
            metadata = consumer.list_topics(timeout=5)
        except KafkaException:
            return
        for topic in sorted(self.missing):
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                consumer.incremental_assign(
                    [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(found.partitions)]
                )
                self.missing.discard(topic)
                log.info("console: %s now exists, reading it", topic)

    def _on_error(self, error: KafkaError) -> None:
        if error.code() in CONNECTION_ERRORS or error.fatal():
            self.state.kafka_error, self.state.kafka_error_at = f"lost connection to Kafka: {error.str()}", time.time()

    def _index(self, consumer: Consumer, messages: list, ends: dict[tuple[str, int], int]) -> None:
        alerts, labels, payments, rules = [], [], [], []
        for message in messages:
            error = message.error()
            topic, partition = message.topic(), message.partition()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    ends.pop((topic, partition), None)
                else:
                    self._on_error(error)
                continue
            offset = message.offset()
            if offset + 1 >= ends.get((topic, partition), 0):
                ends.pop((topic, partition), None)
            kind = self.topics[topic]
            try:
                if kind == "rules":
                    if message.value() is not None:
                        rules.append((offset, self._rules.decode(message.value())))
                    continue
                schema_id, payload = split_frame(message.value())
                value = read_payload(payload, schema_id, self._schemas.get(schema_id))
                check_record(kind, value)
            except RegistryError as exc:
                # The registry is infrastructure: read this record again (the index must not skip it).
                self._on_error_text(f"schema registry: {exc}")
                consumer.seek(TopicPartition(topic, partition, offset))
                break
            except (DecodeError, KeyError, TypeError, ValueError) as exc:
                self.state.undecodable += 1
                if self.state.undecodable == 1:
                    log.warning(
                        "console: %s[%d]@%d cannot be read (%s): skipped, further ones counted",
                        topic,
                        partition,
                        offset,
                        exc,
                    )
                continue
            if kind == "fraud":
                alerts.append((partition, offset, value))
                payments.append(("fraud", value["transaction"]))
            elif kind == "legit":
                payments.append(("legit", value))
            else:
                labels.append((partition, offset, value))
        if len(messages):
            self.state.kafka_error = None
        self.index.add_rule_versions(rules)
        self.index.add_alerts(alerts)
        self.index.add_payments(payments)
        self.index.add_labels(labels)
        for kind, rows in (("fraud", alerts), ("labels", labels), ("legit", payments), ("rules", rules)):
            self.state.indexed[kind] = self.state.indexed.get(kind, 0) + len(rows)
        if alerts and self.state.caught_up:
            self.on_alerts([value for _, _, value in alerts])
        verdicts = [value["transaction_id"] for _, _, value in labels if value.get("source") == "analyst"]
        if verdicts and self.state.caught_up:
            self.on_verdicts(verdicts)

    def _on_error_text(self, text: str) -> None:
        self.state.kafka_error, self.state.kafka_error_at = text, time.time()

    def _sample_loop(self) -> None:
        consumer = Consumer(consumer_config(self.settings, READER_GROUP_ID))  # for watermarks only
        try:
            while not self._stop.wait(STATS_INTERVAL_S):
                self._sample_detectors(consumer)
        finally:
            consumer.close()

    def _sample_detectors(self, consumer: Consumer) -> None:
        """The detectors' group: committed offsets on the input, its lag; nothing if it has not committed yet."""
        s = self.settings
        try:
            metadata = consumer.list_topics(s.transactions_topic, timeout=5).topics.get(s.transactions_topic)
            if metadata is None or metadata.error is not None:
                return
            partitions = [TopicPartition(s.transactions_topic, p) for p in sorted(metadata.partitions)]
            future = self._admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(s.group_id, partitions)])
            committed = future[s.group_id].result(timeout=5).topic_partitions
            done = sum(max(tp.offset, 0) for tp in committed)
            end = sum(consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in partitions)
        except (KafkaException, TimeoutError) as exc:
            log.debug("console: detector stats not available: %s", exc)
            return
        self.state.samples.append(DetectorSample(at=time.time(), committed=done, lag=max(end - done, 0)))
