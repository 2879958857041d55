"""The produce loop: the generator's pairs to Kafka as Confluent-framed Avro, paced in batches.

Transactions go to the input topic keyed by account id (an account's payments keep their order);
each one's Label goes to the labels topic keyed by transaction id. The schemas must already be
registered (a deliberate step): the loop only looks their ids up, once, then encodes with fastavro.
Event time is the wall clock, or with a speedup N a simulated clock that starts at the wall clock
and runs N times faster (`EventClock`): the rate stays in transactions per wall-clock second, so
episodes that last minutes of event time fit in seconds of a demo. Pacing never sleeps per
message: each wake-up sends every transaction that has fallen due since the start (so the average
rate holds), and waiting is done in producer.poll, which serves delivery reports meanwhile. Every
delivery failure is counted and reported.

With a simulation (the handbook profile) instead of the generator, event time is simulated: the
loop sends the simulation's transactions in event-time order, as fast as it can or at a set number
of simulated days per second, and labels can be delayed: each label is written only once the
simulated clock (the event time of the latest transaction sent) has passed its transaction's event
time plus the delay, as chargebacks arrive. When the simulation ends (or the run is stopped), the
clock runs on and every label still pending is written.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fraudstream.errors import ConfigError
from fraudstream.kafka import ensure_topics, produce_or_wait, producer_config, wait_for_cluster
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import BatchEncoder, make_encoder
from fraudstream.settings import Settings
from fraudstream.producer.generator import DEFAULT_LARGE_LEGIT_SHARE, GeneratedBatch, Generator, Pair, build_population
from fraudstream.producer.handbook import DAY_MS, HandbookSimulation, HandbookStream

Encoder = Callable[[dict[str, Any]], bytes]

DEFAULT_RATE = 1_000.0
DEFAULT_SEED = 42
DEFAULT_SPEEDUP = 1.0  # event time is the wall clock
MAX_BATCH = 1_000  # transactions generated per wake-up at most, so catching up stays smooth
UNTHROTTLED_BATCH = 500
WAKE_S = 0.005  # paced: wake up every ~5 ms, i.e. batches of rate/200 transactions (at least one)
MAX_WAIT_S = 0.05  # never wait longer in one call, so a stop request is seen promptly
LIVE_REFRESH_S = 0.25
PLAIN_REFRESH_S = 5.0
MAX_ERRORS_KEPT = 5
_MS = timedelta(milliseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class EventClock:
    """Event time in epoch milliseconds: the wall clock at start, then `speedup` times faster than it.

    Speedup 1 reads the wall clock itself (time.time), as before the simulated clock existed.
    """

    __slots__ = ("speedup", "start_ms", "started", "_monotonic")

    def __init__(
        self,
        speedup: float = DEFAULT_SPEEDUP,
        *,
        start_ms: int | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < speedup < float("inf"):  # also refuses NaN
            raise ConfigError(f"speedup must be a positive number, not {speedup}")
        self.speedup = speedup
        self.start_ms = time.time_ns() // 1_000_000 if start_ms is None else start_ms
        self._monotonic = monotonic
        self.started = monotonic()

    def now_ms(self) -> int:
        if self.speedup == 1.0:
            return time.time_ns() // 1_000_000
        return self.start_ms + int((self._monotonic() - self.started) * 1_000.0 * self.speedup)


@dataclass(frozen=True, slots=True)
class ProduceReport:
    """What a run sent and what the brokers acknowledged (acks=all), after the final flush."""

    sent: int
    delivered: int
    failed: int  # sent but not acknowledged: delivery errors, plus any still queued at the end
    elapsed_s: float  # the sending phase, without the final flush
    labels_sent: int = 0
    labels_delivered: int = 0
    labels_failed: int = 0
    flush_s: float = 0.0
    target_rate: float | None = None  # None: unthrottled
    stopped_early: bool = False  # a stop request (SIGINT/SIGTERM) or a fatal producer error ended the run
    errors: tuple[str, ...] = ()  # distinct delivery or producer errors, with counts

    @property
    def achieved_rate(self) -> float:
        """Transactions sent per second of the sending phase."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.labels_failed == 0

    def summary(self) -> str:
        target = f" (target {self.target_rate:,.0f}/s)" if self.target_rate else " (unthrottled)"
        labels = (
            (f"; labels: sent {self.labels_sent:,}, delivered {self.labels_delivered:,}, failed {self.labels_failed:,}")
            if self.labels_sent
            else ""
        )
        return (
            f"transactions: sent {self.sent:,}, delivered {self.delivered:,}, failed {self.failed:,}{labels}; "
            f"elapsed {self.elapsed_s:.1f}s (+{self.flush_s:.1f}s flush); "
            f"achieved {self.achieved_rate:,.0f} tx/s{target}" + ("; stopped early" if self.stopped_early else "")
        )


