"""Keyed state on the real broker: changelog topics, transactional writes, restore (read_committed)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from fraudstream.consumer.state.changelog import LAYOUT_HEADER, ensure_changelogs, write_rows, write_tombstones
from fraudstream.consumer.tasks import TaskManager
from fraudstream.consumer.state.recovery import Recovery
from fraudstream.consumer.state.stores import StoreSpec
from fraudstream.consumer.state.table import KeyedTable, layout_tag
from fraudstream.errors import StateError
from fraudstream.kafka import admin, transactional_producer_config
from tests.support.kafka_io import wait_until

ROW = np.dtype([("last_ms", "<i8"), ("count", "<i4"), ("total", "<f8")])
SPEC = StoreSpec(
    name="cards", dtype=ROW, layout=layout_tag("test_row", 1, ROW), expiry_field="last_ms", ttl_ms=3_600_000
)


def create_topic(settings, topic: NewTopic) -> None:
    client = admin(settings)  # kept alive until the future resolves
    client.create_topics([topic])[topic.topic].result(timeout=30)


def rows(*values) -> np.ndarray:
    return np.array(list(values), dtype=ROW)


def transactional(settings) -> Producer:
    producer = Producer(transactional_producer_config(settings, f"test-state-{uuid.uuid4().hex[:8]}"))
    producer.init_transactions(30)
    return producer


def restore(settings, topics, partition: int, spec: StoreSpec = SPEC) -> tuple[KeyedTable, int]:
    recovery = Recovery(settings, topics)
    table = KeyedTable(spec.dtype)
    try:
        progress = recovery.start(partition, {spec.name: table}, [spec])
        steps = 0
        while not progress.done:
            recovery.step(timeout_s=0.2)
            steps += 1
            assert steps < 500, "restore did not reach the changelog's end"
        return table, progress.records
    finally:
        recovery.close()


def row_of(table: KeyedTable, key: bytes):
    slot = int(table.lookup([key])[0])
    assert slot >= 0, f"{key!r} not in the table"
    return table.rows[slot]


def test_changelog_is_created_like_the_input_and_compacted(pipeline):
    topics = ensure_changelogs(pipeline, [SPEC])
    topic = topics["cards"]
    assert topic == pipeline.changelog_topic("cards")
    metadata = admin(pipeline).list_topics(timeout=10)
    assert len(metadata.topics[topic].partitions) == len(metadata.topics[pipeline.transactions_topic].partitions)
    # A second start finds it and accepts it.
    assert ensure_changelogs(pipeline, [SPEC]) == topics


def test_a_changelog_with_another_partition_count_is_refused(pipeline):
    topic = pipeline.changelog_topic("cards")
    create_topic(pipeline, NewTopic(topic, 1, 1, config={"cleanup.policy": "compact"}))
    with pytest.raises(StateError, match=r"has 1 partitions but the input topic .* has 3"):
        ensure_changelogs(pipeline, [SPEC])


def test_a_changelog_that_is_not_compacted_is_refused(pipeline):
    topic = pipeline.changelog_topic("cards")
    create_topic(pipeline, NewTopic(topic, 3, 1, config={"cleanup.policy": "delete"}))
    with pytest.raises(StateError, match="cleanup.policy=delete"):
        ensure_changelogs(pipeline, [SPEC])


def test_restore_reads_committed_changes_only_and_ends_after_the_commit_marker(pipeline):
    topics = ensure_changelogs(pipeline, [SPEC])
    topic = topics["cards"]
    producer = transactional(pipeline)
    producer.begin_transaction()
    write_rows(producer, topic, 1, SPEC, [b"a", b"b"], rows((10, 1, 1.5), (20, 2, 2.5)))
    producer.commit_transaction(30)
    producer.begin_transaction()
    write_rows(producer, topic, 1, SPEC, [b"a"], rows((11, 99, 99.0)))
    write_rows(producer, topic, 1, SPEC, [b"c"], rows((12, 5, 5.0)))
    assert producer.flush(30) == 0  # on the broker, so that only read_committed keeps them out
    producer.abort_transaction(30)
    producer.begin_transaction()
    write_rows(producer, topic, 1, SPEC, [b"b"], rows((21, 3, 3.5)))
    write_tombstones(producer, topic, 1, [b"a"])
    producer.commit_transaction(30)

    table, records = restore(pipeline, topics, 1)
    assert records == 4  # two rows, then one row and a tombstone: the aborted ones are never returned
    assert len(table) == 1 and table.lookup([b"a", b"c"]).tolist() == [-1, -1]
    assert row_of(table, b"b").tolist() == (21, 3, 3.5)
    # Other partitions hold nothing of this one's state.
    empty, none = restore(pipeline, topics, 0)
    assert len(empty) == 0 and none == 0


@pytest.mark.parametrize("bad", ["layout", "size", "no-header"])
def test_an_unreadable_changelog_record_stops_the_restore_naming_where(pipeline, bad):
    topics = ensure_changelogs(pipeline, [SPEC])
    topic = topics["cards"]
    good = rows((1, 1, 1.0)).tobytes()
    value, headers = {
        "layout": (good, [(LAYOUT_HEADER, layout_tag("test_row", 2, ROW))]),
        "size": (good + b"x", [(LAYOUT_HEADER, SPEC.layout)]),
        "no-header": (good, None),
    }[bad]
    producer = transactional(pipeline)
    producer.begin_transaction()
    write_rows(producer, topic, 2, SPEC, [b"ok"], rows((1, 1, 1.0)))
    producer.produce(topic, value, b"bad", partition=2, headers=headers)
    producer.commit_transaction(30)
    with pytest.raises(StateError, match=rf"changelog {topic}\[2\] at offset 1"):
        restore(pipeline, topics, 2)


class FakeConsumer:
    """Records assign/pause/resume calls from the task manager (the real consumer is exercised by the detector
    tests)."""

    def __init__(self, topic: str, partitions) -> None:
        self.topic = topic
        self.assigned = [TopicPartition(topic, p) for p in partitions]
        self.incrementally_assigned: list[int] = []
        self.paused: set[int] = set()
        self.resumed: list[int] = []

    def incremental_assign(self, partitions):
        self.incrementally_assigned += [tp.partition for tp in partitions]

    def assignment(self):
        return self.assigned

    def pause(self, partitions):
        self.paused.update(tp.partition for tp in partitions)

    def resume(self, partitions):
        for tp in partitions:
            self.paused.discard(tp.partition)
            self.resumed.append(tp.partition)


def test_manager_pauses_a_partition_until_its_state_is_restored_then_writes_changes(pipeline):
    manager = TaskManager(pipeline, [SPEC])
    manager.start()
    topic = manager.topics["cards"]
    producer = transactional(pipeline)
    producer.begin_transaction()
    write_rows(
        producer, topic, 0, SPEC, [b"k%d" % i for i in range(500)], rows(*[(i, i, float(i)) for i in range(500)])
    )
    producer.commit_transaction(30)

    consumer = FakeConsumer(pipeline.transactions_topic, [0, 1])
    manager.assign(consumer, consumer.assigned)
    assert consumer.incrementally_assigned == [0, 1]  # by the callback itself, so that they can be paused at once
    assert 1 in consumer.resumed and manager.ready(1)  # empty changelog partition: ready at once
    assert consumer.paused == {0} and not manager.ready(0)
    wait_until(
        lambda: manager.recover_step(consumer) or manager.ready(0), timeout_s=30, what="restore", interval_s=0.01
    )
    assert consumer.paused == set() and len(manager.tables(0)["cards"]) == 500

    table = manager.tables(0)["cards"]
    slots = table.slots([b"k1", b"new"])
    table.rows[slots] = rows((1_000, 7, 7.0), (2_000, 1, 1.0))
    table.mark_dirty(slots)
    producer.begin_transaction()
    assert manager.write_changes(producer, [0]) == 2
    producer.commit_transaction(30)

    again, _ = restore(pipeline, manager.topics, 0)
    assert len(again) == 501 and row_of(again, b"k1").tolist() == (1_000, 7, 7.0)
    manager.revoke([TopicPartition(pipeline.transactions_topic, 0)])
    assert not manager.ready(0)
    manager.close()


def test_keys_idle_past_their_ttl_are_dropped_and_tombstoned(pipeline, monkeypatch):
    import fraudstream.consumer.tasks as tasks_module

    monkeypatch.setattr(tasks_module, "EXPIRE_EVERY_S", 0.0)  # expire at every write, not every 10 s
    manager = TaskManager(pipeline, [SPEC])
    manager.start()
    consumer = FakeConsumer(pipeline.transactions_topic, [0])
    manager.assign(consumer, consumer.assigned)
    table = manager.tables(0)["cards"]
    hour = 3_600_000
    now = 100 * hour
    stale = now - SPEC.ttl_ms - tasks_module.LATE_TOLERANCE_MS - 1  # idle past its TTL and the tolerance
    slots = table.slots([b"stale", b"recent", b"fresh"])
    table.rows[slots] = rows((stale, 1, 1.0), (now - SPEC.ttl_ms, 2, 2.0), (now, 3, 3.0))
    table.mark_dirty(slots)
    producer = transactional(pipeline)
    producer.begin_transaction()
    written = manager.write_changes(producer, [0])
    producer.commit_transaction(30)
    assert written == 4 and manager.tombstones == 1  # three rows, then one tombstone
    assert table.lookup([b"stale", b"recent", b"fresh"]).tolist()[0] == -1
    again, records = restore(pipeline, manager.topics, 0)
    assert records == 4 and sorted(again.keys()) == [b"fresh", b"recent"]
    manager.close()


def test_restore_waits_for_a_transaction_still_open_on_the_changelog(pipeline):
    """The previous owner's last batch may still be committing when the partition moves: the restore must
    take its changes, so it runs to the high watermark, not to the last stable offset."""
    topics = ensure_changelogs(pipeline, [SPEC])
    producer = transactional(pipeline)
    producer.begin_transaction()
    write_rows(producer, topics["cards"], 0, SPEC, [b"late"], rows((5, 5, 5.0)))
    assert producer.flush(30) == 0  # on the broker, not yet committed
    recovery = Recovery(pipeline, topics)
    table = KeyedTable(SPEC.dtype)
    try:
        progress = recovery.start(0, {"cards": table}, [SPEC])
        for _ in range(5):
            recovery.step(timeout_s=0.2)
        assert not progress.done  # a read_committed end (the LSO) would have ended it, empty
        producer.commit_transaction(30)
        wait_until(lambda: recovery.step(timeout_s=0.2) or progress.done, timeout_s=30, what="restore", interval_s=0.01)
    finally:
        recovery.close()
    assert row_of(table, b"late").tolist() == (5, 5, 5.0)


def expire_once(pipeline, spec: StoreSpec, keyed_rows: dict[bytes, tuple], *, removed: tuple[bytes, ...] = ()):
    """Write these rows to partition 0's table, remove some keys, and run the expiry once; (manager, table)."""
    manager = TaskManager(pipeline, [spec])
    manager.start()
    consumer = FakeConsumer(pipeline.transactions_topic, [0])
    manager.assign(consumer, consumer.assigned)
    table = manager.tables(0)[spec.name]
    slots = table.slots(list(keyed_rows))
    table.rows[slots] = rows(*keyed_rows.values())
    table.mark_dirty(slots)
    table.remove(list(removed))
    producer = transactional(pipeline)
    producer.begin_transaction()
    manager.write_changes(producer, [0])
    producer.commit_transaction(30)
    manager.close()
    return manager, table


