"""What the terminal window costs: detector throughput stateless, stateful without the terminal rule, and
stateful with it (the reader of every input partition decoding the input once more), side by side.

    python -m benchmarks.terminal_window [--count 200000] [--rounds 2] [--event-rate R]

Each side gets a fresh input topic pre-filled with the same seeded transactions (the benchmark's pre-fill, on
the demo's clock: 1,000 per wall-clock second at --speedup 3600, so 0.28 per second of event time; see
benchmarks/data.py), then one detector in this process routes them all; its rate is counted from its first
committed batch to its last. `--event-rate 2000` packs the same records into far less event time: every
terminal then takes a dozen cards in 10 minutes and the rule flags most records (a stress test, no real stream).
Sides alternate within each round; medians are reported with each stateful side as a ratio to the stateless
one, in wall throughput and in CPU per record (this process's, every thread's: on a loaded machine the wall
clock mostly measures the other load). Needs the stack (KAFKA_BOOTSTRAP_SERVERS,
SCHEMA_REGISTRY_URL).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from benchmarks.data import PREFILL_EVENT_RATE, prefill
from fraudstream.consumer.detector import Detector
from fraudstream.kafka import ensure_topics
from fraudstream.registry import register_all
from fraudstream.settings import Settings

SIDES = (
    "stateless",
    "stateful, terminal rule off",
    "stateful, terminal window on, rule never fires",
    "stateful, terminal rule on",
)
# The third side keeps the window (read, queried, expired) with thresholds no terminal reaches: the window's
# own cost; the fourth runs the default rule, which also encodes the FraudAlerts it adds.
RULES = {
    SIDES[1]: "[compromised_terminal]\nenabled = false\n",
    SIDES[2]: "[compromised_terminal]\nmin_other_cards = 100000\nmin_other_cards_anywhere = 100000\n",
}


def run_side(base: Settings, side: str, count: int, rules: dict[str, Path], event_rate: float) -> tuple[float, float]:
    """(records per second, CPU ms per 1,000 records: this process's, every thread's, over the same span)."""
    settings = base.replace(
        transactions_topic=f"bench-terminal-{uuid.uuid4().hex[:8]}",
        group_id=f"bench-terminal-{uuid.uuid4().hex[:8]}",
        stateful=side != SIDES[0],
        **({"rules_file": rules[side]} if side in rules else {}),
    )
    ensure_topics(settings)
    register_all(settings)
    prefill(settings, count=count, seed=7, json_topic=None, event_rate=event_rate)
    detector = Detector(settings, log_interval_s=3600, on_log=lambda line: None)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), daemon=True)
    thread.start()
    while detector.metrics.consumed == 0:
        if not thread.is_alive():
            raise RuntimeError(f"{side}: the detector stopped before routing anything")
        time.sleep(0.005)
    started, cpu_started, first = time.perf_counter(), time.process_time(), detector.metrics.consumed
    while detector.metrics.consumed < count:
        time.sleep(0.005)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stop.set()
    thread.join(60)
    if (side in SIDES[2:]) != (detector.terminal is not None):
        raise RuntimeError(f"{side}: the terminal window was {'off' if detector.terminal is None else 'on'}")
    return (count - first) / elapsed, cpu * 1e6 / (count - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--event-rate",
        type=float,
        default=PREFILL_EVENT_RATE,
        help=f"transactions per second of event time (default {PREFILL_EVENT_RATE:.3g}, the demo's)",
    )
    args = parser.parse_args()
    base = Settings.from_env()
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    cpus: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        rules = {}
        for index, (side, text) in enumerate(RULES.items()):
            rules[side] = Path(tmp) / f"rules-{index}.toml"
            rules[side].write_text(text)
        for round_ in range(args.rounds):
            for side in SIDES if round_ % 2 == 0 else reversed(SIDES):
                rate, cpu = run_side(base, side, args.count, rules, args.event_rate)
                rates[side].append(rate)
                cpus[side].append(cpu)
    stateless, stateless_cpu = statistics.median(rates[SIDES[0]]), statistics.median(cpus[SIDES[0]])
    for side in SIDES:
        median, cpu = statistics.median(rates[side]), statistics.median(cpus[side])
        # CPU per record is what a loaded machine changes least: stateless's share of it is the ratio to read.
        print(
            f"{side:<30} {median:>10,.0f} tx/s  {median / stateless:6.1%} of stateless  "
            f"{cpu:6.1f} ms CPU/1k  {stateless_cpu / cpu:6.1%} of stateless's rate per CPU  "
            f"(runs: {', '.join(f'{r:,.0f}' for r in rates[side])}; CPU {', '.join(f'{c:.1f}' for c in cpus[side])})"
        )


if __name__ == "__main__":
    main()
