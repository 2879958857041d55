"""Changelog topics: creation and checks at start-up, and the writes made inside a batch's transaction.

A store's changes go to a compacted topic with as many partitions as the input; partition p of the
changelog holds the state of input partition p (the key is the state key, e.g. a card, whose hash
would pick another partition: the partition is always given explicitly). Writes go through the
detector's transactional producer, so a batch's outputs, its state changes and its input offsets
commit or abort together (Kafka Streams' exactly_once_v2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource, NewTopic

from fraudstream.consumer.state.stores import StoreSpec
from fraudstream.consumer.state.table import row_values
from fraudstream.errors import KafkaUnavailable, StateError
from fraudstream.kafka import admin, produce_or_wait, wait_out
from fraudstream.settings import Settings

LAYOUT_HEADER = "fraudstream.state.layout"
COMPACTED = {"cleanup.policy": "compact"}
CONFIG_REQUEST_TIMEOUT_S = 10.0


def ensure_changelogs(settings: Settings, specs: Sequence[StoreSpec]) -> dict[str, str]:
    """Create each store's changelog like the input topic (partitions, replication), compacted; refuse an
    existing one whose partition count or cleanup policy differs. Returns {store name: changelog topic}."""
    client = admin(settings)
    metadata = client.list_topics(timeout=10)
    source = metadata.topics.get(settings.transactions_topic)
    if source is None or source.error is not None:
        raise KafkaUnavailable(f"input topic {settings.transactions_topic} does not exist")
    partitions = len(source.partitions)
    # As many copies as the input has (its least replicated partition): the state must survive whatever the
    # input survives, whatever FRAUDSTREAM_REPLICATION_FACTOR says about the topics our jobs create.
    replicas = min(len(p.replicas) for p in source.partitions.values())
    topics = {spec.name: settings.changelog_topic(spec.name) for spec in specs}
    missing, existing = [], []
    for topic in topics.values():
        found = metadata.topics.get(topic)
        if found is None:
            missing.append(
                NewTopic(topic, num_partitions=partitions, replication_factor=replicas, config=dict(COMPACTED))
            )
        elif len(found.partitions) != partitions:
            raise StateError(
                f"changelog {topic} has {len(found.partitions)} partitions but the input topic "
                f"{settings.transactions_topic} has {partitions}: state is partitioned like the input, "
                "so the counts must match (delete the changelog to rebuild state from scratch)"
            )
        else:
            existing.append(topic)
    for topic in existing:
        _check_compacted(client, topic, outage_limit_s=settings.broker_outage_limit_s)
    if missing:
        for topic, future in client.create_topics(missing, operation_timeout=30).items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaUnavailable(f"could not create changelog {topic}: {exc.args[0].str()}") from exc
    return topics


def _check_compacted(client, topic: str, *, outage_limit_s: float) -> None:
    """A detector starting while a broker or the controller is away waits it out (a 3-broker soak saw one end on a
    TimeoutError here), up to the broker outage limit."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)

    def describe():
        try:
            return client.describe_configs([resource], request_timeout=CONFIG_REQUEST_TIMEOUT_S)[resource].result(
                timeout=CONFIG_REQUEST_TIMEOUT_S + 5
            )
        except TimeoutError:  # the future's own wait: no answer at all, as for a broker away
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "no answer", retriable=True)) from None

    configs = wait_out(f"reading the configuration of changelog {topic}", describe, limit_s=outage_limit_s)
    policy = configs["cleanup.policy"].value
    if "compact" not in policy.split(","):
        raise StateError(
            f"changelog {topic} has cleanup.policy={policy}; it must be compacted, or old state "
            "would be deleted by retention"
        )


def write_rows(
    producer,
    topic: str,
    partition: int,
    spec: StoreSpec,
    keys: Sequence[bytes],
    rows: np.ndarray,
    on_full: Callable[[], None] | None = None,
) -> int:
    """Produce one changelog record per changed key (its whole row) to the store's partition."""
    if not keys:
        return 0
    headers = [(LAYOUT_HEADER, spec.layout)]
    produce = producer.produce
    for key, value in zip(keys, row_values(rows), strict=True):
        try:  # one call per row (produce_batch takes no headers); the wrapper only when the queue is full
            produce(topic, value, key, partition=partition, headers=headers)
        except BufferError:
            produce_or_wait(producer, topic, value, key, partition=partition, headers=headers)
    return len(keys)


def write_tombstones(producer, topic: str, partition: int, keys: Sequence[bytes]) -> int:
    """A null value per key: compaction then forgets the key for good."""
    for key in keys:
        produce_or_wait(producer, topic, None, key, partition=partition)
    return len(keys)
