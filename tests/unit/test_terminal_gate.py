"""The terminal window's event-time gate, with a stand-in consumer: a batch is decided only once every input
partition is read past its latest event time plus the tolerance, or to its end; a partition that stays
behind is logged and counted, and ends the wait with one clear error: never a silent wrong answer."""

from __future__ import annotations

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

import time
from concurrent.futures import Future
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

import fraudstream.consumer.terminal as terminal
from fraudstream.consumer.decide import Route
from fraudstream.consumer.stateful import decode_batch
from fraudstream.consumer.terminal import TerminalReader
from fraudstream.errors import KafkaUnavailable
from fraudstream.settings import Settings
from tests.support.decoding import decider_pair

T0 = 1_767_225_600_000


class StandInConsumer:
    """Partition -> (end offset, position); consume() returns nothing (nothing new arrives). Also stands in
    for the admin client that asks the partitions' ends."""

    def __init__(self, ends: dict[int, int], positions: dict[int, int]) -> None:
        self.ends, self.positions = ends, positions
        self.polls = 0
        self.asked_ends_at: list[float] = []  # wall clock (ms) of each end asked of the broker
        self.refreshes = 0  # metadata requests

    def list_topics(self, topic: str, timeout: float) -> None:
        self.refreshes += 1

    def consume(self, num_messages: int, timeout: float) -> list:
        self.polls += 1
        return []

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False, timeout: float | None = None):
        return 0, self.ends[tp.partition]

    def list_offsets(self, specs: dict, request_timeout: float, isolation_level) -> dict:
        answers = {}
        for tp in specs:
            self.asked_ends_at.append(time.time() * 1000)
            answers[tp] = Future()
            answers[tp].set_result(SimpleNamespace(offset=self.get_watermark_offsets(tp)[1]))
        return answers

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions[tp.partition]) for tp in partitions]

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]  # nothing committed yet


class LateRecordConsumer(StandInConsumer):
    """A record created before the batch's newest lands on partition 2 at `lands_at_ms` (it was still in its
    producer's batch); consume() reads whatever has landed (the position moves to the end)."""

    def __init__(self, ends: dict[int, int], positions: dict[int, int], lands_at_ms: float) -> None:
        super().__init__(ends, positions)
        self.lands_at_ms = lands_at_ms

    def _land(self) -> None:
        if time.time() * 1000 >= self.lands_at_ms and self.ends[2] == 7:
            self.ends[2] = 8

    def consume(self, num_messages: int, timeout: float) -> list:
        self._land()
        self.positions = dict(self.ends)
        return super().consume(num_messages, timeout)

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False, timeout: float | None = None):
        self._land()
        return super().get_watermark_offsets(tp, cached, timeout)


def reader(
    consumer: StandInConsumer,
    latest: dict[int, int],
    log: list[str],
    gates: list,
    idle_ms: int = Settings().terminal_idle_ms,
    stall_ms: int = Settings().terminal_stall_ms,
    outage_limit_s: float = 1,
) -> TerminalReader:
    settings = Settings().replace(
        broker_outage_limit_s=outage_limit_s, terminal_idle_ms=idle_ms, terminal_stall_ms=stall_ms
    )
    r = TerminalReader(
        settings,
        decode=lambda messages: None,
        on_log=log.append,
        on_gate=lambda stats: gates.append(dict(stats.stalled)),
    )
    r.consumer, r.admin, r.partitions = consumer, consumer, sorted(consumer.ends)
    r._latest = dict(latest)
    r._next = dict(consumer.positions)
    return r


def test_a_partition_read_past_the_batch_or_at_its_end_lets_the_batch_through() -> None:
    log, gates = [], []
    # Partition 0 holds the batch (read to its last offset) and is at its end; 1 is read past T + tolerance
    # with records left; 2 is at its end, far behind in event time.
    consumer = StandInConsumer(ends={0: 40, 1: 90, 2: 7}, positions={0: 40, 1: 60, 2: 7})
    r = reader(consumer, {0: T0, 1: T0 + terminal.TERMINAL_TOLERANCE_MS + 1, 2: T0 - 5_000}, log, gates)
    created_long_ago = time.time() * 1000 - 60_000  # a backlog: the idle time has long passed
    r.wait_for(T0, {0: 40}, created_long_ago)
    assert consumer.polls == 0 and not log and r.stats.waits == 0
    assert len(consumer.asked_ends_at) == 2  # partitions 0 and 2 at their end, as the broker says now


