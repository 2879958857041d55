"""The detector against the real broker and registry: routing, conservation, dead letters, fencing."""

from __future__ import annotations

import functools
import io
import threading

import pytest
from fastavro import parse_schema, schemaless_reader

from fraudstream.consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from fraudstream.consumer.detector import Detector
from fraudstream.errors import Fenced
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings
from tests.support.kafka_io import count_committed, produce_raw, read_topic, transaction, wait_until
from tests.support.malformed import corpus


class RunningDetector:
    """A detector on a thread of the test process; stop() ends it like SIGTERM would."""

    def __init__(self, settings: Settings) -> None:
        self.detector = Detector(settings, log_interval_s=3600, on_log=lambda line: None)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.detector.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "detector did not stop"


def encoder_for(settings: Settings, topic: str, name: str = "Transaction"):
    ids = current_ids(settings, Registry(settings))
    return make_encoder(ids[topic], load_schemas(settings.schemas_dir).parsed[name])


def routed_total(settings: Settings) -> int:
    return count_committed(settings, [settings.legit_topic, settings.fraud_topic, settings.dlq_topic])


@functools.cache
def _writer_schema(registry_url: str, schema_id: int):
    return parse_schema(Registry(Settings(schema_registry_url=registry_url)).schema_by_id(schema_id))


def decode(settings: Settings, value: bytes) -> dict:
    """Decode with the writer schema fetched by id: what any Confluent-compatible reader does."""
    writer = _writer_schema(settings.schema_registry_url, int.from_bytes(value[1:5], "big"))
    return schemaless_reader(io.BytesIO(value[5:]), writer, None)


def test_every_transaction_is_routed_once_by_the_rule(pipeline: Settings):
    encode = encoder_for(pipeline, pipeline.transactions_topic)
    amounts = [i * 37 % 120_000 for i in range(3000)] + [90_000, 90_001]  # both sides of the threshold
    txs = [transaction(a, account=f"acc-{i % 50}") for i, a in enumerate(amounts)]
    produce_raw(pipeline, pipeline.transactions_topic, ((t.account_id.encode(), encode(t.to_dict())) for t in txs))

    detector = RunningDetector(pipeline)
    wait_until(lambda: routed_total(pipeline) >= len(txs), timeout_s=120, what="all transactions routed")
    detector.stop()
    assert detector.error is None

    legit = [decode(pipeline, m.value()) for m in read_topic(pipeline, pipeline.legit_topic)]
    fraud = [decode(pipeline, m.value()) for m in read_topic(pipeline, pipeline.fraud_topic)]
    assert read_topic(pipeline, pipeline.dlq_topic) == []
    expected_fraud = {t.transaction_id for t in txs if t.amount_cents > 90_000}
    assert {r["transaction"]["transaction_id"] for r in fraud} == expected_fraud
    assert {r["transaction_id"] for r in legit} == {t.transaction_id for t in txs} - expected_fraud
    all_ids = [r["transaction_id"] for r in legit] + [r["transaction"]["transaction_id"] for r in fraud]
    assert len(all_ids) == len(set(all_ids)) == len(txs)
    assert all(r["rules"] == ["large_amount"] for r in fraud)
    assert detector.detector.metrics.consumed == len(txs)


def register_transaction_v1(settings: Settings) -> int:
    """Register the released v1 Transaction under the input subject (as a v1 producer's deployment did)."""
    import json

    from fraudstream.schemas import history

    v1 = history(settings.schemas_dir, "Transaction")[0][1]
    return Registry(settings).register(settings.subject(settings.transactions_topic), json.dumps(v1)), v1


