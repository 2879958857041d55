"""One task per assigned input partition, and the task manager that keeps them (Kafka Streams' StreamTask and
TaskManager).

A `Task` owns what belongs to its input partition alone: its stores (a KeyedTable per store: the card
aggregates and the held records), their restore progress, the expiry clock of its stores, and the next input
offset this detector committed for it. The stateless detector's tasks have no stores: they are ready at once and
write nothing, so the loop (consumer/detector.py) runs the same calls whether or not there is state.

The `TaskManager` is called from the loop's one thread:
- `assign` / `revoke` from the consumer's rebalance callbacks: a task with stores is paused and restored from
  its changelogs (`recover_step` in the loop), then resumed; the other partitions keep going;
- `tables(partition)` / `ready_tables(store)` while deciding a batch (the decider's view of the state);
- `begin()` before each batch is decided, `commit()` once its checkpoint committed, `rollback()` when it did
  not: an aborted batch's changes are undone in memory, at the cost of the batch (consumer/state/table.py's
  undo log);
- `write_changes(producer, partitions)` inside the batch's transaction, before the offsets are sent;
- `reset(partitions)` when whether the last checkpoint committed is not known (a producer lost mid-commit): the
  stores are dropped and restored from the changelog (as Kafka Streams does with a corrupted task).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class Task:
    """One input partition's share of the detector."""

    partition: int
    stores: dict[str, KeyedTable]  # store name -> table; none for the stateless detector
    restoring: bool = False  # its stores are being read from their changelogs: the partition is paused
    next_offset: int | None = None  # the next input offset this detector committed (None: not known yet)
    expired_at: float = field(default_factory=time.monotonic)  # when its stores last expired idle rows

    def begin(self) -> None:
        for table in self.stores.values():
            table.begin()

    def commit(self) -> None:
        for table in self.stores.values():
            table.commit()

    def rollback(self) -> int:
        return sum(table.rollback() for table in self.stores.values())

    def write_changes(self, producer, specs: Sequence[StoreSpec], topics: dict[str, str]) -> tuple[int, int]:
        """Inside the open transaction: its changed rows, the tombstones of removed keys, and every EXPIRE_EVERY_S
        those of idle keys. Returns (changelog records written, of which tombstones)."""
        written = tombstones = 0
        now = time.monotonic()
        expire = now - self.expired_at >= EXPIRE_EVERY_S
        for spec in specs:
            table, topic = self.stores[spec.name], topics[spec.name]
            keys, rows = table.take_dirty()
            written += write_rows(producer, topic, self.partition, spec, keys, rows)
            removed = table.take_removed()
            if expire and len(table) and spec.ttl_ms is not None:
                # Event time, not the wall clock: the newest live row's (freed slots keep old values), bounded.
                stream_time = expiry_stream_time(int(table.rows[spec.expiry_field][table.live()[1]].max()))
                removed += table.expire(spec.expiry_field, stream_time - spec.ttl_ms - LATE_TOLERANCE_MS)
            if removed:
                written += write_tombstones(producer, topic, self.partition, removed)
                tombstones += len(removed)
        if expire:
            self.expired_at = now
        return written, tombstones


