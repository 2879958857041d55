"""Crash safety, after Kafka's own transactions tests: kill -9 detectors mid-stream, restart them,
and check that every input transaction appears exactly once across the legit and fraud topics."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

from fraudstream.producer.loop import produce
from fraudstream.settings import Settings
from tests.integration.test_detector import decode
from tests.support.detector_process import DetectorProcess
from tests.support.kafka_io import read_topic, wait_until
from tests.support.routed import RoutedReader

RATE = 2_000


class Stream:
    """The generator in a thread until the test ends it, after the faults: a slow machine cannot end the
    stream before them, which would prove less than the test says."""

    def __init__(self, settings: Settings, rate: float = RATE) -> None:
        self.stop, self.reports = threading.Event(), []
        self.thread = threading.Thread(
            target=lambda: self.reports.append(produce(settings, rate=rate, stop=self.stop, seed=7)), daemon=True
        )
        self.thread.start()

    def end(self) -> int:
        """Stop it; how many transactions it delivered."""
        self.stop.set()
        self.thread.join(120)
        assert self.reports, "the generator failed"
        return self.reports[0].delivered


def input_transaction_ids(settings: Settings) -> Counter:
    return Counter(
        decode(settings, m.value())["transaction_id"]
        for m in read_topic(settings, settings.transactions_topic, timeout_s=120)
    )


def assert_exactly_once(settings: Settings, reader: RoutedReader, total: int) -> None:
    reader.wait_for(total, timeout_s=240, what="every transaction routed")
    reader.wait_until_at_end(timeout_s=120)
    sent = input_transaction_ids(settings)
    assert sum(sent.values()) == total and len(sent) == total
    duplicates = {tid: n for tid, n in reader.ids.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} transactions routed more than once"
    assert set(reader.ids) == set(sent), (
        f"{len(set(sent) - set(reader.ids))} lost, {len(set(reader.ids) - set(sent))} unknown"
    )
    assert reader.dead_letters == 0


def partitions_logged(output: str, what: str) -> list[set[str]]:
    """The partitions of each `assigned ...` or `revoked ...` line, in order."""
    return [
        set(re.findall(r"\S+\[\d+\]", line.split(f" {what} ", 1)[1]))
        for line in output.splitlines()
        if f" {what} " in line
    ]


def test_kill_minus_nine_three_times_loses_and_duplicates_nothing(pipeline: Settings, tmp_path: Path):
    rng = random.Random(2026)
    transactional_id = f"{pipeline.group_id}-crashy"
    reader = RoutedReader(pipeline)
    stream = Stream(pipeline)
    detector = DetectorProcess(pipeline, tmp_path / "detector-0.log", transactional_id=transactional_id)
    try:
        for kill in range(1, 4):
            reader.wait_for_progress(timeout_s=60, what="the detector making progress")
            time.sleep(rng.uniform(0.0, 1.0))  # then a random point in the stream (not a readiness wait)
            detector.kill()
            detector = DetectorProcess(pipeline, tmp_path / f"detector-{kill}.log", transactional_id=transactional_id)
        reader.wait_for_progress(timeout_s=60, what="the last detector making progress")
        assert_exactly_once(pipeline, reader, stream.end())
    finally:
        stream.stop.set()
        reader.close()
    detector.stop_cleanly()


def test_two_detectors_one_killed_mid_stream(pipeline: Settings, tmp_path: Path):
    reader = RoutedReader(pipeline)
    stream = Stream(pipeline)
    survivor = DetectorProcess(pipeline, tmp_path / "survivor.log", transactional_id=f"{pipeline.group_id}-a")
    try:
        reader.wait_for_progress(timeout_s=60, what="the first detector working")
        victim = DetectorProcess(pipeline, tmp_path / "victim.log", transactional_id=f"{pipeline.group_id}-b")
        # The victim joins: the survivor gives some partitions up (cooperative rebalance) ...
        given_up = wait_until(
            lambda: [p for p in partitions_logged(survivor.output(), "revoked") if p],
            timeout_s=60,
            what="the survivor to give partitions to the second detector",
        )[0]
        wait_until(
            lambda: any(partitions_logged(victim.output(), "assigned")),
            timeout_s=60,
            what="the second detector to get partitions",
        )
        victim.kill()  # ... and takes them back once the victim's session times out
        wait_until(
            lambda: any(given_up <= p for p in partitions_logged(survivor.output(), "assigned")[1:]),
            timeout_s=90,
            what=f"the survivor to be assigned {sorted(given_up)} again",
        )
        reader.wait_for_progress(timeout_s=60, what="the survivor routing the victim's partitions")
        assert_exactly_once(pipeline, reader, stream.end())
    finally:
        stream.stop.set()
        reader.close()
    survivor.stop_cleanly()
