"""What a shadow rule set costs the detector: CPU per record of the default (stateful) detector with no shadow set,
and with a shadow set of the same size (the default rules, large_amount's threshold lowered to $500.00, so it
decides otherwise on some records and writes their ShadowDifferences), side by side.

    python -m benchmarks.shadow [--count 100000] [--rounds 2]

Each side gets a fresh input topic pre-filled with the same seeded transactions (benchmarks/data.py), then one
detector in this process routes them all; CPU per record is this process's (every thread's) from its first
committed batch to its last. Sides alternate within each round; medians are reported, and the shadow side as a
ratio to the other (issue #23's budget: at most 1.5x). Writes benchmarks/results/shadow.json. Needs the stack
(KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from benchmarks.data import prefill
from fraudstream.cli import main as fraudstream
from fraudstream.consumer.detector import Detector
from fraudstream.consumer.rules import DEFAULT_RULES_FILE
from fraudstream.kafka import ensure_topics
from fraudstream.registry import register_all
from fraudstream.settings import Settings

SIDES = ("no shadow set", "shadow set of the same size")
RESULTS = Path(__file__).parent / "results" / "shadow.json"


def candidate_rules(threshold_cents: int) -> str:
    """The default rules file with large_amount's threshold set: a shadow set of the same size, one rule different."""
    text = DEFAULT_RULES_FILE.read_text()
    assert "[large_amount]\n" in text
    return text.replace("[large_amount]\n", f"[large_amount]\nthreshold_cents = {threshold_cents}\n", 1)


def set_shadow(settings: Settings, rules_file: Path) -> None:
    code = fraudstream(
        [
            "rules",
            "shadow",
            "set",
            str(rules_file),
            "--topic",
            settings.transactions_topic,
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--schema-registry-url",
            settings.schema_registry_url,
        ]
    )
    if code != 0:
        raise RuntimeError("fraudstream rules shadow set failed")


def run_side(base: Settings, side: str, count: int, candidate: Path) -> tuple[float, float, int]:
    """(records per second, CPU ms per 1,000 records, shadow differences written)."""
    settings = base.replace(
        transactions_topic=f"bench-shadow-{uuid.uuid4().hex[:8]}", group_id=f"bench-shadow-{uuid.uuid4().hex[:8]}"
    )
    ensure_topics(settings)
    register_all(settings)
    prefill(settings, count=count, seed=7, json_topic=None)
    if side == SIDES[1]:
        set_shadow(settings, candidate)
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
        if not thread.is_alive():
            raise RuntimeError(f"{side}: the detector stopped")
        time.sleep(0.005)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stop.set()
    thread.join(60)
    differences = detector.metrics.shadow_differences
    if (side == SIDES[1]) != (differences > 0):
        raise RuntimeError(f"{side}: {differences} shadow differences")
    return (count - first) / elapsed, cpu * 1e6 / (count - first), differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = Settings.from_env()
    runs: dict[str, list[tuple[float, float, int]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "candidate.toml"
        candidate.write_text(candidate_rules(50_000))
        for round_ in range(args.rounds):
            for side in SIDES if round_ % 2 == 0 else reversed(SIDES):
                runs[side].append(run_side(base, side, args.count, candidate))
    cpu = {side: statistics.median(c for _, c, _ in runs[side]) for side in SIDES}
    report = {
        "count": args.count,
        "rounds": args.rounds,
        "sides": {
            side: {
                "records_per_s": statistics.median(r for r, _, _ in runs[side]),
                "cpu_ms_per_1k": cpu[side],
                "shadow_differences": runs[side][0][2],
                "runs": runs[side],
            }
            for side in SIDES
        },
        "cpu_ratio": cpu[SIDES[1]] / cpu[SIDES[0]],
    }
    for side in SIDES:
        s = report["sides"][side]
        print(
            f"{side:<28} {s['records_per_s']:>9,.0f} tx/s  {s['cpu_ms_per_1k']:6.1f} ms CPU/1k  "
            f"{s['shadow_differences']:,} differences"
        )
    print(f"shadow set / none, CPU per record: {report['cpu_ratio']:.2f}x (budget 1.5x)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