class TaskManager:
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
        self.topics: dict[str, str] = {}  # store name -> its changelog topic
        self.recovery: Recovery | None = None  # from start() on, when there are stores
        self.tasks: dict[int, Task] = {}  # input partition -> its task
        self.changelog_records = 0
        self.tombstones = 0
        self.rollbacks = 0  # batches whose changes were undone

    def start(self) -> None:
        """Create or check the changelog topics; refuses a changelog that does not match the input."""
        if self.specs:
            self.topics = ensure_changelogs(self.settings, self.specs)
            self.recovery = Recovery(self.settings, self.topics)

    @property
    def partitions(self) -> set[int]:
        """The input partitions assigned to this detector (their state restored or not)."""
        return set(self.tasks)

    # ----- rebalance -----
    def assign(self, consumer, partitions: Iterable[TopicPartition]) -> None:
        partitions = [tp for tp in partitions if tp.topic == self.settings.transactions_topic]
        for tp in partitions:
            self.tasks[tp.partition] = Task(tp.partition, {})
        if not self.specs or not partitions:
            return  # nothing to restore: the client assigns them after the callback, as they are
        # Assigned here rather than by the client after this callback, so that the partitions can be paused until
        # their state is restored.
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)
        for tp in partitions:
            self._begin_restore(consumer, self.tasks[tp.partition])

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp.topic == self.settings.transactions_topic and self.tasks.pop(tp.partition, None) is not None:
                if self.recovery is not None:
                    self.recovery.stop(tp.partition)

    def drop_all(self) -> None:
        """Forget every task (the consumer that held their partitions is gone)."""
        self.revoke([TopicPartition(self.settings.transactions_topic, p) for p in list(self.tasks)])

    def reset(self, consumer, partitions: Iterable[int]) -> None:
        """Drop these tasks' stores and restore them again: for stores changed by a batch whose transaction may or
        may not have committed."""
        if not self.specs:
            return
        partitions = sorted(set(partitions))
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.settings.transactions_topic}
        gone = [p for p in partitions if p not in assigned]
        if gone:
            # Not an error (a partition revoked meanwhile is its new owner's to restore), but never silent.
            self.revoke([TopicPartition(self.settings.transactions_topic, p) for p in gone])
            self.on_log(
                f"state of {self.settings.transactions_topic}{gone} dropped, not restored: no longer "
                "assigned to this detector (its new owner restores it from the changelog)"
            )
        again = [self.tasks[p] for p in partitions if p in assigned and p in self.tasks]
        if again:
            consumer.pause([TopicPartition(self.settings.transactions_topic, task.partition) for task in again])
            for task in again:
                self._recovery().stop(task.partition)
                self._begin_restore(consumer, task)

    def _recovery(self) -> Recovery:
        assert self.recovery is not None, "start() first"
        return self.recovery

    def _begin_restore(self, consumer, task: Task) -> None:
        task.stores = {spec.name: KeyedTable(spec.dtype) for spec in self.specs}
        task.restoring = True
        progress = self._recovery().start(task.partition, task.stores, self.specs)
        if progress.done:  # nothing in the changelog yet
            self._finish(consumer, progress)

    # ----- restoring -----
    @property
    def recovering(self) -> bool:
        return any(task.restoring for task in self.tasks.values())

    def recover_step(self, consumer) -> None:
        for progress in self._recovery().step():
            self._finish(consumer, progress)

    @property
    def restoring_records(self) -> int:
        """Changelog records still to read (at most: compaction may have removed some)."""
        if self.recovery is None:
            return 0
        return sum(progress.remaining for progress in self.recovery.restoring.values())

    def _finish(self, consumer, progress: RestoreProgress) -> None:
        task = self.tasks[progress.partition]
        task.restoring = False
        task.expired_at = time.monotonic()
        seconds = time.monotonic() - progress.started
        keys = sum(len(table) for table in task.stores.values())
        if progress.records:
            self.on_log(
                f"restored state of {self.settings.transactions_topic}[{task.partition}]: {progress.records} "
                f"changelog records, {keys} keys in {seconds:.2f}s"
            )
        if self.on_restored:
            self.on_restored(progress, seconds)
        consumer.resume([TopicPartition(self.settings.transactions_topic, task.partition)])

    # ----- processing -----
    def ready(self, partition: int) -> bool:
        task = self.tasks.get(partition)
        return task is not None and not task.restoring

    def _ready_tasks(self) -> Iterable[Task]:
        return (task for task in self.tasks.values() if not task.restoring)

    def tables(self, partition: int) -> dict[str, KeyedTable]:
        return self.tasks[partition].stores

    def ready_tables(self, store: str) -> dict[int, KeyedTable]:
        """partition -> its table of `store`, for every task whose state is restored."""
        return {task.partition: task.stores[store] for task in self._ready_tasks()}

    # ----- offsets -----
    def committed(self, offsets: Iterable[TopicPartition]) -> None:
        """These next offsets were committed (or read back from the group; a negative, logical one is unknown)."""
        for tp in offsets:
            task = self.tasks.get(tp.partition)
            if task is not None and tp.topic == self.settings.transactions_topic:
                task.next_offset = tp.offset if tp.offset >= 0 else None

    def next_offsets(self, partitions: Iterable[int]) -> dict[int, int | None]:
        """partition -> its next offset as this detector committed it (None: not known yet), for its tasks."""
        return {p: self.tasks[p].next_offset for p in sorted(set(partitions)) if p in self.tasks}

    # ----- a batch's changes -----
    def begin(self) -> None:
        """A batch starts: every ready task's stores record their changes from now on."""
        for task in self._ready_tasks():
            task.begin()

    def commit(self) -> None:
        """The batch's checkpoint committed: its changes are in the changelog."""
        for task in self._ready_tasks():
            task.commit()

    def rollback(self) -> int:
        """The batch's checkpoint did not commit: every ready task's stores as they were when the batch began
        (O(batch), no restore from the changelog). Returns the changes undone."""
        undone = sum(task.rollback() for task in self._ready_tasks())
        self.rollbacks += 1
        return undone

    def write_changes(self, producer, partitions: Iterable[int]) -> int:
        """Inside the open transaction: the changes of these partitions' tasks. Returns the changelog records
        written."""
        written = 0
        for partition in partitions:
            task = self.tasks.get(partition)
            if task is None or task.restoring:
                continue
            records, tombstones = task.write_changes(producer, self.specs, self.topics)
            written += records
            self.tombstones += tombstones
        self.changelog_records += written
        return written

    def sizes(self) -> dict[str, int]:
        """Live keys per store over the ready tasks."""
        return {spec.name: sum(len(task.stores[spec.name]) for task in self._ready_tasks()) for spec in self.specs}

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.close()