def test_expiry_takes_stream_time_from_live_rows_only(pipeline, monkeypatch):
    """A freed slot keeps its old values: a removed row dated ahead is no stream time."""
    import time

    import fraudstream.consumer.tasks as tasks_module

    monkeypatch.setattr(tasks_module, "EXPIRE_EVERY_S", 0.0)  # expire at every write, not every 10 s
    now = int(time.time() * 1000)
    _, table = expire_once(
        pipeline, SPEC, {b"now": (now, 1, 1.0), b"gone": (now + 20 * 3_600_000, 2, 2.0)}, removed=(b"gone",)
    )
    assert b"now" in table


def test_one_event_time_far_ahead_of_the_clock_does_not_age_out_the_other_rows(pipeline, monkeypatch):
    """One record dated 40 days ahead (a terminal whose clock is wrong) moved the partition's stream time by 40
    days, and expired every card of the partition: expiry trusts event time at most a day past the clock."""
    import time

    import fraudstream.consumer.tasks as tasks_module
    from fraudstream.consumer.stateful import CARDS
    from fraudstream.consumer.state.stores import EXPIRY_MAX_AHEAD_MS

    monkeypatch.setattr(tasks_module, "EXPIRE_EVERY_S", 0.0)
    month = CARDS.ttl_ms
    spec = StoreSpec(name="cards", dtype=ROW, layout=SPEC.layout, expiry_field="last_ms", ttl_ms=month)
    now = int(time.time() * 1000)
    manager, table = expire_once(
        pipeline, spec, {b"now": (now, 1, 1.0), b"clock-ahead": (now + 40 * 24 * 3_600_000, 3, 3.0)}
    )
    assert b"now" in table and b"clock-ahead" in table and manager.tombstones == 0
    assert EXPIRY_MAX_AHEAD_MS < month - tasks_module.LATE_TOLERANCE_MS  # why "now" stays


