"""The detector against the real broker and registry: routing, conservation, dead letters, fencing."""

from __future__ import annotations

import functools
import io
import threading
from collections import Counter

import pytest
from fastavro import parse_schema, schemaless_reader

from consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from consumer.detector import Detector
from fraudstream.errors import Fenced
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings
from tests.support.kafka_io import count_committed, produce_raw, read_topic, transaction, wait_until


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
