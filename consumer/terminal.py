"""Per-terminal state that every detector holds whole: the compromised-terminal rule's window.

The input is keyed by account, and a terminal takes cards of every account, so no input partition holds a
terminal's history. Rather than re-keying the stream through an internal topic (a second transactional hop:
twice the latency, and a throughput cost), every detector reads every input partition with a reader of its
own, outside the consumer group (assign mode, read_committed), and keeps the last minutes of
(terminal, card, event time) events: a small table (the window is minutes of event time).

Two parts:

- `TerminalWindow` (pure, no Kafka): the events as a SET keyed by (partition, offset), so re-reading a
  record (a rewind, a reseed, an aborted batch read again) changes nothing and the order in which
  partitions are read does not matter. Its query, `other_cards`, counts for each transaction the distinct
  other cards its terminal took with event time in [t - window, t]; equal times count whatever their
  partition or offset (the tie-break: simultaneous is "before"). Arrays only: the events are kept sorted by
  (terminal, event time) and each batch's queries are two `searchsorted` calls and one `unique`.
- `TerminalReader` (Kafka): feeds the window, and holds the event-time gate that makes the query a
  function of the input alone. Before a batch whose latest event time is T is decided, every input
  partition must have been read past event time T + tolerance (records within a partition may be out of
  order by at most the tolerance), or to its end (read_committed), and each of the batch's own partitions
  past the batch's last offset. A partition that stays behind for long is logged and counted, and after
  the broker outage limit it ends the detector with one line: never a silent wrong answer.

On start (and whenever a batch reaches further back in event time than the window still holds, e.g. after a
rebalance hands over a lagging partition) the reader seeds the window from before the group's committed
offsets: a number of records back per partition, multiplied until every partition's history reaches the
window's start (or the partition's beginning). Events older than the oldest decision's window (minus the
tolerance) expire, so memory is bounded by the window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from fraudstream.consumer.features import MINUTE_MS, TERMINAL_WINDOW_MS, TxColumns, hash_strings
from fraudstream.consumer.global_reader import GlobalReader, StopRequested
from fraudstream.errors import KafkaUnavailable, RegistryError
from fraudstream.kafka import admin, consumer_config, refresh_metadata
from fraudstream.settings import Settings

if TYPE_CHECKING:
    from fraudstream.consumer.stateful import DecodedBatch

log = logging.getLogger("fraudstream.terminal")

# How far a record may be behind the latest event time of its partition (out of order) and still be seen
# by every decision that its window covers. Also the expiry's margin.
TERMINAL_TOLERANCE_MS = MINUTE_MS
# The query looks at most this many of a terminal's latest events back (all of those at the boundary's event
# time included, so the answer depends on the set of events only): the rule needs a few other cards, and a
# busy terminal's hundreds of events in a window would cost a sort each.
RECENT_EVENTS = 16
# Records per read: each read is decoded and added to the window at once, so fewer, larger reads cost less
# per record (the window's insert copies its arrays once per read).
READ_CHUNK = 10_000
SEED_RECORDS = 2_000  # records read back per partition at the first try of a seed (then x4 until enough)
GATE_LOG_EVERY_S = 5.0
END_QUERY_TIMEOUT_S = 5.0  # one ask of a partition's end; unanswered, the gate asks again
# The group coordinator (which answers for committed offsets) starting, loading or moving: waited for, like
# every other broker outage (librdkafka does not mark these retriable).
METADATA_REFRESH_EVERY_S = 2.0  # while the gate waits: how often the input's leaders are asked again
EXPIRE_EVERY_S = 10.0  # expiry only frees memory: how often it asks for the committed offsets  # a partition holding the gate up is logged this often
_POS_SHIFT = 40  # position key: partition << 40 | offset (offsets up to 10^12)
_REL_MAX = 2**32 - 1  # event times in the sort key: ms from the window's base, 32 bits (49 days)
# Queries looking at up to this many events count their distinct cards in a padded matrix, one row each
# (a sort of a few dozen per row); longer ones (many events at one time) in one sort of all their pairs.
_ROW_CAP = 64


def position_keys(partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return (np.asarray(partitions, dtype=np.uint64) << np.uint64(_POS_SHIFT)) | np.asarray(offsets, dtype=np.uint64)


class TerminalWindow:
    """(partition, offset) -> (terminal hash, card hash, event time), kept sorted by (terminal, event time)."""

    def __init__(self, window_ms: int = TERMINAL_WINDOW_MS, recent: int = RECENT_EVENTS) -> None:
        self.window_ms = window_ms
        self.recent = recent
        self.clear()

    def clear(self) -> None:
        self._key = np.empty(0, np.uint64)  # terminal << 32 | (t - base): the sort and search key
        self._t = np.empty(0, np.int64)
        self._card = np.empty(0, np.uint32)
        self._pos = np.empty(0, np.uint64)
        self._seen = np.empty(0, np.uint64)  # sorted position keys held
        self._base: int | None = None
        self.expired_before: int | None = None  # events older than this may have been dropped

    def __len__(self) -> int:
        return len(self._t)

    def add(
        self, partitions: np.ndarray, offsets: np.ndarray, terminals: np.ndarray, cards: np.ndarray, times: np.ndarray
    ) -> int:
        """Insert events (any order, duplicates allowed); returns how many were new."""
        pos = position_keys(partitions, offsets)
        pos, first = np.unique(pos, return_index=True)  # duplicates within the call
        if len(self._seen):
            at = np.searchsorted(self._seen, pos)
            held = (at < len(self._seen)) & (self._seen[np.minimum(at, len(self._seen) - 1)] == pos)
            pos, first = pos[~held], first[~held]
        if not len(pos):
            return 0
        t = np.asarray(times, dtype=np.int64)[first]
        terminals = np.asarray(terminals, dtype=np.uint32)[first]
        cards = np.asarray(cards, dtype=np.uint32)[first]
        if self._base is None or t.min() < self._base or t.max() - self._base > _REL_MAX:
            self._rebase(int(min(t.min(), self._t.min() if len(self._t) else t.min())))
        key = self._keys(terminals, t)
        order = np.argsort(key, kind="stable")
        key, t, cards, pos_sorted = key[order], t[order], cards[order], pos[order]
        at = np.searchsorted(self._key, key, side="right")
        self._key = np.insert(self._key, at, key)
        self._t = np.insert(self._t, at, t)
        self._card = np.insert(self._card, at, cards)
        self._pos = np.insert(self._pos, at, pos_sorted)
        self._seen = np.insert(self._seen, np.searchsorted(self._seen, pos), pos)
        return len(pos)

    def _rebase(self, lowest: int) -> None:
        """A new base for the 32-bit time part of the key (rare: the window spans minutes)."""
        self._base = lowest - (1 << 30)  # room below for late records
        if len(self._t):
            terminals = (self._key >> np.uint64(32)).astype(np.uint32)
            self._key = self._keys(terminals, self._t)
            order = np.argsort(self._key, kind="stable")
            self._key, self._t, self._card, self._pos = (
                self._key[order],
                self._t[order],
                self._card[order],
                self._pos[order],
            )

    def _keys(self, terminals: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self._base is None:  # set by the first add (_rebase), before any key is made
            raise RuntimeError("the terminal window has no base time: nothing was added to it")
        rel = np.clip(np.asarray(t, dtype=np.int64) - self._base, 0, _REL_MAX).astype(np.uint64)
        return (np.asarray(terminals, dtype=np.uint64) << np.uint64(32)) | rel

    def other_cards(
        self, terminals: np.ndarray, cards: np.ndarray, times: np.ndarray, *, ahead_ms: int = 0
    ) -> np.ndarray:
        """Per query: distinct cards other than its own at its terminal with event time in [t - window, t + ahead],
        among the terminal's `recent` latest events up to t + ahead (and all those at the same time as the last
        of them). The detector asks with ahead 0; a look-ahead is measured offline (consumer/quality.py)."""
        n = len(times)
        out = np.zeros(n, dtype=np.int64)
        if not n or not len(self._t):
            return out
        times = np.asarray(times, dtype=np.int64)
        if times.max() - self._base > _REL_MAX:  # a query beyond the key's range: widen it first
            self._rebase(int(self._t.min()))
        upper = times + ahead_ms
        lo = np.searchsorted(self._key, self._keys(terminals, times - self.window_ms), side="left")
        hi = np.searchsorted(self._key, self._keys(terminals, upper), side="right")
        busy = np.flatnonzero(hi - lo > self.recent)
        if len(busy):  # back to the `recent`-th latest event's time, every event at that time included
            boundary = self._key[hi[busy] - self.recent]
            lo[busy] = np.maximum(lo[busy], np.searchsorted(self._key, boundary, side="left"))
        lengths = hi - lo
        cards = np.asarray(cards, dtype=np.uint32)
        short = lengths <= _ROW_CAP
        out[short] = self._distinct_others(lo[short], lengths[short], cards[short], times[short], upper[short])
        long_rows = np.flatnonzero(~short)
        if len(long_rows):  # rare: hundreds of events at one terminal at one time
            out[long_rows] = self._distinct_others_sorted(
                lo[long_rows], lengths[long_rows], cards[long_rows], times[long_rows], upper[long_rows]
            )
        return out

    def _distinct_others(
        self, lo: np.ndarray, lengths: np.ndarray, cards: np.ndarray, times: np.ndarray, upper: np.ndarray
    ) -> np.ndarray:
        """Distinct counted cards per query, for queries of at most _ROW_CAP events: one small sort per row
        (a (queries, longest) matrix), never one sort of the whole batch's (query, card) pairs."""
        if not len(lo) or not lengths.max():
            return np.zeros(len(lo), dtype=np.int64)
        column = np.arange(int(lengths.max()))
        event = np.minimum(lo[:, None] + column, len(self._t) - 1)
        et, found = self._t[event], self._card[event]
        # Counted: within the query's events, another card, in [t - window, upper] (exact times again: keys
        # beyond the 32-bit range from the base are clamped together).
        counts = (
            (column < lengths[:, None])
            & (found != cards[:, None])
            & (et >= (times - self.window_ms)[:, None])
            & (et <= upper[:, None])
        )
        row = np.sort(np.where(counts, found.astype(np.int64), -1), axis=1)  # not counted: -1, sorted first
        new = row >= 0
        new[:, 1:] &= row[:, 1:] != row[:, :-1]
        return new.sum(axis=1)

    def _distinct_others_sorted(
        self, lo: np.ndarray, lengths: np.ndarray, cards: np.ndarray, times: np.ndarray, upper: np.ndarray
    ) -> np.ndarray:
        """The same count for long queries: the (query, card) pairs of all of them, made unique at once."""
        n = len(lo)
        total = int(lengths.sum())
        if not total:
            return np.zeros(n, dtype=np.int64)
        query = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        event = np.arange(total) - np.repeat(starts, lengths) + np.repeat(lo, lengths)
        et = self._t[event]
        other = (self._card[event] != cards[query]) & (et >= times[query] - self.window_ms) & (et <= upper[query])
        pairs = np.unique(
            (query[other].astype(np.uint64) << np.uint64(32)) | self._card[event[other]].astype(np.uint64)
        )
        return np.bincount((pairs >> np.uint64(32)).astype(np.int64), minlength=n).astype(np.int64)

    def expire(self, older_than: int) -> int:
        """Drop events with event time before `older_than`; returns how many."""
        if self.expired_before is None or older_than > self.expired_before:
            self.expired_before = older_than
        keep = self._t >= older_than
        dropped = len(keep) - int(keep.sum())
        if dropped:
            self._key, self._t, self._card, self._pos = (
                self._key[keep],
                self._t[keep],
                self._card[keep],
                self._pos[keep],
            )
            self._seen = np.sort(self._pos)
        return dropped


