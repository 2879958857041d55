"""Backtest throughput against the live detector's, on the same topic and machine: `python -m benchmarks.backtest`.

    python -m benchmarks.backtest [--count 300000] [--rounds 2]      (part of make bench; make bench-backtest)

A fresh input topic is filled with the generator's transactions (about 1,000 per hour of event time, as the
demo produces them) and its rules topic seeded from the rules file. Then, `--rounds` times, the live run and
the three others in a rotating order:

- live: one stateful detector (in this process, exactly-once: transactions, outputs, changelogs) routes them
  all; its rate is counted from its first record consumed to its last, on a consumer group of its own;
- reading alone: the replay's own read loop and consumer go through the topic from its beginning, nothing
  decoded or decided: the ceiling of any replay that reads the topic with this client on this machine;
- backtest: the replay of `fraudstream backtest` (consumer/backtest.py) reads the topic from its beginning and
  decides every record with the live rule set (one decider, as the fidelity check runs it), then with the
  candidate and the live rules together (two deciders, as `fraudstream backtest` runs), timed over the whole
  replay, reading included.

Prints the medians (records per second of wall time, and CPU ms per 1,000 records of this process) and the
ratios backtest / live. Needs the stack (KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL). On a machine shared with
other work, wall-clock rates move with the load: the CPU figures say more there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from fraudstream.consumer.detector import Detector
from fraudstream.consumer.rules_topic import RulesCodec, check_rules_topic, seed_records, write_records
from fraudstream.kafka import ensure_topics
from fraudstream.producer.loop import produce
from fraudstream.registry import register_all
from fraudstream.settings import Settings

SPEEDUP = 43_200.0  # produced unthrottled (some 12,000 a second): about 1,000 per hour of event time
CANDIDATE_TOML = "[large_amount]\nthreshold_cents = 200000\n"


def prepare(base: Settings, count: int) -> Settings:
    settings = base.replace(transactions_topic=f"bench-backtest-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    register_all(settings)
    produce(settings, rate=None, count=count, seed=11, speedup=SPEEDUP)
    check_rules_topic(settings)
    write_records(settings, RulesCodec(settings), seed_records(settings, settings.rules_file, author="benchmark"))
    return settings


def run_live(settings: Settings, count: int) -> tuple[float, float]:
    """(records per second, CPU ms per 1,000 records) of one detector routing the whole topic."""
    settings = settings.replace(group_id=f"bench-backtest-{uuid.uuid4().hex[:8]}")
    detector = Detector(settings, log_interval_s=3600, on_log=lambda line: None)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), daemon=True)
    thread.start()
    try:
        while detector.metrics.consumed == 0:
            if not thread.is_alive():
                raise RuntimeError("the detector stopped before routing anything")
            time.sleep(0.005)
        started, cpu = time.perf_counter(), time.process_time()
        while detector.metrics.consumed < count:
            if not thread.is_alive():
                raise RuntimeError("the detector stopped before routing everything")
            time.sleep(0.005)
        elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    finally:
        stop.set()
        thread.join(60)
    return count / elapsed, cpu_s / count * 1e6


def run_bare_read(settings: Settings, count: int) -> tuple[float, float]:
    """(records per second, CPU ms per 1,000 records) of the replay's own read (`read_chunks`, its consumer and
    settings) with nothing decoded or decided: the ceiling of any replay that reads the topic."""
    from fraudstream.consumer.backtest import history_consumer, read_chunks
    from fraudstream.consumer.inspect import StartOffset, plan_read
    from fraudstream.consumer.stateful import DecodedBatch

    consumer = history_consumer(settings)
    try:
        topic = settings.transactions_topic
        plan = plan_read(consumer, topic, partition=None, start=StartOffset("earliest"), settings=settings)
        finished = {p for p in plan.starts if plan.starts[p] >= plan.ends[p]}
        started, cpu = time.perf_counter(), time.process_time()
        chunks = read_chunks(consumer, topic, plan, finished, lambda messages: DecodedBatch())
        read = sum(len(keys) for _, keys, _, _ in chunks)
        elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    finally:
        consumer.close()
    if read != count:
        raise RuntimeError(f"the bare read got {read:,} records of {count:,}")
    return read / elapsed, cpu_s / read * 1e6


def run_backtest(settings: Settings, rule_sets: dict, count: int) -> tuple[float, float, float]:
    """(records per second of the whole replay, of its deciding alone, CPU ms per 1,000 records)."""
    from fraudstream.consumer.backtest import Replay
    from fraudstream.consumer.decide import Route

    result = Replay(settings, rule_sets).run()
    # Every record read and decided (none still held at the end), by every rule set.
    decided = {name: int((side["route"] != Route.HELD).sum()) for name, side in result.sides.items()}
    if result.read != count or any(n != count for n in decided.values()):
        raise RuntimeError(f"the replay read {result.read:,} records of {count:,} and decided {decided}")
    return result.read / result.read_s, result.read / result.decide_s, result.cpu_s / result.read * 1e6


def main(argv: list[str] | None = None) -> int:
    from fraudstream.backtest import BASELINE, CANDIDATE, load_rule_sets

    parser = argparse.ArgumentParser(prog="python -m benchmarks.backtest", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300_000, help="transactions in the topic [300000]")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternated; medians reported [2]")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    settings = prepare(Settings.from_env(), args.count)
    candidate = Path(f"/tmp/{settings.transactions_topic}-candidate.toml")
    candidate.write_text(CANDIDATE_TOML)
    rule_sets = load_rule_sets(settings, candidate, None)
    live: list[tuple[float, float]] = []
    bare: list[tuple[float, float]] = []
    one: list[tuple[float, float, float]] = []
    two: list[tuple[float, float, float]] = []
    one_rule_set = {BASELINE: rule_sets.baseline}
    two_rule_sets = {CANDIDATE: rule_sets.candidate, BASELINE: rule_sets.baseline}
    others: list[tuple[list, Callable[[], tuple]]] = [
        (bare, lambda: run_bare_read(settings, args.count)),
        (one, lambda: run_backtest(settings, one_rule_set, args.count)),
        (two, lambda: run_backtest(settings, two_rule_sets, args.count)),
    ]
    for round_ in range(args.rounds):
        live.append(run_live(settings, args.count))
        # In turn: in a fixed order, the one-rule-set replay (right after the bare read) measured slower than the
        # two-rule-set one, up to 20%.
        for figures_of, run in others[round_ % 3 :] + others[: round_ % 3]:
            figures_of.append(run())
    candidate.unlink()

    def med(runs, k):
        return statistics.median(r[k] for r in runs)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    figures = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit or None,
        "count": args.count,
        "rounds": args.rounds,
        "live": {"records_per_s": med(live, 0), "cpu_ms_per_1k": med(live, 1)},
        "bare_read": {"records_per_s": med(bare, 0), "cpu_ms_per_1k": med(bare, 1)},
        "backtest_one_rule_set": {
            "records_per_s": med(one, 0),
            "deciding_records_per_s": med(one, 1),
            "cpu_ms_per_1k": med(one, 2),
        },
        "backtest_two_rule_sets": {
            "records_per_s": med(two, 0),
            "deciding_records_per_s": med(two, 1),
            "cpu_ms_per_1k": med(two, 2),
        },
    }
    print(f"{args.count:,} transactions, {args.rounds} round(s), medians")
    print(f"{'':<34}{'records/s':>12}{'CPU ms/1k':>11}{'÷ live (rate)':>15}{'live ÷ (CPU)':>14}")
    print(f"{'live detector (exactly-once)':<34}{med(live, 0):>12,.0f}{med(live, 1):>11.2f}{'1.00x':>15}{'1.00x':>14}")
    print(
        f"{'reading the topic alone (ceiling)':<34}{med(bare, 0):>12,.0f}{med(bare, 1):>11.2f}"
        f"{med(bare, 0) / med(live, 0):>14.2f}x{med(live, 1) / med(bare, 1):>13.2f}x"
    )
    for name, runs in (("backtest, live rule set", one), ("backtest, candidate + live", two)):
        print(
            f"{name:<34}{med(runs, 0):>12,.0f}{med(runs, 2):>11.2f}{med(runs, 0) / med(live, 0):>14.2f}x"
            f"{med(live, 1) / med(runs, 2):>13.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
