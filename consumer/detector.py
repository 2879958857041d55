"""The detector's loop (Kafka Streams' StreamThread): consume a batch, decide it, commit it in one checkpoint;
and what the loop does when something goes wrong.

    consume (consumer/batching.py) -> records of ready tasks (one per input partition, its state restored:
      consumer/tasks.py, consumer/state/)
      -> decide (consumer/decide.py, consumer/stateful.py): one Decision per record, held records released
      -> checkpoint (consumer/checkpoint.py): begin -> outputs (consumer/collector.py) -> changelog rows
         -> input offsets (KIP-447) -> commit

Each batch: take the records already fetched, up to a target that grows while the input is backlogged (at most
batch_max_records), closing the batch as soon as the input runs dry; keep the records of partitions still
assigned; decide every record; run the batch's checkpoint. The checkpoint classifies what goes wrong in the
transaction; this module decides what follows:

- abortable (a delivery failed, the transaction is in an error state): abort, rewind the batch, rebuild the
  state it changed, retry it with backoff, a bounded number of times in a row. An output its topic will never
  take (over max.message.bytes) is dead-lettered with the reason in the retried transaction;
- fatal or fenced producer, a transaction that outlived its timeout, or a call stuck for good: if another
  detector holds our group.instance.id in the consumer group, it took over and we stop; otherwise the broker
  ended our producer epoch (a restart, a transaction timed out while it was down) or the client is stuck:
  recreate the transactional producer under the same id, rewind to the committed offsets, go on;
- rebalances (the callbacks below), a fenced consumer, brokers or the registry away: see each method.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from fraudstream.consumer.batching import TRANSACTION_TIME_SHARE, BatchSizer, gather
from fraudstream.consumer.checkpoint import (
    CALL_TIMEOUT_S,
    STUCK_CALL_GRACE_S,
    AbortBatch,
    Checkpoint,
    ProducerLost,
    Stopping,
    TransactionalCalls,
    attempt_timeout,
    transaction_deadline,
)
from fraudstream.consumer.collector import BATCH_HEADER_BYTES, RecordCollector
from fraudstream.consumer.decide import ColumnarDecider, DecidedBatch, Decider, Decision, Route
from fraudstream.consumer.metrics import DetectorMetrics
from fraudstream.consumer.rules import TERMINAL_RULES, load_rules, rules_from_settings
from fraudstream.consumer.rules_topic import RulesTopic
from fraudstream.consumer.stateful import STORES, StatefulDecider, StateTouchedError, decode_batch, load_scoring
from fraudstream.consumer.tasks import TaskManager
from fraudstream.consumer.global_reader import StopRequested
from fraudstream.consumer.terminal import TerminalReader
from fraudstream.group_probe import static_members
from fraudstream.errors import Fenced, KafkaUnavailable, RegistryError, RegistryUnavailable
from fraudstream.kafka import (
    NEVER_PASSING,
    admin,
    consumer_config,
    ensure_topics,
    max_message_bytes,
    transactional_producer_config,
    wait_for_cluster,
)
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, make_encoder
from fraudstream.settings import Settings
from fraudstream.signals import stop_requests

log = logging.getLogger("fraudstream.detector")
T = TypeVar("T")

GROUP_REQUEST_TIMEOUT_S = 30.0  # long enough for a restarted coordinator to load: a timed-out one is risky
REGISTRY_BACKOFF_MAX_S = 5.0
KAFKA_BACKOFF_MAX_S = 2.0
ABANDONED_PRODUCERS_LIMIT = 3  # producers stuck for good replaced in the process (checkpoint.py); one more: exit
FAILURES_IN_A_ROW_LIMIT = 5  # aborted or lost transactions with no commit between them, then stop
RULES_START_S = 30.0  # reading the rules topic to its end at start, at least this long
CONSUMER_GONE_CODES = {KafkaError._STATE, KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID}


class BatchDecider(Protocol):
    """What the loop asks of a decider (consumer/decide.py's, consumer/stateful.py's, or a test's)."""

    def decide_batch(self, messages: Sequence) -> DecidedBatch: ...


@runtime_checkable
class HoldingDecider(BatchDecider, Protocol):
    """A decider that holds records (the stateful one): those due are released while the input is quiet."""

    def release_due(self) -> DecidedBatch | None: ...


def _started(part: T | None, name: str) -> T:
    """What start-up (Detector._start) makes: a clear error when it is used before."""
    if part is None:
        raise RuntimeError(f"the detector's {name} is used before start-up made it")
    return part


def default_transactional_id(settings: Settings) -> str:
    """Stable across restarts on one host, so a restarted detector aborts its predecessor's open
    transaction at once instead of leaving readers stalled until it times out."""
    return settings.transactional_id or f"{settings.group_id}-{socket.gethostname()}"


# Files a container engine puts in every container (Docker, Podman), and the variable Kubernetes sets in every pod.
CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))