def test_a_partition_at_its_end_counts_only_after_the_idle_time_since_the_newest_record_was_created() -> None:
    """A record created just before the batch's newest, on another partition, lands 100 ms later: the
    batch waits for it instead of being decided without it."""
    created = time.time() * 1000
    consumer = LateRecordConsumer(ends={0: 40, 2: 7}, positions={0: 40, 2: 7}, lands_at_ms=created + 100)
    r = reader(consumer, {0: T0, 2: T0 - 5_000}, [], [], idle_ms=300)
    r.wait_for(T0, {0: 40}, created)
    assert consumer.positions[2] == 8, "decided before the late record was read"
    assert consumer.polls > 0 and r.stats.waits == 1
    assert min(consumer.asked_ends_at) >= created + 300  # the end asked only once the idle time had passed


def test_a_partition_at_its_end_that_stopped_short_of_the_others_is_waited_for_until_its_records_land() -> None:
    """Soak 3016: partition 2's newest readable record was created 3 s before the batch's newest (its replicas
    stalled; acks=all makes a record readable only once they have it). At its end after the idle time, it was
    trusted, and the batch was decided without a record created just before its newest, at the same terminal:
    a compromised-terminal victim went out legit. Now such a partition is waited for, up to the stall time."""
    created = time.time() * 1000
    consumer = LateRecordConsumer(ends={0: 40, 2: 7}, positions={0: 40, 2: 7}, lands_at_ms=created + 600)
    r = reader(consumer, {0: T0, 2: T0 - 5_000}, [], [], idle_ms=100, stall_ms=5_000, outage_limit_s=20)
    r._created = {0: int(created), 2: int(created) - 3_000}  # partition 2 went silent 3 s before the batch
    r.wait_for(T0, {0: 40}, int(created))
    # The stand-in's landed record carries no timestamp to read, so the wait runs its whole stall time.
    assert consumer.positions[2] == 8, "decided before the stalled partition's record was read"
    assert time.time() * 1000 >= created + 5_000 and r.stats.waits == 1


def test_a_partition_quiet_for_longer_than_the_stall_time_is_trusted_at_its_end() -> None:
    """A partition that simply has no traffic costs no wait once it has been silent past terminal_stall_ms."""
    created = time.time() * 1000
    consumer = StandInConsumer(ends={0: 40, 2: 7}, positions={0: 40, 2: 7})
    r = reader(consumer, {0: T0, 2: T0 - 5_000}, [], [], idle_ms=0)
    r._created = {0: int(created), 2: int(created) - Settings().terminal_stall_ms - 1}
    started = time.monotonic()
    r.wait_for(T0, {0: 40}, int(created))
    assert time.monotonic() - started < 1.0 and r._stalled(int(created)) == set()


def test_a_partition_behind_and_not_at_its_end_is_logged_counted_and_ends_the_wait(monkeypatch) -> None:
    monkeypatch.setattr(terminal, "GATE_LOG_EVERY_S", 0.1)
    monkeypatch.setattr(terminal, "METADATA_REFRESH_EVERY_S", 0.2)
    log, gates = [], []
    # Partition 1: read only up to T + tolerance (not past it), and records remain (position 60 of 90).
    consumer = StandInConsumer(ends={0: 50, 1: 90}, positions={0: 40, 1: 60})
    r = reader(
        consumer, {0: T0 + terminal.TERMINAL_TOLERANCE_MS + 1, 1: T0 + terminal.TERMINAL_TOLERANCE_MS}, log, gates
    )
    with pytest.raises(KafkaUnavailable, match=r"input partitions \[1\] .* not read past event time"):
        r.wait_for(T0, {0: 40})
    assert consumer.polls > 1  # it kept reading while it waited
    assert consumer.refreshes >= 2  # and asked for the leaders again (reader and end queries alike)
    assert any("waiting for input partitions [1]" in line for line in log)
    assert gates and all(list(g) == [1] for g in gates) and list(r.stats.stalled) == [1]


def test_a_batch_partition_not_yet_read_by_the_window_holds_the_gate(monkeypatch) -> None:
    log, gates = [], []
    consumer = StandInConsumer(ends={0: 50}, positions={0: 40})
    r = reader(consumer, {0: T0 + 10 * terminal.TERMINAL_TOLERANCE_MS}, log, gates)
    with pytest.raises(KafkaUnavailable):
        r.wait_for(T0, {0: 45})  # the batch reaches offset 44; the window has read up to 39


