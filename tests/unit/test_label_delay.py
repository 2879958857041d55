"""The produce loop on a simulation: a label is never written before the simulated clock passes its due time.

The loop runs for real (fraudstream.producer.loop._Run) against a recording stand-in for the Kafka producer, so
the order of produce() calls is exactly what the broker would receive.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import pytest

from fraudstream.settings import Settings
from fraudstream.producer import handbook
from fraudstream.producer.loop import _Run

DAY_MS = handbook.DAY_MS
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class RecordingProducer:
    """Acknowledges every record at once and remembers what was produced, in order, and when."""

    def __init__(self) -> None:
        self.log: list[tuple[str, bytes, float]] = []

    def produce(self, topic, value, key, on_delivery=None) -> None:
        self.log.append((topic, value, time.monotonic()))
        if on_delivery:
            on_delivery(None, None)

    def poll(self, timeout: float = 0) -> int:
        if timeout:
            time.sleep(min(timeout, 0.001))  # the real poll waits up to timeout too
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return 0


def encode_transaction(record: dict) -> bytes:
    return json.dumps(
        {"id": record["transaction_id"], "ms": (record["event_time"] - EPOCH).total_seconds() * 1000}
    ).encode()


def encode_label(record: dict) -> bytes:
    return record["transaction_id"].encode()


def run(simulation, *, label_delay_days: float, days_per_second: float | None = None, count: int | None = None):
    settings = Settings(transactions_topic="tx")
    producer = RecordingProducer()
    report = _Run(
        producer,
        handbook.HandbookStream(simulation),
        settings,
        encode_transaction,
        encode_label,
        labels=True,
        rate=None,
        count=count,
        duration=None,
        stop=threading.Event(),
        progress=None,
        flush_timeout_s=1.0,
        label_delay_ms=round(label_delay_days * DAY_MS),
        days_per_second=days_per_second,
    ).run()
    return report, producer.log


@pytest.fixture(scope="module")
def simulation():
    return handbook.simulate(customers=150, terminals=300, days=12, seed=4)


@pytest.mark.parametrize("delay_days", [2.0, 0.25])
def test_a_label_is_never_written_before_the_clock_passes_its_delay(simulation, delay_days):
    report, log = run(simulation, label_delay_days=delay_days)
    assert report.ok and report.sent == report.labels_sent == len(simulation)
    event_ms: dict[str, float] = {}
    clock = float("-inf")  # the latest event time written so far
    held_to_the_end = 0
    for topic, value, _ in log:
        if topic == "tx":
            tx = json.loads(value)
            event_ms[tx["id"]] = tx["ms"]
            clock = max(clock, tx["ms"])
            continue
        assert topic == "tx.labels"
        due = event_ms[value.decode()] + delay_days * DAY_MS  # KeyError: a label before its transaction
        if due > clock:  # only once the simulation has ended, and its clock runs on past every due time
            assert len(event_ms) == len(simulation), f"label written at simulated {clock}, due at {due}"
            held_to_the_end += 1
    assert held_to_the_end > 0  # the end of the run really holds labels back, so the check above ran
    labels = [value for topic, value, _ in log if topic == "tx.labels"]
    assert sorted(labels) == sorted(key.encode() for key in event_ms)  # every label, once


def test_without_a_delay_each_label_follows_its_transaction(simulation):
    _, log = run(simulation, label_delay_days=0)
    topics = [topic for topic, _, _ in log]
    assert topics == ["tx", "tx.labels"] * len(simulation)
    for (_, tx_value, _), (_, label_value, _) in zip(log[::2], log[1::2]):
        assert json.loads(tx_value)["id"] == label_value.decode()


def test_a_count_stops_the_simulation_early_and_its_labels_still_come(simulation):
    report, log = run(simulation, label_delay_days=3, count=1_000)
    assert report.sent == 1_000 and report.labels_sent == 1_000
    assert [t for t, _, _ in log].count("tx.labels") == 1_000


def test_paced_in_simulated_days_per_second_never_runs_ahead_of_the_clock():
    simulation = handbook.simulate(customers=100, terminals=200, days=3, seed=9)
    pace = 30.0  # 3 simulated days in 0.1 s of wall time
    before = time.monotonic()
    report, log = run(simulation, label_delay_days=0, days_per_second=pace)
    assert report.sent == len(simulation)
    for topic, value, at in log:
        if topic == "tx":
            simulated_ms = json.loads(value)["ms"] - simulation.start_ms
            # Owed by then: (at - start) * pace days; the loop started after `before`.
            assert simulated_ms <= (at - before) * pace * DAY_MS
    last_tx_at = max(at for topic, _, at in log if topic == "tx")
    assert last_tx_at - before >= (simulation.time_ms[-1] - simulation.start_ms) / (pace * DAY_MS)