@pytest.mark.parametrize("decoder", ["columnar", "record"])
def test_malformed_records_go_to_the_dead_letter_topic_with_reasons(pipeline: Settings, decoder: str):
    pipeline = pipeline.replace(decoder=decoder)
    encode = encoder_for(pipeline, pipeline.transactions_topic)
    encode_label = encoder_for(pipeline, pipeline.labels_topic, "Label")
    v1_id, v1_schema = register_transaction_v1(pipeline)
    encode_v1 = make_encoder(v1_id, parse_schema(v1_schema))
    cases = corpus(
        transaction(1_000, transaction_id="ab"), encode=encode, encode_v1=encode_v1, encode_label=encode_label
    )
    assert len(cases) >= 30
    bad = cases  # both decoders dead-letter a record followed by extra bytes, alike
    good_txs = [transaction(a) for a in (100, 95_000, 20_000, 150_000)]
    v1_tx = transaction(99_999)
    v1_record = {k: v for k, v in v1_tx.to_dict().items() if k != "device_id"}
    records = []
    for i, (name, (value, _)) in enumerate(bad.items()):
        records.append((f"bad-{name}".encode(), value))
        records.append((b"good", encode(good_txs[i % len(good_txs)].to_dict())))
    records.append((b"good-v1", encode_v1(v1_record)))
    produce_raw(pipeline, pipeline.transactions_topic, records)

    detector = RunningDetector(pipeline)
    wait_until(lambda: routed_total(pipeline) >= len(records), timeout_s=120, what="all records routed")
    detector.stop()
    assert detector.error is None, detector.error

    dead = read_topic(pipeline, pipeline.dlq_topic)
    assert sorted(m.key().decode().removeprefix("bad-") for m in dead) == sorted(bad)  # each exactly once
    for message in dead:
        headers = dict(message.headers())
        name = message.key().decode().removeprefix("bad-")
        value, kind = bad[name]
        assert headers[DLQ_KIND].decode() == kind, (name, headers)
        assert headers[DLQ_REASON], name
        assert headers[DLQ_TOPIC].decode() == pipeline.transactions_topic
        assert int(headers[DLQ_PARTITION]) >= 0 and int(headers[DLQ_OFFSET]) >= 0
        assert message.value() == value or (value is None and not message.value())  # original bytes
    legit = read_topic(pipeline, pipeline.legit_topic)
    fraud = read_topic(pipeline, pipeline.fraud_topic)
    assert len(legit) + len(fraud) == len(records) - len(bad)
    for message in legit + fraud:  # what left for legit or fraud is readable by a Python (fastavro) reader
        decode(pipeline, message.value())
    fraud_ids = {decode(pipeline, m.value())["transaction"]["transaction_id"] for m in fraud}
    assert v1_tx.transaction_id in fraud_ids  # the v1 record was read with the current schema and routed by the rule


def test_a_second_detector_with_the_same_transactional_id_fences_the_first(pipeline: Settings):
    settings = pipeline.replace(transactional_id=f"{pipeline.group_id}-fixed")
    encode = encoder_for(settings, settings.transactions_topic)

    def send(n: int) -> list:
        txs = [transaction(i * 1_000, account=f"acc-{i}") for i in range(n)]
        produce_raw(settings, settings.transactions_topic, ((t.account_id.encode(), encode(t.to_dict())) for t in txs))
        return txs

    sent = send(300)
    first = RunningDetector(settings)
    wait_until(lambda: routed_total(settings) >= 300, timeout_s=60, what="first batch routed")
    second = RunningDetector(settings)
    wait_until(
        lambda: second.detector.consumer is not None and second.detector.consumer.assignment(),
        timeout_s=60,
        what="second detector joined",
    )
    sent += send(600)  # spread over every partition: the first detector must try a transaction and learn it is fenced
    wait_until(lambda: not first.thread.is_alive(), timeout_s=60, what="the fenced detector to stop")
    assert isinstance(first.error, Fenced), first.error
    assert "transactional id" in str(first.error)
    wait_until(lambda: routed_total(settings) >= len(sent), timeout_s=90, what="all routed by the second detector")
    second.stop()
    assert second.error is None
    ids = [
        decode(settings, m.value()).get("transaction_id")
        or decode(settings, m.value())["transaction"]["transaction_id"]
        for topic in (settings.legit_topic, settings.fraud_topic)
        for m in read_topic(settings, topic)
    ]
    assert sorted(ids) == sorted(t.transaction_id for t in sent)  # exactly once: nothing lost, nothing twice