def test_the_features_of_an_empty_batch_need_no_gate() -> None:
    from fraudstream.consumer.features import TxColumns

    r = reader(StandInConsumer(ends={0: 1}, positions={0: 0}), {}, [], [])
    empty = TxColumns.concat_in_order([])
    assert r.features(empty, np.zeros(0, np.int64), np.zeros(0, np.int64))["terminal_cards"].tolist() == []


class StandInMessage:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def error(self):
        return None

    def timestamp(self):
        return (TIMESTAMP_NOT_AVAILABLE, -1)


def test_a_read_adds_the_decoded_records_at_their_own_positions_and_moves_past_every_message() -> None:
    """Records interleaved from three partitions, one of them a dead letter (never an event), the last
    message of partition 2 among them: each event sits at its own (partition, offset), and every partition's
    next offset and latest event time move past what was read, dead letters included."""
    import pyarrow as pa

    from fraudstream.consumer.features import hash_strings
    from fraudstream.consumer.stateful import DecodedBatch

    messages = [StandInMessage(p, o) for p, o in [(0, 10), (1, 5), (0, 11), (2, 30), (1, 6), (2, 31)]]
    taken = [0, 1, 2, 4, 5]  # message 3 (partition 2, offset 30) is a dead letter
    columns = pa.RecordBatch.from_pydict(
        {
            "terminal_id": [f"term-{i}" for i in taken],
            "card_id": [f"card-{i}" for i in taken],
            "event_time": pa.array([T0 + 1000 * i for i in taken], pa.timestamp("ms", tz="UTC")),
        }
    )
    decoded = DecodedBatch(dead={3: None}, columns=columns, column_rows=taken)
    r = TerminalReader(Settings(), decode=lambda _messages: decoded)
    first = r._ingest(messages, first_t_wanted=True)
    assert r._next == {0: 12, 1: 7, 2: 32}
    assert r._latest == {0: T0 + 2000, 1: T0 + 4000, 2: T0 + 5000}
    assert first == {0: T0, 1: T0 + 1000, 2: T0 + 5000}
    assert sorted(r.window._pos.tolist()) == sorted(
        terminal.position_keys(
            np.array([messages[i].partition() for i in taken]), np.array([messages[i].offset() for i in taken])
        ).tolist()
    )
    # Each event's terminal and card are its own record's, found through its position.
    by_position = dict(zip(r.window._pos.tolist(), r.window._card.tolist(), strict=True))
    cards = hash_strings([f"card-{i}" for i in taken])
    for i, card in zip(taken, cards.tolist(), strict=True):
        assert (
            by_position[
                int(terminal.position_keys(np.array([messages[i].partition()]), np.array([messages[i].offset()]))[0])
            ]
            == card
        )


class SeedingConsumer:
    """One partition of `count` records, committed at `committed`; consume() hands out what the assignment
    reaches, past the committed offset too (as a real read does once it has fetched further)."""

    def __init__(self, count: int, committed: int) -> None:
        self.count, self.committed_offset = count, committed
        self.positions: dict[int, int] = {}

    def committed(self, partitions, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self.committed_offset) for tp in partitions]

    def get_watermark_offsets(self, tp, cached=False, timeout=None):
        return 0, self.count

    def assign(self, partitions):
        self.positions = {tp.partition: tp.offset for tp in partitions}

    def incremental_unassign(self, partitions):
        for tp in partitions:
            self.positions.pop(tp.partition, None)

    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, -1001)) for tp in partitions]

    def consume(self, num_messages, timeout):
        out = []
        for p, at in self.positions.items():
            upto = min(self.count, at + num_messages - len(out))
            out += [StandInMessage(p, o) for o in range(at, upto)]
            self.positions[p] = upto
        return out


