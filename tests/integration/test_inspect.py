"""`fraudstream inspect` against the real broker and registry, through the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from confluent_kafka import Producer

from fraudstream.kafka import producer_config, transactional_producer_config
from fraudstream.records import FraudAlert, Transaction
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings
from tests.support.kafka_io import transaction
from tests.support.output_lines import LineReader, stop_process

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
CLI_TIMEOUT_S = 60


def millis(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


def whole_millis_now() -> datetime:
    """Avro timestamp-millis keeps milliseconds: build times that survive the round trip exactly."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_console_json(record: dict[str, Any]) -> dict[str, Any]:
    """What kafka-avro-console-consumer prints for a record dict: timestamps as epoch millis."""
    return {
        name: (
            millis(value)
            if isinstance(value, datetime)
            else as_console_json(value)
            if isinstance(value, dict)
            else value
        )
        for name, value in record.items()
    }


def encoders(settings: Settings) -> dict[str, Any]:
    """Topic -> encoder with the registered current schema, as the producer and detector frame records."""
    schemas = load_schemas(settings.schemas_dir)
    ids = current_ids(settings, Registry(settings), schemas)
    return {
        settings.legit_topic: make_encoder(ids[settings.legit_topic], schemas.parsed["Transaction"]),
        settings.fraud_topic: make_encoder(ids[settings.fraud_topic], schemas.parsed["FraudAlert"]),
    }


def produce(
    settings: Settings,
    topic: str,
    records: list[tuple[bytes | None, bytes | None, list | None]],
    *,
    partition: int | None = None,
) -> None:
    producer = Producer(producer_config(settings))
    for key, value, headers in records:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(topic, value, key, headers=headers, **extra)
    assert producer.flush(30) == 0, "records not delivered"


