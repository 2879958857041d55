"""Crash safety, after Kafka's own transactions tests: kill -9 detectors mid-stream, restart them,
and check that every input transaction appears exactly once across the legit and fraud topics."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from fraudstream.producer.loop import produce
from fraudstream.settings import Settings
from tests.integration.test_detector import decode, routed_total
from tests.support.kafka_io import read_topic, wait_until

TOTAL = 50_000


class DetectorProcess:
    """`python -m fraudstream.consumer` in its own process, as an operator would run it."""

    def __init__(self, settings: Settings, transactional_id: str) -> None:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
               "SCHEMA_REGISTRY_URL": settings.schema_registry_url}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fraudstream.consumer", "--topic", settings.transactions_topic, "--group-id", settings.group_id,
             "--transactional-id", transactional_id, "--log-interval", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        return self.process.returncode, output


def start_producer(settings: Settings, count: int, rate: float) -> tuple[threading.Thread, list]:
    reports = []
    thread = threading.Thread(target=lambda: reports.append(produce(settings, rate=rate, count=count, seed=7)))
    thread.start()
    return thread, reports


def routed_transaction_ids(settings: Settings) -> Counter:
    ids = Counter()
    for message in read_topic(settings, settings.legit_topic, timeout_s=120):
        ids[decode(settings, message.value())["transaction_id"]] += 1
    for message in read_topic(settings, settings.fraud_topic, timeout_s=120):
        ids[decode(settings, message.value())["transaction"]["transaction_id"]] += 1
    return ids


def input_transaction_ids(settings: Settings) -> Counter:
    return Counter(decode(settings, m.value())["transaction_id"]
                   for m in read_topic(settings, settings.transactions_topic, timeout_s=120))


def assert_exactly_once(settings: Settings) -> None:
    wait_until(lambda: routed_total(settings) >= TOTAL, timeout_s=240, what="every transaction routed")
    sent = input_transaction_ids(settings)
    routed = routed_transaction_ids(settings)
    assert sum(sent.values()) == TOTAL and len(sent) == TOTAL
    duplicates = {tid: n for tid, n in routed.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} transactions routed more than once"
    assert set(routed) == set(sent), f"{len(set(sent) - set(routed))} lost, {len(set(routed) - set(sent))} unknown"
    assert read_topic(settings, settings.dlq_topic) == []


def test_kill_minus_nine_three_times_loses_and_duplicates_nothing(pipeline: Settings):
    rng = random.Random(2026)
    transactional_id = f"{pipeline.group_id}-crashy"
    producer_thread, reports = start_producer(pipeline, TOTAL, rate=2_000)  # a 25 s stream
    detector = DetectorProcess(pipeline, transactional_id)
    kills_while_producing = 0
    for _ in range(3):
        before = routed_total(pipeline)
        wait_until(lambda: routed_total(pipeline) > before, timeout_s=60, what="the detector making progress")
        time.sleep(rng.uniform(0.0, 1.0))  # then a random point in the stream (not a readiness wait)
        kills_while_producing += producer_thread.is_alive()
        detector.kill()
        detector = DetectorProcess(pipeline, transactional_id)
    assert kills_while_producing == 3, "the stream ended before the third kill: the test proved less than it says"
    producer_thread.join(120)
    assert reports and reports[0].delivered == TOTAL
    assert_exactly_once(pipeline)
    code, output = detector.terminate()
    assert code == 0, output


def test_two_detectors_one_killed_mid_stream(pipeline: Settings):
    producer_thread, reports = start_producer(pipeline, TOTAL, rate=5_000)
    survivor = DetectorProcess(pipeline, f"{pipeline.group_id}-a")
    victim = DetectorProcess(pipeline, f"{pipeline.group_id}-b")
    wait_until(lambda: routed_total(pipeline) > 5_000, timeout_s=60, what="both detectors working")
    victim.kill()  # its partitions move to the survivor; its open transaction is aborted by timeout
    producer_thread.join(120)
    assert reports and reports[0].delivered == TOTAL
    assert_exactly_once(pipeline)
    code, output = survivor.terminate()
    assert code == 0, output
    assert "revoked" in output or "assigned" in output
