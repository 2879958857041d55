"""The produce loop against a real broker and registry: every transaction lands with exactly one label."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import NewTopic

from fraudstream.cli import main as fraudstream_main
from fraudstream.errors import KafkaUnavailable, SchemaError
from fraudstream.kafka import admin, consumer_config
from fraudstream.records import Label, Transaction
from fraudstream.registry import Registry, register_all
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder
from fraudstream.settings import PROJECT_ROOT, Settings
from fraudstream.producer.generator import FRAUD_SCENARIOS, LEGIT
from fraudstream.producer.loop import produce

READ_LIMIT_S = 60.0  # a bound on waiting for records, so a broken run fails instead of hanging


def read_topic(settings: Settings, topic: str, record_name: str) -> list[tuple[str, dict[str, Any]]]:
    """Every record of a topic (read_committed), up to the end offsets seen at the start, as (key, decoded value)."""
    schemas = load_schemas(settings.schemas_dir)
    decoder = Decoder(Registry(settings), schemas.expanded[record_name])
    consumer = Consumer(consumer_config(settings, f"test-reader-{uuid.uuid4().hex[:8]}"))
    try:
        partitions = [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        remaining = {partition for partition, end in ends.items() if end > 0}
        consumer.assign(partitions)
        records = []
        deadline = time.monotonic() + READ_LIMIT_S
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(1_000, timeout=1.0):
                assert msg.error() is None, msg.error()
                records.append((msg.key().decode(), decoder.decode(msg.value())))
                if msg.offset() + 1 >= ends[msg.partition()]:
                    remaining.discard(msg.partition())
        assert not remaining, f"partitions {sorted(remaining)} of {topic} not read to their end"
        return records
    finally:
        consumer.close()


def read_pairs(settings: Settings) -> tuple[dict[str, Transaction], list[Label]]:
    transactions: dict[str, Transaction] = {}
    for key, value in read_topic(settings, settings.transactions_topic, "Transaction"):
        tx = Transaction.from_dict(value)
        assert key == tx.account_id
        assert tx.transaction_id not in transactions
        transactions[tx.transaction_id] = tx
    labels = []
    for key, value in read_topic(settings, settings.labels_topic, "Label"):
        label = Label.from_dict(value)
        assert key == label.transaction_id
        labels.append(label)
    return transactions, labels


def test_every_produced_transaction_has_exactly_one_label(pipeline: Settings):
    report = produce(pipeline, rate=0, count=3_000, seed=11)

    assert report.ok, report.errors
    assert (report.sent, report.delivered, report.failed) == (3_000, 3_000, 0)
    assert (report.labels_sent, report.labels_delivered, report.labels_failed) == (3_000, 3_000, 0)
    transactions, labels = read_pairs(pipeline)
    assert len(transactions) == 3_000
    assert Counter(label.transaction_id for label in labels) == Counter(transactions.keys())
    # Each label names its transaction's terminal and event time (what a detector's label table needs).
    assert all(
        (label.terminal_id, label.event_time)
        == (transactions[label.transaction_id].terminal_id, transactions[label.transaction_id].event_time)
        for label in labels
    )
    scenarios = Counter(label.scenario for label in labels)
    assert scenarios[LEGIT] > 2_500 and sum(scenarios[name] for name in FRAUD_SCENARIOS) > 30
    # Labels are ground truth on their own topic: the transaction carries no hint of them.
    assert not {"is_fraud", "scenario"} & set(Transaction.__dataclass_fields__)


def test_paced_run_keeps_the_rate_on_average(pipeline: Settings):
    """Pacing is behaviour, not speed: never faster than asked, and not far behind at a rate this low.
    The lower bound leaves room for a busy machine (the generator needs ~1% of a core at 500/s)."""
    report = produce(pipeline, rate=500, count=1_000, seed=12, labels=False)
    assert report.ok and report.sent == report.delivered == 1_000 and report.labels_sent == 0
    assert report.target_rate == 500
    assert 0.5 * 500 <= report.achieved_rate <= 1.1 * 500, report.summary()
    # The same from the broker's side: the records' timestamps span the paced duration (about 2 s).
    timestamps = sorted(m.timestamp()[1] for m in read_raw(pipeline, pipeline.transactions_topic))
    assert (timestamps[-1] - timestamps[0]) / 1000 >= 0.9 * (1_000 - 1) / 500 / 1.1


def read_raw(settings: Settings, topic: str) -> list:
    from tests.support.kafka_io import read_topic as read_messages

    return read_messages(settings, topic)


def test_unregistered_schemas_are_a_clear_error_and_nothing_is_created(stack_settings: Settings):
    settings = stack_settings.replace(transactions_topic=f"test-unregistered-{uuid.uuid4().hex[:10]}")
    with pytest.raises(SchemaError, match="run `fraudstream schemas register`"):
        produce(settings, rate=0, count=10)
    assert settings.transactions_topic not in admin(settings).list_topics(timeout=10).topics


def test_unreachable_broker_is_one_clear_error(stack_settings: Settings):
    settings = stack_settings.replace(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(KafkaUnavailable, match="127.0.0.1:1 did not answer"):
        produce(settings, rate=0, count=10, cluster_timeout_s=2.0)


def test_delivery_failures_are_counted_reported_and_fail_the_exit_status(stack_settings: Settings, capsys):
    # A transactions topic that rejects every batch as too large: a real broker-side delivery failure.
    settings = stack_settings.replace(transactions_topic=f"test-reject-{uuid.uuid4().hex[:10]}", partitions=1)
    client = admin(settings)  # kept referenced until the futures resolve
    created = client.create_topics(
        [
            NewTopic(
                settings.transactions_topic,
                num_partitions=1,
                replication_factor=settings.replication_factor,
                config={"max.message.bytes": "16"},
            )
        ]
    )
    for future in created.values():
        future.result()
    register_all(settings)

    report = produce(settings, rate=0, count=20, seed=13)
    assert not report.ok
    assert (report.sent, report.delivered, report.failed) == (20, 0, 20)
    assert report.labels_delivered == 20  # the labels topic is healthy
    assert any("too large" in error.lower() for error in report.errors), report.errors

    status = fraudstream_main(
        [
            "produce",
            "--topic",
            settings.transactions_topic,
            "--count",
            "20",
            "--rate",
            "0",
            "--quiet",
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--schema-registry-url",
            settings.schema_registry_url,
        ]
    )
    out, err = capsys.readouterr()
    assert status == 1
    assert "failed 20" in out and len(out.strip().splitlines()) == 1
    assert err.startswith("fraudstream produce: error: 20 records not delivered")


def test_sigterm_stops_flushes_and_exits_cleanly(pipeline: Settings):
    command = [
        sys.executable,
        "-m",
        "fraudstream.producer",
        "--topic",
        pipeline.transactions_topic,
        "--rate",
        "200",
        "--bootstrap-servers",
        pipeline.bootstrap_servers,
        "--schema-registry-url",
        pipeline.schema_registry_url,
    ]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_a_record(pipeline, pipeline.transactions_topic)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    summary = out.strip().splitlines()[-1]
    assert "stopped early" in summary
    sent = int(re.search(r"transactions: sent ([\d,]+), delivered \1, failed 0", summary).group(1).replace(",", ""))
    transactions, labels = read_pairs(pipeline)
    assert len(transactions) == sent > 0
    assert Counter(label.transaction_id for label in labels) == Counter(transactions.keys())


def wait_for_a_record(settings: Settings, topic: str) -> None:
    consumer = Consumer(consumer_config(settings, f"test-waiter-{uuid.uuid4().hex[:8]}"))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + READ_LIMIT_S
        while time.monotonic() < deadline:
            if any(msg.error() is None for msg in consumer.consume(1, timeout=1.0)):
                return
        pytest.fail(f"no record reached {topic} within {READ_LIMIT_S:.0f}s")
    finally:
        consumer.close()