def test_a_seed_reaches_back_a_window_before_the_committed_offset_whatever_a_read_returns_beyond_it(monkeypatch):
    """The seed's horizon comes from the records before the committed offset: records a read returns after it
    (later event times) must not move the horizon forward and leave the window's history short."""
    import pyarrow as pa

    from fraudstream.consumer.stateful import DecodedBatch

    step = 100  # ms of event time between records: 10,000 records span 1,000 s
    count, committed = 20_000, 10_000

    def decode(messages):
        offsets = [m.offset() for m in messages]
        return DecodedBatch(
            columns=pa.RecordBatch.from_pydict(
                {
                    "terminal_id": [f"term-{o % 7}" for o in offsets],
                    "card_id": [f"card-{o % 13:03d}" for o in offsets],
                    "event_time": pa.array([T0 + step * o for o in offsets], pa.timestamp("ms", tz="UTC")),
                }
            ),
            column_rows=list(range(len(messages))),
        )

    monkeypatch.setattr(terminal, "READ_CHUNK", 10_000)  # one read returns the whole rest of the partition
    r = TerminalReader(Settings(), decode=decode, on_log=lambda line: None)
    r.consumer, r.partitions = SeedingConsumer(count, committed), [0]
    r.seed()
    latest_before = T0 + step * (committed - 1)
    horizon = latest_before - r.window.window_ms - 2 * r.tolerance_ms
    assert int(r.window._t.min()) <= horizon, "the history held starts after the horizon: decisions would miss events"
    # The first read (from 8,000) returned 10,000 records, 8,000 of them past the committed offset: they are
    # held, and reading goes on after them.
    assert r._next == {0: 18_000} and int(r.window._t.max()) == T0 + step * 17_999


class UnansweredFirstConsumer(StandInConsumer):
    """The first ask of an end fails (a broker away); the gate must keep reading and ask again, never block."""

    def list_offsets(self, specs: dict, request_timeout: float, isolation_level) -> dict:
        if not self.asked_ends_at:
            self.asked_ends_at.append(time.time() * 1000)
            failed = Future()
            failed.set_exception(KafkaException("broker transport failure"))
            return dict.fromkeys(specs, failed)
        return super().list_offsets(specs, request_timeout, isolation_level)


def test_an_end_the_broker_did_not_answer_is_asked_again() -> None:
    consumer = UnansweredFirstConsumer(ends={0: 40}, positions={0: 40})
    r = reader(consumer, {0: T0}, [], [], idle_ms=0)
    r.wait_for(T0, {0: 40}, time.time() * 1000 - 60_000)
    assert len(consumer.asked_ends_at) == 2 and consumer.polls >= 1


@pytest.mark.parametrize(
    "code", [KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE]
)
def test_a_group_coordinator_starting_or_moving_is_waited_for(code) -> None:
    """Seen at start on a fresh three-broker cluster: committed offsets answered 'Not coordinator'."""
    r = reader(StandInConsumer(ends={0: 1}, positions={0: 0}), {}, [], [])
    answers = iter([KafkaException(KafkaError(code)), KafkaException(KafkaError(code)), "committed"])

    def committed():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert r.call("reading the committed offsets", committed) == "committed"


def test_another_broker_error_still_ends_the_call_with_one_line() -> None:
    r = reader(StandInConsumer(ends={0: 1}, positions={0: 0}), {}, [], [])

    def refused():
        raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))

    with pytest.raises(KafkaUnavailable, match="terminal reader: reading the committed offsets failed"):
        r.call("reading the committed offsets", refused)


# ----- held records (consumer/held.py): when the window answers for a look-ahead -----
AHEAD_MS = 120_000


def ready(r) -> None:
    """Readiness between batches with records held (what the decider's ready asks of the reader)."""
    r.ready(None, oldest_held_ms=T0, holding=True, idle_ms=2_000)


def test_a_held_record_is_due_once_every_partition_is_read_past_its_look_ahead() -> None:
    # Partition 0 has records left to read, so only event time can release; 1 has just been read to its end.
    consumer = StandInConsumer(ends={0: 90, 1: 60}, positions={0: 40, 1: 60})
    just_now = time.time() * 1000
    past = T0 + AHEAD_MS + terminal.TERMINAL_TOLERANCE_MS
    r = reader(consumer, {0: past + 1, 1: past}, [], [])
    r._created = {0: just_now, 1: just_now}  # both wrote a record just now: neither is quiet
    times, created = np.array([T0, T0 - 1]), np.array([just_now - 10, just_now - 10])
    assert r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [False, True]
    assert not consumer.asked_ends_at  # no partition looked quiet: no end asked
    r._latest[1] = past + 1
    assert r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [True, True]


