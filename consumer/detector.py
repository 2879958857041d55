"""The detector: exactly-once consume -> decide -> produce, one Kafka transaction per batch.

Each batch: consume up to batch_max_records within batch_max_ms; decide every record; in one
transaction, produce each to the legit, fraud or dead-letter topic and send the batch's input
offsets with the consumer group metadata (KIP-447); commit. Error handling follows
pitfalls.md: fatal -> stop (fenced); abortable -> abort and rewind to the batch start;
retriable -> retry the same call; a commit that times out is retried, never aborted.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from consumer.decide import ColumnarDecider, Decider, Decision, Route
from consumer.metrics import DetectorMetrics
from consumer.rules import rules_from_settings
from fraudstream.errors import Fenced, KafkaUnavailable, RegistryError
from fraudstream.kafka import consumer_config, ensure_topics, transactional_producer_config, wait_for_cluster
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.detector")

INIT_TRANSACTIONS_TIMEOUT_S = 30.0
TRANSACTION_CALL_TIMEOUT_S = 30.0
REGISTRY_OUTAGE_LIMIT_S = 240.0  # below max.poll.interval.ms (300 s), so we never silently leave the group
REGISTRY_BACKOFF_MAX_S = 5.0
KAFKA_RETRY_LIMIT_S = 120.0  # a retriable transactional call (e.g. a commit timing out) is retried this long
FENCED_CODES = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


def default_transactional_id(settings: Settings) -> str:
    """Stable across restarts on one host, so a restarted detector aborts its predecessor's open
    transaction at once instead of leaving readers stalled until it times out."""
    return settings.transactional_id or f"{settings.group_id}-{socket.gethostname()}"


class Detector:
    def __init__(self, settings: Settings, *, log_interval_s: float = 10.0,
                 on_log: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.transactional_id = default_transactional_id(settings)
        self.log_interval_s = log_interval_s
        self.on_log = on_log or log.info
        self.metrics = DetectorMetrics()
        self.routes = {Route.LEGIT: settings.legit_topic, Route.FRAUD: settings.fraud_topic,
                       Route.DEAD_LETTER: settings.dlq_topic}
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None

    # ----- start-up -----
    def _start(self) -> Decider | ColumnarDecider:
        s = self.settings
        wait_for_cluster(s)
        ensure_topics(s, (s.transactions_topic, s.legit_topic, s.fraud_topic, s.dlq_topic))
        registry = Registry(s)
        schemas = load_schemas(s.schemas_dir)
        ids = current_ids(s, registry, schemas)  # clear error when `schemas register` was not run
        decoder = Decoder(registry, schemas.expanded["Transaction"], reader_id=ids[s.transactions_topic])
        decider = Decider(decoder, rules_from_settings(s),
                          legit_schema_id=ids[s.legit_topic], legit_schema=schemas.parsed["Transaction"],
                          fraud_schema_id=ids[s.fraud_topic], fraud_schema=schemas.parsed["FraudAlert"],
                          reject_trailing_bytes=s.decoder == "record")
        if s.decoder == "columnar":
            decider = ColumnarDecider(decider, reader_schema=schemas.expanded["Transaction"])
        self.producer = Producer(transactional_producer_config(s, self.transactional_id))
        self._call("initialising transactions", self.producer.init_transactions, INIT_TRANSACTIONS_TIMEOUT_S)
        # Static membership (KIP-345) under the same stable id: a restarted detector takes its
        # partitions back at once instead of waiting out the session timeout of its dead self.
        self.consumer = Consumer(consumer_config(s, s.group_id, **{"group.instance.id": self.transactional_id}))
        self.consumer.subscribe([s.transactions_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        if s.metrics_port:
            self.metrics.serve(s.metrics_port)
        self.on_log(f"detector {self.transactional_id} started: {s.transactions_topic} -> "
                    f"{s.legit_topic} | {s.fraud_topic} | {s.dlq_topic} (group {s.group_id})")
        return decider

    def _on_assign(self, consumer, partitions) -> None:
        self.on_log(f"assigned {_partition_list(partitions)}")

    def _on_revoke(self, consumer, partitions) -> None:
        # Nothing to flush: a batch's transaction is always committed or aborted before the next
        # consume(), which is the only place a rebalance callback can run.
        self.on_log(f"revoked {_partition_list(partitions)}")

    # ----- main loop -----
    def run(self, stop: threading.Event) -> DetectorMetrics:
        decider = self._start()
        # Start-up objects (schemas, clients, imports) never die: keep them out of the collector's
        # full passes, which otherwise stall a batch now and then (seen in the latency tail).
        gc.freeze()
        consumer = self.consumer
        max_records = self.settings.batch_max_records
        timeout_s = self.settings.batch_max_ms / 1000
        try:
            while not stop.is_set():
                messages = consumer.consume(max_records, timeout_s)
                messages = [m for m in messages if not self._is_error(m)]
                if messages:
                    decisions = self._decide(decider, messages, stop)
                    if decisions is None:  # stopping during a registry outage: nothing produced, re-read later
                        break
                    self._transact(messages, decisions)
                else:
                    self.producer.poll(0)
                if self.metrics.line_due(self.log_interval_s):
                    self.on_log(self.metrics.line())
        finally:
            self._close()
        self.on_log(f"stopped: {self.metrics.line()}")
        return self.metrics

    def _is_error(self, message) -> bool:
        error = message.error()
        if error is None:
            return False
        # librdkafka reports a fatal consumer error as _FATAL; being fenced is the one we expect.
        if error.code() == KafkaError.FENCED_INSTANCE_ID or (error.code() == KafkaError._FATAL and "fenced" in error.str()):
            raise Fenced(f"detector {self.transactional_id} stopped: another detector with the same transactional id "
                         f"(also its group.instance.id) joined the group ({error.str()})")
        if error.fatal() or error.code() == KafkaError._FATAL:
            raise KafkaUnavailable(f"consumer failed: {error.str()}")
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise KafkaUnavailable(f"input topic {self.settings.transactions_topic} does not exist")
        log.warning("consumer: %s", error.str())
        return True

    def _decide(self, decider: Decider | ColumnarDecider, messages: list, stop: threading.Event) -> list[Decision] | None:
        """Decide the batch; while the registry does not answer, retry with backoff (never dead-letter)."""
        backoff, waited = 0.2, 0.0
        while True:
            try:
                return decider.decide(messages)
            except RegistryError as exc:
                if waited >= REGISTRY_OUTAGE_LIMIT_S:
                    raise RegistryError(f"{exc} (gave up after {waited:.0f}s)") from exc
                log.warning("%s; retrying in %.1fs", exc, backoff)
                self.metrics.registry_retried()
                if stop.wait(backoff):
                    return None
                waited += backoff
                backoff = min(backoff * 2, REGISTRY_BACKOFF_MAX_S)

    def _transact(self, messages: list, decisions: list[Decision]) -> None:
        producer = self.producer
        tally = Tally(d.route for d in decisions)
        try:
            self._call("beginning a transaction", producer.begin_transaction)
            self._call("producing", self._produce_all, decisions)
            self._call("sending offsets", producer.send_offsets_to_transaction, _next_offsets(messages),
                       self.consumer.consumer_group_metadata(), TRANSACTION_CALL_TIMEOUT_S)
            started = time.perf_counter()
            self._call("committing", producer.commit_transaction, TRANSACTION_CALL_TIMEOUT_S)
            commit_s = time.perf_counter() - started
        except _AbortBatch as abort:
            log.warning("aborting batch of %d: %s", len(messages), abort)
            self._call("aborting", producer.abort_transaction, TRANSACTION_CALL_TIMEOUT_S)
            self._rewind(messages)
            self.metrics.aborted()
            return
        dead_kinds = Tally(d.dead_letter_kind for d in decisions if d.route is Route.DEAD_LETTER)
        self.metrics.batch_committed(consumed=len(messages), legit=tally[Route.LEGIT], fraud=tally[Route.FRAUD],
                                     dead_kinds=dict(dead_kinds), commit_s=commit_s)

    def _produce_all(self, decisions: list[Decision]) -> None:
        produce, poll, routes = self.producer.produce, self.producer.poll, self.routes
        for decision in decisions:
            while True:
                try:
                    produce(routes[decision.route], decision.value, decision.key, headers=decision.headers)
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    poll(0.05)

    def _call(self, what: str, fn, *args):
        """One transactional API call, classified: retriable -> again; abortable -> _AbortBatch; fatal -> Fenced."""
        deadline, backoff = time.monotonic() + KAFKA_RETRY_LIMIT_S, 0.1
        while True:
            try:
                return fn(*args)
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal() or error.code() in FENCED_CODES:
                    raise Fenced(f"detector {self.transactional_id} stopped while {what}: {error.str()} "
                                 "(another detector with the same transactional id took over, or the producer failed)") from exc
                if error.txn_requires_abort():
                    raise _AbortBatch(f"{what}: {error.str()}") from exc
                if not error.retriable() or time.monotonic() > deadline:
                    raise KafkaUnavailable(f"{what} failed: {error.str()}") from exc
                log.warning("retrying after %s failed: %s", what, error.str())
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _rewind(self, messages: list) -> None:
        """abort_transaction() does not move the consumer: seek back to each partition's first offset in the batch."""
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            first.setdefault((message.topic(), message.partition()), message.offset())
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for (topic, partition), offset in first.items():
            if (topic, partition) in assigned:  # a revoked partition is re-read from the committed offset by its new owner
                self.consumer.seek(TopicPartition(topic, partition, offset))

    def _close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing consumer: %s", exc)
        if self.producer is not None:
            try:
                self.producer.flush(10)  # transactions are committed or aborted by now; this serves late callbacks
            except KafkaException as exc:  # a fenced producer reports its fatal error again here
                log.debug("closing producer: %s", exc)


class _AbortBatch(Exception):
    """The open transaction must be aborted and the batch re-read."""


def _next_offsets(messages: list) -> list[TopicPartition]:
    """The next offset to read per partition (last consumed + 1): what send_offsets_to_transaction expects."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        last[(message.topic(), message.partition())] = message.offset()
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


def _partition_list(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def run_until_signalled(settings: Settings, **kwargs) -> DetectorMetrics:
    """Run a detector in this process until SIGINT/SIGTERM."""
    import signal

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return Detector(settings, **kwargs).run(stop)
