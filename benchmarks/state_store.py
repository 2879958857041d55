"""Keyed state stores side by side: in memory (numpy rows, our KeyedTable) vs RocksDB (rocksdict, as
quixstreams uses), for N card profiles: memory per key, and restore speed from a real changelog.

    python -m benchmarks.state_store [--cards 1000000]

Writes N profiles to a changelog topic on the broker (transactionally, as the detector does), then
restores the partition into each store with the detector's own restore path, and reports changelog
records per second and memory per key. Needs the local stack (or KAFKA_BOOTSTRAP_SERVERS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from fraudstream.consumer.stateful import CARDS
from fraudstream.consumer.state.changelog import write_rows
from fraudstream.consumer.state.recovery import Recovery
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.kafka import admin, ensure_topics, transactional_producer_config
from fraudstream.settings import Settings

RESULTS = Path(__file__).parent / "results"
CHUNK = 50_000  # rows per transaction while filling the changelog


def fill_changelog(settings: Settings, spec, topic: str, cards: int) -> float:
    producer = Producer(
        transactional_producer_config(
            settings,
            f"bench-state-{uuid.uuid4().hex[:8]}",
            **{"linger.ms": 20, "queue.buffering.max.messages": 1_000_000},
        )
    )
    producer.init_transactions(30)
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    for first in range(0, cards, CHUNK):
        n = min(CHUNK, cards - first)
        rows = np.zeros(n, dtype=spec.dtype)
        for name in spec.dtype.names:  # arbitrary but non-zero content, so nothing compresses away
            field = rows[name]
            if field.dtype.kind in "iuf" and field.ndim == 1:
                rows[name] = rng.integers(1, 1_000_000, n).astype(field.dtype)
        producer.begin_transaction()
        write_rows(producer, topic, 0, spec, [b"card-%012x" % (first + i) for i in range(n)], rows)
        producer.commit_transaction(60)
    return time.perf_counter() - started


def rss_bytes() -> int:
    """The process's resident memory now (Linux), to measure what a restored table costs."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def restore_into_table(settings: Settings, spec, topic: str) -> dict:
    before = rss_bytes()
    recovery = Recovery(settings, {spec.name: topic})
    table = KeyedTable(spec.dtype)
    started = time.perf_counter()
    progress = recovery.start(0, {spec.name: table}, [spec])
    while not progress.done:
        recovery.step()
    seconds = time.perf_counter() - started
    grown = rss_bytes() - before
    recovery.close()
    return {
        "store": "memory (numpy KeyedTable)",
        "keys": len(table),
        "records": progress.records,
        "seconds": seconds,
        "records_per_s": progress.records / seconds,
        "bytes_per_key": table.nbytes() / max(len(table), 1),
        "rss_growth_bytes_per_key": grown / max(len(table), 1),
    }


def restore_into_rocksdb(settings: Settings, spec, topic: str) -> dict:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from rocksdict import Rdict, WriteBatch

    from fraudstream.kafka import consumer_config

    folder = tempfile.mkdtemp(prefix="bench-rocks-")
    db = Rdict(folder)
    consumer = Consumer(consumer_config(settings, f"bench-rocks-{uuid.uuid4().hex[:6]}"))
    tp = TopicPartition(topic, 0, OFFSET_BEGINNING)
    _, end = consumer.get_watermark_offsets(tp, timeout=10)
    consumer.assign([tp])
    records = 0
    started = time.perf_counter()
    while True:
        batch = WriteBatch()
        for message in consumer.consume(20_000, 0.2):
            if message.error() is None:
                batch.put(message.key(), message.value())
                records += 1
        db.write(batch)
        if consumer.position([TopicPartition(topic, 0)])[0].offset >= end:
            break
    seconds = time.perf_counter() - started
    consumer.close()
    db.close()
    disk = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "store": "RocksDB (rocksdict)",
        "keys": records,
        "records": records,
        "seconds": seconds,
        "records_per_s": records / seconds,
        "bytes_per_key": disk / max(records, 1),
        "note": "bytes on disk per key; plus RocksDB's block cache and memtables in memory",
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.state_store", description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=1_000_000)
    args = parser.parse_args()
    settings = Settings.from_env().replace(transactions_topic=f"bench-state-{uuid.uuid4().hex[:8]}", partitions=1)
    spec = CARDS
    topic = settings.changelog_topic("cards")
    ensure_topics(settings, (settings.transactions_topic, topic), partitions=1)
    try:
        fill_s = fill_changelog(settings, spec, topic, args.cards)
        results = [restore_into_table(settings, spec, topic), restore_into_rocksdb(settings, spec, topic)]
    finally:
        admin(settings).delete_topics([settings.transactions_topic, topic])
    summary = {
        "cards": args.cards,
        "row_bytes": spec.dtype.itemsize,
        "changelog_fill_s": fill_s,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stores": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "state_store.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.cards:,} card profiles of {spec.dtype.itemsize} bytes; changelog filled in {fill_s:.1f}s")
    memory = results[0]
    for r in results:
        print(
            f"  {r['store']:28} restore {r['records_per_s']:>10,.0f} records/s ({r['seconds']:.1f}s)  "
            f"{r['bytes_per_key']:>6.0f} bytes/key  x{r['records_per_s'] / memory['records_per_s']:.2f} of memory"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
