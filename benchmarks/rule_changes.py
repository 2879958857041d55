"""Detector throughput while the rules change every second, against the same run with no change.

    python -m benchmarks.rule_changes [--count 100000] [--every 1.0]

Each side: a fresh input topic filled with the generator's transactions first, then one stateful
detector (in this process) routes them all, from its first record to its last. On the changing side a
thread writes a new version of the amount rule (its threshold alternating) to the rules topic every
`--every` seconds meanwhile. Prints both rates and their ratio (changing / steady), and how many
changes the detector installed. Needs the stack (KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL).
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

from consumer.detector import Detector
from consumer.rules import LARGE_AMOUNT
from consumer.rules_topic import RulesCodec, read_all, write_records
from fraudstream.kafka import ensure_topics
from fraudstream.registry import register_all
from fraudstream.settings import Settings
from producer.loop import produce


def run_side(base: Settings, count: int, every_s: float | None) -> tuple[float, int]:
    """(records per second, rule changes installed)."""
    settings = base.replace(transactions_topic=f"bench-rules-{uuid.uuid4().hex[:8]}",
                            group_id=f"bench-rules-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    register_all(settings)
    produce(settings, rate=None, count=count, seed=11)
    detector = Detector(settings, log_interval_s=3600, on_log=lambda line: None)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), daemon=True)
    thread.start()
    while detector.metrics.consumed == 0:
        time.sleep(0.005)
    started = time.perf_counter()
    # The analyst writes from another process, as in production: not competing for this one's GIL.
    writer_stop = multiprocessing.Event()
    writer = multiprocessing.Process(target=_change_rules, args=(settings, every_s, writer_stop), daemon=True)
    seeded = detector.rules_topic.changes
    if every_s:
        writer.start()
    while detector.metrics.consumed < count:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    writer_stop.set()
    if every_s:
        writer.join(30)
    changes = detector.rules_topic.changes - seeded
    stop.set()
    thread.join(60)
    return count / elapsed, changes


def _change_rules(settings: Settings, every_s: float, stop) -> None:
    codec = RulesCodec(settings)
    [rule] = [r for _, r, _ in read_all(settings, codec) if r is not None and r.id == LARGE_AMOUNT][-1:]
    while not stop.wait(every_s):
        threshold = 50_000 if rule.parameters["threshold_cents"] != 50_000 else 90_000
        rule = dataclasses.replace(rule, version=rule.version + 1, written_at=datetime.now(UTC),
                                   parameters={**rule.parameters, "threshold_cents": threshold})
        write_records(settings, codec, [rule])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=2, help="steady/changing pairs, alternated (medians reported)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between rule changes")
    args = parser.parse_args()
    base = Settings.from_env()
    steady_rates, changing_rates, changes = [], [], []
    for _ in range(args.rounds):
        steady_rates.append(run_side(base, args.count, None)[0])
        rate, installed = run_side(base, args.count, args.every)
        changing_rates.append(rate)
        changes.append(installed)
    steady, changing = statistics.median(steady_rates), statistics.median(changing_rates)
    print(f"steady:   {steady:,.0f} tx/s  (runs: {', '.join(f'{r:,.0f}' for r in steady_rates)})")
    print(f"changing: {changing:,.0f} tx/s  (runs: {', '.join(f'{r:,.0f}' for r in changing_rates)}; "
          f"rule changes installed per run: {changes})")
    print(f"ratio changing/steady: {changing / steady:.3f}")


if __name__ == "__main__":
    main()
