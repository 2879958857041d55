"""The view's own consumer: follows every topic of the pipeline from its end at start, feeding a DemoState."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from fraudstream.demo.scoring import DemoState
from fraudstream.errors import KafkaUnavailable
from fraudstream.kafka import admin, consumer_config
from fraudstream.printable import printable
from fraudstream.records import FraudAlert, Label, Rule, Transaction
from fraudstream.registry import Registry
from fraudstream.schemas import load_schemas
from fraudstream.serde import DecodeError, Decoder
from fraudstream.settings import Settings

METADATA_TIMEOUT_S = 10.0
VIEW_GROUP_ID = "fraudstream-demo-view"  # never joined nor committed: the view uses assign()
Position = tuple[str, int]  # (topic, partition)


def rule_line(decoder: Decoder, value: bytes | None) -> str:
    """One rules-topic record for the view (detectors judge its validity; the view only shows it)."""
    if value is None:
        return "a rule was removed"
    try:
        rule = Rule.from_dict(decoder.decode(value))
    except DecodeError as error:
        return f"unreadable rule record ({error.reason})"
    parameters = " ".join(f"{k}={v}" for k, v in sorted(rule.parameters.items()) if not isinstance(v, tuple))
    return printable(
        f"{rule.id} v{rule.version} {'enabled' if rule.enabled else 'disabled'} {parameters}".rstrip()
        + f"  by {rule.author}"
        + (f": {rule.comment}" if rule.comment else "")
    )


class PipelineWatcher:
    """Follows the input, output and label topics from their ends at start, feeding a DemoState."""

    def __init__(self, settings: Settings, state: DemoState) -> None:
        self.settings = settings
        self.state = state
        schemas = load_schemas(settings.schemas_dir)
        registry = Registry(settings)
        transactions = Decoder(registry, schemas.expanded["Transaction"])
        alerts = Decoder(registry, schemas.expanded["FraudAlert"])
        labels = Decoder(registry, schemas.expanded["Label"])
        rules = Decoder(registry, schemas.expanded["Rule"])
        self.handlers: dict[str, Callable[[bytes | None], None]] = {
            settings.transactions_topic: lambda value: state.on_input(time.monotonic()),
            settings.legit_topic: lambda value: state.on_legit(Transaction.from_dict(transactions.decode(value))),
            settings.fraud_topic: lambda value: state.on_fraud(FraudAlert.from_dict(alerts.decode(value))),
            settings.dlq_topic: lambda value: state.on_dead_letter(),
            settings.labels_topic: lambda value: state.on_label(Label.from_dict(labels.decode(value))),
            settings.rules_topic: lambda value: state.on_rule(rule_line(rules, value)),
        }
        self.admin = admin(settings)
        self.consumer = Consumer(
            consumer_config(
                settings,
                VIEW_GROUP_ID,
                **{
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,  # tells when a partition is read up to its last stable offset
                },
            )
        )
        self.partitions = self._partitions()
        self.start = self.end_offsets()
        self.position: dict[Position, int] = dict(self.start)
        self.consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in self.start.items()])

    def _partitions(self) -> list[Position]:
        try:
            metadata = self.consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"Kafka did not answer a metadata request: {exc.args[0].str()}") from exc
        missing = [topic for topic in self.handlers if topic not in metadata.topics]
        if missing:
            raise KafkaUnavailable(f"topic {missing[0]} is not in the cluster's metadata")
        return [(topic, p) for topic in self.handlers for p in sorted(metadata.topics[topic].partitions)]

    def end_offsets(self, topics: Sequence[str] | None = None) -> dict[Position, int]:
        """Last stable offsets: where a read_committed reader's partitions end now."""
        return self._list_offsets(
            [(t, p) for t, p in self.partitions if topics is None or t in topics], OffsetSpec.latest()
        )

    def _list_offsets(self, partitions: list[Position], spec: OffsetSpec) -> dict[Position, int]:
        # The admin client, in one request, not the view's consumer: its broker connection is busy with
        # fetch long-polls, which would delay each watermark query by up to fetch.wait.max.ms.
        try:
            futures = self.admin.list_offsets(
                {TopicPartition(t, p): spec for t, p in partitions},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=METADATA_TIMEOUT_S,
            )
            return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}
        except KafkaException as exc:
            raise KafkaUnavailable(
                f"could not list the offsets of {len(partitions)} partitions: {exc.args[0].str()}"
            ) from exc

    def backlog(self, group_id: str) -> int:
        """Input records the group has not processed yet: the detectors will route them too."""
        topic = self.settings.transactions_topic
        inputs = [(t, p) for t, p in self.partitions if t == topic]
        earliest = self._list_offsets(inputs, OffsetSpec.earliest())
        group = Consumer(consumer_config(self.settings, group_id))
        try:
            committed = group.committed([TopicPartition(t, p) for t, p in inputs], timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(
                f"could not read the committed offsets of group {group_id}: {exc.args[0].str()}"
            ) from exc
        finally:
            group.close()
        backlog = 0
        for tp in committed:
            where = (tp.topic, tp.partition)
            start = tp.offset if tp.offset >= 0 else earliest[where]  # no commit yet: the group starts at the earliest
            backlog += max(0, self.start[where] - start)
        return backlog

    def poll(self, timeout_s: float) -> None:
        for message in self.consumer.consume(num_messages=2_000, timeout=timeout_s):
            error = message.error()
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    assert topic is not None and partition is not None and offset is not None  # it names where
                    self.position[topic, partition] = max(self.position[topic, partition], offset)
                elif error.fatal():
                    raise KafkaUnavailable(f"the view's consumer failed: {error.str()}")
                continue
            assert topic is not None and partition is not None and offset is not None  # a record: all set
            self.position[topic, partition] = offset + 1
            try:
                self.handlers[topic](message.value())
            except DecodeError:
                self.state.undecodable_outputs += 1

    def caught_up(self, ends: dict[Position, int]) -> bool:
        return all(self.position[where] >= end for where, end in ends.items())

    def close(self) -> None:
        self.consumer.close()