def test_a_quiet_partition_at_its_end_stops_holding_records_created_an_idle_time_before_it_was_found_so() -> None:
    # Partition 1 is far behind in event time but at its end, its newest record created 10 s ago: the stream
    # stopped. Asked once (asynchronously), then the records created 2 s or more before the ask are due.
    now = time.time() * 1000
    consumer = StandInConsumer(ends={0: 90, 1: 60}, positions={0: 90, 1: 60})
    r = reader(consumer, {0: T0 + 10 * AHEAD_MS, 1: T0 - AHEAD_MS}, [], [])
    r._created = {0: now, 1: now - 10_000}
    times = np.array([T0, T0])
    created = np.array([now - 5_000, now - 500])  # the second was created after partition 1 went quiet... and recently
    assert r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [False, False]  # nothing asked yet
    assert not consumer.asked_ends_at  # releasable itself asks nothing: decide does no I/O
    ready(r)  # readiness, before the next decide: the end is asked
    assert len(consumer.asked_ends_at) == 1
    assert r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [False, False]  # not answered then
    ready(r)  # the answer is taken
    assert r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [True, False]
    assert r.cut_short(times, AHEAD_MS) == ["1", "1"]  # partition 1's look-ahead was not read: named


def test_a_partition_at_its_end_that_stopped_short_of_the_others_is_quiet_only_after_the_stall_time() -> None:
    """Soak 3023: six held compromised-terminal victims on partition 1 went out early, as legit, with their own
    partition named quiet. Its producer or replicas had stalled (a broker frozen): it sat at its end with its
    newest record seconds older than the other partitions', which kept being written. Such a partition is not
    quiet until the stall time has passed since its newest record; then it is, so an uneven stop still releases."""
    now = time.time() * 1000
    consumer = StandInConsumer(ends={0: 90, 1: 60}, positions={0: 90, 1: 60})
    r = reader(consumer, {0: T0 + 10 * AHEAD_MS, 1: T0 - AHEAD_MS}, [], [])
    r._created = {0: now, 1: now - 3_000}  # partition 0 written just now; 1 stopped 3 s before it
    times, created = np.array([T0]), np.array([now - 20_000])
    ready(r)  # asked
    ready(r)  # answered: at its end, nothing created for 3 s
    assert len(consumer.asked_ends_at) >= 1 and 1 not in r._quiet
    assert r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [False]
    r._created = {0: now - 8_000, 1: now - 11_000}  # the same gap, and the stream stopped: past the stall time
    ready(r)
    ready(r)
    assert 1 in r._quiet and r.releasable(times, created, AHEAD_MS, idle_ms=2_000).tolist() == [True]


def test_a_record_whose_look_ahead_every_partition_answered_is_not_cut_short() -> None:
    past = T0 + AHEAD_MS + terminal.TERMINAL_TOLERANCE_MS
    r = reader(
        StandInConsumer(ends={0: 90, 1: 60, 2: 5}, positions={0: 40, 1: 60, 2: 5}), {0: past + 1, 1: past}, [], []
    )
    assert r.cut_short(np.array([T0 - 1, T0]), AHEAD_MS) == ["2", "1,2"]  # 2 never read: behind everything


def test_a_partition_with_records_left_to_read_is_not_quiet_however_old_its_newest_record() -> None:
    now = time.time() * 1000
    consumer = StandInConsumer(ends={0: 90}, positions={0: 50})  # 40 records still to read
    r = reader(consumer, {0: T0}, [], [])
    r._created = {0: now - 60_000}
    for _ in range(3):
        ready(r)
        assert r.releasable(np.array([T0]), np.array([now - 30_000]), AHEAD_MS, idle_ms=2_000).tolist() == [False]
    assert len(consumer.asked_ends_at) >= 1 and 0 not in r._quiet


class NoMoreCalls(Exception):
    pass


