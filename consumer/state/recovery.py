"""Restoring stores from their changelogs, apart from the hot path.

A consumer of its own (assign mode, read_committed, never committing) reads each assigned changelog
partition from its beginning up to the high watermark taken when the partition was assigned (not the
last stable offset: a transaction still completing must be waited for, not cut off). The end is
reached when the consumer's *position* gets there: a transactional changelog ends with a commit marker
that no consumer ever returns, so waiting for the record at high watermark - 1 could wait forever.
Positions can be logical (negative) before the first fetch: they are compared, never computed with.

Restoring is incremental (`step`), so the detector keeps processing its other partitions meanwhile; the
input partition being restored stays paused until its stores are complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, IsolationLevel, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from fraudstream.consumer.global_reader import GlobalReader
from fraudstream.consumer.state.changelog import LAYOUT_HEADER
from fraudstream.consumer.state.stores import StoreSpec
from fraudstream.consumer.state.table import KeyedTable, check_layout, check_row_bytes
from fraudstream.errors import KafkaUnavailable, StateError
from fraudstream.kafka import admin, consumer_config, refresh_metadata
from fraudstream.serde import consumed_headers
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.state")

RESTORE_BATCH = 20_000
STALL_LOG_AFTER_S = 15.0  # a changelog partition whose restore has not moved for this long is logged (and again)
METADATA_REFRESH_AFTER_S = 2.0  # ... and for this long: its leaders are asked again (at most this often)


@dataclass
class _Restoring:
    spec: StoreSpec
    table: KeyedTable
    end: int  # the changelog's high watermark when the partition was assigned
    records: int = 0
    done: bool = False
    position: int = -1  # the restore consumer's last known position (logical, negative, before the first fetch)
    moved_at: float = field(default_factory=time.monotonic)  # when the position last moved
    reported_at: float = 0.0  # when a stalled restore was last logged

    def __post_init__(self) -> None:
        # What every record of this store must look like, computed once: the per-record check is a compare.
        self.headers = [(LAYOUT_HEADER, self.spec.layout)]
        self.size = self.spec.dtype.itemsize


@dataclass
class RestoreProgress:
    """One input partition's restore: its stores' changelog partitions, and how far each is."""

    partition: int
    started: float = field(default_factory=time.monotonic)
    stores: dict[str, _Restoring] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return all(store.done for store in self.stores.values())

    @property
    def records(self) -> int:
        return sum(store.records for store in self.stores.values())

    @property
    def remaining(self) -> int:
        return sum(0 if s.done else max(s.end - s.records, 0) for s in self.stores.values())


class Recovery(GlobalReader):
    """The restore reader: the changelogs of the tasks being restored (a global reader: consumer/global_reader.py,
    whose outage policy waits out a changelog partition whose leader is down, up to the broker outage limit)."""

    name = "restore reader"

    def __init__(self, settings: Settings, topics: dict[str, str], *, timeout_s: float = 5.0) -> None:
        super().__init__(settings)
        self.topics = topics  # store name -> changelog topic
        self.timeout_s = timeout_s  # one attempt
        self._admin: AdminClient | None = None  # made when a stalled restore is reported
        self._refreshed_at = 0.0  # when the restore consumer last asked for its changelogs' leaders
        # assign() only: the group id is required by the client but never joins or commits.
        self.consumer = Consumer(
            consumer_config(
                settings, f"{settings.group_id}.restore", **{"enable.partition.eof": False, "fetch.max.bytes": 64 << 20}
            )
        )
        # The end to restore to is the high watermark, which only a read_uncommitted client is told: a
        # read_committed one gets the last stable offset, which lags while a transaction (the previous
        # owner's last batch) is still being committed, and would end the restore before its changes.
        self.offsets = Consumer(
            consumer_config(settings, f"{settings.group_id}.restore", **{"isolation.level": "read_uncommitted"})
        )
        self.stalls = 0  # times a restore was logged as not moving
        self.restoring: dict[int, RestoreProgress] = {}
        self._by_topic_partition: dict[tuple[str, int], _Restoring] = {}

    def start(self, partition: int, tables: dict[str, KeyedTable], specs: Sequence[StoreSpec]) -> RestoreProgress:
        """Begin restoring an input partition's stores (tables are empty and filled in place)."""
        progress = RestoreProgress(partition)
        to_assign = []
        for spec in specs:
            topic = self.topics[spec.name]
            tp = TopicPartition(topic, partition)
            low, high = self._watermarks(tp)
            restoring = _Restoring(spec, tables[spec.name], end=high, done=high <= low)
            progress.stores[spec.name] = restoring
            if not restoring.done:
                self._by_topic_partition[(topic, partition)] = restoring
                to_assign.append(TopicPartition(topic, partition, OFFSET_BEGINNING))
        if to_assign:
            self._client().incremental_assign(to_assign)
        if not progress.done:
            self.restoring[partition] = progress
        return progress

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """The changelog partition's offsets; retried while it has no leader (a just-created topic, a broker down).

        librdkafka sends this request to the leader its metadata cache names, and nothing refreshes that
        cache here: the client has no assigned partitions and subscribes to nothing, so a leader that died
        stays the leader it asks (a request to a dead broker times out, which does not mark the metadata
        stale) until metadata.max.age.ms, longer than any outage limit. So every failed attempt asks for
        the topic's metadata, which replaces the cached leader (and drops a broker the cluster fenced)."""
        return self.call(
            f"reading the end of changelog {tp.topic}[{tp.partition}]",
            lambda: self.offsets.get_watermark_offsets(tp, timeout=self.timeout_s, cached=False),
            topic=tp.topic,
            client=self.offsets,
        )

    def stop(self, partition: int) -> None:
        """Forget a partition being restored (it was revoked)."""
        progress = self.restoring.pop(partition, None)
        if progress is None:
            return
        ours = [TopicPartition(self.topics[name], partition) for name, s in progress.stores.items() if not s.done]
        for tp in ours:
            self._by_topic_partition.pop((tp.topic, tp.partition), None)
        if ours:
            self._client().incremental_unassign(ours)

    def step(self, max_records: int = RESTORE_BATCH, timeout_s: float = 0.05) -> list[RestoreProgress]:
        """Read the next changelog records into their tables; returns the partitions completed by this step."""
        if not self.restoring:
            return []
        messages = self._client().consume(max_records, timeout_s)
        latest: dict[tuple[str, int], dict[bytes, bytes | None]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaUnavailable(f"restoring state: {error.str()}")
                log.warning("restoring state: %s", error.str())
                continue
            topic, partition = message.topic(), message.partition()
            assert topic is not None and partition is not None  # a record, not an error: both are set
            where = (topic, partition)
            restoring = self._by_topic_partition.get(where)
            if restoring is None:  # its partition was revoked meanwhile
                continue
            value, key = message.value(), message.key()
            if key is None:
                _refuse(message, restoring.spec)
            if value is not None and (len(value) != restoring.size or message.headers() != restoring.headers):
                value = _upgraded(message, restoring.spec)
            latest.setdefault(where, {})[key] = value
            restoring.records += 1
        for where, changes in latest.items():
            restoring = self._by_topic_partition[where]
            _apply(restoring.table, restoring.spec, changes)
        return self._finished()

    def _finished(self) -> list[RestoreProgress]:
        waiting = [(where, r) for where, r in self._by_topic_partition.items() if not r.done]
        if waiting:
            positions = self._client().position([TopicPartition(t, p) for (t, p), _ in waiting])
            now = time.monotonic()
            for (where, restoring), position in zip(waiting, positions, strict=True):
                if position.offset >= 0 and position.offset >= restoring.end:
                    restoring.done = True
                    self._client().incremental_unassign([TopicPartition(*where)])
                    del self._by_topic_partition[where]
                elif position.offset != restoring.position:
                    restoring.position, restoring.moved_at = position.offset, now
                else:
                    if (
                        now - restoring.moved_at >= METADATA_REFRESH_AFTER_S
                        and now - self._refreshed_at >= METADATA_REFRESH_AFTER_S
                    ):
                        # Not moving: perhaps fetching from a leader that died (a client in assign mode keeps
                        # asking it until its metadata ages out). Asking for the leaders moves the fetch.
                        self._refreshed_at = now
                        refresh_metadata(self._client(), where[0], self.timeout_s)
                    if (
                        now - restoring.moved_at >= STALL_LOG_AFTER_S
                        and now - restoring.reported_at >= STALL_LOG_AFTER_S
                    ):
                        restoring.reported_at = now
                        self._report_stall(where, restoring, now)
        completed = [p for p in self.restoring.values() if p.done]
        for progress in completed:
            del self.restoring[progress.partition]
        return completed

    def _report_stall(self, where: tuple[str, int], restoring: _Restoring, now: float) -> None:
        """A restore that has not moved for a while: where it is, and what the partition's leader says now (asked
        asynchronously and waited for a bounded time: a broker away must not block the detector)."""
        tp = TopicPartition(*where)
        if self._admin is None:
            self._admin = admin(self.settings)
        asked = {
            level: self._admin.list_offsets(
                {tp: OffsetSpec.latest()}, isolation_level=level, request_timeout=self.timeout_s
            )[tp]
            for level in (IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED)
        }
        try:
            stable, high = (asked[level].result(timeout=self.timeout_s).offset for level in asked)
        except (KafkaException, TimeoutError) as exc:
            # A client whose metadata went stale (a broker restarted: FENCED_LEADER_EPOCH) keeps failing the same
            # way (seen for ten minutes in CI): the next report asks with a new one.
            self._admin = None
            now_reads = f"its offsets unknown now: {exc}"
        else:
            now_reads = f"last stable offset {stable}, high watermark {high}"
            if stable < high and (restoring.position < 0 or restoring.position >= stable):
                now_reads += (
                    f"; reading stops at offset {stable}, where a transaction is still open: one open past the "
                    "transaction timeout hangs (its marker lost) and only an admin ends it (kafka-transactions.sh "
                    "find-hanging, then abort)"
                )
        log.warning(
            "restoring changelog %s[%d] has not moved for %.0f s: at offset %d of %d (%s)",
            tp.topic,
            tp.partition,
            now - restoring.moved_at,
            restoring.position,
            restoring.end,
            now_reads,
        )
        self.stalls += 1

    def close(self) -> None:
        try:
            self.offsets.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the restore reader's end asker: %s", exc)
        super().close()


def _upgraded(message: Message, spec: StoreSpec) -> bytes:
    """A row written with one of the store's older layouts, read into the current one; anything else is refused."""
    layout = dict(consumed_headers(message) or ()).get(LAYOUT_HEADER)
    older = dict(spec.older_layouts).get(layout) if layout is not None else None
    value = message.value()
    if older is None or message.key() is None or value is None or len(value) != older.itemsize:
        _refuse(message, spec)
    old = np.frombuffer(value, dtype=older, count=1)
    row = np.zeros(1, dtype=spec.dtype)
    for name in older.names or ():
        row[name] = old[name]
    return row.tobytes()


def _refuse(message: Message, spec: StoreSpec) -> NoReturn:
    """A record this store cannot read stops the restore: skipping it would silently lose state."""
    where = f"cannot restore state from changelog {message.topic()}[{message.partition()}] at offset {message.offset()}"
    value = message.value()
    if value is not None:  # a row: its layout and size first (a tombstone carries neither)
        check_layout(dict(consumed_headers(message) or ()).get(LAYOUT_HEADER), spec.layout, where=where)
        check_row_bytes(value, spec.dtype, where=where)
    if message.key() is None:
        raise StateError(f"{where}: the record has no key")
    raise StateError(f"{where}: unexpected headers {message.headers()!r}")


def _apply(table: KeyedTable, spec: StoreSpec, changes: dict[bytes, bytes | None]) -> None:
    puts = [(key, value) for key, value in changes.items() if value is not None]
    deletes = [key for key, value in changes.items() if value is None]
    if deletes:
        table.delete(deletes)
    if puts:
        keys = [key for key, _ in puts]
        table.put(keys, np.frombuffer(b"".join(value for _, value in puts), dtype=spec.dtype))
