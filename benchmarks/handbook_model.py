"""The Handbook measurement in one command (`make handbook`): produce the book's simulation with labels
7 days late, train on its training week from the topics, run one detector with the model exactly once
until it has committed the whole input, then evaluate the book's test week.

    python -m benchmarks.handbook_model [--days 183] [--topic handbook-<random>] [--output-dir DIR]

Long (about 15 minutes on a loaded 2-core machine at the book's size); the suite's short version is
tests/integration/test_model_scoring.py. Uses KAFKA_BOOTSTRAP_SERVERS / SCHEMA_REGISTRY_URL like every command.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from fraudstream import cli
from fraudstream.consumer.detector import Detector
from fraudstream.kafka import consumer_config, ensure_topics
from fraudstream.producer import handbook
from fraudstream.producer.loop import produce
from fraudstream.registry import register_all
from fraudstream.settings import Settings

LABEL_DELAY_DAYS = 7.0


def committed_all(settings: Settings) -> bool:
    """The detector group's committed offsets have reached the input's end on every partition."""
    consumer = Consumer(consumer_config(settings, settings.group_id))
    try:
        topic = consumer.list_topics(settings.transactions_topic, timeout=10).topics[settings.transactions_topic]
        partitions = [TopicPartition(settings.transactions_topic, p) for p in topic.partitions]
        committed = consumer.committed(partitions, timeout=10)
        return all(c.offset >= consumer.get_watermark_offsets(c, timeout=10)[1] for c in committed)
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=handbook.DEFAULT_DAYS)
    parser.add_argument("--customers", type=int, default=handbook.DEFAULT_CUSTOMERS)
    parser.add_argument("--terminals", type=int, default=handbook.DEFAULT_TERMINALS)
    parser.add_argument(
        "--train",
        nargs=2,
        metavar=("FROM", "TO"),
        default=["2018-07-25", "2018-07-31"],
        help="training window [the Handbook's]",
    )
    parser.add_argument(
        "--test",
        nargs=2,
        metavar=("FROM", "TO"),
        default=["2018-08-08", "2018-08-14"],
        help="evaluated window [the Handbook's]",
    )
    parser.add_argument("--topic", default=f"handbook-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = Settings.from_env(
        transactions_topic=args.topic, group_id=f"{args.topic}-detector", label_delay_days=LABEL_DELAY_DAYS
    )
    ensure_topics(settings)
    register_all(settings)
    started = time.monotonic()
    simulation = handbook.simulate(days=args.days, customers=args.customers, terminals=args.terminals, seed=42)
    report = produce(settings, simulation=simulation, label_delay_days=LABEL_DELAY_DAYS)
    print(report.summary(), flush=True)
    connection = [
        "--topic",
        args.topic,
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--schema-registry-url",
        settings.schema_registry_url,
    ]
    model = args.output_dir / "handbook-model.txt"
    if cli.main(["train", "--from", args.train[0], "--to", args.train[1], "--output", str(model), *connection]):
        return 1
    stop = threading.Event()
    detector = Detector(settings.replace(model_file=model, transactional_id=f"{args.topic}-detector-1"))
    thread = threading.Thread(target=detector.run, args=(stop,), daemon=True)
    thread.start()
    while thread.is_alive() and not committed_all(settings):
        stop.wait(5)
    stop.set()
    thread.join(60)
    status = cli.main(
        [
            "evaluate",
            "--from",
            args.test[0],
            "--to",
            args.test[1],
            "--no-daily",
            "--output",
            str(args.output_dir / "handbook-model.json"),
            *connection,
        ]
    )
    print(f"handbook measurement on {args.topic}: {time.monotonic() - started:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
