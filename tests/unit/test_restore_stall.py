"""A restore that stops moving is logged with where it is and what the partition's leader says now, asked
without blocking the detector (stand-in clients: the stall itself is what a broker restart can cause)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from types import SimpleNamespace

from confluent_kafka import OFFSET_INVALID, IsolationLevel, KafkaError, KafkaException, TopicPartition

import fraudstream.consumer.state.recovery as recovery
from fraudstream.consumer.state.recovery import Recovery, RestoreProgress, _Restoring
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import CARDS
from fraudstream.settings import Settings


class StuckConsumer:
    """Assigned, and fetching nothing: its position stays at offset 5."""

    def __init__(self):
        self.refreshed = []

    def list_topics(self, topic, timeout):
        self.refreshed.append(topic)

    def consume(self, num_messages, timeout):
        return []

    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, 5) for tp in partitions]


class Leader:
    """The changelog partition's leader: its last stable offset and high watermark (9 and 12 by default), or an
    error for every ask."""

    def __init__(self, stable: int = 9, high: int = 12, error: KafkaError | None = None):
        self.stable, self.high, self.error = stable, high, error
        self.asked = []

    def list_offsets(self, specs, isolation_level, request_timeout):
        self.asked.append(isolation_level)
        answers = {}
        for tp in specs:
            answers[tp] = Future()
            if self.error is not None:
                answers[tp].set_exception(KafkaException(self.error))
            else:
                committed = isolation_level == IsolationLevel.READ_COMMITTED
                answers[tp].set_result(SimpleNamespace(offset=self.stable if committed else self.high))
        return answers


class NeverFetched(StuckConsumer):
    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, OFFSET_INVALID) for tp in partitions]


def stalled_restore(monkeypatch, consumer, leader, end):
    """A restore of one changelog partition that will not move, reported at once when it does not."""
    monkeypatch.setattr(recovery, "STALL_LOG_AFTER_S", 0.0)
    monkeypatch.setattr(recovery, "METADATA_REFRESH_AFTER_S", 0.0)
    restore = Recovery(Settings(), {CARDS.name: "cards.changelog"})
    restore.consumer.close()
    restore.offsets.close()
    restore.consumer, restore._admin = consumer, leader
    stuck = _Restoring(CARDS, KeyedTable(CARDS.dtype), end=end)
    restore._by_topic_partition[("cards.changelog", 0)] = stuck
    restore.restoring[0] = RestoreProgress(0, stores={CARDS.name: stuck})
    return restore, stuck


def test_a_restore_that_has_not_moved_is_logged_with_its_offsets(monkeypatch, caplog):
    restore, stuck = stalled_restore(monkeypatch, StuckConsumer(), Leader(), end=12)
    with caplog.at_level(logging.WARNING, logger="fraudstream.state"):
        assert restore.step() == []  # first look: the position is noted
        assert restore.step() == []  # still there: reported
    assert restore.stalls == 1 and not stuck.done
    assert (
        "restoring changelog cards.changelog[0] has not moved for 0 s: at offset 5 of 12 "
        "(last stable offset 9, high watermark 12)" in caplog.text
    )
    assert restore._admin.asked == [IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED]
    assert restore.consumer.refreshed == ["cards.changelog"]  # and its leaders were asked again


def test_a_restore_held_by_an_open_transaction_says_so_and_how_to_end_it(monkeypatch, caplog):
    """CI: a transaction whose markers the broker skipped held a changelog partition's last stable offset at 0;
    the restore waited ten minutes, logged only as 'has not moved'."""
    restore, _ = stalled_restore(monkeypatch, NeverFetched(), Leader(stable=0, high=108), end=108)
    with caplog.at_level(logging.WARNING, logger="fraudstream.state"):
        restore.step()
        restore.step()
    assert restore.stalls == 1
    assert "(last stable offset 0, high watermark 108; reading stops at offset 0, where a transaction" in caplog.text
    assert "kafka-transactions.sh find-hanging" in caplog.text


def test_a_failed_offsets_query_is_asked_next_time_with_a_new_client(monkeypatch, caplog):
    stale = Leader(error=KafkaError(KafkaError.FENCED_LEADER_EPOCH))
    restore, _ = stalled_restore(monkeypatch, StuckConsumer(), stale, end=12)
    with caplog.at_level(logging.WARNING, logger="fraudstream.state"):
        restore.step()
        restore.step()
    assert "its offsets unknown now" in caplog.text and "hanging" not in caplog.text
    assert restore._admin is None and stale.asked  # asked, failed, dropped: the next report makes a new client
