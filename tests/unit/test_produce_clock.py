"""The produce loop's simulated clock (--speedup): event time N times faster, the rate per wall second."""

from __future__ import annotations

import argparse
import math
import threading
from datetime import datetime, timezone

import pytest

import fraudstream.producer.cli as produce_cli
from fraudstream.errors import ConfigError
from fraudstream.settings import Settings
from fraudstream.producer.generator import Generator, build_population
from fraudstream.producer.loop import EventClock, _Run


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_event_time_runs_speedup_times_faster_than_the_wall_clock() -> None:
    wall = FakeMonotonic()
    clock = EventClock(3600.0, start_ms=1_000_000, monotonic=wall)

    assert clock.now_ms() == 1_000_000
    wall.now += 0.5
    assert clock.now_ms() == 1_000_000 + 1_800_000  # half a second: half an hour of event time
    wall.now += 60.0
    assert clock.now_ms() == 1_000_000 + 60.5 * 3_600_000


def test_speedup_one_is_the_wall_clock() -> None:
    before = datetime.now(timezone.utc).timestamp() * 1000
    stamped = EventClock(1.0, start_ms=0).now_ms()
    after = datetime.now(timezone.utc).timestamp() * 1000

    assert before - 1 <= stamped <= after + 1


@pytest.mark.parametrize("speedup", [0.0, -2.0, math.nan, math.inf])
def test_a_speedup_that_is_not_a_positive_number_is_a_config_error(speedup: float) -> None:
    with pytest.raises(ConfigError, match="speedup"):
        EventClock(speedup)


class FakeProducer:
    """Takes what the loop produces and acknowledges it on poll, like a broker that never fails."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []
        self._pending: list = []

    def produce(self, topic, value, key, on_delivery) -> None:
        self.sent.append((topic, value))
        self._pending.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> int:
        pending, self._pending = self._pending, []
        for on_delivery in pending:
            on_delivery(None, None)
        return len(pending)

    def flush(self, timeout: float = 0.0) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self._pending)


def test_the_produce_loop_stamps_event_time_on_the_simulated_clock() -> None:
    settings = Settings(transactions_topic="clocked")
    fake = FakeProducer()
    generator = Generator(3, population=build_population(3, accounts=200))
    run = _Run(
        fake,
        generator,
        settings,
        lambda record: record,
        lambda record: record,
        labels=False,
        rate=2_000.0,
        count=600,
        duration=None,
        stop=threading.Event(),
        progress=None,
        flush_timeout_s=1.0,
        speedup=3_600.0,
    )
    report = run.run()

    times = [record["event_time"] for topic, record in fake.sent if topic == "clocked"]
    assert report.sent == len(times) == 600
    span_ms = (max(times) - min(times)).total_seconds() * 1000
    wall_ms = report.elapsed_s * 1000
    # Stamps are taken at wake-ups within the sending phase: at most its length, N times over, and
    # far more than the wall clock alone would give (600 at 2,000/s is about 0.3 s of wall time).
    assert span_ms <= wall_ms * 3_600 + 1
    assert span_ms >= 0.5 * wall_ms * 3_600
    assert times == sorted(times)


def test_the_cli_passes_speedup_to_the_loop(monkeypatch) -> None:
    seen = {}

    def fake_produce(settings, **options):
        seen.update(options)
        from fraudstream.producer.loop import ProduceReport

        return ProduceReport(sent=0, delivered=0, failed=0, elapsed_s=0.0)

    monkeypatch.setattr(produce_cli, "produce", fake_produce)
    parser = argparse.ArgumentParser()
    produce_cli.add_arguments(parser)

    assert produce_cli.run(parser.parse_args(["--speedup", "3600", "--count", "1"]), Settings()) == 0
    assert seen["speedup"] == 3600.0
    produce_cli.run(parser.parse_args(["--count", "1"]), Settings())
    assert seen["speedup"] == 1.0
