"""What an aborted batch costs the stateful detector, side by side: the batch's changes undone in memory (the undo
log of consumer/state/table.py, what the detector does now) against the partition's state rebuilt from its
changelog (what it did before: every row of the partition read again, through the detector's own restore path).

    python -m benchmarks.abort_cost [--cards 200000] [--batch 20000] [--rounds 3]

Fills a changelog with N card profiles (as benchmarks/state_store.py does), restores them into a table, then
per round: a batch of B payments through the detector's own card features (card_features_split) on that table,
then undone; and a rebuild of the table from the changelog. Medians; the ratio is rebuild / undo. The undo's cost
grows with the batch, the rebuild's with the partition's state. Needs the local stack (or KAFKA_BOOTSTRAP_SERVERS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import numpy as np

from benchmarks.state_store import RESULTS, fill_changelog, restore_into_table
from fraudstream.consumer.features import TxColumns, card_features_split
from fraudstream.consumer.state.recovery import Recovery
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import CARDS
from fraudstream.kafka import ensure_topics
from fraudstream.settings import Settings
from tests.support.decoding import make_tx


def payments(count: int, cards: int, seed: int) -> TxColumns:
    """`count` in-person payments on cards the changelog holds (their keys as the detector makes them)."""
    rng = np.random.default_rng(seed)
    records = [
        make_tx(
            int(rng.integers(100, 90_000)), card_id=f"card-{int(rng.integers(0, cards)):012x}", channel="CARD_PRESENT"
        ).to_dict()
        for _ in range(count)
    ]
    return TxColumns.from_records(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abort_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    topic = f"bench-abort-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, (topic,), partitions=1)
    fill_changelog(settings, CARDS, topic, args.cards)
    undo_s, rebuild_s, undone = [], [], []
    restored = KeyedTable(CARDS.dtype)
    recovery = Recovery(settings, {CARDS.name: topic})
    progress = recovery.start(0, {CARDS.name: restored}, [CARDS])
    while not progress.done:
        recovery.step()
    recovery.close()
    assert len(restored) == args.cards
    for round_number in range(args.rounds):
        tx = payments(args.batch, args.cards, seed=round_number)
        restored.begin()
        card_features_split([restored], np.zeros(len(tx), dtype=np.int64), tx)
        started = time.perf_counter()
        undone.append(restored.rollback())
        undo_s.append(time.perf_counter() - started)
        rebuild_s.append(restore_into_table(settings, CARDS, topic)["seconds"])  # the old abort: a full restore
    result = {
        "cards": args.cards,
        "batch": args.batch,
        "rounds": args.rounds,
        "undo_ms": statistics.median(undo_s) * 1000,
        "rebuild_ms": statistics.median(rebuild_s) * 1000,
        "changes_undone": statistics.median(undone),
    }
    result["rebuild_over_undo"] = result["rebuild_ms"] / max(result["undo_ms"], 1e-6)
    print(json.dumps(result, indent=2))
    (RESULTS / "abort_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