class _Deliveries:
    """Delivery-report callback for one topic: counts, keeps the first distinct errors, spots fatal ones."""

    __slots__ = ("delivered", "failed", "errors", "fatal")

    def __init__(self, errors: dict[str, int]) -> None:
        self.delivered = 0
        self.failed = 0
        self.errors = errors  # shared between topics: error text -> count
        self.fatal: str | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        _note(self.errors, f"{msg.topic()}: {err.str()}")
        if err.fatal():
            self.fatal = err.str()


def _note(errors: dict[str, int], text: str) -> None:
    if text in errors or len(errors) < MAX_ERRORS_KEPT:
        errors[text] = errors.get(text, 0) + 1


class _Progress:
    """Rate and totals: a live line on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, out: TextIO, target_rate: float | None) -> None:
        self.out = out
        self.live = out.isatty()
        self.every = LIVE_REFRESH_S if self.live else PLAIN_REFRESH_S
        self.target = f" / target {target_rate:,.0f}" if target_rate else ""
        self.started = self.last_at = self.next_at = 0.0
        self.last_sent = 0

    def begin(self, started: float) -> None:
        self.started = self.last_at = started
        self.next_at = started + self.every

    def update(self, now: float, sent: int, delivered: int, failed: int) -> None:
        if now < self.next_at:
            return
        recent = (sent - self.last_sent) / max(now - self.last_at, 1e-9)
        line = (
            f"{now - self.started:7.1f}s  sent {sent:>11,}  delivered {delivered:>11,}  failed {failed:,}  "
            f"{recent:>9,.0f} tx/s{self.target}"
        )
        if self.live:
            self.out.write(f"\r{line}\x1b[K")
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self.last_at, self.last_sent, self.next_at = now, sent, now + self.every

    def finish(self, now: float, sent: int, delivered: int, failed: int) -> None:
        """Leave the live line on its final figures; plain output needs nothing (the summary follows)."""
        if self.live:
            self.next_at = now
            self.update(now, sent, delivered, failed)
            self.out.write("\n")
            self.out.flush()


def produce(
    settings: Settings,
    *,
    rate: float | None = DEFAULT_RATE,
    count: int | None = None,
    duration: float | None = None,
    seed: int = DEFAULT_SEED,
    quiet: bool = True,
    stop: threading.Event | None = None,
    shares: Mapping[str, float] | None = None,
    large_legit_share: float = DEFAULT_LARGE_LEGIT_SHARE,
    accounts: int | None = None,
    labels: bool = True,
    progress_out: TextIO | None = None,
    cluster_timeout_s: float = 15.0,
    delivery_timeout_s: float = 30.0,
    speedup: float = DEFAULT_SPEEDUP,
    simulation: HandbookSimulation | None = None,
    label_delay_days: float = 0.0,
    days_per_second: float | None = None,
) -> ProduceReport:
    """Generate and send transactions (and their labels) until count, duration or a stop request.

    rate: transactions per wall-clock second, None or 0 for as fast as possible. speedup: event time runs
    this many times faster than the wall clock (see EventClock). Neither count nor duration:
    run until `stop` is set. Raises KafkaUnavailable, RegistryError or SchemaError before sending
    anything when the cluster or the registry is not usable.

    simulation: send this simulation's transactions (in event-time order, until it ends) instead of
    the generator's; rate, shares, accounts do not apply. days_per_second paces it in simulated time
    (None or 0: as fast as possible); label_delay_days holds each label back until the simulated
    clock passes its transaction's event time plus the delay (simulation only).
    """
    if rate is not None and rate < 0:
        raise ConfigError(f"rate must be positive (or 0 for unthrottled), not {rate}")
    if count is not None and count < 0:
        raise ConfigError(f"count must not be negative, not {count}")
    if duration is not None and duration <= 0:
        raise ConfigError(f"duration must be positive, not {duration}")
    EventClock(speedup)  # checks it before any network wait
    if label_delay_days < 0 or (label_delay_days and simulation is None):
        raise ConfigError(
            "a label delay needs a simulation (its clock is simulated) and must not be negative, "
            f"not {label_delay_days}"
        )
    if days_per_second is not None and days_per_second < 0:
        raise ConfigError(
            f"simulated days per second must be positive (or 0: as fast as possible), not {days_per_second}"
        )
    if simulation is not None:
        generator: Generator | HandbookStream = HandbookStream(simulation)
    else:
        # Build the generator first: bad shares are a usage error, reported before any network wait.
        population = build_population(seed, accounts=accounts) if accounts is not None else None
        generator = Generator(seed, shares=shares, large_legit_share=large_legit_share, population=population)

    wait_for_cluster(settings, timeout_s=cluster_timeout_s)
    schemas = load_schemas(settings.schemas_dir)
    schema_ids = current_ids(settings, Registry(settings), schemas)  # SchemaError when not registered
    topics = (settings.transactions_topic, settings.labels_topic) if labels else (settings.transactions_topic,)
    ensure_topics(settings, topics)
    encode_transaction = make_encoder(schema_ids[settings.transactions_topic], schemas.parsed["Transaction"])
    encode_label = make_encoder(schema_ids[settings.labels_topic], schemas.parsed["Label"])

    # The generator's batches are encoded whole (in Rust); the handbook simulation's record by record.
    batch_encoders = (
        None
        if simulation is not None
        else (
            BatchEncoder(schema_ids[settings.transactions_topic], schemas.expanded["Transaction"]),
            BatchEncoder(schema_ids[settings.labels_topic], schemas.expanded["Label"]),
        )
    )
    producer = Producer(
        producer_config(
            settings,
            **{
                "client.id": "fraudstream-producer",
                # Fail undeliverable records within a bounded time rather than librdkafka's 5 minutes.
                "delivery.timeout.ms": int(delivery_timeout_s * 1000),
            },
        )
    )
    paced = None if simulation is not None else rate or None
    return _Run(
        producer,
        generator,
        settings,
        encode_transaction,
        encode_label,
        labels=labels,
        rate=paced,
        count=count,
        duration=duration,
        stop=stop or threading.Event(),
        progress=None if quiet else _Progress(progress_out or sys.stdout, paced),
        flush_timeout_s=delivery_timeout_s + 5.0,
        speedup=speedup,
        label_delay_ms=round(label_delay_days * DAY_MS),
        days_per_second=days_per_second or None,
        batch_encoders=batch_encoders,
    ).run()


class _Run:
    """One run's mutable state; produce() is its only user."""

    def __init__(
        self,
        producer: Producer,
        generator: Generator | HandbookStream,
        settings: Settings,
        encode_transaction: Encoder,
        encode_label: Encoder,
        *,
        labels: bool,
        rate: float | None,
        count: int | None,
        duration: float | None,
        stop: threading.Event,
        progress: _Progress | None,
        flush_timeout_s: float,
        speedup: float = DEFAULT_SPEEDUP,
        label_delay_ms: int = 0,
        days_per_second: float | None = None,
        batch_encoders: tuple[BatchEncoder, BatchEncoder] | None = None,
    ) -> None:
        self.producer = producer
        self.generator = generator
        self.transactions_topic = settings.transactions_topic
        self.labels_topic = settings.labels_topic
        self.encode_transaction = encode_transaction
        self.encode_label = encode_label
        self.labels = labels
        self.rate = rate
        self.count = count
        self.duration = duration
        self.stop = stop
        self.progress = progress
        self.flush_timeout_s = flush_timeout_s
        self.clock = EventClock(speedup)
        self.errors: dict[str, int] = {}
        self.on_transaction = _Deliveries(self.errors)
        self.on_label = _Deliveries(self.errors)
        self.sent = 0
        self.labels_sent = 0
        self.producer_fatal: str | None = None
        self.label_delay_ms = label_delay_ms
        self.days_per_second = days_per_second
        # Labels held back until the simulated clock passes their due time: (due_ms, value, key), in
        # due order since transactions are sent in event-time order.
        self.pending_labels: deque[tuple[int, bytes, str]] = deque()
        self.clock_ms = 0  # the simulated clock: the event time of the latest transaction sent
        # (transactions, labels): whole generated batches encoded at once, with no object per record
        self.batch_encoders = batch_encoders

    def run(self) -> ProduceReport:
        started = time.monotonic()
        if self.progress:
            self.progress.begin(started)
        if isinstance(self.generator, HandbookStream):
            stopped_early = self._send_simulation(started, self.generator)
            if not self._fatal():
                self._release_labels(None)  # the clock runs on past the last transaction: every label falls due
        else:
            stopped_early = self._send_until_done(started, self.generator)
        elapsed = time.monotonic() - started
        if self.progress:
            self.progress.finish(time.monotonic(), self.sent, self.on_transaction.delivered, self.on_transaction.failed)
        flush_started = time.monotonic()
        self._flush()
        flush_s = time.monotonic() - flush_started
        still_queued = len(self.producer)
        if still_queued:
            _note(self.errors, f"{still_queued:,} records still queued {self.flush_timeout_s:.0f}s after the end")
        return ProduceReport(
            sent=self.sent,
            delivered=self.on_transaction.delivered,
            failed=self.sent - self.on_transaction.delivered,
            elapsed_s=elapsed,
            labels_sent=self.labels_sent,
            labels_delivered=self.on_label.delivered,
            labels_failed=self.labels_sent - self.on_label.delivered,
            flush_s=flush_s,
            target_rate=self.rate,
            stopped_early=stopped_early,
            errors=tuple(f"{text} (x{n:,})" if n > 1 else text for text, n in self.errors.items()),
        )

    def _fatal(self) -> str | None:
        return self.producer_fatal or self.on_transaction.fatal or self.on_label.fatal

    def _send_until_done(self, started: float, generator: Generator) -> bool:
        """Send until count or duration is reached (False) or a stop request or fatal error ends it (True)."""
        producer, stop, progress, rate = self.producer, self.stop, self.progress, self.rate
        limit = self.count if self.count is not None else sys.maxsize  # no count: never reached
        deadline = started + self.duration if self.duration is not None else float("inf")
        batch_cap = max(1, min(MAX_BATCH, int(rate * WAKE_S))) if rate else UNTHROTTLED_BATCH
        monotonic = time.monotonic
        while self.sent < limit:
            if stop.is_set() or self._fatal():
                return True
            now = monotonic()
            if rate:
                # By time t, (t - started) * rate transactions are owed: each wake-up sends all that are
                # owed, so lateness is made up by the next batch and the average rate holds.
                owed = min(int((min(now, deadline) - started) * rate) - self.sent, limit - self.sent)
                if now >= deadline and owed <= 0:
                    return False
                if owed < batch_cap and now < deadline and self.sent + owed < limit:
                    batch_owed_at = min(started + (self.sent + batch_cap) / rate, deadline)
                    producer.poll(min(max(batch_owed_at - now, 0.0), MAX_WAIT_S))  # waits, serving delivery reports
                    continue
                wanted = min(owed, MAX_BATCH)
            else:
                if now >= deadline:
                    return False
                wanted = min(UNTHROTTLED_BATCH, limit - self.sent)
            if self.batch_encoders is not None and not self.label_delay_ms:
                if not self._send_columns(generator.next_columns(wanted, self.clock.now_ms()), self.batch_encoders):
                    return True
            elif not self._send(generator.next_batch(wanted, self.clock.now_ms())):
                return True
            producer.poll(0)
            if progress:
                progress.update(monotonic(), self.sent, self.on_transaction.delivered, self.on_transaction.failed)
        return False

    def _send_simulation(self, started: float, stream: HandbookStream) -> bool:
        """Send the simulation in event-time order until it ends (False) or a stop or fatal error (True).

        Paced in simulated time when days_per_second is set: by wall time w after the start, every
        transaction up to the simulation's start + w * days_per_second days is owed.
        """
        producer, stop, progress, pace = self.producer, self.stop, self.progress, self.days_per_second
        limit = self.count if self.count is not None else float("inf")
        deadline = started + self.duration if self.duration is not None else float("inf")
        sim_start_ms = stream.simulation.start_ms
        while self.sent < limit and not stream.exhausted:
            if stop.is_set() or self._fatal():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            wanted = min(UNTHROTTLED_BATCH, limit - self.sent)
            if pace:
                owed = stream.due(sim_start_ms + (now - started) * pace * DAY_MS)
                if owed <= 0:
                    next_due_s = ((stream.next_time_ms() or sim_start_ms) - sim_start_ms) / (pace * DAY_MS)
                    producer.poll(min(max(started + next_due_s - now, 0.0), MAX_WAIT_S))
                    continue
                wanted = min(wanted, owed)
            if not self._send(stream.next_batch(int(wanted))):
                return True
            if not self._release_labels(self.clock_ms):
                return True
            producer.poll(0)
            if progress:
                progress.update(time.monotonic(), self.sent, self.on_transaction.delivered, self.on_transaction.failed)
        return False

    def _release_labels(self, clock_ms: int | None) -> bool:
        """Write the held-back labels due by clock_ms (None: all of them); False if a fatal error interrupted."""
        pending = self.pending_labels
        while pending and (clock_ms is None or pending[0][0] <= clock_ms):
            _, value, key = pending.popleft()
            if not self._send_label(value, key):
                return False
        return True

    def _send_label(self, value: bytes, key: str) -> bool:
        try:
            self.producer.produce(self.labels_topic, value, key, on_delivery=self.on_label)
        except BufferError:
            # Not stoppable: a sent transaction always gets its label (bounded by delivery.timeout.ms).
            if not self._retry(self.labels_topic, value, key, self.on_label, stoppable=False):
                return False
        except KafkaException as exc:
            return self._producer_error(exc)
        self.labels_sent += 1
        return True

    def _send(self, batch: list[Pair]) -> bool:
        """Send a batch of pairs; False when a stop request or a fatal error interrupted it."""
        produce = self.producer.produce
        encode_transaction, encode_label = self.encode_transaction, self.encode_label
        transactions_topic, labels_topic = self.transactions_topic, self.labels_topic
        on_transaction, on_label, labels = self.on_transaction, self.on_label, self.labels
        for transaction, label in batch:
            value = encode_transaction(transaction.to_dict())
            try:
                produce(transactions_topic, value, transaction.account_id, on_delivery=on_transaction)
            except BufferError:
                # The local queue is full: wait for deliveries, unless asked to stop.
                if not self._retry(transactions_topic, value, transaction.account_id, on_transaction, stoppable=True):
                    return False
            except KafkaException as exc:
                return self._producer_error(exc)
            self.sent += 1
            if self.label_delay_ms:
                event_ms = (transaction.event_time - _EPOCH) // _MS
                self.clock_ms = max(self.clock_ms, event_ms)
                if labels:
                    self.pending_labels.append(
                        (event_ms + self.label_delay_ms, encode_label(label.to_dict()), label.transaction_id)
                    )
                continue
            if labels:
                value = encode_label(label.to_dict())
                try:
                    produce(labels_topic, value, label.transaction_id, on_delivery=on_label)
                except BufferError:
                    # Not stoppable: a sent transaction always gets its label (bounded by delivery.timeout.ms).
                    if not self._retry(labels_topic, value, label.transaction_id, on_label, stoppable=False):
                        return False
                except KafkaException as exc:
                    return self._producer_error(exc)
                self.labels_sent += 1
        return True

    def _send_columns(self, batch: GeneratedBatch, encoders: tuple[BatchEncoder, BatchEncoder]) -> bool:
        """Send a generated batch encoded whole: the same records and bytes as _send would send, without
        an object per record; False when a stop request or a fatal error interrupted it."""
        encode_transactions, encode_labels = encoders
        transactions = batch.transactions(encode_transactions.arrow_schema)
        values = encode_transactions(transactions)
        keys = transactions.column("account_id").to_pylist()
        if self.labels:
            label_values = encode_labels(batch.labels(encode_labels.arrow_schema))
            label_keys = transactions.column("transaction_id").to_pylist()
        produce = self.producer.produce
        transactions_topic, labels_topic = self.transactions_topic, self.labels_topic
        on_transaction, on_label, labels = self.on_transaction, self.on_label, self.labels
        for index, value in enumerate(values):
            key = keys[index]
            try:
                produce(transactions_topic, value, key, on_delivery=on_transaction)
            except BufferError:
                # The local queue is full: wait for deliveries, unless asked to stop.
                if not self._retry(transactions_topic, value, key, on_transaction, stoppable=True):
                    return False
            except KafkaException as exc:
                return self._producer_error(exc)
            self.sent += 1
            if labels:
                value, key = label_values[index], label_keys[index]
                try:
                    produce(labels_topic, value, key, on_delivery=on_label)
                except BufferError:
                    # Not stoppable: a sent transaction always gets its label (bounded by delivery.timeout.ms).
                    if not self._retry(labels_topic, value, key, on_label, stoppable=False):
                        return False
                except KafkaException as exc:
                    return self._producer_error(exc)
                self.labels_sent += 1
        return True

    def _retry(self, topic: str, value: bytes, key: str, on_delivery: _Deliveries, *, stoppable: bool) -> bool:
        """The local queue was full: wait for deliveries and produce again; False if stopped or failed."""
        try:
            return produce_or_wait(
                self.producer,
                topic,
                value,
                key,
                wait_s=MAX_WAIT_S,
                on_delivery=on_delivery,
                give_up=lambda: bool((stoppable and self.stop.is_set()) or self._fatal()),
            )
        except KafkaException as exc:
            return self._producer_error(exc)

    def _producer_error(self, exc: KafkaException) -> bool:
        error = exc.args[0]
        text = error.str() if isinstance(error, KafkaError) else str(error)
        _note(self.errors, f"producer error: {text}")
        self.producer_fatal = text
        return False

    def _flush(self) -> None:
        """Wait for what was sent, in short steps so that a second Ctrl-C can still interrupt."""
        deadline = time.monotonic() + self.flush_timeout_s
        while len(self.producer) and time.monotonic() < deadline:
            self.producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