def unstable_id_warning(settings: Settings, *, markers: tuple[Path, ...] = CONTAINER_MARKERS) -> str | None:
    """A warning when the transactional id comes from the host name inside a container, where a recreated
    container gets a new one (a StatefulSet's pods keep theirs; a Deployment's and Compose's do not)."""
    in_container = any(marker.exists() for marker in markers) or "KUBERNETES_SERVICE_HOST" in os.environ
    if settings.transactional_id or not in_container:
        return None
    return (
        f"transactional id {default_transactional_id(settings)} comes from this container's host name, which "
        "changes when the container is recreated: set FRAUDSTREAM_TRANSACTIONAL_ID (or --transactional-id) to "
        "a stable slot name, so that a restarted detector aborts its predecessor's open transaction at once"
    )


class Detector:
    def __init__(
        self, settings: Settings, *, log_interval_s: float = 10.0, on_log: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.transactional_id = default_transactional_id(settings)
        self.log_interval_s = log_interval_s
        self.on_log = on_log or log.info
        self.metrics = DetectorMetrics()
        self.routes = {
            Route.LEGIT: settings.legit_topic,
            Route.FRAUD: settings.fraud_topic,
            Route.DEAD_LETTER: settings.dlq_topic,
        }
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.stop = threading.Event()
        self._revocations = 0  # partitions revoked or lost so far: a batch taken meanwhile is filtered
        # Records per transaction: more while the input is backlogged, within the transaction's timeout.
        self.sizer = BatchSizer(
            most=settings.batch_max_records,
            time_budget_s=settings.transaction_timeout_ms / 1000 * TRANSACTION_TIME_SHARE,
        )
        self._admin: AdminClient | None = None
        self._parked_clients: list = []
        # The transaction protocol (consumer/checkpoint.py) and the one sink of outputs (consumer/collector.py).
        self.calls = TransactionalCalls(self.stop)
        self.collector = RecordCollector(self.routes, {}, self.calls, shadow_topic=settings.shadow_topic)
        self.checkpoint = Checkpoint(self.calls, self.collector, transaction_timeout_ms=settings.transaction_timeout_ms)
        self._failures_in_a_row = 0
        # Transactions refused because the group moved on without us (AbortBatch.group_moved): since when, how many.
        self._group_moved_since, self._group_moved_retries = 0.0, 0
        # A task per assigned input partition; without stores until start-up gives them the stateful rules' stores.
        self.tasks = TaskManager(settings, (), on_log=self.on_log)
        # How long another member must hold our group.instance.id to count as alive (see _successors).
        self._successor_wait_s = consumer_config(settings, settings.group_id)["session.timeout.ms"] / 1000 * 1.5 + 2
        self.rules_topic: RulesTopic | None = None  # the rules in force, when the stateful rules are on
        self.rules_dead_lettered = 0  # refused rule records this detector routed to the dead-letter topic
        self.labels = None  # the labels topic's reader, when a model scores the records
        self.terminal: TerminalReader | None = None  # the terminal window's reader, when the stateful rules are on

    # ----- what start-up makes (None before it) -----
    @property
    def _started_consumer(self) -> Consumer:
        return _started(self.consumer, "consumer")

    @property
    def _started_producer(self) -> Producer:
        return _started(self.producer, "producer")

    @property
    def _started_admin(self) -> AdminClient:
        return _started(self._admin, "admin client")

    @property
    def _started_rules_topic(self) -> RulesTopic:
        return _started(self.rules_topic, "rules topic (stateful rules only)")

    # ----- start-up -----
    def _start(self) -> tuple[BatchDecider, list]:
        s = self.settings
        # A cluster starting beside the detector (a restart of everything, compose) is waited for, as an outage is.
        wait_for_cluster(s, timeout_s=s.broker_outage_limit_s, on_wait=self.on_log)
        ensure_topics(s, (s.transactions_topic, s.legit_topic, s.fraud_topic, s.dlq_topic, s.shadow_topic))
        registry = Registry(s)
        schemas = load_schemas(s.schemas_dir)
        # A clear error when `schemas register` was not run; a registry restarting is waited for.
        ids = self._until_registry_answers(lambda: current_ids(s, registry, schemas))
        decoder = Decoder(registry, schemas.expanded["Transaction"], reader_id=ids[s.transactions_topic])
        decider: Decider | ColumnarDecider | StatefulDecider  # each wraps the one before
        decider = Decider(
            decoder,
            rules_from_settings(s),
            legit_schema_id=ids[s.legit_topic],
            legit_schema=schemas.parsed["Transaction"],
            fraud_schema_id=ids[s.fraud_topic],
            fraud_schema=schemas.parsed["FraudAlert"],
            reject_trailing_bytes=True,
        )
        if s.decoder == "columnar":
            decider = ColumnarDecider(decider, reader_schema=schemas.expanded["Transaction"])
        if s.stateful:
            decider = self._stateful(decider, make_encoder(ids[s.shadow_topic], schemas.parsed["ShadowDifference"]))
        self._admin = admin(s)  # one for the detector's life: see max_message_bytes
        self.collector.limits = max_message_bytes(
            self._admin, tuple(self.routes.values()), outage_limit_s=s.broker_outage_limit_s
        )
        # Static membership (KIP-345) under the same stable id: a restarted detector takes its
        # partitions back at once instead of waiting out the session timeout of its dead self.
        self.consumer = self._new_consumer()
        # Join the group before fencing anyone's producer: whoever holds our group.instance.id is then
        # always the newest detector, which is how a fenced one tells a successor from a broker restart.
        first_records = self._join_group()
        self.producer = self._new_producer()
        if s.metrics_port:
            self.metrics.serve(s.metrics_port)
        if (warning := unstable_id_warning(s)) is not None:
            log.warning(warning)
            self.on_log(warning)
        self.on_log(
            f"detector {self.transactional_id} started: {s.transactions_topic} -> "
            f"{s.legit_topic} | {s.fraud_topic} | {s.dlq_topic} (group {s.group_id})"
        )
        return decider, first_records

    def _stateful(self, decider: Decider | ColumnarDecider, encode_shadow: Callable[[dict], bytes]) -> StatefulDecider:
        """The rules file's rules over per-card state, restored from and written to changelog topics."""
        s = self.settings
        load_rules(s.rules_file, settings=s)  # a bad rules file is refused before any topic is touched
        self.tasks = TaskManager(s, STORES, on_log=self.on_log, on_restored=self.metrics.restored)
        self.tasks.start()
        record_wise = decider.record_wise if isinstance(decider, ColumnarDecider) else decider
        columnar = decider if isinstance(decider, ColumnarDecider) else None
        decode = lambda messages: decode_batch(columnar, record_wise, messages)  # noqa: E731
        rules = self._rules_from_topic()
        if any(kind in TERMINAL_RULES for kind in rules.kinds.values()):
            # Per-terminal state that every detector holds whole, read from every input partition (README,
            # "Stateful rules": why not a repartition).
            self.terminal = TerminalReader(
                s, decode, stop=self.stop.is_set, on_log=self.on_log, on_gate=self.metrics.terminal_gate
            )
            self.terminal.start()
        else:
            # No reader (it decodes the whole input once more): a terminal rule enabled later needs a restart, and
            # a shadow set's terminal rule does not run either.
            self._started_rules_topic.skip(TERMINAL_RULES)
            rules = self._started_rules_topic.current
            self.on_log(
                "no compromised_terminal rule in force: no terminal window (one enabled later, or one in a shadow "
                "set, runs after a restart)"
            )
        self.on_log(
            f"rules {', '.join(rules.names)} (rule set {rules.version} of {s.rules_topic}); "
            f"state in {', '.join(self.tasks.topics.values())}"
            + (" and a terminal window of every input partition" if self.terminal else "")
        )
        model, self.labels = load_scoring(s, on_log=self.on_log)
        stateful = StatefulDecider(
            decode,
            rules,
            self.tasks,
            encode_legit=record_wise.encode_legit,
            encode_fraud=record_wise.encode_fraud,
            model=model,
            labels=self.labels,
            terminal_features=self.terminal.features if self.terminal else None,
            terminal=self.terminal,
            hold_idle_ms=s.terminal_hold_idle_ms,
            input_topic=s.transactions_topic,
            encode_shadow=encode_shadow,
        )
        self._install_shadow(stateful)
        return stateful

    def _new_consumer(self) -> Consumer:
        s = self.settings
        consumer = Consumer(consumer_config(s, s.group_id, **{"group.instance.id": self.transactional_id}))
        consumer.subscribe(
            [s.transactions_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        return consumer

    def _join_group(self) -> list:
        """Poll until the group coordinator gave us a member id; records already fetched are the first batch."""
        records: list = []
        deadline = time.monotonic() + self.settings.broker_outage_limit_s
        while not self._started_consumer.memberid():
            if self.stop.is_set():
                raise Stopping("joining the consumer group")
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not join consumer group {self.settings.group_id} within "
                    f"{self.settings.broker_outage_limit_s} s"
                )
            records += self._started_consumer.consume(max(1, self.settings.batch_max_records - len(records)), 0.1)
        return records

    def _new_producer(self) -> Producer:
        """A transactional producer under our id; init_transactions fences any older one and ends its open transaction."""
        config = transactional_producer_config(
            self.settings,
            self.transactional_id,
            **{
                # A record batch never exceeds the smallest output topic's limit (a lone record larger than
                # that is dead-lettered before it is produced, see _produce_all).
                "batch.size": max(1, min(self.collector.limits.values()) - BATCH_HEADER_BYTES),
                "delivery.report.only.error": True,
                "on_delivery": self.collector.on_delivery_error,
            },
        )
        producer = Producer(config)
        self._retry_outage("initialising transactions", lambda: producer.init_transactions(CALL_TIMEOUT_S))
        return producer

    # ----- rebalance callbacks (run inside consume()) -----
    def _on_assign(self, consumer, partitions) -> None:
        self.on_log(f"assigned {_partition_list(partitions)}")
        self.tasks.assign(consumer, partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        # Nothing to flush: a batch's transaction is always committed or aborted before the next
        # consume(), which is the only place a rebalance callback can run.
        self._revocations += 1
        self.on_log(f"revoked {_partition_list(partitions)}")
        self.tasks.revoke(partitions)

    def _on_lost(self, consumer, partitions) -> None:
        self._revocations += 1
        self.on_log(f"lost {_partition_list(partitions)}")
        self.tasks.revoke(partitions)

    # ----- main loop -----
    def run(self, stop: threading.Event | None = None) -> DetectorMetrics:
        self.stop = stop if stop is not None else self.stop
        self.calls.stop = self.stop
        try:
            decider, pending = self._start()
            # Start-up objects (schemas, clients, imports) never die: keep them out of the collector's
            # full passes, which otherwise stall a batch now and then (seen in the latency tail).
            gc.freeze()
            consumer = self._started_consumer
            while not self.stop.is_set():
                try:
                    if isinstance(decider, StatefulDecider):  # its rules change at runtime (the rules topic)
                        self._apply_rule_changes(decider)
                    messages, pending = self._next_batch(consumer, pending), []
                    if self.tasks.recovering:
                        self.tasks.recover_step(consumer)
                        self.metrics.restoring(self.tasks.restoring_records)
                        messages = self._with_state_ready(messages)
                    if messages:
                        batch = self._decide(decider, messages)
                        if batch is None:  # stopping during a registry outage: nothing produced, re-read later
                            break
                        self._process_batch(messages, batch)
                    elif (batch := self._decide(decider, [])) is not None:
                        self._process_batch([], batch)  # held records due while the input is quiet
                    else:
                        self._started_producer.poll(0)
                except _ConsumerLost as lost:  # between transactions: none is open
                    consumer, pending = self._recover_consumer(lost)
                if self.metrics.line_due(self.log_interval_s):
                    self.on_log(self.metrics.line())
        except (Stopping, StopRequested) as stopping:
            self.on_log(
                f"stop requested while {stopping}: the open transaction, if any, is aborted by the next "
                "detector with this id or when transaction.timeout.ms expires"
            )
        finally:
            self._close()
        self.on_log(f"stopped: {self.metrics.line()}")
        return self.metrics

    def _next_batch(self, consumer: Consumer, pending: list) -> list:
        """The next batch (`pending`: records fetched while joining the group): as many records as the sizer
        allows of those already fetched, closed as soon as the input runs dry (see consumer/batching.py).
        Errors are reported, not returned; so are the records of a partition revoked during these very
        consume() calls (they are its new owner's)."""
        revocations = self._revocations
        wait_s = self.settings.batch_max_ms / 1000
        messages = pending or gather(consumer.consume, self.sizer.target, idle_wait_s=wait_s, max_wait_s=wait_s)
        if any(m.error() is not None for m in messages):
            messages = [m for m in messages if not self._is_error(m)]
        if pending or self._revocations != revocations:
            assigned = self.tasks.partitions
            messages = [m for m in messages if m.partition() in assigned]
        return messages

    def _is_error(self, message) -> bool:
        error = message.error()
        if error is None:
            return False
        # librdkafka reports a fatal consumer error as _FATAL; being fenced is the one we expect.
        if error.code() == KafkaError.FENCED_INSTANCE_ID or (
            error.code() == KafkaError._FATAL and "fenced" in error.str()
        ):
            raise _ConsumerLost(f"the group coordinator fenced this consumer ({error.str()})")
        if error.fatal() or error.code() == KafkaError._FATAL:
            raise KafkaUnavailable(f"consumer failed: {error.str()}")
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise KafkaUnavailable(f"input topic {self.settings.transactions_topic} does not exist")
        log.warning("consumer: %s", error.str())
        return True

    def _decide(self, decider: BatchDecider, messages: list) -> DecidedBatch | None:
        """Decide the batch (no messages: release the held records due while the input is quiet; None when there
        are none, or when stopping during a registry outage). While the registry does not answer, retry with
        backoff (never dead-letter); a batch that had changed state when it stopped answering is undone first, so
        that the retry counts each payment once."""
        limit_s = self.settings.registry_outage_limit_s
        backoff, started = 0.2, time.monotonic()
        while True:
            self.tasks.begin()
            try:
                if messages:
                    return decider.decide_batch(messages)
                return decider.release_due() if isinstance(decider, HoldingDecider) else None
            except RegistryError as exc:
                if isinstance(exc, StateTouchedError):
                    self.tasks.rollback()
                waited = time.monotonic() - started
                if waited >= limit_s:
                    raise RegistryError(
                        f"{exc}; gave up after {waited:.0f} s (registry outage limit {limit_s} s); "
                        "nothing of the batch was routed, a restart resumes from it"
                    ) from exc
                log.warning("%s; retrying in %.1fs", exc, backoff)
                self.metrics.registry_retried()
                if self.stop.wait(min(backoff, max(0.0, limit_s - waited))):
                    return None
                backoff = min(backoff * 2, REGISTRY_BACKOFF_MAX_S)

    def _until_registry_answers(self, fn: Callable[[], T]) -> T:
        """fn(), retried with backoff while the registry does not answer, up to its outage limit (a detector
        starting while the registry restarts); a refusal or an answer is not retried."""
        limit_s = self.settings.registry_outage_limit_s
        backoff, deadline = 0.2, time.monotonic() + limit_s
        while True:
            try:
                return fn()
            except RegistryUnavailable as exc:
                if time.monotonic() + backoff > deadline:
                    raise RegistryError(f"{exc}; gave up after the registry outage limit ({limit_s} s)") from exc
                log.warning("%s; retrying in %.1fs", exc, backoff)
                if self.stop.wait(backoff):
                    raise Stopping("waiting for the schema registry") from exc
                backoff = min(backoff * 2, REGISTRY_BACKOFF_MAX_S)

    def _with_state_ready(self, messages: list) -> list:
        """Only records whose task's state is restored; a partition whose state is being rebuilt is paused, and
        any of its records fetched before that are read again once it resumes."""
        if not self.tasks.recovering:
            return messages
        ready = self.tasks.ready
        kept = [m for m in messages if ready(m.partition())]
        if len(kept) < len(messages):
            self._rewind([m for m in messages if not ready(m.partition())], rebuild_state=False)
        return kept

    # ----- one batch -----
    def _process_batch(self, messages: list, batch: DecidedBatch) -> None:
        """Run the batch's transaction; on failure abort and rewind, or recover the producer."""
        started = time.monotonic()
        try:
            commit_s = self._run_transaction(messages, batch)
        except AbortBatch as abort:
            self._abort_and_rewind(messages, abort)
            return
        except ProducerLost as lost:
            self._recover(lost)
            return
        self._failures_in_a_row = self._group_moved_retries = 0
        self._group_moved_since = 0.0
        self.tasks.commit()
        if messages:
            self.sizer.done(len(messages), time.monotonic() - started)
        tally = batch.routes()
        outputs = [*batch.outputs.values(), *(decision for _, decision in batch.released)]
        # Every dead letter names its kind (decide.dead_letter).
        dead_kinds = Tally(d.dead_letter_kind or "unknown" for d in outputs if d.route is Route.DEAD_LETTER)
        rules = Tally(rule for d in outputs if d.route is Route.FRAUD for rule in d.rules)
        self.metrics.batch_committed(
            consumed=len(messages),
            legit=tally[Route.LEGIT],
            fraud=tally[Route.FRAUD],
            dead_kinds=dict(dead_kinds),
            commit_s=commit_s,
            rules=dict(rules),
            shadow_differences=len(batch.shadow),
        )
        self.metrics.state_size(self.tasks.sizes())  # none without stores
        if self.terminal is not None:
            self.metrics.state_size({**self.metrics.state_keys, "terminal_events": len(self.terminal.window)})

    def _run_transaction(self, messages: list, batch: DecidedBatch) -> float:
        """The batch's checkpoint (consumer/checkpoint.py): its outputs, state changes and input offsets in one
        transaction. Returns the commit's duration; raises what Checkpoint.commit raises."""
        # Offsets go with every transaction, a release-only one too (its partitions' offsets as committed): the
        # group coordinator checks them against the group's generation, and that is what fences a detector
        # whose partitions were given away (KIP-447) before it releases rows their new owner restored.
        offsets = _next_offsets(messages) if messages else self._offsets_of(batch.state_partitions)
        partitions = {m.partition() for m in messages} | batch.state_partitions
        self.collector.rejected.clear()
        commit_s, written = self.checkpoint.commit(
            self.producer,
            messages,
            batch,
            offsets=offsets,
            group_metadata=self._started_consumer.consumer_group_metadata,
            write_state=lambda producer: self.tasks.write_changes(producer, partitions),
        )
        self.metrics.changelog_written(written)
        self.tasks.committed(offsets)
        return commit_s

    def _offsets_of(self, partitions: set[int]) -> list[TopicPartition]:
        """The next offsets to read of these input partitions, as this detector committed them (asked of the group
        for a partition it has not committed yet)."""
        topic = self.settings.transactions_topic
        unknown = [
            TopicPartition(topic, p) for p, offset in self.tasks.next_offsets(partitions).items() if offset is None
        ]
        if unknown:
            self.tasks.committed(self._committed(unknown))
        return [
            TopicPartition(topic, p, offset)
            for p, offset in self.tasks.next_offsets(partitions).items()
            if offset is not None
        ]

    def _abort_and_rewind(self, messages: list, abort: AbortBatch) -> None:
        if abort.group_moved:
            # Not a failure of this detector: the consumer rejoins by itself (its partitions may go elsewhere, and
            # a batch of revoked ones is then dropped); until then the same refusal, waited out like an outage.
            self._group_moved_since = self._group_moved_since or time.monotonic()
            self._group_moved_retries += 1
        else:
            self._failures_in_a_row += 1
        log.warning(
            "aborting the transaction of a batch of %d (%s): %s",
            len(messages),
            f"the group moved on, retry {self._group_moved_retries}"
            if abort.group_moved
            else f"failure {self._failures_in_a_row} in a row",
            abort,
        )
        try:
            self.checkpoint.abort(self.producer)
            self.metrics.aborted()
            if self.collector.refused_as_too_large():
                self._refresh_limits()
        except ProducerLost as lost:
            self._recover(lost)
            return
        self._rewind(messages)
        self._backoff_or_give_up(abort)

    def _refresh_limits(self) -> None:
        """A broker refused a record batch as too large: an output topic's limit went down since start-up.
        Read the limits again; the retried transaction dead-letters what no longer fits, and a producer
        with smaller record batches keeps the rest within the limit."""
        limits = max_message_bytes(
            self._started_admin, tuple(self.routes.values()), outage_limit_s=self.settings.broker_outage_limit_s
        )
        log.warning(
            "an output was over its topic's max.message.bytes; limits now %s (were %s)", limits, self.collector.limits
        )
        if limits != self.collector.limits:
            self.collector.limits = limits
            self.producer = self._new_producer()

    def _backoff_or_give_up(self, reason: Exception) -> None:
        if self._failures_in_a_row >= FAILURES_IN_A_ROW_LIMIT:
            raise KafkaUnavailable(f"{self._failures_in_a_row} transactions in a row failed, the last one: {reason}")
        limit_s = self.settings.broker_outage_limit_s
        if self._group_moved_since and time.monotonic() - self._group_moved_since > limit_s:
            raise KafkaUnavailable(f"the consumer did not rejoin its group within {limit_s} s: {reason}")
        retries = max(self._failures_in_a_row, self._group_moved_retries)
        if self.stop.wait(min(0.2 * 2 ** (retries - 1), KAFKA_BACKOFF_MAX_S)):
            raise Stopping("waiting to retry a failed transaction")

    def _recover(self, lost: ProducerLost) -> None:
        """The producer is unusable. Stop if a newer detector took our id over; otherwise recreate it and rewind."""
        if lost.stuck:
            # Its call may never return: keep it (destroying a client with a call pending can crash librdkafka) and
            # its thread; the new producer's init_transactions fences it and ends its open transaction.
            abandoned = self.calls.abandon(self.producer)
            if abandoned > ABANDONED_PRODUCERS_LIMIT:
                raise KafkaUnavailable(
                    f"{lost}; {abandoned} producers stuck for good in this process: "
                    "exiting for a supervisor to restart it"
                )
            self.on_log(
                f"{lost}: abandoning this producer ({abandoned} so far) for a new one under the "
                "same transactional id, which fences it; resuming from the committed offsets"
            )
            self.producer = self._new_producer()
            self._rewind_to_committed()
            self.metrics.recovered()
            self._failures_in_a_row += 1
            self._backoff_or_give_up(lost)
            return
        if lost.expired:
            # Our own transaction timed out: no sign of another detector. (A newer one joins the group first,
            # which fences our consumer, and that path asks the group.) Asking here, while the brokers are
            # still unsettled, risks a group request timing out, which can crash librdkafka 2.x
            # (assertion in rd_kafka_enq_once_del_source_return).
            successors = []
        else:
            log.warning(
                "transactional producer lost (%s): asking group %s who holds %s",
                lost,
                self.settings.group_id,
                self.transactional_id,
            )
            successors = self._retry_outage("asking the group who holds our id", self._successors)
        if successors:
            raise Fenced(
                f"detector {self.transactional_id} stopped: another detector with the same transactional id "
                f"joined group {self.settings.group_id} as member {successors[0]} and took over ({lost})"
            )
        self._failures_in_a_row += 1
        self.on_log(
            f"{lost}; no other detector holds {self.transactional_id}, so the broker ended this producer's "
            "epoch (a broker restart, or a transaction timed out meanwhile): recreating the transactional "
            "producer and resuming from the committed offsets"
        )
        self.producer = self._new_producer()
        self._rewind_to_committed()
        self.metrics.recovered()
        self._backoff_or_give_up(lost)

    def _recover_consumer(self, lost: _ConsumerLost) -> tuple[Consumer, list]:
        """The consumer was fenced. Stop if another detector holds our id; otherwise make a new consumer and rejoin."""
        log.warning("%s: asking group %s who holds %s", lost, self.settings.group_id, self.transactional_id)
        successors = self._retry_outage("asking the group who holds our id", self._successors)
        if successors:
            raise Fenced(
                f"detector {self.transactional_id} stopped: another detector with the same transactional id "
                f"joined group {self.settings.group_id} as member {successors[0]} and took over ({lost})"
            )
        self._failures_in_a_row += 1
        self.on_log(
            f"{lost}; no other detector holds {self.transactional_id} (the coordinator fenced our own "
            "rejoin, e.g. after a broker restart): recreating the consumer and rejoining the group"
        )
        fenced = self._started_consumer  # outside the try: its RuntimeError is the client's
        try:
            fenced.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the fenced consumer: %s", exc)
        self.tasks.drop_all()  # the new consumer's assignment makes them again (and restores their state)
        self.consumer = self._new_consumer()
        first_records = self._join_group()  # a new consumer starts from the committed offsets
        self.metrics.recovered()
        self._backoff_or_give_up(lost)
        return self.consumer, first_records

    def _successors(self) -> list[str]:
        """Live members of our group, other than this consumer, that hold our group.instance.id.

        A newer detector replaces our static membership under a new member id (keeping our client id
        and host: Kafka carries them over, so only the member id tells). So can our own consumer: after
        a broker restart, librdkafka may rejoin under a new id and then fence itself with the old one.
        That member is never heartbeated and expires after the session timeout; a newer detector's
        stays. Hence: another member id that is still there a session timeout later."""
        deadline = time.monotonic() + self._successor_wait_s
        while True:
            # Brokers first (a plain metadata request): a group request timing out while its coordinator
            # is still coming up can trip an assertion in librdkafka 2.x (rd_kafka_enq_once_del_source_return).
            if not self._started_admin.list_topics(timeout=CALL_TIMEOUT_S).brokers:
                raise KafkaUnavailable("no broker answered")
            ours = self._started_consumer.memberid()
            # In a child process (fraudstream/group_probe.py): this request can abort the process that sends it.
            members = static_members(
                self.settings, self.settings.group_id, self.transactional_id, timeout_s=GROUP_REQUEST_TIMEOUT_S
            )
            others = [m.member_id for m in members if m.member_id != ours]
            if not others or time.monotonic() >= deadline:
                return others
            if self.stop.wait(min(1.0, self._successor_wait_s / 5)):
                raise Stopping("asking the group who holds our id")

    def _retry_outage(self, what: str, fn: Callable[[], object]):
        """A call outside any transaction: retried with backoff while the brokers are away, up to the outage limit."""
        limit_s = self.settings.broker_outage_limit_s
        deadline, backoff = time.monotonic() + limit_s, 0.2
        while True:
            try:
                with exit_if_stuck(CALL_TIMEOUT_S + self._successor_wait_s):
                    return fn()
            except (KafkaException, KafkaUnavailable) as exc:
                error = exc.args[0]
                reason = error.str() if isinstance(error, KafkaError) else str(error)
                # Anything else (transport failures, timeouts, "not coordinator") is the outage itself.
                if isinstance(error, KafkaError) and (
                    error.fatal() or error.code() in CONSUMER_GONE_CODES or error.code() in NEVER_PASSING
                ):  # authorization: at once
                    raise KafkaUnavailable(f"{what} failed: {reason}") from exc
                if time.monotonic() + backoff > deadline:
                    raise KafkaUnavailable(f"{what} failed for {limit_s} s (broker outage limit): {reason}") from exc
                log.warning("retrying after %s failed: %s", what, reason)
                if self.stop.wait(backoff):
                    raise Stopping(what) from exc
                backoff = min(backoff * 2, KAFKA_BACKOFF_MAX_S)

    # ----- rewinding: abort_transaction() does not move the consumer -----
    def _rewind(self, messages: list, *, rebuild_state: bool = True) -> None:
        """Seek each assigned partition back to its first offset in the batch (a revoked one is re-read by its new
        owner), and undo the state changes of the batch that did not commit (`rebuild_state`): in memory, at the
        cost of the batch (consumer/state/table.py's undo log), the held records it released included."""
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            first.setdefault((message.topic(), message.partition()), message.offset())
        if rebuild_state:
            self.tasks.rollback()
        assigned = self.tasks.partitions
        self._seek([TopicPartition(t, p, offset) for (t, p), offset in first.items() if p in assigned])

    def _rewind_to_committed(self) -> None:
        """Seek every assigned partition to its committed offset (the beginning if none): after a lost producer,
        whether its last commit went through is known only to the group coordinator."""
        partitions = [TopicPartition(self.settings.transactions_topic, p) for p in sorted(self.tasks.partitions)]
        if not partitions:
            return
        committed = self._committed(partitions)
        self.tasks.reset(self.consumer, [tp.partition for tp in partitions])
        self.tasks.committed(committed)
        # Logical offsets (no commit yet: OFFSET_INVALID, -1001) are passed on as a position, never computed with.
        self._seek(
            [
                TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                for tp in committed
            ]
        )

    def _committed(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The group's committed offsets. After a broker restart the consumer's own requests to the group
        coordinator can stay stuck (librdkafka waits on a stale coordinator connection, and every attempt times
        out), so once one attempt failed, each next one asks with a fresh client of the group id that never
        joins it (assign mode), which finds the coordinator anew."""
        attempts = 0

        def ask() -> list[TopicPartition]:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                return _checked(self._started_consumer.committed(partitions, timeout=CALL_TIMEOUT_S))
            asker = Consumer(consumer_config(self.settings, self.settings.group_id))
            try:
                answer = asker.committed(partitions, timeout=CALL_TIMEOUT_S)
            except KafkaException:
                self._parked_clients.append(asker)  # its request may still be pending: never destroyed
                raise
            asker.close()
            return _checked(answer)

        return self._consumer_call("reading the committed offsets", ask)

    def _seek(self, positions: list[TopicPartition]) -> None:
        for position in positions:
            self._consumer_call(
                f"rewinding {position.topic}[{position.partition}]", functools.partial(self._seek_to, position)
            )

    def _seek_to(self, position: TopicPartition) -> None:
        self._started_consumer.seek(position)

    def _consumer_call(self, what: str, fn: Callable[[], object]):
        """A consumer call retried through broker outages; a consumer that failed for good (fenced meanwhile)
        is reported as lost, to be replaced by a new one, which starts from the committed offsets."""
        try:
            return self._retry_outage(what, fn)
        except KafkaUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, KafkaException) and (
                cause.args[0].fatal() or cause.args[0].code() in CONSUMER_GONE_CODES
            ):
                raise _ConsumerLost(f"{what}: the consumer failed ({cause.args[0].str()})") from exc
            raise

    # ----- rules changed at runtime -----
    def _rules_from_topic(self):
        """The rules topic read to its end (seeded from the rules file when empty): the rules in force."""
        self.rules_topic = RulesTopic(self.settings, on_log=self.on_log, on_refused=self.metrics.rule_refused)
        # Each rule record is read with its writer schema: a registry restarting meanwhile is waited out for its
        # outage limit, as the batches do (soak 3018: a detector starting during a registry kill gave up after
        # 30 s and was restarted from outside).
        return self.rules_topic.start(
            seed_from=self.settings.rules_file,
            timeout_s=max(RULES_START_S, self.settings.registry_outage_limit_s),
        )

    def _apply_rule_changes(self, decider: StatefulDecider) -> None:
        """Between batches: install the rule changes fetched meanwhile (never waits), and dead-letter the
        rule records refused. Every detector reads every rule record, so one of them routes the dead
        letters: the one that holds input partition 0 (see README, "Rules changed at runtime")."""
        rules_topic = self._started_rules_topic
        if rules_topic.poll():
            if decider.rules is not rules_topic.current:
                decider.rules = rules_topic.current
                self.on_log(f"rules {', '.join(decider.rules.names)} now in force (rule set {decider.rules.version})")
            self._install_shadow(decider)
        if rules_topic.dead_letters and 0 in self.tasks.partitions:
            self._dead_letter_rules(rules_topic.take_dead_letters())
        elif rules_topic.dead_letters and self.tasks.partitions:
            rules_topic.take_dead_letters()  # another detector routes them

    def _install_shadow(self, decider: StatefulDecider) -> None:
        """The rules topic's shadow set beside the live one, from the next batch on (`fraudstream rules shadow`)."""
        shadow = self._started_rules_topic.shadow
        if shadow is decider.shadow_rules:
            return
        decider.shadow_rules = shadow
        if shadow is None:
            self.on_log("no shadow rules now")
        else:
            self.on_log(
                f"shadow rules {', '.join(shadow.names)} (shadow set {shadow.version}) decide beside the live ones; "
                f"differences go to {self.settings.shadow_topic}"
            )

    def _dead_letter_rules(self, letters: list[Decision]) -> None:
        """A transaction of their own: between batches there is no open one."""
        producer, dlq = self._started_producer, self.settings.dlq_topic
        deadline = transaction_deadline(self.settings.transaction_timeout_ms)
        try:
            self.calls.call("beginning a transaction", deadline, producer.begin_transaction)
            for letter in letters:
                # confluent-kafka's HeadersType is a List[Tuple[str, str | bytes | None]], and a list is invariant:
                # our list[tuple[str, bytes]], which produce takes, does not match it.
                producer.produce(dlq, letter.value, letter.key, headers=letter.headers)  # type: ignore[arg-type]
            self.calls.call("committing", deadline, lambda: producer.commit_transaction(attempt_timeout(deadline)))
        except (AbortBatch, KafkaException) as exc:
            self.on_log(f"dead-lettering {len(letters)} rule records failed ({exc}); retried after the next change")
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(CALL_TIMEOUT_S)
            self._started_rules_topic.dead_letters[:0] = letters
            return
        self.rules_dead_lettered += len(letters)

    def _close(self) -> None:
        if self.labels is not None:
            self.labels.close()
        if self.rules_topic is not None:
            self.rules_topic.close()
        if self.terminal is not None:
            self.terminal.close()
        if self.consumer is not None:
            try:
                self.consumer.close()  # before the state: its revocation callback stops a partition's restore
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing consumer: %s", exc)
        self.tasks.close()
        if self.producer is not None:
            try:
                self.producer.flush(10)  # transactions are committed or aborted by now; this serves late callbacks
            except (KafkaException, SystemError) as exc:  # a fenced producer reports its fatal error again here
                log.debug("closing producer: %s", exc)


class _ConsumerLost(Exception):
    """The group coordinator fenced our consumer (fatal for it): another detector took over, or our own rejoin did."""


@contextlib.contextmanager
def exit_if_stuck(timeout_s: float):
    """Around one blocking Kafka call of at most `timeout_s`: if it is still blocked STUCK_CALL_GRACE_S later,
    every thread's stack goes to the log and the process exits with status 1 (faulthandler's timer, which
    runs even while the call holds the interpreter)."""
    faulthandler.dump_traceback_later(timeout_s + STUCK_CALL_GRACE_S, exit=True, file=sys.stdout)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _checked(committed: list[TopicPartition]) -> list[TopicPartition]:
    """The committed offsets, or the first partition's error as a KafkaException (retried like the call's own): a
    partition whose offset could not be read comes back as OFFSET_INVALID, which would read it from the start."""
    for tp in committed:
        if tp.error is not None:
            raise KafkaException(tp.error)
    return committed


def _next_offsets(messages: list) -> list[TopicPartition]:
    """The next offset to read per partition (last record of the batch + 1): what send_offsets_to_transaction
    expects. From the batch itself, not the consumer's position: records fetched but kept out of the batch
    (a partition still restoring, a revoked one) must not be committed."""
    # One input topic: a partition number names the partition. One call per record (not three), then the
    # last record of each partition found on the array.
    partitions = np.array([message.partition() for message in messages], dtype=np.int64)
    found, from_end = np.unique(partitions[::-1], return_index=True)
    last = len(messages) - 1 - from_end
    return [
        TopicPartition(messages[i].topic(), int(partition), messages[i].offset() + 1)
        for partition, i in zip(found.tolist(), last.tolist())
    ]


def _partition_list(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def run_until_signalled(settings: Settings, **kwargs) -> DetectorMetrics:
    """Run a detector in this process: the first SIGINT/SIGTERM stops it cleanly, a second one at once."""
    with stop_requests(exit_on_second="detector") as (stop, _):
        return Detector(settings, **kwargs).run(stop)