def inspect(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fraudstream.cli", "inspect", *args, *connection(settings)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def connection(settings: Settings) -> list[str]:
    return ["--bootstrap-servers", settings.bootstrap_servers, "--schema-registry-url", settings.schema_registry_url]


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def sample_transactions(count: int) -> list[Transaction]:
    return [
        transaction(
            1_000 + 100 * i,
            account=f"acc-{i % 4}",
            event_time=whole_millis_now(),
            device_id=(f"dev-{i}" if i % 2 else None),
            channel=("ONLINE" if i % 2 else "CARD_PRESENT"),
        )
        for i in range(count)
    ]


def test_legit_topic_prints_json_lines_equal_to_what_was_produced(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.legit_topic]
    sent = sample_transactions(12)
    produce(pipeline, pipeline.legit_topic, [(t.account_id.encode(), encode(t.to_dict()), None) for t in sent])

    done = inspect(pipeline, pipeline.legit_topic, "--from-beginning")

    assert done.returncode == 0, done.stderr
    printed = sorted(json_lines(done.stdout), key=lambda r: r["transaction_id"])
    expected = sorted((as_console_json(t.to_dict()) for t in sent), key=lambda r: r["transaction_id"])
    assert printed == expected
    assert any(r["device_id"] is None for r in printed) and any(r["device_id"] for r in printed)


def test_fraud_topic_prints_json_lines_equal_to_what_was_produced(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.fraud_topic]
    alerts = [
        FraudAlert(transaction=t, rules=("large_amount", "velocity")[: 1 + i % 2], detected_at=whole_millis_now())
        for i, t in enumerate(sample_transactions(6))
    ]
    produce(
        pipeline,
        pipeline.fraud_topic,
        [(a.transaction.transaction_id.encode(), encode(a.to_dict()), None) for a in alerts],
    )

    done = inspect(pipeline, pipeline.fraud_topic, "--from-beginning")

    assert done.returncode == 0, done.stderr
    printed = sorted(json_lines(done.stdout), key=lambda r: r["transaction"]["transaction_id"])
    expected = sorted((as_console_json(a.to_dict()) for a in alerts), key=lambda r: r["transaction"]["transaction_id"])
    assert printed == expected


def test_confluent_json_tags_union_values_with_their_branch(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.legit_topic]
    with_device, without_device = sample_transactions(2)[::-1]
    assert with_device.device_id and without_device.device_id is None
    produce(
        pipeline,
        pipeline.legit_topic,
        [(None, encode(t.to_dict()), None) for t in (with_device, without_device)],
        partition=0,
    )

    done = inspect(pipeline, pipeline.legit_topic, "--from-beginning", "--confluent-json")

    assert done.returncode == 0, done.stderr
    assert [r["device_id"] for r in json_lines(done.stdout)] == [{"string": with_device.device_id}, None]


def test_dead_letter_topic_prints_the_reason_for_each_record_and_exits_0(pipeline: Settings) -> None:
    bad_values = [b"not avro at all", b"\x00\x00\x00\x7f\xff\x01\x02", b"\xff\xfe binary"]
    records = [
        (
            f"acc-{i}".encode(),
            value,
            [
                ("error.kind", b"no_magic_byte" if i != 1 else b"unknown_schema_id"),
                ("error.reason", f"reason number {i}".encode()),
                ("source.topic", pipeline.transactions_topic.encode()),
                ("source.partition", b"2"),
                ("source.offset", str(40 + i).encode()),
            ],
        )
        for i, value in enumerate(bad_values)
    ]
    produce(pipeline, pipeline.dlq_topic, records, partition=0)

    done = inspect(pipeline, pipeline.dlq_topic, "--from-beginning")

    assert done.returncode == 0, done.stderr
    printed = json_lines(done.stdout)
    assert [r["error"]["reason"] for r in printed] == ["reason number 0", "reason number 1", "reason number 2"]
    assert [r["error"]["kind"] for r in printed] == ["no_magic_byte", "unknown_schema_id", "no_magic_byte"]
    assert [r["value_hex"] for r in printed] == [v.hex() for v in bad_values]
    assert printed[0]["key"] == "acc-0"
    assert printed[2]["source"] == {"topic": pipeline.transactions_topic, "partition": 2, "offset": 42}

    as_base64 = json_lines(inspect(pipeline, pipeline.dlq_topic, "--from-beginning", "--bytes", "base64").stdout)
    assert [r["value_base64"] for r in as_base64][0] == "bm90IGF2cm8gYXQgYWxs"


def test_undecodable_value_on_a_data_topic_prints_an_error_line_and_reading_goes_on(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.legit_topic]
    first, last = sample_transactions(2)
    produce(
        pipeline,
        pipeline.legit_topic,
        [(b"k", encode(first.to_dict()), None), (b"k", b'{"json": true}', None), (b"k", encode(last.to_dict()), None)],
        partition=1,
    )

    done = inspect(pipeline, pipeline.legit_topic, "--from-beginning")

    assert done.returncode == 0, done.stderr
    good, bad, good_again = json_lines(done.stdout)
    assert (good["transaction_id"], good_again["transaction_id"]) == (first.transaction_id, last.transaction_id)
    assert bad["error"]["kind"] == "no_magic_byte" and (bad["partition"], bad["offset"]) == (1, 1)
    assert bad["value_hex"] == b'{"json": true}'.hex()
    assert "1 of 3 records could not be decoded" in done.stderr


def test_key_metadata_partition_offset_and_max_messages(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.legit_topic]
    sent = sample_transactions(4)
    produce(
        pipeline,
        pipeline.legit_topic,
        [(t.account_id.encode(), encode(t.to_dict()), [("trace", b"abc"), ("bin", b"\xff")]) for t in sent],
        partition=2,
    )
    legit_id = current_ids(pipeline, Registry(pipeline))[pipeline.legit_topic]

    done = inspect(
        pipeline,
        pipeline.legit_topic,
        "--partition",
        "2",
        "--offset",
        "1",
        "--max-messages",
        "2",
        "--print-key",
        "--print-metadata",
    )

    assert done.returncode == 0, done.stderr
    first, second = json_lines(done.stdout)
    assert (first["topic"], first["partition"], first["offset"], second["offset"]) == (pipeline.legit_topic, 2, 1, 2)
    assert first["key"] == sent[1].account_id and first["value"]["transaction_id"] == sent[1].transaction_id
    assert first["schema_id"] == legit_id and first["timestamp_type"] == "CreateTime"
    assert abs(first["timestamp"] - time.time() * 1000) < 600_000
    assert first["headers"] == {"trace": "abc", "bin_hex": "ff"}

    last_one = json_lines(inspect(pipeline, pipeline.legit_topic, "--partition", "2", "--offset", "-1").stdout)
    assert [r["transaction_id"] for r in last_one] == [sent[-1].transaction_id]


def test_reads_committed_records_only_unless_asked(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.legit_topic]
    aborted, committed = sample_transactions(2)
    producer = Producer(transactional_producer_config(pipeline, f"test-inspect-{uuid.uuid4().hex[:8]}"))
    producer.init_transactions(30)
    for record, finish in ((aborted, producer.abort_transaction), (committed, producer.commit_transaction)):
        producer.begin_transaction()
        producer.produce(pipeline.legit_topic, encode(record.to_dict()), partition=0)
        assert producer.flush(30) == 0  # on the log before the abort (an abort drops unsent records)
        finish(30)

    default = json_lines(inspect(pipeline, pipeline.legit_topic, "--from-beginning").stdout)
    uncommitted = json_lines(inspect(pipeline, pipeline.legit_topic, "--from-beginning", "--read-uncommitted").stdout)

    assert [r["transaction_id"] for r in default] == [committed.transaction_id]
    assert [r["transaction_id"] for r in uncommitted] == [aborted.transaction_id, committed.transaction_id]


def test_missing_topic_is_one_error_line_and_a_non_zero_exit(stack_settings: Settings) -> None:
    done = inspect(stack_settings, f"no-such-topic-{uuid.uuid4().hex[:8]}", "--from-beginning")

    assert done.returncode != 0
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_follow_prints_new_records_until_interrupted(pipeline: Settings) -> None:
    encode = encoders(pipeline)[pipeline.legit_topic]
    before, after = sample_transactions(2)
    produce(pipeline, pipeline.legit_topic, [(None, encode(before.to_dict()), None)])
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fraudstream.cli",
            "inspect",
            pipeline.legit_topic,
            "--from-beginning",
            "--follow",
            *connection(pipeline),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        output = LineReader(follower.stdout)
        assert json.loads(output.next_line(timeout_s=30))["transaction_id"] == before.transaction_id
        produce(pipeline, pipeline.legit_topic, [(None, encode(after.to_dict()), None)])
        assert json.loads(output.next_line(timeout_s=30))["transaction_id"] == after.transaction_id
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0, follower.stderr.read()
    finally:
        stop_process(follower)


@pytest.fixture(autouse=True)
def _no_env_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI under test gets its topic from arguments only.
    monkeypatch.delenv("FRAUDSTREAM_TOPIC", raising=False)
    assert "FRAUDSTREAM_TOPIC" not in os.environ


def test_unreachable_broker_is_one_error_line_not_a_log_flood() -> None:
    closed_port = "127.0.0.1:1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fraudstream.cli",
            "inspect",
            "transactions",
            "--from-beginning",
            "--bootstrap-servers",
            closed_port,
        ],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )

    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Kafka did not answer" in done.stderr
