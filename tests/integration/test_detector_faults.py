"""The detector's failure paths on the real broker and registry: outputs the broker will never take,
and a registry outage longer than the detector waits for."""

from __future__ import annotations

import os
import random
import signal
import string
import subprocess
import sys
from urllib.parse import urlsplit

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from fastavro import parse_schema

from fraudstream.consumer.decide import DLQ_KIND, DLQ_REASON
from fraudstream.consumer.collector import OUTPUT_TOO_LARGE
from fraudstream.kafka import admin
from fraudstream.serde import make_encoder
from fraudstream.settings import ENV, Settings
from tests.integration.test_detector import RunningDetector, decode, encoder_for, register_transaction_v1, routed_total
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until
from tests.support.tcp_proxy import TcpProxy

FRAUD_TOPIC_LIMIT = 4_096
# Makes a transaction's FraudAlert larger than FRAUD_TOPIC_LIMIT, even lz4-compressed as the broker sees it.
BIG_CITY = "".join(random.Random(5).choices(string.ascii_letters + string.digits, k=12_000))


def limit_topic(settings: Settings, topic: str, max_message_bytes: int) -> None:
    client = admin(settings)
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", str(max_message_bytes), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in client.incremental_alter_configs([resource]).values():
        future.result()


def routed_ids(settings: Settings) -> list[str]:
    return [decode(settings, m.value())["transaction_id"] for m in read_topic(settings, settings.legit_topic)] + [
        decode(settings, m.value())["transaction"]["transaction_id"] for m in read_topic(settings, settings.fraud_topic)
    ]


def send_with_one_too_large(settings: Settings) -> tuple[list, bytes]:
    encode = encoder_for(settings, settings.transactions_topic)
    small = [transaction(a) for a in (100, 95_000, 200, 99_000)]
    big = transaction(97_000, city=BIG_CITY)
    big_bytes = encode(big.to_dict())
    produce_raw(
        settings,
        settings.transactions_topic,
        [(b"k", encode(t.to_dict())) for t in small[:2]]
        + [(b"big", big_bytes)]
        + [(b"k", encode(t.to_dict())) for t in small[2:]],
    )
    return small, big_bytes


def assert_only_the_big_one_dead_lettered(
    settings: Settings, small: list, big_bytes: bytes, routed_before: list
) -> None:
    [dead] = read_topic(settings, settings.dlq_topic)
    headers = dict(dead.headers())
    assert dead.value() == big_bytes  # the original input, not the alert
    assert headers[DLQ_KIND].decode() == OUTPUT_TOO_LARGE
    assert settings.fraud_topic in headers[DLQ_REASON].decode() and "max.message.bytes" in headers[DLQ_REASON].decode()
    ids = routed_ids(settings)
    assert sorted(ids) == sorted(routed_before + [t.transaction_id for t in small])  # each once, nothing lost


def test_an_output_over_its_topics_limit_is_dead_lettered_without_an_abort(pipeline: Settings):
    limit_topic(pipeline, pipeline.fraud_topic, FRAUD_TOPIC_LIMIT)
    small, big_bytes = send_with_one_too_large(pipeline)
    detector = RunningDetector(pipeline)
    wait_until(lambda: routed_total(pipeline) >= 5, timeout_s=90, what="all five routed")
    detector.stop()
    assert detector.error is None, detector.error
    assert detector.detector.metrics.aborts == 0  # known before producing: no transaction wasted
    assert_only_the_big_one_dead_lettered(pipeline, small, big_bytes, [])


def test_a_limit_lowered_while_running_aborts_once_then_dead_letters_in_the_retried_transaction(pipeline: Settings):
    encode = encoder_for(pipeline, pipeline.transactions_topic)
    first = [transaction(a) for a in (300, 96_000)]
    produce_raw(pipeline, pipeline.transactions_topic, [(b"k", encode(t.to_dict())) for t in first])
    detector = RunningDetector(pipeline)
    wait_until(lambda: routed_total(pipeline) >= 2, timeout_s=90, what="the first records routed")
    limit_topic(pipeline, pipeline.fraud_topic, FRAUD_TOPIC_LIMIT)  # the detector still believes the old limit

    small, big_bytes = send_with_one_too_large(pipeline)
    wait_until(lambda: routed_total(pipeline) >= 7, timeout_s=90, what="the rest routed")
    detector.stop()
    assert detector.error is None, detector.error
    assert detector.detector.metrics.aborts >= 1  # the broker refused it: the abort path really ran
    assert_only_the_big_one_dead_lettered(pipeline, small, big_bytes, [t.transaction_id for t in first])


def test_a_registry_outage_past_the_limit_stops_with_one_line_and_a_restart_resumes(pipeline: Settings):
    url = urlsplit(pipeline.schema_registry_url)
    proxy = TcpProxy(url.hostname, url.port)
    settings = pipeline.replace(schema_registry_url=f"http://127.0.0.1:{proxy.port}{url.path}")
    encode = encoder_for(settings, settings.transactions_topic)
    v1_id, v1_schema = register_transaction_v1(settings)
    encode_v1 = make_encoder(v1_id, parse_schema(v1_schema))
    env = {
        **os.environ,
        ENV["bootstrap_servers"]: settings.bootstrap_servers,
        ENV["schema_registry_url"]: settings.schema_registry_url,
        ENV["registry_outage_limit_s"]: "3",
    }
    command = [
        sys.executable,
        "-m",
        "fraudstream.consumer",
        "--topic",
        settings.transactions_topic,
        "--group-id",
        settings.group_id,
    ]

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = transaction(500)
    produce_raw(settings, settings.transactions_topic, [(b"k", encode(first.to_dict()))])
    detector = start()
    try:
        wait_until(lambda: routed_total(settings) >= 1, timeout_s=60, what="the first record routed")
        proxy.down()
        # A writer schema the detector has not cached: deciding it needs the registry.
        v1_tx, after = transaction(700), transaction(800)
        produce_raw(
            settings,
            settings.transactions_topic,
            [
                (b"k", encode_v1({k: v for k, v in v1_tx.to_dict().items() if k != "device_id"})),
                (b"k", encode(after.to_dict())),
            ],
        )
        out, err = detector.communicate(timeout=90)
    finally:
        if detector.poll() is None:
            detector.kill()
    assert detector.returncode == 1, (out, err)
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("fraudstream detect: error: ") and "registry outage limit 3 s" in line, line
    assert routed_total(settings) == 1 and read_topic(settings, settings.dlq_topic) == []  # held, not dead-lettered

    proxy.up()
    detector = start()
    try:
        wait_until(lambda: routed_total(settings) >= 3, timeout_s=90, what="the restarted detector to resume")
    finally:
        detector.send_signal(signal.SIGTERM)
        out, err = detector.communicate(timeout=60)
        proxy.down()
    assert detector.returncode == 0, err
    assert sorted(routed_ids(pipeline)) == sorted(t.transaction_id for t in (first, v1_tx, after))
    assert read_topic(settings, settings.dlq_topic) == []
