"""Stateful features and rules, without Kafka: `python -m benchmarks.state` (`--quick`: a smoke run).

Measured side by side, in one process, on the same seeded transactions (the demo's clock):
  features   card_features + the rules per batch of 2,000 (ours) against card_features_one, the
             per-record specification, in a plain Python loop; terminal_features likewise; and the
             decode into columns (TxColumns.from_arrow, from the columnar decoder's Arrow batches)
  memory     KeyedTable for 1,000,000 cards: bytes per key (its own estimate and the process's RSS
             growth), and its restore and changelog paths (put, take_dirty) in rows per second
Rates are per CPU second of this process (every path runs on one thread), so other load on the
machine does not skew them. Writes <output-dir>/state.json and state.md and prints the markdown.
Figures are ratios and rates, never assertions.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyruhvro

from fraudstream.consumer.features import (
    PROFILE_DTYPE,
    TERMINAL_DTYPE,
    TxColumns,
    card_features,
    card_features_one,
    terminal_features,
    terminal_features_one,
)
from fraudstream.consumer.quality import DEMO_RATE, DEMO_SPEEDUP, START_MS
from fraudstream.consumer.rules import TERMINAL_RULES, load_rules
from fraudstream.consumer.state.table import KeyedTable, row_values, rows_from_values
from fraudstream.schemas import load_schemas
from fraudstream.settings import PROJECT_ROOT, Settings
from fraudstream.producer.generator import Generator

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
BATCH = 2_000


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def best_of(runs: int, work) -> float:
    """Least CPU time of this process over `runs` runs of work() (each from fresh state). CPU time, not
    wall time: every path here runs on one thread, and a shared machine's other load leaves it alone."""
    times = []
    for _ in range(runs):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    return min(times)


