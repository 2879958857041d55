"""librdkafka client configuration and topic administration, built in one place from Settings."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from fraudstream.errors import KafkaUnavailable
from fraudstream.settings import MAX_POLL_INTERVAL_S, Settings

log = logging.getLogger("fraudstream.kafka")


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks=all, batched: what a payment producer should be."""
    return {
        **settings.kafka_common(),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "compression.type": "lz4",
        "logger": _client_logger("producer"),
        **overrides,
    }


def transactional_producer_config(settings: Settings, transactional_id: str, **overrides: Any) -> dict[str, Any]:
    return producer_config(
        settings,
        **{
            "transactional.id": transactional_id,
            # An open transaction stalls read_committed readers: keep it bounded (pitfall 5).
            # Also how long a killed detector's open transaction can hold back readers if no process
            # with its transactional id comes back to abort it.
            "transaction.timeout.ms": settings.transaction_timeout_ms,
            "linger.ms": 2,
            **overrides,
        },
    )


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        **settings.kafka_common(),
        "group.id": group_id,
        "isolation.level": "read_committed",  # librdkafka's default, stated anyway (pitfall 6)
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        # A killed detector's partitions move to the others after this long (librdkafka default: 45 s).
        "session.timeout.ms": 10_000,
        "max.poll.interval.ms": MAX_POLL_INTERVAL_S * 1000,
        "logger": _client_logger("consumer"),
        **overrides,
    }


def admin(settings: Settings) -> AdminClient:
    return AdminClient({**settings.kafka_common(), "logger": _client_logger("admin")})


def wait_for_cluster(settings: Settings, timeout_s: float = 15.0) -> None:
    """Fail fast, with one clear line, when the brokers do not answer."""
    client = admin(settings)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if client.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic()))).brokers:
                return
        except KafkaException as exc:
            last = exc
    raise KafkaUnavailable(f"Kafka at {settings.bootstrap_servers} did not answer within {timeout_s:.0f}s"
                           + (f" ({last.args[0].str()})" if last else ""))


def ensure_topics(settings: Settings, topics: tuple[str, ...] | None = None, *, partitions: int | None = None) -> None:
    """Create the pipeline's topics if they do not exist (existing ones are left as they are)."""
    topics = topics or settings.all_topics
    client = admin(settings)
    wait_for_cluster(settings)
    existing = set(client.list_topics(timeout=10).topics)
    wanted = [
        NewTopic(topic, num_partitions=partitions or settings.partitions, replication_factor=settings.replication_factor)
        for topic in topics
        if topic not in existing
    ]
    if not wanted:
        return
    for topic, future in client.create_topics(wanted, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaUnavailable(f"could not create topic {topic}: {exc.args[0].str()}") from exc


def max_message_bytes(client: AdminClient, topics: tuple[str, ...], *, timeout_s: float = 10.0) -> dict[str, int]:
    """Each topic's max.message.bytes: the largest record batch (header included) its brokers accept.

    `client` is long-lived and must outlive the call: a client destroyed with a request still in flight
    fails its futures, and can trip an assertion in librdkafka."""
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]
    limits = {}
    for resource, future in client.describe_configs(resources, request_timeout=timeout_s).items():
        try:
            limits[resource.name] = int(future.result()["max.message.bytes"].value)
        except KafkaException as exc:
            raise KafkaUnavailable(f"could not read the configuration of topic {resource.name}: "
                                   f"{exc.args[0].str()}") from exc
    return limits


def static_members(client: AdminClient, group_id: str, instance_id: str, *, timeout_s: float = 10.0) -> list:
    """The members (MemberDescription: member_id, client_id, host) that hold `instance_id` (group.instance.id)
    in the group, as its coordinator sees it now (`client`: long-lived, as for max_message_bytes)."""
    future = client.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
    try:
        description = future.result()
    except KafkaException as exc:
        raise KafkaUnavailable(f"could not describe consumer group {group_id}: {exc.args[0].str()}") from exc
    return [m for m in description.members if m.group_instance_id == instance_id]


def _client_logger(role: str) -> logging.Logger:
    """librdkafka logs through Python logging (not raw stderr), so the CLI decides what is shown."""
    return logging.getLogger(f"fraudstream.librdkafka.{role}")