def test_a_store_without_ttl_is_never_expired(pipeline, monkeypatch):
    """Held records' rows go with their output, never by age: the store has no TTL."""
    import fraudstream.consumer.tasks as tasks_module
    from fraudstream.consumer.held import HELD

    monkeypatch.setattr(tasks_module, "EXPIRE_EVERY_S", 0.0)
    assert HELD.ttl_ms is None
    spec = StoreSpec(name="held", dtype=ROW, layout=SPEC.layout, expiry_field="last_ms", ttl_ms=None)
    manager = TaskManager(pipeline, [spec])
    manager.start()
    consumer = FakeConsumer(pipeline.transactions_topic, [0])
    manager.assign(consumer, consumer.assigned)
    table = manager.tables(0)["held"]
    slots = table.slots([b"old", b"new"])
    table.rows[slots] = rows((0, 1, 1.0), (10**15, 2, 2.0))
    table.mark_dirty(slots)
    producer = transactional(pipeline)
    producer.begin_transaction()
    assert manager.write_changes(producer, [0]) == 2
    producer.commit_transaction(30)
    assert b"old" in table and manager.tombstones == 0
    manager.close()


def test_a_reset_of_a_partition_no_longer_assigned_drops_its_state_and_says_so(pipeline):
    """After an abort, state changed by the batch is rebuilt; a partition revoked meanwhile is dropped, not
    restored (its new owner does that), and the log line says which."""
    lines = []
    manager = TaskManager(pipeline, [SPEC], on_log=lines.append)
    manager.start()
    consumer = FakeConsumer(pipeline.transactions_topic, [0, 1])
    manager.assign(consumer, consumer.assigned)
    assert manager.ready(0) and manager.ready(1)
    consumer.assigned = consumer.assigned[:1]  # partition 1 revoked by the consumer, before the reset
    manager.reset(consumer, [0, 1])
    wait_until(
        lambda: manager.recover_step(consumer) or manager.ready(0), timeout_s=30, what="restore", interval_s=0.01
    )
    assert not manager.ready(1) and 1 not in consumer.paused
    assert any("[1] dropped" in line for line in lines), lines
    manager.close()