def features_section(count: int, runs: int, seed: int) -> dict[str, Any]:
    pairs = list(islice(Generator(seed).stream(START_MS, DEMO_RATE / DEMO_SPEEDUP), count))
    records = [tx.to_dict() for tx, _ in pairs]
    batches = [TxColumns.from_records(records[i : i + BATCH]) for i in range(0, count, BATCH)]
    rules = load_rules(None)
    card_rules = rules.without(*TERMINAL_RULES)

    def ours_cards() -> None:
        table = KeyedTable(PROFILE_DTYPE)
        for tx in batches:
            card_rules.evaluate(tx, card_features(table, tx))

    def ours_features_only() -> None:
        table = KeyedTable(PROFILE_DTYPE)
        for tx in batches:
            card_features(table, tx)

    # The per-record loops are slow: they run on a tenth of the records (at least one batch), scaled up.
    sample = records[: max(BATCH, count // 10)]

    def per_record_cards() -> None:
        profiles: dict[str, Any] = {}
        for r in sample:
            _, profiles[r["card_id"]] = card_features_one(profiles.get(r["card_id"]), r)

    def ours_terminals() -> None:
        table = KeyedTable(TERMINAL_DTYPE)
        for tx in batches:
            terminal_features(table, tx)

    def per_record_terminals() -> None:
        profiles: dict[str, Any] = {}
        for r in sample:
            _, profiles[r["terminal_id"]] = terminal_features_one(profiles.get(r["terminal_id"]), r)

    schema = load_schemas(Settings().schemas_dir)
    arrow = []
    for i in range(0, count, BATCH):
        payloads = []
        for r in records[i : i + BATCH]:
            out = io.BytesIO()
            fastavro.schemaless_writer(out, schema.parsed["Transaction"], r)
            payloads.append(out.getvalue())
        arrow.append(pyruhvro.deserialize_array(payloads, schema.text("Transaction")))

    def decode_columns() -> None:
        for batch in arrow:
            TxColumns.from_arrow(batch)

    per_record_card_s = best_of(1, per_record_cards) * count / len(sample)
    per_record_terminal_s = best_of(1, per_record_terminals) * count / len(sample)
    return {
        "count": count,
        "batch": BATCH,
        "runs": runs,
        "ours_card_features_and_rules_tps": count / best_of(runs, ours_cards),
        "ours_card_features_tps": count / best_of(runs, ours_features_only),
        "per_record_card_features_tps": count / per_record_card_s,
        "ours_terminal_features_tps": count / best_of(runs, ours_terminals),
        "per_record_terminal_features_tps": count / per_record_terminal_s,
        "from_arrow_tps": count / best_of(runs, decode_columns),
        "per_record_sample": len(sample),
    }


def memory_section(cards: int) -> dict[str, Any]:
    keys = [f"card-{i:012x}".encode() for i in range(cards)]
    before = rss_bytes()
    table = KeyedTable(PROFILE_DTYPE, capacity=1024)
    started = time.process_time()
    slots = table.slots(keys)
    insert_s = time.process_time() - started
    table.rows["last_ms"][slots] = START_MS
    grown = rss_bytes() - before
    estimate = table.nbytes()

    table.mark_dirty(slots)
    started = time.process_time()
    dirty_keys, rows = table.take_dirty()
    values = row_values(rows)  # what changelog records carry
    take_s = time.process_time() - started

    restored = KeyedTable(PROFILE_DTYPE, capacity=1024)
    started = time.process_time()
    restored.put(dirty_keys, rows_from_values(values, PROFILE_DTYPE, where="benchmark"))
    put_s = time.process_time() - started
    assert len(restored) == cards
    return {
        "cards": cards,
        "row_bytes": PROFILE_DTYPE.itemsize,
        "estimate_bytes_per_key": estimate / cards,
        "rss_growth_bytes_per_key": grown / cards,
        "rows_array_bytes_per_key": table.rows.nbytes / cards,
        "insert_keys_per_s": cards / insert_s,
        "take_dirty_and_serialize_rows_per_s": cards / take_s,
        "restore_put_rows_per_s": cards / put_s,
    }


def markdown(results: dict[str, Any]) -> str:
    f, m = results["features"], results["memory"]
    ratio = f["ours_card_features_and_rules_tps"] / f["per_record_card_features_tps"]
    lines = [
        f"Measured {results['when']} with `python -m benchmarks.state`: {results['machine']}; one process, no Kafka.",
        "",
        f"**Features and rules**: {f['count']:,} generated transactions (the demo's clock), batches of "
        f"{f['batch']:,}, best of {f['runs']}; the per-record loops on {f['per_record_sample']:,} of them.",
        "",
        "| Path | Records per CPU second | Ours ÷ it |",
        "|---|---:|---:|",
        f"| ours: card_features + rules (batch rounds) | {f['ours_card_features_and_rules_tps']:,.0f} | 1.00× |",
        f"| ours: card_features alone | {f['ours_card_features_tps']:,.0f} | |",
        f"| per record: card_features_one in a Python loop | {f['per_record_card_features_tps']:,.0f} | {ratio:.1f}× |",
        f"| ours: terminal_features (batch rounds) | {f['ours_terminal_features_tps']:,.0f} | 1.00× |",
        f"| per record: terminal_features_one in a Python loop | {f['per_record_terminal_features_tps']:,.0f} | "
        f"{f['ours_terminal_features_tps'] / f['per_record_terminal_features_tps']:.1f}× |",
        f"| decode: TxColumns.from_arrow | {f['from_arrow_tps']:,.0f} | |",
        "",
        f"**KeyedTable, {m['cards']:,} cards** (row {m['row_bytes']} bytes): "
        f"{m['estimate_bytes_per_key']:,.0f} bytes per key by its own estimate, "
        f"{m['rss_growth_bytes_per_key']:,.0f} by the process's RSS growth (rows array "
        f"{m['rows_array_bytes_per_key']:,.0f}, the rest is the key index); "
        f"per CPU second: new keys {m['insert_keys_per_s']:,.0f}, take_dirty + serialize "
        f"{m['take_dirty_and_serialize_rows_per_s']:,.0f} rows, restore (put) {m['restore_put_rows_per_s']:,.0f} rows.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.state", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="transactions for the feature paths")
    parser.add_argument("--cards", type=int, default=1_000_000, help="keys in the memory measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: checks that it works")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.cards, args.runs = 4_000, 20_000, 1
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}",
        "quick": args.quick,
        "features": features_section(args.count, args.runs, args.seed),
        "memory": memory_section(args.cards),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "state.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.output_dir / "state.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
