"""The backtest's engine side: a topic's records replayed through the detector's own StatefulDecider.

No second implementation of anything the detector decides with: the records are real confluent-kafka messages
read from the input topic (assign mode, read_committed, every partition from its beginning to the end taken
at start), decoded by the detector's decoders into the detector's prepared batches (`prepare_batch`), and
decided by its pure decide (`StatefulDecider.ready`, then `decide_prepared`), which computes the card
features, the terminal window's features, the rules, the model's score, and holds and releases records for
the terminal rule's look-ahead exactly as `fraudstream detect` does. What differs is only where its state
lives and what is done with the decisions:

- state: one KeyedTable per store per input partition, in memory (`MemoryState`, the TaskManager's
  interface the decider reads), built from the topic's history before the window (every record is decided,
  the report keeps the window's);
- terminal window: a TerminalWindow fed with every partition's records as they are read (`ReplayTerminal`,
  the TerminalReader's interface). A batch is decided once every partition has been read past its latest
  event time plus the tolerance, or to its end: the live detector's event-time gate. A held record is
  released once every partition has been read past its event time plus the look-ahead and the tolerance,
  or to its end;
- outputs: nothing is produced, no transaction, no changelog, and the deciders make no output bytes
  (`make_outputs` off: no FraudAlert encoded, released held records as arrays). Each record's decision (route,
  fired rules, score) is kept, by input position, for the report.

Several rule sets are decided over the same read (the candidate and the live rules): one decider each (their
held records differ), one terminal window for all (it holds input events only). What does not depend on the
rule set is computed once per batch and given to each decider: the decoding, the card features
(`SharedCardFeatures`), the terminal window's features and the model's scores (`SharedScores`).

What a replay cannot reproduce: the live detector's quiet-partition release (a held record released after
`terminal_hold_idle_ms` of wall-clock quiet, before the window reached its look-ahead) depends on when records
arrived; a replay reads the whole history at once, so it releases with the full look-ahead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, TopicPartition

from fraudstream.consumer.decide import ColumnarDecider, DecidedBatch, Decider, ReleasedRows, Route
from fraudstream.consumer.features import TxColumns, card_features_split
from fraudstream.consumer.inspect import StartOffset, plan_read
from fraudstream.consumer.model import Model
from fraudstream.consumer.rules import COMPROMISED_TERMINAL, TERMINAL_RULES, RuleSet
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import (
    STORES,
    DecodedBatch,
    PreparedBatch,
    StatefulDecider,
    decode_batch,
    prepare_batch,
)
from fraudstream.consumer.terminal import TERMINAL_TOLERANCE_MS, TerminalWindow, terminal_cards
from fraudstream.errors import KafkaUnavailable
from fraudstream.kafka import consumer_config
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.backtest")

READ_CHUNK = 20_000  # records per consume() and per decided batch (the detector's batch_max_records)
POLL_S = 0.5
# A history read from its beginning: larger fetches per partition, and more records kept fetched ahead (the
# default, 100,000 records a partition, halved the rate of a bare read of 300,000 records here: 150,000 against
# 300,000 a second; the local queue's byte bound, 64 MB by default, still holds).
HISTORY_FETCH = {"max.partition.fetch.bytes": 8 * 1024 * 1024, "queued.min.messages": 1_000_000}
EXPIRE_EVERY = 20  # batches between two expiries of the terminal window (it only frees memory)
BACKTEST_GROUP_ID = "fraudstream-backtest"  # never joined nor committed (assign() only)
_POS_SHIFT = 40  # position key: partition << 40 | offset, as the terminal window and held rows number records


def position_key(partition: int, offset: int) -> int:
    return (partition << _POS_SHIFT) | offset


class MemoryState:
    """The TaskManager's interface the decider reads (`tables`, `ready_tables`), in memory: one KeyedTable per
    store per input partition, made on first use."""

    def __init__(self) -> None:
        self._tables: dict[int, dict[str, KeyedTable]] = {}

    def tables(self, partition: int) -> dict[str, KeyedTable]:
        tables = self._tables.get(partition)
        if tables is None:
            tables = self._tables[partition] = {spec.name: KeyedTable(spec.dtype) for spec in STORES}
        return tables

    def ready_tables(self, store: str) -> dict[int, KeyedTable]:
        return {partition: tables[store] for partition, tables in self._tables.items()}

    def forget_changes(self) -> None:
        """Nothing goes to a changelog: drop what the tables keep for one (their tombstone lists grow otherwise)."""
        for tables in self._tables.values():
            for table in tables.values():
                table.take_removed()


@dataclass
class ReadProgress:
    """How far the replay has read each input partition: its latest event time, and whether it is at its end."""

    partitions: list[int]
    latest: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def past_everywhere(self, event_ms: np.ndarray) -> np.ndarray:
        """For each event time: whether every partition was read past it, or to its end (the gate's test)."""
        due = np.ones(len(event_ms), dtype=bool)
        for p in self.partitions:
            if p not in self.finished:
                due &= event_ms < self.latest.get(p, np.iinfo(np.int64).min)
        return due

    def floor(self) -> int | None:
        """No record still to read is earlier than this (records run out of order by at most the tolerance)."""
        open_ = [self.latest.get(p) for p in self.partitions if p not in self.finished]
        read = [t for t in open_ if t is not None]
        if not read or len(read) < len(open_):  # none open, or one not read yet
            return None
        return min(read) - TERMINAL_TOLERANCE_MS


class ReplayTerminal:
    """The TerminalReader's interface (`ready`, `features`, `releasable`, `cut_short`, `other_cards_held`, `keep_from`) over a
    TerminalWindow the replay feeds: the same window code and query, with the gate held by the replay loop. One
    serves every rule set: a batch's features are computed once and given to each."""

    def __init__(self, window: TerminalWindow, progress: ReadProgress) -> None:
        self.window = window
        self.progress = progress
        self.tolerance_ms = TERMINAL_TOLERANCE_MS
        # Set by each StatefulDecider, read by none: the replay expires the window from every decider's held records.
        self.keep_from: Callable[[], int | None] = lambda: None
        self._features = PerBatch()

    def ready(self, batch, *, oldest_held_ms: int | None, holding: bool, idle_ms: int) -> None:
        """Nothing to wait for: the replay loop decides a batch only once its gate holds."""

    def features(
        self, tx: TxColumns, partitions: np.ndarray, offsets: np.ndarray, created_ms: int | None = None
    ) -> dict[str, np.ndarray]:
        if not len(tx):
            return {"terminal_cards": np.zeros(0, np.int64)}
        return self._features.get(tx, lambda: terminal_cards(self.window, tx, partitions, offsets))

    def releasable(self, times: np.ndarray, created_ms: np.ndarray, ahead_ms: int, idle_ms: int) -> np.ndarray:
        return self.progress.past_everywhere(np.asarray(times, dtype=np.int64) + ahead_ms + self.tolerance_ms)

    def cut_short(self, times: np.ndarray, ahead_ms: int) -> list[str]:
        return [""] * len(times)  # a replay releases with the whole look-ahead, or at the history's end

    def other_cards_held(
        self, terminals: np.ndarray, cards: np.ndarray, times: np.ndarray, ahead_ms: int
    ) -> np.ndarray:
        return self.window.other_cards(terminals, cards, times, ahead_ms=ahead_ms)


@dataclass
class SideDecisions:
    """One rule set's decisions, by input position: route (Route values), score, and the rules that fired."""

    name: str
    rules: RuleSet
    route: list[np.ndarray] = field(default_factory=list)  # per batch, int8
    score: list[np.ndarray] = field(default_factory=list)  # per batch, float64
    fired: dict[int, tuple[str, ...]] = field(default_factory=dict)  # position key -> rules of a fraud decision
    released: list[ReleasedRows] = field(default_factory=list)  # held records decided later, by input position
    held: int = 0  # records held for the look-ahead (decided on release)
    held_then_alerted: int = 0  # of those, released as fraud (the terminal rule, counting cards up to the look-ahead)


@dataclass
class ReplayResult:
    """Every record read: its position, transaction id, card, event time; and each side's decisions."""

    topic: str
    position: np.ndarray  # uint64, position keys
    transaction_id: np.ndarray  # object (None: dead-lettered before it was read)
    card_id: np.ndarray  # object
    event_ms: np.ndarray  # int64 (-1: not decoded)
    sides: dict[str, dict[str, np.ndarray]]  # name -> {"route", "score"}
    fired: dict[str, dict[int, tuple[str, ...]]]  # name -> position key -> rules
    rule_sets: dict[str, RuleSet]
    held: dict[str, int]
    held_then_alerted: dict[str, int]
    read: int
    decide_s: float  # seconds spent deciding (reading and decoding excluded)
    read_s: float  # seconds of the whole replay
    decode_s: float = 0.0  # seconds spent decoding
    cpu_s: float = 0.0  # CPU seconds of this process over the whole replay (the machine may be shared)
    model_scored: int = 0  # batches the model scored, and those whose scores served another rule set
    model_shared: int = 0
    # Batches whose card and terminal features one rule set's decider computed, and those another one reused.
    features_computed: int = 0
    features_shared: int = 0


def history_consumer(settings: Settings) -> Consumer:
    """The consumer a replay reads the input topic's history with: assign mode, read_committed, never committing."""
    return Consumer(
        consumer_config(
            settings,
            BACKTEST_GROUP_ID,
            **{
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "enable.auto.commit": False,
                **HISTORY_FETCH,
            },
        )
    )


def build_decoders(settings: Settings) -> tuple[Decider, ColumnarDecider | None]:
    """The detector's decoders and encoders, as `detect` builds them (consumer/detector.py, Detector._start)."""
    registry = Registry(settings)
    schemas = load_schemas(settings.schemas_dir)
    ids = current_ids(settings, registry, schemas)
    decoder = Decoder(registry, schemas.expanded["Transaction"], reader_id=ids[settings.transactions_topic])
    record_wise = Decider(
        decoder,
        (),
        legit_schema_id=ids[settings.legit_topic],
        legit_schema=schemas.parsed["Transaction"],
        fraud_schema_id=ids[settings.fraud_topic],
        fraud_schema=schemas.parsed["FraudAlert"],
        reject_trailing_bytes=True,
    )
    columnar = (
        ColumnarDecider(record_wise, reader_schema=schemas.expanded["Transaction"])
        if settings.decoder == "columnar"
        else None
    )
    return record_wise, columnar


def _no_output(record: dict) -> bytes:
    """The deciders' fraud encoder: a replay makes no output (StatefulDecider.make_outputs is off)."""
    raise AssertionError("a replay encodes no alert")


class PerBatch:
    """A batch's result, computed for the first rule set's decider and given to the others: keyed by the prepared
    batch's columns (the same object for every decider of a batch), so a new batch computes anew."""

    def __init__(self) -> None:
        self.computed = self.shared = 0  # batches computed, and served again
        self._last: tuple[TxColumns, dict[str, np.ndarray]] | None = None

    def get(self, tx: TxColumns, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self._last is not None and self._last[0] is tx:
            self.shared += 1
            return self._last[1]
        result = compute()
        self.computed += 1
        self._last = (tx, result)
        return result


class SharedCardFeatures(PerBatch):
    """The deciders' card features. They do not depend on the rule set (a card's profile counts every payment,
    whatever was decided), so the first decider of a batch computes them, updating its card tables, and the
    others get the same arrays for the same batch (their own card tables stay empty, never read)."""

    def __call__(self, tables: Sequence[KeyedTable], which: np.ndarray, tx: TxColumns) -> dict[str, np.ndarray]:
        return self.get(tx, lambda: card_features_split(tables, which, tx))


def _events(batch: PreparedBatch, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per message of a prepared batch: transaction id, card id (UTF-8 bytes) and event time (-1: dead letter)."""
    transaction_id = np.full(n, None, dtype=object)
    card_key = np.full(n, None, dtype=object)
    event_ms = np.full(n, -1, dtype=np.int64)
    if batch.tx is not None:
        transaction_id[batch.positions] = batch.tx.transaction_id
        card_key[batch.positions] = batch.tx.card_key
        event_ms[batch.positions] = batch.tx.event_time_ms
    return transaction_id, card_key, event_ms


class SharedScores(Model):
    """The model as the replay's deciders share it. What it scores (card, terminal and label features) does not
    depend on the rule set, so every decider of a batch asks it the same matrix: the first one's scores serve
    the others, once the matrix is found equal (not assumed). It scores on every core: a replay has no
    producer to leave one for. (The Handbook's 1.79M transactions with two rule sets: the model was half of
    the deciding time, scored twice on one core.)"""

    def __init__(self, model: Model, *, threads: int) -> None:
        super().__init__(model.booster, model.meta)
        self.threads = threads
        self.scored = self.shared = 0  # matrices scored, and served again
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def score(self, matrix: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        last = self._last
        if last is not None and last[0].shape == matrix.shape and np.array_equal(last[0], matrix, equal_nan=True):
            self.shared += 1
            return last[1]
        scores = super().score(matrix, threads=threads or self.threads)
        self.scored += 1
        self._last = (matrix, scores)
        return scores


class Replay:
    """Read the input topic once and decide it with each rule set (`rule_sets`: name -> RuleSet)."""

    def __init__(
        self,
        settings: Settings,
        rule_sets: dict[str, RuleSet],
        *,
        model: Model | None = None,
        labels=None,
        on_log: Callable[[str], None] = log.info,
    ) -> None:
        self.settings = settings
        self.rule_sets = rule_sets
        self.model = SharedScores(model, threads=os.cpu_count() or 1) if model is not None else None
        self.labels = labels  # a started LabelsReader, for a model
        self.on_log = on_log

    def run(self) -> ReplayResult:
        s = self.settings
        record_wise, columnar = build_decoders(s)

        def decode(messages: Sequence) -> DecodedBatch:
            return decode_batch(columnar, record_wise, messages)

        consumer = history_consumer(s)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            plan = plan_read(consumer, s.transactions_topic, partition=None, start=StartOffset("earliest"), settings=s)
            progress = ReadProgress(sorted(plan.starts))
            progress.finished = {p for p in plan.starts if plan.starts[p] >= plan.ends[p]}
            window = TerminalWindow()
            shared_terminal = ReplayTerminal(window, progress)  # its answers do not depend on the rule set either
            card_features = SharedCardFeatures()
            deciders: dict[str, tuple[StatefulDecider, MemoryState, SideDecisions]] = {}
            for name, rules in self.rule_sets.items():
                state = MemoryState()
                # As `detect` does: a terminal window only for a rule set with a terminal rule (nothing held otherwise).
                terminal = (
                    shared_terminal
                    if any(kind in TERMINAL_RULES for kind in getattr(rules, "kinds", {}).values())
                    or any(n in TERMINAL_RULES for n in rules.names)
                    else None
                )
                decider = StatefulDecider(
                    decode,
                    rules,
                    state,
                    encode_legit=record_wise.encode_legit,
                    encode_fraud=_no_output,
                    model=self.model,
                    labels=self.labels,
                    terminal_features=terminal.features if terminal else None,
                    terminal=terminal,
                    hold_idle_ms=s.terminal_hold_idle_ms,
                    input_topic=s.transactions_topic,
                )
                decider.make_outputs = False  # nothing is produced: decisions without output bytes
                decider.card_features = card_features
                deciders[name] = (decider, state, SideDecisions(name, rules))
            positions: list[np.ndarray] = []
            info: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            # Batches read, not decided yet: (the prepared batch, its position keys, earliest and latest event time).
            pending: list[tuple[PreparedBatch, np.ndarray, int, int]] = []
            decide_s = decode_s = 0.0
            batches = 0
            read = 0

            def decide(prepared: PreparedBatch, keys: np.ndarray) -> None:
                """The detector's pure decide, each rule set on the same prepared batch."""
                nonlocal decide_s, batches
                t0 = time.perf_counter()
                for decider, _state, side in deciders.values():
                    decider.ready(prepared)
                    _collect(side, decider.decide_prepared(prepared), keys, self.model is not None)
                batches += 1
                if batches % EXPIRE_EVERY == 0:
                    self._expire(window, progress, pending, deciders)
                    for _, state, _ in deciders.values():
                        state.forget_changes()
                decide_s += time.perf_counter() - t0

            # Read and decoded here, between two decides: librdkafka fetches ahead on its own threads meanwhile
            # (a reader thread of ours was measured slower: the decoding and the deciding share one lock).
            chunks = read_chunks(consumer, s.transactions_topic, plan, progress.finished, decode)
            for prepared, keys, finished, seconds in chunks:
                progress.finished = finished
                decode_s += seconds
                if prepared is None:
                    continue
                read += len(keys)
                t0 = time.perf_counter()
                tx = prepared.tx
                if tx is not None:
                    window.add(
                        prepared.partition_of, prepared.offsets, tx.terminal_hash, tx.card_hash, tx.event_time_ms
                    )
                    for p in np.unique(prepared.partition_of).tolist():
                        latest = int(tx.event_time_ms[prepared.partition_of == p].max())
                        progress.latest[p] = max(progress.latest.get(p, latest), latest)
                positions.append(keys)
                info.append(_events(prepared, len(keys)))
                decide_s += time.perf_counter() - t0
                if tx is not None:
                    pending.append((prepared, keys, int(tx.event_time_ms.min()), int(tx.event_time_ms.max())))
                else:  # dead letters only: nothing for the gate to wait for
                    pending.append((prepared, keys, np.iinfo(np.int64).max, np.iinfo(np.int64).min))
                # The gate: a batch is decided once every partition was read past its latest event time plus
                # the tolerance, or to its end.
                while pending and progress.past_everywhere(np.array([pending[0][3] + TERMINAL_TOLERANCE_MS]))[0]:
                    decide(*pending.pop(0)[:2])
            progress.finished = set(progress.partitions)
            while pending:
                decide(*pending.pop(0)[:2])
            t0 = time.perf_counter()
            for decider, _, side in deciders.values():
                released = decider.release_due()  # the input has ended: every held record is due
                if released is not None:
                    _collect(side, released, np.zeros(0, np.uint64), self.model is not None)
            decide_s += time.perf_counter() - t0
        finally:
            consumer.close()
        position = np.concatenate(positions) if positions else np.zeros(0, np.uint64)
        sides, fired, held_counts, alerted = {}, {}, {}, {}
        for name, (_, _, side) in deciders.items():
            route = np.concatenate(side.route) if side.route else np.zeros(0, np.int8)
            score = np.concatenate(side.score) if side.score else np.zeros(0, np.float64)
            if side.released:
                order = np.argsort(position, kind="stable")
                keys = np.concatenate([rows.positions for rows in side.released])
                at = order[np.searchsorted(position[order], keys)]
                route[at] = np.where(np.concatenate([rows.fraud for rows in side.released]), Route.FRAUD, Route.LEGIT)
                score[at] = np.concatenate([rows.score for rows in side.released])
            sides[name] = {"route": route, "score": score}
            fired[name], held_counts[name], alerted[name] = side.fired, side.held, side.held_then_alerted

        def column(k: int) -> np.ndarray:
            return np.concatenate([i[k] for i in info]) if info else np.zeros(0, dtype=object)

        return ReplayResult(
            topic=s.transactions_topic,
            position=position,
            transaction_id=column(0),
            card_id=pa.array(column(1), pa.binary()).cast(pa.string()).to_numpy(zero_copy_only=False),
            event_ms=np.concatenate([i[2] for i in info]) if info else np.zeros(0, np.int64),
            sides=sides,
            fired=fired,
            rule_sets=dict(self.rule_sets),
            held=held_counts,
            held_then_alerted=alerted,
            read=read,
            decide_s=decide_s,
            decode_s=decode_s,
            read_s=time.perf_counter() - started,
            cpu_s=time.process_time() - cpu_started,
            model_scored=self.model.scored if self.model is not None else 0,
            model_shared=self.model.shared if self.model is not None else 0,
            features_computed=card_features.computed,
            features_shared=card_features.shared,
        )

    @staticmethod
    def _expire(window: TerminalWindow, progress: ReadProgress, pending: list, deciders: dict) -> None:
        """Drop the window's events no decision to come can read: before the earliest of the records still to
        read, the batches not decided yet and the held records, less the tolerance and the window."""
        floor = progress.floor()
        if floor is None:  # a partition not read yet: its records may be of any time
            return
        floors = [floor, *(earliest for _, _, earliest, _ in pending)]
        floors += [t for t in (decider.oldest_held() for decider, _, _ in deciders.values()) if t is not None]
        window.expire(min(floors) - TERMINAL_TOLERANCE_MS - window.window_ms)


def read_chunks(
    consumer: Consumer,
    topic: str,
    plan,
    finished: set[int],
    decode: Callable[[Sequence], DecodedBatch],
) -> Iterator[tuple[PreparedBatch | None, np.ndarray, set[int], float]]:
    """Read `plan` (each partition from its start to its end taken at start) in chunks of up to READ_CHUNK records:
    each as (the prepared batch, its records' position keys, the partitions read to their end so far, the seconds
    its decoding took); None for a read that brought no record."""
    remaining = {p for p in plan.starts if p not in finished}
    partitions = set(plan.starts)
    if remaining:
        consumer.assign([TopicPartition(topic, p, plan.starts[p]) for p in sorted(remaining)])
    end_of = np.zeros(max(plan.ends, default=0) + 1, dtype=np.int64)  # partition -> its end offset
    end_of[list(plan.ends)] = list(plan.ends.values())
    while remaining:
        messages = consumer.consume(READ_CHUNK, POLL_S)
        errors = [message.error() for message in messages]
        if any(error is not None for error in errors):  # an end of partition, or a failure
            for message, error in zip(messages, errors, strict=True):
                if error is None:
                    continue
                if error.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(message.partition())
                elif error.fatal() or error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise KafkaUnavailable(f"reading {topic}: {error.str()}")
            messages = [message for message, error in zip(messages, errors, strict=True) if error is None]
        if not messages:
            yield None, np.zeros(0, np.uint64), partitions - remaining, 0.0
            continue
        # Records on arrays, not one by one: this runs for every record of the history.
        parts = np.array([m.partition() for m in messages], dtype=np.int64)
        offsets = np.array([m.offset() for m in messages], dtype=np.int64)
        ends = end_of[parts]
        for p in np.unique(parts[offsets + 1 >= ends]).tolist():
            remaining.discard(p)  # its last record of the plan is here, or one past it
        before_end = offsets < ends
        if not before_end.all():
            keep = np.flatnonzero(before_end)
            messages = [messages[i] for i in keep.tolist()]
            parts, offsets = parts[keep], offsets[keep]
        keys = (parts.astype(np.uint64) << np.uint64(_POS_SHIFT)) | offsets.astype(np.uint64)
        started = time.perf_counter()
        prepared = prepare_batch(messages, decode(messages), with_offsets=True) if messages else None
        yield prepared, keys, partitions - remaining, time.perf_counter() - started


def _collect(side: SideDecisions, batch: DecidedBatch, positions: np.ndarray, scored: bool) -> None:
    """A decided batch's routes and scores by message index (`positions`: the messages' position keys); released
    records by their input position."""
    n = len(positions)
    if n:
        route = np.zeros(n, dtype=np.int8)  # forwarded as they came: legit
        if scored and batch.legit_scores is not None:
            score = np.array([float(v) if v else np.nan for v in batch.legit_scores])  # b"": fraud, set below
        else:
            score = np.zeros(n, dtype=np.float64)
        outputs = batch.outputs
        if outputs:  # fraud, dead letters, held, re-encoded legit: a minority, on arrays
            index = np.fromiter(outputs.keys(), dtype=np.int64, count=len(outputs))
            routes = np.fromiter((d.route for d in outputs.values()), dtype=np.int8, count=len(outputs))
            route[index] = routes
            for i in index[routes == Route.FRAUD].tolist():
                decision = outputs[i]
                side.fired[int(positions[i])] = decision.rules
                score[i] = decision.score
        side.route.append(route)
        side.score.append(score)
        side.held += batch.held
    for rows in batch.released_rows:  # the terminal rule routed them, with its look-ahead
        side.fired.update(dict.fromkeys(rows.positions[rows.fraud].tolist(), (COMPROMISED_TERMINAL,)))
        side.held_then_alerted += int(rows.fraud.sum())
        side.released.append(rows)
