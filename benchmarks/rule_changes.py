"""Detector throughput while the rules change every second, against the same run with no change.

    python -m benchmarks.rule_changes [--count 300000] [--every 1.0] [--rounds 2]   (make bench-rules)

Each side: a fresh input topic filled with the generator's transactions first and its rules topic
seeded, then one stateful detector (in this process) routes them all; its rate is counted from its
first record to its last. On both sides another process writes a new version of the amount rule
(its threshold alternating) every `--every` seconds, from before the detector starts to its end, with
one producer for its life (as an analyst's tool would run elsewhere). On the changing side it writes to
the detector's rules topic; on the steady side, after the first change (both sides start alike), to a
topic nobody reads, so the machine carries the same writer on both sides and the ratio is what
receiving and installing the changes costs the detector. Prints both rates (medians over the rounds,
sides alternated), their ratio (changing / steady), and how many changes the detector installed while
routing. Needs the stack (KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime

from confluent_kafka import Producer

from fraudstream.consumer.detector import Detector
from fraudstream.consumer.rules import LARGE_AMOUNT
from fraudstream.consumer.rules import RULE_NAMES
from fraudstream.consumer.rules_topic import (
    RulesCodec,
    check_rules_topic,
    read_messages,
    read_changes,
    seed_records,
    write_records,
)
from fraudstream.kafka import ensure_topics, producer_config
from fraudstream.registry import register_all
from fraudstream.settings import Settings
from fraudstream.producer.loop import produce


def run_side(base: Settings, count: int, every_s: float, changing: bool = True) -> tuple[float, int, int]:
    """(records per second, rule changes the detector installed while it routed them, the amount rule's
    version in force at the end). How many changes land while routing depends on the run's speed; the
    change written before the detector starts is always installed, so the last figure is at least 2."""
    settings = base.replace(
        transactions_topic=f"bench-rules-{uuid.uuid4().hex[:8]}", group_id=f"bench-rules-{uuid.uuid4().hex[:8]}"
    )
    ensure_topics(settings)
    register_all(settings)
    produce(settings, rate=None, count=count, seed=11)
    codec = RulesCodec(settings)
    check_rules_topic(settings)
    write_records(settings, codec, seed_records(settings, settings.rules_file, author="benchmark"))
    # The analyst writes from another process, as in production: not competing for this one's GIL. Both
    # sides start alike (one change written before the detector starts); only the changing side goes on
    # writing to the detector's rules topic, the steady side's writer to a topic nobody reads.
    writer_stop = multiprocessing.Event()
    writer = multiprocessing.Process(target=_change_rules, args=(settings, every_s, writer_stop, changing), daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while len(read_messages(settings)) <= len(RULE_NAMES):
        if time.monotonic() > deadline:
            raise RuntimeError("the rule writer made no change within 60 s")
        time.sleep(0.05)
    detector = Detector(settings, log_interval_s=3600, on_log=lambda line: None)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), daemon=True)
    thread.start()
    while detector.metrics.consumed == 0:
        time.sleep(0.005)
    started = time.perf_counter()
    seeded = detector.rules_topic.changes
    while detector.metrics.consumed < count:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    writer_stop.set()
    writer.join(30)
    changes = detector.rules_topic.changes - seeded
    amount_version = detector.rules_topic.current.versions[LARGE_AMOUNT]
    stop.set()
    thread.join(60)
    return count / elapsed, changes, amount_version


def _change_rules(settings: Settings, every_s: float, stop, keep_changing: bool) -> None:
    codec = RulesCodec(settings)
    rule = read_changes(settings, codec)[0][LARGE_AMOUNT]
    unread = f"{settings.rules_topic}.unread"  # the steady side's writes after the first: nobody reads them
    ensure_topics(settings, (unread,))
    producer = Producer(producer_config(settings))
    topic = settings.rules_topic
    while not stop.wait(every_s):
        threshold = 50_000 if rule.parameters["threshold_cents"] != 50_000 else 90_000
        rule = dataclasses.replace(
            rule,
            version=rule.version + 1,
            written_at=datetime.now(UTC),
            parameters={**rule.parameters, "threshold_cents": threshold},
        )
        producer.produce(topic, codec.encode(rule), rule.id.encode())
        if producer.flush(30):
            raise RuntimeError(f"could not write to {topic} within 30 s")
        if not keep_changing:
            topic = unread
    producer.flush(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=2, help="steady/changing pairs, alternated (medians reported)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between rule changes")
    args = parser.parse_args()
    base = Settings.from_env()
    steady_rates, changing_rates, changes = [], [], []
    for _ in range(args.rounds):
        steady_rates.append(run_side(base, args.count, args.every, changing=False)[0])
        rate, installed, _ = run_side(base, args.count, args.every, changing=True)
        changing_rates.append(rate)
        changes.append(installed)
    steady, changing = statistics.median(steady_rates), statistics.median(changing_rates)
    print(f"steady:   {steady:,.0f} tx/s  (runs: {', '.join(f'{r:,.0f}' for r in steady_rates)})")
    print(
        f"changing: {changing:,.0f} tx/s  (runs: {', '.join(f'{r:,.0f}' for r in changing_rates)}; "
        f"rule changes installed per run: {changes})"
    )
    print(f"ratio changing/steady: {changing / steady:.3f}")


if __name__ == "__main__":
    main()