def test_after_ready_the_decider_decides_and_releases_with_no_wait_and_no_call_to_kafka() -> None:
    """Pure decide: everything that waits or reads is in `ready`. With every client call refused after it,
    decide_prepared still decides the batch, holds its in-person payment, and releases the one held earlier
    on the quiet partition's answer that `ready` took."""
    from fraudstream.consumer.stateful import prepare_batch
    from tests.support.decoding import encode
    from tests.support.stateful_standins import Message, State, in_person, stateful_decider

    now = time.time() * 1000
    consumer = StandInConsumer(ends={0: 90, 1: 60}, positions={0: 90, 1: 60})
    r = reader(consumer, {0: T0 + 10 * AHEAD_MS, 1: T0 - AHEAD_MS}, [], [])
    r._created = {0: now, 1: now - 10_000}  # partition 1 stopped 10 s ago
    r.decode = lambda messages: None
    decider = stateful_decider(r, State())
    decider.hold_idle_ms = 2_000
    first = decider.decide_batch([Message(encode(in_person(0)), 0)])  # held: partition 1 not past its look-ahead
    assert first.held == 1 and not first.released
    later = [Message(encode(in_person(1)), 1)]
    batch = prepare_batch(later, decider.decode(later), with_offsets=True)
    decider.ready(batch)  # asks partition 1's end, and takes the answer next time
    decider.ready(batch)
    asked, polls = len(consumer.asked_ends_at), consumer.polls

    def refused(*args, **kwargs):
        raise NoMoreCalls

    for call in ("consume", "list_offsets", "position", "committed", "get_watermark_offsets", "list_topics"):
        setattr(consumer, call, refused)
    decided = decider.decide_prepared(batch)
    # Both released (each created before partition 1 went quiet), named as cut short on partition 1.
    assert decided.held == 1 and [record.offset() for record, _ in decided.released] == [0, 1]
    assert {dict(d.headers or ()).get("fraudstream.released_early") for _, d in decided.released} == {b"1"}
    assert (len(consumer.asked_ends_at), consumer.polls) == (asked, polls) and asked >= 1


class Record:
    """A record as a broker hands it out."""

    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self._partition, self._offset, self._value = partition, offset, value

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def value(self):
        return self._value

    def key(self):
        return b"acct"

    def topic(self):
        return "transactions"

    def headers(self):
        return None

    def error(self):
        return None

    def timestamp(self):
        return (1, 1_000)  # created long ago: no wait for records in flight


class LogConsumer:
    """Each partition's records as a broker holds them; consume() hands out at most `chunk` records of each
    assigned partition per call, from its position (a fetch never returns a whole partition at once)."""

    def __init__(self, logs: dict[int, list[bytes]], committed: dict[int, int], chunk: int = 4) -> None:
        self.logs, self.committed_at, self.chunk = logs, committed, chunk
        self.positions: dict[int, int] = {}

    def assign(self, tps: list[TopicPartition]) -> None:
        self.positions = {tp.partition: tp.offset for tp in tps}

    def incremental_unassign(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self.positions.pop(tp.partition, None)

    def consume(self, num_messages: int, timeout: float) -> list:
        out = []
        for p, at in sorted(self.positions.items()):
            taken = self.logs[p][at : at + self.chunk]
            out += [Record(p, at + i, value) for i, value in enumerate(taken)]
            self.positions[p] = at + len(taken)
        return out

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, -1001)) for tp in tps]

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.committed_at[tp.partition]) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False, timeout: float | None = None):
        return 0, len(self.logs[tp.partition])

    def list_offsets(self, specs: dict, request_timeout: float, isolation_level) -> dict:
        answers = {}
        for tp in specs:
            answers[tp] = Future()
            answers[tp].set_result(SimpleNamespace(offset=len(self.logs[tp.partition])))
        return answers

    def list_topics(self, topic: str, timeout: float) -> None:
        pass


def encoded_tx(i: int, seconds: float, **changes) -> bytes:
    """Transaction i, `seconds` of event time after T0, on a card and a terminal of its own unless changed."""
    from datetime import timedelta

    from tests.support.decoding import encode, make_tx

    event_time = datetime.fromtimestamp(T0 / 1000, tz=UTC) + timedelta(seconds=seconds)
    fields = dict(transaction_id=f"tx-{i}", card_id=f"card-{i}", terminal_id=f"term-{i}")
    return encode(make_tx(2_500, event_time=event_time, **{**fields, **changes}).to_dict())


def log_backed_reader(logs: dict[int, list[bytes]], committed: dict[int, int]) -> TerminalReader:
    """A terminal reader of partitions 0 and 1 as `logs` hold them, seeded from the `committed` offsets."""
    consumer = LogConsumer(logs, committed=committed)
    _, columnar = decider_pair()
    r = TerminalReader(
        Settings().replace(broker_outage_limit_s=5),
        decode=lambda messages: decode_batch(columnar, columnar.record_wise, messages),
    )
    r.consumer = r.admin = consumer
    r.partitions = [0, 1]
    r.seed()
    return r


