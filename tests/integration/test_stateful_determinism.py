"""Stateful detection decides the same whatever happens to the detectors.

One seeded stream of generated transactions (simulated event time) goes to three input topics with the
same keys, hence the same partitions. Three detector groups read them:
- A: one detector, never interrupted;
- B: one detector killed with SIGKILL three times mid-stream (each restart restores its state from the
  changelog);
- C: a group that grows from one detector to two and shrinks back to one mid-stream (partitions, and
  their state, move between processes).
Every transaction must get the same route and the same rules in all three, and each run must route
every transaction exactly once. Finally the changelog of B, the killed one, restored from Kafka, must hold
exactly the card profiles that a recount from the input gives: no state change applied twice or lost.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import TopicPartition

from fraudstream.consumer.features import TxColumns, card_features
from fraudstream.consumer.held import HELD
from fraudstream.consumer.state.recovery import Recovery
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import CARDS
from fraudstream.kafka import ensure_topics, producer_config
from fraudstream.registry import register_all
from fraudstream.settings import Settings
from fraudstream.producer.generator import Generator
from tests.integration.test_detector import decode, encoder_for, routed_total
from tests.support.detector_process import DetectorProcess
from tests.support.kafka_io import read_topic, wait_until
from tests.support.routed import describe_outputs

TOTAL = 50_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: event time is simulated, never the wall clock
EVENT_RATE = 20.0  # transactions per second of event time: 50,000 span about 42 minutes
SEND_RATE = 800  # per topic per wall-clock second: a stream of about 60 s, so kills land mid-stream
MIN_TERMINAL_FIRED = 50  # the stream holds about 250 compromised-terminal victims
MIN_HELD = 500  # records held for the terminal rule's look-ahead (several percent of the stream)


LOGS = Path(tempfile.mkdtemp(prefix="determinism-"))  # each detector's output, shown when one fails


def detector_process(settings: Settings, slot: str) -> DetectorProcess:
    """A detector in the slot `slot` of its group: a transactional id kept across its restarts (a restarted
    detector fences its predecessor), and of the group's own, never shared with another run on the broker
    (a run elsewhere with the same id would fence this one)."""
    return DetectorProcess(
        settings,
        LOGS / f"{slot}-{time.monotonic_ns()}.log",
        transactional_id=f"{settings.group_id}-{slot}",
        log_interval_s=10,
    )


def make_pipeline(base: Settings, name: str) -> Settings:
    settings = base.replace(
        transactions_topic=f"det-{name}-{uuid.uuid4().hex[:8]}",
        group_id=f"det-{name}-{uuid.uuid4().hex[:8]}",
        partitions=3,
    )
    ensure_topics(settings)
    register_all(settings)
    return settings


def send_stream(pipelines: list[Settings], records: list) -> threading.Thread:
    """The same records, keyed by account, to every input topic, paced."""
    from confluent_kafka import Producer

    encoders = [encoder_for(p, p.transactions_topic) for p in pipelines]

    def run() -> None:
        producer = Producer(producer_config(pipelines[0]))
        started = time.monotonic()
        for index, tx in enumerate(records):
            record = tx.to_dict()
            for settings, encode in zip(pipelines, encoders, strict=True):
                producer.produce(settings.transactions_topic, encode(record), tx.account_id.encode())
            if index % 500 == 0:
                producer.poll(0)
                ahead = index / SEND_RATE - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the stream, not waiting for readiness
        assert producer.flush(60) == 0

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def decisions(settings: Settings) -> dict[str, tuple[str, tuple[str, ...]]]:
    """transaction id -> (route, rules fired), asserting that nothing was routed twice."""
    seen: dict[str, tuple[str, tuple[str, ...]]] = {}
    routed = 0
    for message in read_topic(settings, settings.legit_topic, timeout_s=120):
        seen[decode(settings, message.value())["transaction_id"]] = ("legit", ())
        routed += 1
    for message in read_topic(settings, settings.fraud_topic, timeout_s=120):
        alert = decode(settings, message.value())
        seen[alert["transaction"]["transaction_id"]] = ("fraud", tuple(alert["rules"]))
        routed += 1
    assert routed == len(seen), f"{routed - len(seen)} transactions routed more than once"
    return seen


def progressed(settings: Settings, at_least: int) -> bool:
    return routed_total(settings) >= at_least


def recount(settings: Settings) -> dict[int, KeyedTable]:
    """Card profiles per partition, computed afresh from the input topic in offset order."""
    by_partition: dict[int, list[dict]] = {}
    for message in read_topic(settings, settings.transactions_topic, timeout_s=120):
        by_partition.setdefault(message.partition(), []).append((message.offset(), decode(settings, message.value())))
    tables = {}
    for partition, records in by_partition.items():
        records.sort(key=lambda pair: pair[0])
        table = KeyedTable(CARDS.dtype)
        for first in range(0, len(records), 2_000):  # batches, like the detector's
            card_features(table, TxColumns.from_records([r for _, r in records[first : first + 2_000]]))
        tables[partition] = table
    return tables


def restored(settings: Settings, partitions) -> dict[int, KeyedTable]:
    recovery = Recovery(settings, {CARDS.name: settings.changelog_topic(CARDS.name)})
    tables = {p: KeyedTable(CARDS.dtype) for p in partitions}
    try:
        for partition, table in tables.items():
            progress = recovery.start(partition, {CARDS.name: table}, [CARDS])
            while not progress.done:
                recovery.step()
    finally:
        recovery.close()
    return tables


def rows_by_key(table: KeyedTable) -> dict[bytes, bytes]:
    keys = table.keys()
    return {key: table.rows[int(table.lookup([key])[0])].tobytes() for key in keys}


def held_changelog(settings: Settings) -> tuple[int, int]:
    """(keys the held store's changelog ever held, keys whose last record is a tombstone)."""
    last: dict[bytes, bytes | None] = {}
    for message in read_topic(settings, settings.changelog_topic(HELD.name)):
        last[message.key()] = message.value()
    return len(last), sum(value is None for value in last.values())


def test_same_decisions_uninterrupted_killed_and_rescaled(stack_settings: Settings):
    records = [tx for tx, _label in itertools.islice(Generator(seed=11).stream(START_MS, EVENT_RATE), TOTAL)]
    steady, killed, rescaled = (make_pipeline(stack_settings, name) for name in ("steady", "killed", "rescaled"))
    sender = send_stream([steady, killed, rescaled], records)

    a = detector_process(steady, "steady")
    b = detector_process(killed, "killed")
    c1 = detector_process(rescaled, "rescaled-1")
    mid_stream = []  # for each kill, grow and shrink: was there input left to decide?
    for kill in range(3):  # kill B each time it has routed another 500 (its state restored, working)
        before = routed_total(killed)
        wait_until(
            lambda before=before: progressed(killed, before + 500),
            timeout_s=120,
            what=f"B working before kill {kill + 1}",
            interval_s=0.05,
        )
        mid_stream.append(routed_total(killed) < TOTAL)
        b.kill()
        b = detector_process(killed, "killed")
        if kill == 0:
            mid_stream.append(routed_total(rescaled) < TOTAL)
            c2 = detector_process(rescaled, "rescaled-2")  # C grows to two
        if kill == 1:
            mid_stream.append(routed_total(rescaled) < TOTAL)
            c2.stop_cleanly()  # and shrinks back to one
    assert all(mid_stream), (
        f"some kills or rescales came after the end of the stream ({mid_stream}): the test proved less than it says"
    )
    sender.join(120)
    for settings, process in ((steady, a), (killed, b), (rescaled, c1)):
        try:
            wait_until(
                lambda s=settings: progressed(s, TOTAL), timeout_s=240, what=f"{settings.transactions_topic} routed"
            )
        except AssertionError as timed_out:
            outputs = [
                TopicPartition(t, p)
                for t in (settings.legit_topic, settings.fraud_topic, settings.dlq_topic)
                for p in range(settings.partitions)
            ]
            raise AssertionError(
                f"{timed_out}: {routed_total(settings)} of {TOTAL} readable (read_committed); "
                f"{describe_outputs(settings, outputs)}; its detector's log:\n{process.tail(20)}"
            ) from None
    for process in (a, b, c1):
        process.stop_cleanly()

    expected = decisions(steady)
    assert len(expected) == TOTAL
    fired = {rule for route, rules in expected.values() for rule in rules}
    assert {"card_testing", "impossible_travel"} <= fired, f"stateful rules never fired: {fired}"
    # The terminal rule reads a window of every input partition: its path ran, many times.
    terminal_fired = sum("compromised_terminal" in rules for _route, rules in expected.values())
    assert terminal_fired >= MIN_TERMINAL_FIRED, f"compromised_terminal fired {terminal_fired} times"
    # Records held for the terminal rule's look-ahead went through their store in every run, and each was
    # released in the end: its changelog holds a row, then a tombstone, for every key.
    for settings in (steady, killed, rescaled):
        held, released = held_changelog(settings)
        assert held >= MIN_HELD and released == held, (settings.transactions_topic, held, released)
    for settings in (killed, rescaled):
        got = decisions(settings)
        differing = [tid for tid in expected if got.get(tid) != expected[tid]]
        assert not differing, (
            f"{len(differing)} of {TOTAL} decided differently in {settings.transactions_topic}, "
            f"e.g. {differing[0]}: {expected[differing[0]]} vs {got.get(differing[0])}"
        )

    # The killed run's changelog holds exactly what a recount from the input gives: every state change
    # applied once, none lost, none counted twice.
    expected_state = recount(killed)
    got_state = restored(killed, expected_state)
    for partition, table in expected_state.items():
        want, have = rows_by_key(table), rows_by_key(got_state[partition])
        assert len(want) > 0 and want.keys() == have.keys(), f"partition {partition}: keys differ"
        differing = [key for key in want if want[key] != have[key]]
        assert not differing, f"partition {partition}: {len(differing)} card profiles differ, e.g. {differing[0]!r}"
