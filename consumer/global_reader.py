"""The detector's global readers (Kafka Streams' global stores and their GlobalStreamThread): topics a detector
reads on its own, whole or by partition, outside its consumer group (assign mode, never committing), beside the
input it consumes as a member of the group:

- the rules topic (consumer/rules_topic.py: `RulesTopic`), read to its end at start, then between batches;
- the labels topic (consumer/labels_topic.py: `LabelsReader`), for a model's label features;
- every input partition (consumer/terminal.py: `TerminalReader`), for the terminal window;
- the changelogs of the tasks being restored (consumer/state/recovery.py: `Recovery`).

They share this base: one outage and retry policy (`call`) for their requests outside the fetch (ends of
partitions, committed offsets, metadata), and one way of closing. `call` waits out what `passes`
(fraudstream/kafka.py: a leader or coordinator moving, a broker away, librdkafka's retriable errors) for the
broker outage limit, asking for fresh metadata between attempts (an assign-mode client otherwise keeps asking
a leader that died until its metadata ages out); anything else, or the limit, ends with one line naming the
reader and what it asked; a stop request ends the wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import Consumer, KafkaException, TopicPartition

from fraudstream.kafka import refresh_metadata, wait_out
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.readers")
T = TypeVar("T")

RETRY_INTERVAL_S = 0.2  # a leader election or a broker restart takes a moment; nothing else to wait on
METADATA_TIMEOUT_S = 5.0


class StopRequested(Exception):
    """The detector is stopping while a global reader waits."""


class GlobalReader:
    """Base of the global readers: `settings`, `name` (in its log lines and errors), `stop_requested` (asked while
    waiting), and `consumer` (its client, made by the reader's start; None before and after)."""

    name = "reader"
    consumer: Consumer | None = None

    def __init__(self, settings: Settings, *, stop: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.stop_requested = stop
        self.retries = 0  # attempts waited out by `call`

    def call(self, what: str, fn: Callable[[], T], *, topic: str | None = None, client=None) -> T:
        """fn(), retried while its error passes, for the broker outage limit (fraudstream.kafka.wait_out). `topic`:
        asked for again between attempts (by `client`, the reader's consumer by default), so that the next attempt
        finds its leader."""

        def before_retry(error) -> None:
            if self.stop_requested():
                raise StopRequested(what)
            self.retries += 1
            refresher = client if client is not None else self.consumer
            if topic is not None and refresher is not None:
                refresh_metadata(refresher, topic, METADATA_TIMEOUT_S)

        return wait_out(
            f"{self.name}: {what}",
            fn,
            limit_s=self.settings.broker_outage_limit_s,
            interval_s=RETRY_INTERVAL_S,
            before_retry=before_retry,
        )

    def position(self, topic: str, partition: int) -> int:
        """The reader's next offset in a partition; 0 while it is logical (nothing read yet)."""
        consumer = self._client()
        position = consumer.position([TopicPartition(topic, partition)])[0].offset
        return position if position >= 0 else 0

    def _client(self) -> Consumer:
        if self.consumer is None:
            raise RuntimeError(f"the {self.name} is not started (or was closed)")
        return self.consumer

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.debug("closing the %s: %s", self.name, exc)
            self.consumer = None
