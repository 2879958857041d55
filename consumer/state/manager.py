"""Keyed state for the detector: a table per (store, input partition), restored on assignment, dropped on
revocation, its changes written to the changelog inside each batch's transaction.

The detector calls, from its one thread:
- `assign` / `revoke` from the consumer's rebalance callbacks: an assigned partition is paused and
  restored from its changelog (`recover_step` in the loop), then resumed; the other partitions keep going;
- `tables(partition)` while deciding a batch (only for partitions that are ready);
- `write_changes(producer, partitions)` inside the batch's transaction, before offsets are sent;
- `begin()` before each batch is decided, `commit()` once its checkpoint committed, `rollback()` when it did
  not: an aborted batch's changes are undone in memory, at the cost of the batch;
- `reset(partitions)` when whether the last checkpoint committed is not known (a producer lost mid-commit): the
  tables are dropped and restored from the changelog (as Kafka Streams does with a corrupted task).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from confluent_kafka import TopicPartition

from fraudstream.consumer.state.changelog import ensure_changelogs, write_rows, write_tombstones
from fraudstream.consumer.state.recovery import Recovery, RestoreProgress
from fraudstream.consumer.state.stores import StoreSpec, expiry_stream_time
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.state")

EXPIRE_EVERY_S = 10.0  # physical expiry only frees memory: rules already ignore rows past their TTL
# Rows are expired this long after their TTL (event time), so that a record arriving out of order still
# finds a row that its rules would read: when expiry runs never changes a decision.
LATE_TOLERANCE_MS = 60 * 60 * 1000


class StateManager:
    def __init__(
        self,
        settings: Settings,
        specs: Sequence[StoreSpec],
        *,
        on_log: Callable[[str], None] = log.info,
        on_restored: Callable[[RestoreProgress, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.specs = tuple(specs)
        self.on_log = on_log
        self.on_restored = on_restored
        self.topics: dict[str, str] = {}
        self.recovery: Recovery | None = None  # from start() on
        self._ready: dict[int, dict[str, KeyedTable]] = {}
        self._restoring_tables: dict[int, dict[str, KeyedTable]] = {}
        self._last_expiry: dict[int, float] = {}
        self.changelog_records = 0
        self.tombstones = 0
        self.rollbacks = 0  # batches whose changes were undone

    def start(self) -> None:
        """Create or check the changelog topics; refuses a changelog that does not match the input."""
        self.topics = ensure_changelogs(self.settings, self.specs)
        self.recovery = Recovery(self.settings, self.topics)

    # ----- rebalance -----
    def assign(self, consumer, partitions: Iterable[TopicPartition]) -> None:
        partitions = [tp for tp in partitions if tp.topic == self.settings.transactions_topic]
        if not partitions:
            return
        consumer.pause(partitions)
        for tp in partitions:
            self._begin_restore(consumer, tp.partition)

    def _recovery(self) -> Recovery:
        assert self.recovery is not None, "start() first"
        return self.recovery

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp.topic == self.settings.transactions_topic:
                self._ready.pop(tp.partition, None)
                self._restoring_tables.pop(tp.partition, None)
                self._last_expiry.pop(tp.partition, None)
                self._recovery().stop(tp.partition)

    def drop_all(self) -> None:
        """Forget every partition (the consumer that held them is gone)."""
        topic = self.settings.transactions_topic
        self.revoke([TopicPartition(topic, p) for p in (*self._ready, *self._restoring_tables)])

    def reset(self, consumer, partitions: Iterable[int]) -> None:
        """Drop and restore again: for tables changed by a batch whose transaction was aborted."""
        partitions = sorted(set(partitions))
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.settings.transactions_topic}
        self.revoke([TopicPartition(self.settings.transactions_topic, p) for p in partitions])
        again = [p for p in partitions if p in assigned]
        if len(again) < len(partitions):
            # Not an error (a partition revoked meanwhile is its new owner's to restore), but never silent.
            gone = sorted(set(partitions) - set(again))
            self.on_log(
                f"state of {self.settings.transactions_topic}{gone} dropped, not restored: no longer "
                "assigned to this detector (its new owner restores it from the changelog)"
            )
        if again:
            consumer.pause([TopicPartition(self.settings.transactions_topic, p) for p in again])
            for partition in again:
                self._begin_restore(consumer, partition)

    def _begin_restore(self, consumer, partition: int) -> None:
        tables = {spec.name: KeyedTable(spec.dtype) for spec in self.specs}
        progress = self._recovery().start(partition, tables, self.specs)
        self._restoring_tables[partition] = tables
        if progress.done:  # nothing in the changelog yet
            self._finish(consumer, progress)

    # ----- restoring -----
    @property
    def recovering(self) -> bool:
        return bool(self._restoring_tables)

    def recover_step(self, consumer) -> None:
        for progress in self._recovery().step():
            self._finish(consumer, progress)

    @property
    def restoring_records(self) -> int:
        """Changelog records still to read (at most: compaction may have removed some)."""
        return sum(progress.remaining for progress in self._recovery().restoring.values())

    def _finish(self, consumer, progress: RestoreProgress) -> None:
        partition = progress.partition
        tables = self._restoring_tables.pop(partition)
        self._ready[partition] = tables
        self._last_expiry[partition] = time.monotonic()
        seconds = time.monotonic() - progress.started
        keys = sum(len(table) for table in tables.values())
        if progress.records:
            self.on_log(
                f"restored state of {self.settings.transactions_topic}[{partition}]: {progress.records} "
                f"changelog records, {keys} keys in {seconds:.2f}s"
            )
        if self.on_restored:
            self.on_restored(progress, seconds)
        consumer.resume([TopicPartition(self.settings.transactions_topic, partition)])

    # ----- processing -----
    def ready(self, partition: int) -> bool:
        return partition in self._ready

    def tables(self, partition: int) -> dict[str, KeyedTable]:
        return self._ready[partition]

    def ready_tables(self, store: str) -> dict[int, KeyedTable]:
        """partition -> its table of `store`, for every partition whose state is restored."""
        return {partition: tables[store] for partition, tables in self._ready.items()}

    # ----- a batch's changes (consumer/state/table.py keeps their undo log) -----
    def begin(self) -> None:
        """A batch starts: every ready table records its changes from now on."""
        for tables in self._ready.values():
            for table in tables.values():
                table.begin()

    def commit(self) -> None:
        """The batch's checkpoint committed: its changes are in the changelog."""
        for tables in self._ready.values():
            for table in tables.values():
                table.commit()

    def rollback(self) -> int:
        """The batch's checkpoint did not commit: every ready table as it was when the batch began (O(batch), no
        restore from the changelog). Returns the changes undone."""
        undone = sum(table.rollback() for tables in self._ready.values() for table in tables.values())
        self.rollbacks += 1
        return undone

    def write_changes(self, producer, partitions: Iterable[int]) -> int:
        """Inside the open transaction: every changed row of these partitions' tables, and tombstones for the
        keys that expired. Returns the number of changelog records written."""
        written = 0
        now = time.monotonic()
        for partition in partitions:
            tables = self._ready.get(partition)
            if tables is None:
                continue
            expire = now - self._last_expiry.get(partition, now) >= EXPIRE_EVERY_S
            for spec in self.specs:
                table, topic = tables[spec.name], self.topics[spec.name]
                keys, rows = table.take_dirty()
                written += write_rows(producer, topic, partition, spec, keys, rows)
                removed = table.take_removed()
                if removed:
                    written += write_tombstones(producer, topic, partition, removed)
                    self.tombstones += len(removed)
                if expire and len(table) and spec.ttl_ms is not None:
                    # Event time, not the wall clock: the newest live row's (freed slots keep old values).
                    stream_time = expiry_stream_time(int(table.rows[spec.expiry_field][table.live()[1]].max()))
                    gone = table.expire(spec.expiry_field, stream_time - spec.ttl_ms - LATE_TOLERANCE_MS)
                    written += write_tombstones(producer, topic, partition, gone)
                    self.tombstones += len(gone)
            if expire:
                self._last_expiry[partition] = now
        self.changelog_records += written
        return written

    def sizes(self) -> dict[str, int]:
        """Live keys per store over the ready partitions."""
        return {spec.name: sum(len(t[spec.name]) for t in self._ready.values()) for spec in self.specs}

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.close()