def test_registry_outage_is_retried_not_dead_lettered(pipeline: Settings):
    from urllib.parse import urlsplit

    from tests.support.tcp_proxy import TcpProxy

    url = urlsplit(pipeline.schema_registry_url)
    proxy = TcpProxy(url.hostname, url.port)
    settings = pipeline.replace(schema_registry_url=f"http://127.0.0.1:{proxy.port}{url.path}")
    encode = encoder_for(settings, settings.transactions_topic)
    v1_id, v1_schema = register_transaction_v1(settings)
    encode_v1 = make_encoder(v1_id, parse_schema(v1_schema))

    detector = RunningDetector(settings)
    produce_raw(settings, settings.transactions_topic, [(b"k", encode(transaction(500).to_dict()))])
    wait_until(lambda: routed_total(settings) >= 1, timeout_s=60, what="first record routed")
    proxy.down()
    # A record with a writer schema the detector has not cached yet: it must ask the registry.
    v1_tx = transaction(700)
    produce_raw(
        settings,
        settings.transactions_topic,
        [(b"k", encode_v1({k: v for k, v in v1_tx.to_dict().items() if k != "device_id"}))],
    )
    wait_until(
        lambda: detector.detector.metrics.registry_retries >= 2, timeout_s=30, what="the detector to retry the registry"
    )
    assert routed_total(settings) == 1  # held, not dead-lettered
    proxy.up()
    wait_until(lambda: routed_total(settings) >= 2, timeout_s=90, what="processing to resume")
    detector.stop()
    proxy.down()
    assert detector.error is None, detector.error
    assert read_topic(pipeline, pipeline.dlq_topic) == []
    legit_ids = {decode(pipeline, m.value())["transaction_id"] for m in read_topic(pipeline, pipeline.legit_topic)}
    assert v1_tx.transaction_id in legit_ids


def register_foreign_schemas(settings: Settings) -> dict[str, int]:
    """A PROTOBUF and a JSON schema in the same registry, under subjects of this test's own: the Confluent API
    serves every type under one id space, so a record can name one of them by mistake or on purpose."""
    from confluent_kafka.schema_registry import Schema

    client = Registry(settings).client
    base = settings.transactions_topic
    return {
        "not_avro_schema/protobuf": client.register_schema(
            f"{base}-proto-value",
            Schema('syntax = "proto3";\nmessage Payment { string id = 1; int64 cents = 2; }', "PROTOBUF"),
        ),
        "not_avro_schema/json": client.register_schema(
            f"{base}-json-value", Schema('{"type": "object", "properties": {"id": {"type": "string"}}}', "JSON")
        ),
    }


def test_records_framed_with_a_non_avro_schema_id_are_dead_lettered_and_the_detector_stays_up(pipeline: Settings):
    """One such record used to stop the detector with a traceback, again at every restart (it was never committed)."""
    encode = encoder_for(pipeline, pipeline.transactions_topic)
    foreign = register_foreign_schemas(pipeline)
    payload = encode(transaction(1_000).to_dict())[5:]
    records = [(name.encode(), b"\x00" + schema_id.to_bytes(4, "big") + payload) for name, schema_id in foreign.items()]
    # The newer Confluent framing: a schema GUID in a header (this registry serves no GUIDs) and a bad header.
    guid_header = [("__value_schema_id", b"\x01" + bytes(range(16)))]
    headed = [
        (b"unknown_schema_id/guid-header", payload, guid_header),
        (b"bad_schema_guid/short-header", payload, [("__value_schema_id", b"\x01\x02")]),
    ]
    good = [transaction(a) for a in (100, 95_000)]
    records += [(b"good", encode(t.to_dict())) for t in good]
    produce_raw(pipeline, pipeline.transactions_topic, records)
    for key, value, headers in headed:
        produce_raw(pipeline, pipeline.transactions_topic, [(key, value)], headers=headers)
    total = len(records) + len(headed)

    for _ in range(2):  # and again after a restart: nothing left over stops it
        detector = RunningDetector(pipeline)
        wait_until(
            lambda detector=detector: routed_total(pipeline) >= total or not detector.thread.is_alive(),
            timeout_s=120,
            what="all records routed",
        )
        detector.stop()
        assert detector.error is None, detector.error
    dead = read_topic(pipeline, pipeline.dlq_topic)
    kinds = sorted((m.key().decode(), dict(m.headers())[DLQ_KIND].decode()) for m in dead)
    assert kinds == sorted((name, name.split("/")[0]) for name in [*foreign, *(k.decode() for k, _, _ in headed)])
    reasons = {m.key().decode(): dict(m.headers())[DLQ_REASON].decode() for m in dead}
    assert "PROTOBUF" in reasons["not_avro_schema/protobuf"] and "JSON" in reasons["not_avro_schema/json"]
    assert routed_total(pipeline) == total  # each once, the good ones routed
