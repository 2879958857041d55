"""A batch's checkpoint: one Kafka transaction that commits the batch's outputs, its state changes and its input
offsets together, or none of them (quixstreams' Checkpoint; Kafka Streams' exactly_once_v2 commit).

    begin -> outputs (the record collector) -> changelog rows (the state) -> input offsets -> commit

Errors are classified here, once, as librdkafka reports them (KafkaError.retriable(), txn_requires_abort(),
fatal()):

- retriable (a timeout, a broker moving): the same call again, with backoff, but never past the transaction's own
  timeout: after that the coordinator aborts it, so retrying would only fail later and look like fencing;
- abortable (a delivery failed, the transaction is in an error state): AbortBatch, for the detector to abort,
  rewind and read the batch again;
- fatal or fenced producer, a transaction that outlived its timeout, or a call stuck for good: ProducerLost, for
  the detector to recreate the producer (or stop, when a newer detector took its id over).

Every transactional call runs on the producer's own thread (TransactionalCalls): one still blocked
STUCK_CALL_GRACE_S past its timeout (librdkafka after broker restarts) loses the producer instead of the process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from fraudstream.consumer.decide import DecidedBatch
from fraudstream.errors import KafkaUnavailable

if TYPE_CHECKING:  # the collector imports this module's errors
    from fraudstream.consumer.collector import RecordCollector

log = logging.getLogger("fraudstream.detector")

CALL_TIMEOUT_S = 5.0  # one attempt of a blocking Kafka call: short, so a stop request is seen promptly
# A Kafka call still blocked this long after its own timeout never returns (seen after broker restarts:
# librdkafka's send_offsets_to_transaction and commit_transaction blocked for minutes past a 7 s timeout).
STUCK_CALL_GRACE_S = 60.0
# A transaction's calls are retried until this share of transaction.timeout.ms has passed since it began.
TRANSACTION_DEADLINE_SHARE = 0.8
FENCED_CODES = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


# What the group coordinator answers to a transaction's offsets from a member the group no longer has in that
# generation.
GROUP_MOVED_CODES = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
}


class AbortBatch(Exception):
    """The open transaction must be aborted and the batch re-read. `group_moved`: the group coordinator refused the
    offsets because the group moved on without this member (a rebalance, or a membership that expired while the
    process was stopped): the consumer rejoins by itself; until then every retry fails the same way (Kafka
    Streams' TaskMigratedException)."""

    def __init__(self, reason: str, *, group_moved: bool = False) -> None:
        super().__init__(reason)
        self.group_moved = group_moved


class ProducerLost(Exception):
    """The producer cannot go on (fatal, fenced, its transaction outlived transaction.timeout.ms, or a call of it is
    stuck for good)."""

    def __init__(self, reason: str, *, expired: bool = False, stuck: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired
        self.stuck = stuck


class Stopping(Exception):
    """A stop was requested while waiting to retry; the message says what was being waited for."""


def attempt_timeout(deadline: float) -> float:
    return max(0.1, min(CALL_TIMEOUT_S, deadline - time.monotonic()))


def transaction_deadline(timeout_ms: int) -> float:
    """Until when a transaction begun now may retry its calls."""
    return time.monotonic() + timeout_ms / 1000 * TRANSACTION_DEADLINE_SHARE


class TransactionalCalls:
    """The transactional API's calls, on the producer's own thread, classified and retried in one way."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._thread = _call_thread()
        self.abandoned: list = []  # (producer, its call thread) stuck for good: kept, never destroyed

    def call(self, what: str, deadline: float, fn: Callable[[], object]):
        """One call: retriable errors again until the deadline; the rest classified. One blocked
        STUCK_CALL_GRACE_S past its timeout loses the producer."""
        while True:
            timeout_s = attempt_timeout(deadline)
            try:
                return self._thread.submit(fn).result(timeout=timeout_s + STUCK_CALL_GRACE_S)
            except FutureTimeout:
                raise ProducerLost(
                    f"{what} still blocked {STUCK_CALL_GRACE_S:g} s past its {timeout_s:.1f} s timeout", stuck=True
                ) from None
            except KafkaException as exc:
                error = exc.args[0]
                classify(what, error, exc)
                self.wait_before_retry(what, error, deadline)

    def abandon(self, producer) -> int:
        """Keep a producer whose call is stuck (destroying a client with a call pending can crash librdkafka),
        and its thread; later calls run on a new thread. Returns how many were abandoned so far."""
        self.abandoned.append((producer, self._thread))
        self._thread = _call_thread()
        return len(self.abandoned)

    def wait_before_retry(self, what: str, error: KafkaError, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # The coordinator is about to abort the transaction: a retry would fail with a fencing-like
            # error. Recreating the producer ends the transaction under our control.
            raise ProducerLost(
                f"{what} still failing when the transaction was about to time out ({error.str()})", expired=True
            )
        log.warning("retrying after %s failed: %s", what, error.str())
        if self.stop.wait(min(0.2, remaining)):
            raise Stopping(what)


def classify(what: str, error: KafkaError, exc: Exception) -> None:
    """Raise for every error of a transactional producer but a retriable one."""
    # _FATAL: what a call on a producer that already hit a fatal error (fenced, say) raises.
    if error.fatal() or error.code() in FENCED_CODES or error.code() == KafkaError._FATAL:
        raise ProducerLost(f"{what}: {error.str()}") from exc
    if error.txn_requires_abort():
        raise AbortBatch(f"{what}: {error.str()}", group_moved=error.code() in GROUP_MOVED_CODES) from exc
    if not error.retriable():
        raise KafkaUnavailable(f"{what} failed: {error.str()}") from exc


def classify_produce(what: str, error: KafkaError, exc: Exception) -> None:
    """As classify, for a failed produce(): _STATE means the open transaction already failed (a delivery error, or
    an idempotence error that needs the abort's epoch bump), so the batch is aborted, not the process ended."""
    if error.code() == KafkaError._STATE:
        raise AbortBatch(f"{what}: the transaction is in an error state ({error.str()})") from exc
    classify(what, error, exc)


class Checkpoint:
    """Runs one batch's transaction. The caller owns what happens after a failure (abort and rewind, or a new
    producer); this owns the order of the calls and what each error means."""

    def __init__(self, calls: TransactionalCalls, collector: RecordCollector, *, transaction_timeout_ms: int) -> None:
        self.calls = calls
        self.collector = collector
        self.transaction_timeout_ms = transaction_timeout_ms

    def commit(
        self,
        producer,
        messages: list,
        batch: DecidedBatch,
        *,
        offsets: list[TopicPartition],
        group_metadata: Callable[[], object],
        write_state: Callable[[object], int],
    ) -> tuple[float, int]:
        """begin, the batch's outputs, its tasks' state changes (`write_state(producer)`: none without stores), the
        input `offsets`, commit. Returns (the commit's duration, changelog records written). Raises AbortBatch,
        ProducerLost, Stopping, KafkaUnavailable. `batch.outputs` may be updated in place: an output its topic will
        never take becomes a dead letter."""
        call = self.calls.call
        deadline = transaction_deadline(self.transaction_timeout_ms)
        call("beginning a transaction", deadline, producer.begin_transaction)
        self.collector.produce_all(producer, messages, batch, deadline)
        # Not retried call by call: the changed rows were taken, so any failure aborts the transaction, and the
        # abort undoes the batch's state changes in memory (consumer/tasks.py).
        try:
            written = write_state(producer)
        except KafkaException as exc:
            error = exc.args[0]
            classify_produce("writing state changes", error, exc)
            raise AbortBatch(f"writing state changes: {error.str()}") from exc
        if offsets:
            call(
                "sending offsets",
                deadline,
                lambda: producer.send_offsets_to_transaction(offsets, group_metadata(), attempt_timeout(deadline)),
            )
        started = time.perf_counter()
        call("committing", deadline, lambda: producer.commit_transaction(attempt_timeout(deadline)))
        return time.perf_counter() - started, written

    def abort(self, producer) -> None:
        """Abort the open transaction; an abort that itself fails loses the producer."""
        deadline = time.monotonic() + self.transaction_timeout_ms / 1000
        try:
            self.calls.call("aborting", deadline, lambda: producer.abort_transaction(attempt_timeout(deadline)))
        except AbortBatch as failed:
            raise ProducerLost(f"the abort itself failed: {failed}") from failed


class _CallThread:
    """One daemon thread running calls in turn (a ThreadPoolExecutor's threads are joined when the interpreter exits:
    one stuck for good in an abandoned producer's call would keep the process from ever ending)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="transactional-calls", daemon=True).start()

    def submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self._calls.put((fn, future))
        return future

    def _run(self) -> None:
        while True:
            fn, future = self._calls.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, as an executor would
                future.set_exception(exc)


def _call_thread() -> _CallThread:
    return _CallThread()