def test_a_held_record_released_after_a_reseed_counts_the_cards_its_look_ahead_reaches() -> None:
    """Soak 3015: a detector given a partition with older held records reseeded its window, which reads each
    partition again only up to the group's committed offset. The release had already been judged due on the
    window as read before the reseed (far past the look-ahead), then counted the cards on the reseeded one:
    three victims' cards at the skimmer, after partition 1's committed offset, were not there, and the first
    victim went out legit. Now the reseed is part of readiness: a record is due on what the window holds."""
    from tests.support.stateful_standins import Message, State, stateful_decider

    tx = encoded_tx
    victim = tx(0, 0, terminal_id="skimmer", channel="CARD_PRESENT")
    filler0 = [tx(100 + i, 10 * (i + 1)) for i in range(60)]  # partition 0 reaches 10 minutes past the victim
    before = [tx(200 + i, -300 + i) for i in range(10)]  # partition 1, committed up to here
    between = [tx(300 + i, 10 + i) for i in range(10)]  # read once, then again after the reseed
    cards = [tx(400 + i, 30 * (i + 1), terminal_id="skimmer", channel="CARD_PRESENT") for i in range(3)]
    after = [tx(500 + i, 100 + 10 * i) for i in range(50)]
    logs = {0: [victim, *filler0], 1: [*before, *between, *cards, *after]}
    r = log_backed_reader(logs, committed={0: 0, 1: len(before)})
    state = State()
    decider = stateful_decider(r, state)
    first = decider.decide_batch([Message(victim, 0)])  # no other card yet: held for the look-ahead
    assert first.held == 1 and not first.released
    r.holds_from = T0 + 1  # the window no longer reaches back a window from the held record: reseed
    released = None
    for _ in range(40):
        released = decider.release_due()
        if released is not None:
            break
    assert r.stats.reseeds >= 1  # the path under test ran
    assert released is not None and len(state.held) == 0
    [(record, decision)] = released.released
    assert decision.route is Route.FRAUD and decision.rules == ("compromised_terminal",), decision


def test_a_batch_decided_while_held_records_reseed_the_window_counts_what_the_gate_read() -> None:
    """Soak 3018: a detector that had just taken partitions over (scale 3 -> 1) reseeded its window for older
    held records after the gate had let a batch through, so the batch was counted on a window read again only
    up to each partition's committed offset: the cards at a terminal, on partition 1 after its committed
    offset, were gone, and 10 compromised-terminal victims went out legit. The reseed now comes before the
    gate, which reads the window forward again."""
    from fraudstream.consumer.stateful import prepare_batch
    from tests.support.stateful_standins import Message, State, stateful_decider

    tx = encoded_tx

    # Held for its look-ahead (no other card yet), which nothing read in this test reaches.
    held_victim = tx(0, 300, terminal_id="other-skimmer", channel="CARD_PRESENT")
    victim = tx(1, 0, terminal_id="skimmer", channel="CARD_PRESENT")
    filler0 = [tx(100 + i, 10 * (i + 1)) for i in range(60)]
    before = [tx(200 + i, -900 + i) for i in range(10)]  # partition 1, committed up to here
    gap = [tx(300 + i, -800 + i) for i in range(5)]  # more than one fetch past the committed offset
    cards = [tx(400 + i, -30 + 10 * i, terminal_id="skimmer", channel="CARD_PRESENT") for i in range(3)]
    after = [tx(500 + i, 100 + 10 * i) for i in range(50)]
    logs = {0: [held_victim, victim, *filler0], 1: [*before, *gap, *cards, *after]}

    def victims_cards(reseed_for_held: bool) -> list[int]:
        r = log_backed_reader(logs, committed={0: 0, 1: len(before)})
        state = State()
        decider = stateful_decider(r, state)
        first = decider.decide_batch([Message(held_victim, 0)])  # its gate reads partition 1 past the cards
        assert first.held == 1 and not first.released
        if reseed_for_held:
            r.holds_from = T0 + 1  # the window no longer reaches back a window from the held record
        reseeds = r.stats.reseeds
        messages = [Message(victim, 1)]
        batch = prepare_batch(messages, decider.decode(messages), with_offsets=True)
        decider.ready(batch)  # what the decision is counted on
        assert r.stats.reseeds == reseeds + reseed_for_held  # the path under test ran (or did not)
        return r.features(batch.tx, batch.partition_of, batch.offsets)["terminal_cards"].tolist()

    assert victims_cards(reseed_for_held=False) == [3]  # the three cards before the victim at its terminal
    assert victims_cards(reseed_for_held=True) == [3]
