"""The record collector: the one sink of a batch's outputs (Kafka Streams' RecordCollector). Every output goes
through it: the forwarded legit records on a fast path of one produce() call each, the few with an output of
their own (fraud alerts, dead letters, re-encoded records, released held records) checked against their topic's
size limit, an output no topic will take swapped for a dead letter, a full local queue waited out, and a failed
produce() retried for that record alone. Delivery errors reported by librdkafka are kept for the checkpoint.
"""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException

from fraudstream.consumer.checkpoint import ProducerLost, TransactionalCalls, classify_produce
from fraudstream.consumer.decide import DecidedBatch, Decision, Route, dead_letter
from fraudstream.kafka import produce_or_wait
from fraudstream.serde import DecodeError

# What a broker counts on top of a record's key, value and headers: the v2 record batch header (61 bytes)
# and one record's framing at its largest (varints), plus per header its two length varints.
BATCH_HEADER_BYTES = 61
RECORD_FRAMING_BYTES = 36
HEADER_FRAMING_BYTES = 10
TOO_LARGE_CODES = {KafkaError.MSG_SIZE_TOO_LARGE}  # the broker's MESSAGE_TOO_LARGE and librdkafka's local check
OUTPUT_TOO_LARGE = "output_too_large"


class RecordCollector:
    def __init__(
        self, routes: dict[Route, str], limits: dict[str, int], calls: TransactionalCalls, *, shadow_topic: str = ""
    ) -> None:
        self.routes = routes
        self.shadow_topic = shadow_topic  # where a batch's ShadowDifferences go (consumer/stateful.py)
        self.limits = limits  # output topic -> max.message.bytes
        self.calls = calls  # TransactionalCalls: how a failed produce() is classified and waited on
        self.rejected: list[KafkaError] = []  # delivery failures of the open transaction

    def on_delivery_error(self, error: KafkaError | None, message) -> None:
        """The producer's on_delivery (errors only). The error alone: after a fatal error, confluent-kafka can call
        this with a Python exception pending, and any call on `message` then fails."""
        if error is not None:
            self.rejected.append(error)

    def refused_as_too_large(self) -> bool:
        """Whether a broker refused a record batch of the last transaction as too large."""
        return any(error.code() in TOO_LARGE_CODES for error in self.rejected)

    def produce_all(self, producer, messages: list, batch: DecidedBatch, deadline: float) -> None:
        """Produce each output once, in the batch's order: runs of forwarded records between the few
        records with an output of their own."""
        # Below this, key + value cannot reach any output topic's limit: the exact check is skipped.
        small = min(self.limits.values()) - BATCH_HEADER_BYTES - RECORD_FRAMING_BYTES - 4096
        start = 0
        for index in sorted(batch.outputs):
            if start < index:
                self._produce_legit(producer, messages, start, index, batch, small, deadline)
            if batch.outputs[index].route is not Route.HELD:
                self._produce_one(producer, messages, batch, index, batch.outputs[index], small, deadline)
            start = index + 1
        if start < len(messages):
            self._produce_legit(producer, messages, start, len(messages), batch, small, deadline)
        if batch.released:  # held records decided now: their input records stand in for the messages
            inputs = [record for record, _ in batch.released]
            outputs = DecidedBatch(len(inputs), {i: decision for i, (_, decision) in enumerate(batch.released)})
            for index, decision in list(outputs.outputs.items()):
                self._produce_one(producer, inputs, outputs, index, decision, small, deadline)
            # _produce_one may have put a dead letter in place of an output no topic takes
            batch.released = [(record, outputs.outputs[i]) for i, record in enumerate(inputs)]
        for key, value in batch.shadow:  # small records (under 10 kB): no size check
            self._produce_to(producer, self.shadow_topic, key, value, deadline)

    def _produce_to(self, producer, topic: str, key: bytes, value: bytes, deadline: float) -> None:
        """One record to `topic`, a full local queue waited out and a failed call retried, as in _produce_one."""
        while True:
            try:
                producer.produce(topic, value, key)
                return
            except BufferError:
                _produce_when_room(producer, topic, value, key, None, deadline)
                return
            except KafkaException as exc:
                self._retry_or_raise(exc, deadline)

    def _retry_or_raise(self, exc: KafkaException, deadline: float) -> None:
        """A failed produce(): raise what ends the transaction, or wait before producing the record again."""
        error = exc.args[0]
        classify_produce("producing", error, exc)
        self.calls.wait_before_retry("producing", error, deadline)

    def _produce_legit(
        self, producer, messages: list, start: int, stop: int, batch: DecidedBatch, small: int, deadline: float
    ) -> None:
        """Forward messages[start:stop] to the legit topic: their own key and value bytes, the batch's legit
        headers. The fast path: one produce call per record and no object; anything unusual (a record
        near a topic's size limit, a produce that failed) goes to _produce_one."""
        produce, topic, headers = producer.produce, self.routes[Route.LEGIT], batch.legit_headers
        headers_of = batch.headers_of if batch.legit_scores is not None else None
        for index in range(start, stop):
            message = messages[index]
            if headers_of is not None:
                headers = headers_of(index)
            value, key = message.value(), message.key()
            if len(value) + (len(key) if key else 0) <= small:
                try:
                    produce(topic, value, key, headers=headers)
                    continue
                except (BufferError, KafkaException) as exc:
                    self._produce_one(
                        producer,
                        messages,
                        batch,
                        index,
                        Decision(Route.LEGIT, key, value, headers),
                        small,
                        deadline,
                        failed=exc,
                    )
                    continue
            self._produce_one(
                producer, messages, batch, index, Decision(Route.LEGIT, key, value, headers), small, deadline
            )

    def _produce_one(
        self,
        producer,
        messages: list,
        batch: DecidedBatch,
        index: int,
        decision: Decision,
        small: int,
        deadline: float,
        *,
        failed: Exception | None = None,
    ) -> None:
        """Produce one record's output, checked against its topic's size limit; a failed call (`failed`: the
        fast path's) is retried for this record alone, never the ones before it. An output its topic will
        never take is dead-lettered: batch.outputs then holds the dead letter."""
        routes = self.routes
        if failed is None and decision.value is not None and len(decision.value) + len(decision.key or b"") > small:
            decision = self._fit_or_dead_letter(messages[index], decision)
            if decision.route is Route.DEAD_LETTER:
                batch.outputs[index] = decision
        topic = routes[decision.route]
        while True:
            try:
                if failed is not None:
                    exc, failed = failed, None
                    raise exc
                producer.produce(topic, decision.value, decision.key, headers=decision.headers)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry this record
                _produce_when_room(producer, topic, decision.value, decision.key, decision.headers, deadline)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() in TOO_LARGE_CODES and decision.route is not Route.DEAD_LETTER:
                    # Over the producer's own message.max.bytes: no broker will ever take it.
                    decision = batch.outputs[index] = too_large(
                        messages[index], topic, len(decision.value or b""), None
                    )
                    topic = routes[decision.route]
                    continue
                self._retry_or_raise(exc, deadline)

    def _fit_or_dead_letter(self, message, decision: Decision) -> Decision:
        """The decision itself, or a dead letter when its output is larger than its topic takes."""
        topic = self.routes[decision.route]
        size = (
            BATCH_HEADER_BYTES
            + RECORD_FRAMING_BYTES
            + len(decision.value or b"")
            + len(decision.key or b"")
            + sum(len(k) + len(v or b"") + HEADER_FRAMING_BYTES for k, v in decision.headers or ())
        )
        if size <= self.limits[topic] or decision.route is Route.DEAD_LETTER:
            return decision  # a dead letter is the input's own bytes; if even that is too large, the retries end it
        return too_large(message, topic, size, self.limits[topic])


def _produce_when_room(producer, topic: str, value, key, headers, deadline: float) -> None:
    """produce() once the local queue has room (delivery reports served meanwhile), or ProducerLost at `deadline`."""
    if not produce_or_wait(producer, topic, value, key, give_up=lambda: time.monotonic() > deadline, headers=headers):
        raise ProducerLost(
            "producing: the local queue stayed full until the transaction was about to time out", expired=True
        ) from None


def too_large(message, topic: str, size: int, limit: int | None) -> Decision:
    over = f"its max.message.bytes ({limit})" if limit is not None else "the producer's message.max.bytes"
    return dead_letter(message, DecodeError(OUTPUT_TOO_LARGE, f"the output for {topic} ({size} bytes) is over {over}"))