def terminal_cards(
    window: TerminalWindow, tx: TxColumns, partitions: np.ndarray, offsets: np.ndarray
) -> dict[str, np.ndarray]:
    """TERMINAL_FEATURES of a batch from a window that holds (at least) the batch's own records (the
    TerminalReader's answer; consumer/quality.py adds to and asks its window the same way)."""
    window.add(partitions, offsets, tx.terminal_hash, tx.card_hash, tx.event_time_ms)
    return {"terminal_cards": window.other_cards(tx.terminal_hash, tx.card_hash, tx.event_time_ms)}


@dataclass
class GateStats:
    """What the gate cost: polls of the reader, time waited, partitions that held it up."""

    waits: int = 0
    waited_s: float = 0.0
    stalled: dict[int, float] = field(default_factory=dict)  # partition -> when it started holding the gate (monotonic)
    reseeds: int = 0
    events_read: int = 0


class TerminalReader(GlobalReader):
    """Reads every input partition into a TerminalWindow (a global reader: consumer/global_reader.py). `ready`
    does the reading and waiting before a batch is decided (the event-time gate, reseeds, the ends of quiet
    partitions); the answers decide asks for (`features`, `releasable`, `cut_short`, `other_cards_held`) come
    from the window alone."""

    name = "terminal reader"

    def __init__(
        self,
        settings: Settings,
        decode: Callable[[Sequence], DecodedBatch],
        *,
        window: TerminalWindow | None = None,
        tolerance_ms: int = TERMINAL_TOLERANCE_MS,
        stop: Callable[[], bool] = lambda: False,
        on_log: Callable[[str], None] = log.info,
        on_gate: Callable[[GateStats], None] = lambda stats: None,
    ) -> None:
        super().__init__(settings, stop=stop)
        self.decode = decode  # messages -> stateful.DecodedBatch, the detector's own decoders
        self.window = window or TerminalWindow()
        self.tolerance_ms = tolerance_ms
        self.on_log = on_log
        self.stats = GateStats()
        self.on_gate = on_gate  # the gate's stats, each time they change (the detector's metrics)
        self.consumer: Consumer | None = None
        # asks the partitions' ends (list_offsets: asynchronous, never blocks the gate)
        self.admin: AdminClient | None = None
        self.partitions: list[int] = []
        self._latest: dict[int, int] = {}  # partition -> latest event time read
        self._next: dict[int, int] = {}  # partition -> next offset to ingest (after the last record read)
        # partition -> [(next offset, latest event time up to it)], one mark per chunk read: how far the
        # group's committed offsets are in event time, for expiry.
        self._marks: dict[int, list[tuple[int, int]]] = {}
        self._last_expiry = 0.0
        # For held records (consumer/held.py): partition -> Kafka timestamp of the newest record read; the
        # pending ask of its end (sent at, answer); the latest time it was found quiet (at its end, nothing
        # created for the hold idle time before).
        self._created: dict[int, int] = {}
        self._end_asks: dict[int, tuple[float, Future]] = {}
        self._quiet: dict[int, float] = {}
        self.holds_from: int | None = None  # the window holds every event from this event time on (None: all)
        self.keep_from: Callable[[], int | None] = lambda: None  # the oldest held record's event time

    # ----- start and seed -----
    def start(self) -> None:
        s = self.settings
        # The group's own id, never joined (assign mode, no commits): committed() answers for the group.
        consumer = self.consumer = Consumer(
            consumer_config(
                s, s.group_id, **{"auto.offset.reset": "earliest", "client.id": f"{s.group_id}.terminal-reader"}
            )
        )
        self.admin = admin(s)
        metadata = self.call(
            "reading the input topic's partitions", lambda: consumer.list_topics(s.transactions_topic, timeout=10)
        )
        topic = metadata.topics.get(s.transactions_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise KafkaUnavailable(f"input topic {s.transactions_topic} has no partitions the terminal reader can read")
        self.partitions = sorted(topic.partitions)
        self.seed()

    def seed(self, back_to: int | None = None) -> None:
        """Empty the window and read it again from before the group's committed offsets, and at least a window
        before event time `back_to` (held records older than the committed offsets' horizon)."""
        s, consumer = self.settings, self._client()
        started = time.monotonic()
        self.window.clear()
        self._latest.clear()
        self._next.clear()
        self._marks.clear()
        self._quiet.clear()
        self._end_asks.clear()
        tps = [TopicPartition(s.transactions_topic, p) for p in self.partitions]
        committed = self.call("reading the committed offsets", lambda: consumer.committed(tps, timeout=10))
        low, high = {}, {}
        for tp in tps:
            low[tp.partition], high[tp.partition] = self.call(
                "reading the input's offsets",
                partial(consumer.get_watermark_offsets, tp, timeout=10),
                topic=s.transactions_topic,
            )
        # Logical offsets (no commit yet) mean the partition's beginning; never computed with.
        target = {tp.partition: (tp.offset if tp.offset >= 0 else low[tp.partition]) for tp in committed}
        back = {p: SEED_RECORDS for p in self.partitions}
        before: dict[int, int] = {}  # partition -> latest event time read before its committed offset
        while True:
            start = {p: max(low[p], target[p] - back[p]) for p in self.partitions}
            first_t = self._read_ranges(start, target, before)
            # The earliest decision to come is no earlier than the latest event read before the committed
            # offsets, minus the tolerance: every partition's history must reach back a window before that.
            # Only records before the committed offsets count: a read also returns records after them, whose
            # later event times would move the horizon forward and cut the history short.
            latest = [before[p] for p in self.partitions if p in before]
            if not latest:
                break
            horizon = min(latest) - self.window.window_ms - 2 * self.tolerance_ms
            if back_to is not None:
                horizon = min(horizon, back_to - self.window.window_ms - 2 * self.tolerance_ms)
            short = [
                p for p in self.partitions if start[p] > low[p] and (first_t.get(p) is None or first_t[p] > horizon)
            ]
            if not short:
                break
            for p in short:
                back[p] *= 4
        cut = [first_t[p] for p in self.partitions if start[p] > low[p] and p in first_t]
        self.holds_from = max(cut) if cut else None
        for p in self.partitions:  # where reading goes on (a partition with nothing read: its committed offset)
            self._next.setdefault(p, target[p])
        consumer.assign([TopicPartition(s.transactions_topic, p, self._next[p]) for p in self.partitions])
        self.on_log(
            f"terminal window seeded in {time.monotonic() - started:.1f} s: {len(self.window):,} events from "
            f"{len(self.partitions)} partitions of {s.transactions_topic}"
        )

    def _read_ranges(self, start: dict[int, int], end: dict[int, int], before: dict[int, int]) -> dict[int, int]:
        """Read [start, end) of each partition into the window; the first event time read per partition. `before`
        (partition -> latest event time read at an offset below end) is updated."""
        topic, consumer = self.settings.transactions_topic, self._client()
        consumer.assign([TopicPartition(topic, p, start[p]) for p in self.partitions if start[p] < end[p]])
        first_t: dict[int, int] = {}
        reached: dict[int, int] = {}
        pending = {p for p in self.partitions if start[p] < end[p]}
        deadline = time.monotonic() + self.settings.broker_outage_limit_s
        while pending:
            if self.stop_requested():
                raise StopRequested("seeding the terminal window")
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read {topic} partitions {sorted(pending)} to seed the terminal window "
                    f"within {self.settings.broker_outage_limit_s} s"
                )
            messages = self._consume(0.2)
            for p, t in self._ingest(messages, first_t_wanted=True, before=(end, before)).items():
                first_t.setdefault(p, t)
            for m in messages:
                reached[m.partition()] = max(reached.get(m.partition(), 0), m.offset() + 1)
            for p in list(pending):
                # This pass's own progress (an earlier pass may have read further), or the consumer's
                # position, which also passes transaction markers.
                position = max(reached.get(p, -1), consumer.position([TopicPartition(topic, p)])[0].offset)
                if position >= end[p]:
                    pending.discard(p)
                    consumer.incremental_unassign([TopicPartition(topic, p)])
        return first_t

    # ----- reading -----
    def _consume(self, timeout_s: float) -> list:
        messages = self._client().consume(READ_CHUNK, timeout_s)
        out = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaUnavailable(f"terminal reader: {error.str()}")
                log.warning("terminal reader: %s", error.str())
                continue
            out.append(message)
        return out

    def _ingest(
        self,
        messages: list,
        *,
        first_t_wanted: bool = False,
        before: tuple[dict[int, int], dict[int, int]] | None = None,
    ) -> dict[int, int]:
        """Decode and add to the window; returns per partition the first event time of these messages. With
        `before` = (end, latest): latest[p] is raised to the latest event time read below offset end[p]."""
        if not messages:
            return {}
        try:
            decoded = self.decode(messages)
        except RegistryError:
            # Read them again later: seek each partition back to its first message here (idempotent).
            first_offsets: dict[int, int] = {}
            for m in messages:
                first_offsets.setdefault(m.partition(), m.offset())
            for p, offset in first_offsets.items():
                self._client().seek(TopicPartition(self.settings.transactions_topic, p, offset))
            raise
        # Each message's partition and offset, read once (two calls per message, the rest on arrays; two flat
        # lists convert to arrays several times faster than one list of pairs).
        message_partitions = np.array([m.partition() for m in messages], dtype=np.int64)
        message_offsets = np.array([m.offset() for m in messages], dtype=np.int64)
        seen, last = np.unique(message_partitions[::-1], return_index=True)
        for p, i in zip(seen.tolist(), (len(messages) - 1 - last).tolist(), strict=True):
            reached = int(message_offsets[message_partitions == p].max()) + 1
            self._next[p] = max(self._next.get(p, 0), reached)
            kind, created = messages[i].timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE:
                self._created[p] = max(self._created.get(p, created), created)
        rows, parts = [], []
        if decoded.columns is not None and decoded.columns.num_rows:
            batch = decoded.columns
            rows.append(np.asarray(decoded.column_rows, dtype=np.int64))
            parts.append(
                (
                    hash_strings(batch.column("terminal_id")),
                    hash_strings(batch.column("card_id")),
                    batch.column("event_time").cast("int64").to_numpy(zero_copy_only=False),
                )
            )
        if decoded.records:
            tx = TxColumns.from_records([r for _, r in decoded.records])
            rows.append(np.array([i for i, _ in decoded.records], dtype=np.int64))
            parts.append((tx.terminal_hash, tx.card_hash, tx.event_time_ms))
        if not rows:
            return {}
        index = np.concatenate(rows)
        terminals, cards, times = (np.concatenate([p[k] for p in parts]) for k in range(3))
        partitions, offsets = message_partitions[index], message_offsets[index]
        self.stats.events_read += self.window.add(partitions, offsets, terminals, cards, times)
        first: dict[int, int] = {}
        order = np.argsort(index, kind="stable")  # message order: the first event time of each partition
        for p in np.unique(partitions).tolist():
            mask = partitions == p
            self._latest[p] = max(self._latest.get(p, int(times[mask].max())), int(times[mask].max()))
            self._marks.setdefault(p, []).append((int(offsets[mask].max()) + 1, int(times[mask].max())))
            if first_t_wanted:
                first[p] = int(times[order][partitions[order] == p][0])
            if before is not None:
                end, latest = before
                below = mask & (offsets < end.get(p, 0))
                if below.any():
                    latest[p] = max(latest.get(p, int(times[below].max())), int(times[below].max()))
        return first

    # ----- the gate -----
    def wait_for(self, latest_ms: int, batch_ends: dict[int, int], created_ms: int | None = None) -> None:
        """Read until every partition is past event time latest_ms + tolerance or at its end, and each partition
        of the batch past its last offset (batch_ends: partition -> last offset + 1).

        "At its end" is trusted only from `terminal_idle_ms` after the batch's newest record was created
        (created_ms, its Kafka timestamp; the wall clock when the gate starts if later or unknown), and
        against an end asked of the broker then: a record created before it on another partition, still
        in its producer's batch or in flight, has landed and is read first."""
        started = time.monotonic()
        deadline = started + self.settings.broker_outage_limit_s
        now_ms = time.time() * 1000
        settle_in_s = max(
            0.0,
            (min(created_ms if created_ms is not None else now_ms, now_ms) + self.settings.terminal_idle_ms - now_ms)
            / 1000,
        )
        ends: dict[int, Future | int] = {}  # partition -> its end as the broker answers once settled
        last_log = last_refresh = started
        waited = False
        stall_s = self.settings.terminal_stall_ms / 1000
        while True:
            settled = time.monotonic() - started >= settle_in_s
            stalled = self._stalled(created_ms) if time.monotonic() - started < stall_s else set()
            behind = self._behind(latest_ms + self.tolerance_ms, batch_ends, ends if settled else None, stalled)
            if not behind:
                break
            waited = True
            now = time.monotonic()
            for p in behind:
                self.stats.stalled.setdefault(p, now)
            if now > deadline:
                raise KafkaUnavailable(
                    f"terminal window: input partitions {behind} of {self.settings.transactions_topic} "
                    f"were not read past event time {latest_ms + self.tolerance_ms} nor to their end "
                    f"within {self.settings.broker_outage_limit_s} s"
                )
            if now - last_log >= GATE_LOG_EVERY_S:
                last_log = now
                self.on_gate(self.stats)
                self.on_log(
                    f"terminal window waiting for input partitions {behind} (not yet past event time "
                    f"{latest_ms + self.tolerance_ms} nor at their end) for {now - started:.0f} s"
                )
            if self.stop_requested():
                raise StopRequested("waiting for the terminal window")
            if now - last_refresh >= METADATA_REFRESH_EVERY_S:
                last_refresh = now
                self._refresh_metadata()
            self._ingest(self._consume(0.05 if settled else min(0.05, max(0.001, settle_in_s - (now - started)))))
        for p in [p for p in self.stats.stalled if p not in behind]:
            del self.stats.stalled[p]
        if waited:
            self.stats.waits += 1
            self.stats.waited_s += time.monotonic() - started
            self.on_gate(self.stats)

    def _refresh_metadata(self) -> None:
        """The input's leaders asked again, for the reader and its end queries (seen on three brokers: the gate
        waited the whole outage limit for a partition whose leader was killed)."""
        for client in (self.consumer, self.admin):
            refresh_metadata(client, self.settings.transactions_topic, METADATA_REFRESH_EVERY_S)

    def _stalled(self, created_ms: int | None) -> set[int]:
        """The partitions whose newest record read was created between terminal_stall_ms and terminal_idle_ms
        before the batch's newest (`created_ms`): they stopped short of the others, as a stalled producer or
        replica does, and their end is not trusted yet."""
        if created_ms is None:
            return set()
        idle, stall = self.settings.terminal_idle_ms, self.settings.terminal_stall_ms
        return {p for p, created in self._created.items() if created_ms - stall < created < created_ms - idle}

    def _behind(
        self,
        past_ms: int,
        batch_ends: dict[int, int],
        ends: dict[int, Future | int] | None,
        stalled: Collection[int] = (),
    ) -> list[int]:
        """The partitions the gate still waits for. `ends`: None before the idle time has passed (no partition
        counts as at its end yet); after, each partition's end as the broker answers (its pending query, then
        the offset), asked once. A `stalled` partition not read past `past_ms` is waited for even at its end."""
        topic = self.settings.transactions_topic
        behind = []
        for p in self.partitions:
            position = self._next.get(p)
            if p in batch_ends and (position is None or position < batch_ends[p]):
                behind.append(p)
                continue
            if self._latest.get(p, -1) > past_ms:
                continue
            if ends is None or p in stalled:
                behind.append(p)
                continue
            end = ends.get(p)
            if end is None or (isinstance(end, Future) and end.done() and end.exception() is not None):
                # Asked of the partition's leader now, not the end of an earlier fetch (at read_committed the
                # last stable offset); asynchronously, so a broker away never blocks the wait. Unanswered:
                # behind, and asked again once the answer is an error.
                tp = TopicPartition(topic, p)
                ends[p] = end = self._end_asker().list_offsets(
                    {tp: OffsetSpec.latest()},
                    request_timeout=END_QUERY_TIMEOUT_S,
                    isolation_level=IsolationLevel.READ_COMMITTED,
                )[tp]
            if isinstance(end, Future):
                if not end.done() or end.exception() is not None:
                    behind.append(p)
                    continue
                ends[p] = end = end.result().offset
            # The consumer's position passes transaction markers, which are never returned as records.
            consumed = max(self._client().position([TopicPartition(topic, p)])[0].offset, position or 0)
            if consumed < end:
                behind.append(p)
        return behind

    # ----- readiness: everything that waits or reads, before a batch is decided -----
    def ready(
        self,
        batch: tuple[TxColumns, np.ndarray, np.ndarray, int | None] | None,
        *,
        oldest_held_ms: int | None,
        holding: bool,
        idle_ms: int,
    ) -> None:
        """Before a batch (columns, partitions, offsets, the Kafka timestamp of its newest record; None between
        batches) is decided: reseed where the batch or the oldest held record (`oldest_held_ms`) reaches back
        past the events held; wait for the event-time gate; when records are or may be held (`holding`), read
        what has arrived and ask quiet-looking partitions' ends (asynchronously) for their release; expire
        now and then. features, releasable, cut_short and other_cards_held then answer from what this read,
        with no wait and no I/O."""
        # Every reseed comes before the gate: a reseed reads the window again only up to the group's committed
        # offsets, and the gate then reads it forward past the batch (soak 3018: a reseed for held records after
        # the gate lost a partition's records past its committed offset, and a batch was counted without them).
        reaches_back = False
        if batch is not None and len(batch[0]):
            expired_before = self.window.expired_before
            if (
                expired_before is not None
                and int(batch[0].event_time_ms.min()) - self.window.window_ms < expired_before
            ):
                # A batch reaching back past what the window still holds (a partition handed over by a lagging
                # detector, a rewind).
                reaches_back = True
                self.on_log("terminal window: a batch reaches back past the events held; reseeding")
        held_reach_back = (
            oldest_held_ms is not None
            and self.holds_from is not None
            and oldest_held_ms - self.window.window_ms < self.holds_from
        )
        if held_reach_back:
            # A partition handed over with held records older than the window reaches.
            self.on_log("terminal window: held records reach back past the events held; reseeding")
        if reaches_back or held_reach_back:
            self.stats.reseeds += 1
            self.seed(back_to=oldest_held_ms)  # a window before the oldest held record too, whatever the reason
        if batch is not None and len(batch[0]):
            tx, partitions, offsets, created_ms = batch
            ends: dict[int, int] = {}
            for p, o in zip(partitions.tolist(), offsets.tolist(), strict=True):
                ends[p] = max(ends.get(p, 0), o + 1)
            self.wait_for(int(tx.event_time_ms.max()), ends, created_ms)
        if holding:
            self._ingest(self._consume(0))
            now_ms = time.time() * 1000
            for p in self.partitions:
                self._ask_if_quiet(p, now_ms, idle_ms)
        if time.monotonic() - self._last_expiry >= EXPIRE_EVERY_S:
            self._last_expiry = time.monotonic()
            self.expire()

    def features(
        self, tx: TxColumns, partitions: np.ndarray, offsets: np.ndarray, created_ms: int | None = None
    ) -> dict[str, np.ndarray]:
        """TERMINAL_FEATURES of a batch (rows in offset order per partition), from the window `ready` read."""
        if not len(tx):
            return {"terminal_cards": np.zeros(0, np.int64)}
        return terminal_cards(self.window, tx, partitions, offsets)

    # ----- held records (consumer/held.py) -----
    def releasable(self, times: np.ndarray, created_ms: np.ndarray, ahead_ms: int, idle_ms: int) -> np.ndarray:
        """Which held records (event times, Kafka timestamps) the window now answers for up to t + ahead_ms:
        on every partition, read past t + ahead_ms + the tolerance, or found quiet (at its end, its newest
        record created idle_ms or more before) at a time at least idle_ms after the held record was created.
        From what `ready` read and asked: no wait, no I/O."""
        need = np.asarray(times, dtype=np.int64) + ahead_ms + self.tolerance_ms
        due = np.ones(len(need), dtype=bool)
        for p in self.partitions:
            passed = need < self._latest.get(p, np.iinfo(np.int64).min)
            if not passed.all():
                quiet = self._quiet.get(p)
                if quiet is not None:
                    passed |= np.asarray(created_ms, dtype=np.int64) + idle_ms <= quiet
            due &= passed
            if not due.any():
                break
        return due

    def cut_short(self, times: np.ndarray, ahead_ms: int) -> list[str]:
        """For held records `releasable` just let go: the partitions not yet read past t + ahead_ms + the tolerance
        (found quiet instead), comma-separated; empty for a record whose look-ahead every partition answered."""
        need = np.asarray(times, dtype=np.int64) + ahead_ms + self.tolerance_ms
        short = [need >= self._latest.get(p, np.iinfo(np.int64).min) for p in self.partitions]
        return [",".join(str(p) for p, s in zip(self.partitions, short, strict=True) if s[i]) for i in range(len(need))]

    def _ask_if_quiet(self, p: int, now_ms: float, idle_ms: int) -> None:
        """Keep `_quiet[p]`, the latest wall-clock time (ms) partition p was found at its end with nothing created
        for idle_ms before: take a pending answer of its end, and ask again (asynchronously) while it looks
        quiet, so that time moves on. A partition that stopped short of the others is not quiet (`_stopped_short`)."""
        created = self._created.get(p)
        pending = self._end_asks.get(p)
        if pending is not None and pending[1].done():
            del self._end_asks[p]
            sent, answer = pending
            if answer.exception() is None:
                end = answer.result().offset
                tp = TopicPartition(self.settings.transactions_topic, p)
                consumed = max(self._client().position([tp])[0].offset, self._next.get(p, 0))
                if (
                    consumed >= end
                    and (created is None or created <= sent - idle_ms)
                    and not self._stopped_short(created, sent)
                ):
                    self._quiet[p] = max(self._quiet.get(p, sent), sent)
        elif pending is None and (created is None or now_ms - created >= idle_ms):
            tp = TopicPartition(self.settings.transactions_topic, p)
            self._end_asks[p] = (
                now_ms,
                self._end_asker().list_offsets(
                    {tp: OffsetSpec.latest()},
                    request_timeout=END_QUERY_TIMEOUT_S,
                    isolation_level=IsolationLevel.READ_COMMITTED,
                )[tp],
            )

    def _stopped_short(self, created: int | None, at_ms: float) -> bool:
        """Whether a partition whose newest record was created at `created` stopped short of the others at wall-clock
        time `at_ms`: another partition has records created more than terminal_idle_ms after it, and it has been
        less than terminal_stall_ms since. Its producer or replicas are stalled (a broker frozen or restarting),
        not quiet: soak 3023 released six held compromised-terminal victims early, as legit, on such a partition.
        Past the stall time it counts as quiet all the same, so a stream that stops unevenly still releases."""
        newest = max(self._created.values(), default=None)
        if created is None or newest is None:
            return False
        return newest - created > self.settings.terminal_idle_ms and at_ms - created < self.settings.terminal_stall_ms

    def other_cards_held(
        self, terminals: np.ndarray, cards: np.ndarray, times: np.ndarray, ahead_ms: int
    ) -> np.ndarray:
        """The terminal rule's count for released records, up to t + ahead_ms (the window reaches back far enough:
        `ready` reseeded it for the oldest held record)."""
        return self.window.other_cards(terminals, cards, times, ahead_ms=ahead_ms)

    def expire(self) -> int:
        """Drop the events no decision can still read. Every decision to come is of a record at or after the
        group's committed offset of its partition (whichever detector holds it, or will after a rebalance
        or a crash), so no earlier in event time than the latest record before that offset, minus the
        tolerance; its window reaches back `window_ms` more. When runs only moves memory, never a decision."""
        topic = self.settings.transactions_topic
        try:
            committed = self._client().committed([TopicPartition(topic, p) for p in self.partitions], timeout=5)
        except KafkaException as exc:
            log.warning("terminal window: expiry skipped, committed offsets unknown (%s)", exc.args[0].str())
            return 0
        floors = []
        for tp in committed:
            marks = self._marks.get(tp.partition, [])
            # Any record before the committed offset bounds what comes after it: no earlier than its event
            # time minus the tolerance. The latest such record read gives the best bound.
            before = [t for offset, t in marks if tp.offset >= 0 and offset <= tp.offset]
            if not before:
                return 0  # a partition not decided past anything read: keep everything
            floors.append(max(before))
            self._marks[tp.partition] = [(offset, t) for offset, t in marks if offset > tp.offset] + [
                (tp.offset, max(before))
            ]
        floor = min(floors)
        held = self.keep_from()
        if held is not None:
            floor = min(floor, held + self.tolerance_ms)  # a held record's window reaches back from its own time
        expired = self.window.expire(floor - self.tolerance_ms - self.window.window_ms)
        expired_before = self.window.expired_before
        if expired_before is not None:  # set by expire(): events before it may be gone
            self.holds_from = max(self.holds_from or expired_before, expired_before)
        return expired

    def _end_asker(self) -> AdminClient:
        """The client asking the partitions' ends: made by start()."""
        if self.admin is None:
            raise RuntimeError("the terminal reader is not started")
        return self.admin
