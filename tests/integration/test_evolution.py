"""Schema evolution on the wire: v1 and v2 Transaction records on one topic, detectors on either version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastavro import parse_schema

from fraudstream.registry import Registry
from fraudstream.schemas import history, load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings
from tests.integration.test_detector import RunningDetector, decode, encoder_for, routed_total
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

AMOUNTS = [100, 95_000, 90_000, 90_001, 250_000, 4_200]


def v1_schemas_dir(tmp_path: Path) -> Path:
    """A checkout of the project as it was at Transaction v1: the detector 'still on v1'."""
    folder = tmp_path / "schemas-v1"
    shutil.copytree(Settings().schemas_dir, folder)
    (folder / "transaction.avsc").write_text(json.dumps(history(folder, "Transaction")[0][1]))
    return folder


def produce_mixed(settings: Settings, v1_id: int, v1_schema) -> dict[str, bool]:
    """The same amounts written once by a v1 producer and once by a v2 producer; returns id -> is fraud."""
    encode_v2 = encoder_for(settings, settings.transactions_topic)
    encode_v1 = make_encoder(v1_id, parse_schema(v1_schema))
    records, expected = [], {}
    for i, amount in enumerate(AMOUNTS):  # a card each: only the amount rule can fire, whatever the state
        old = transaction(amount, account=f"acct-v1-{i}")
        new = transaction(amount, account=f"acct-v2-{i}", channel="ONLINE", device_id="device-42")
        records.append((b"v1", encode_v1({k: v for k, v in old.to_dict().items() if k != "device_id"})))
        records.append((b"v2", encode_v2(new.to_dict())))
        expected[old.transaction_id] = expected[new.transaction_id] = amount > settings.fraud_threshold_cents
    produce_raw(settings, settings.transactions_topic, records)
    return expected


def routed(settings: Settings) -> tuple[dict[str, dict], dict[str, dict]]:
    legit = {
        r["transaction_id"]: r
        for r in (decode(settings, m.value()) for m in read_topic(settings, settings.legit_topic))
    }
    fraud = {
        r["transaction"]["transaction_id"]: r
        for r in (decode(settings, m.value()) for m in read_topic(settings, settings.fraud_topic))
    }
    return legit, fraud


def register_v1_everywhere(settings: Settings, v1_dir: Path) -> int:
    """What a v1 deployment registered: v1 Transaction (input and legit) and the v1 FraudAlert."""
    registry, v1 = Registry(settings), load_schemas(v1_dir)
    v1_id = registry.register(settings.subject(settings.transactions_topic), v1.text("Transaction"))
    registry.register(settings.subject(settings.legit_topic), v1.text("Transaction"))
    registry.register(settings.subject(settings.fraud_topic), v1.text("FraudAlert"))
    return v1_id


def run_detector_until_routed(settings: Settings, total: int) -> None:
    detector = RunningDetector(settings)
    wait_until(lambda: routed_total(settings) >= total, timeout_s=120, what="all routed")
    detector.stop()
    assert detector.error is None, detector.error


def test_current_detector_reads_v1_and_v2_records_alike(pipeline: Settings, tmp_path: Path):
    v1_dir = v1_schemas_dir(tmp_path)
    v1_id = register_v1_everywhere(pipeline, v1_dir)
    expected = produce_mixed(pipeline, v1_id, load_schemas(v1_dir).expanded["Transaction"])
    run_detector_until_routed(pipeline, len(expected))

    legit, fraud = routed(pipeline)
    assert read_topic(pipeline, pipeline.dlq_topic) == []
    assert {tid for tid, is_fraud in expected.items() if is_fraud} == set(fraud)
    assert {tid for tid, is_fraud in expected.items() if not is_fraud} == set(legit)
    # v1 records gain the v2 field's default; v2 records keep theirs.
    devices = {r.get("device_id") for r in legit.values()} | {r["transaction"].get("device_id") for r in fraud.values()}
    assert devices == {None, "device-42"}


def test_detector_still_on_v1_reads_v2_records(pipeline: Settings, tmp_path: Path):
    v1_dir = v1_schemas_dir(tmp_path)
    v1_id = register_v1_everywhere(pipeline, v1_dir)
    expected = produce_mixed(pipeline, v1_id, load_schemas(v1_dir).expanded["Transaction"])
    old_detector = pipeline.replace(schemas_dir=v1_dir)
    run_detector_until_routed(old_detector, len(expected))

    legit, fraud = routed(pipeline)
    assert read_topic(pipeline, pipeline.dlq_topic) == []
    assert {tid for tid, is_fraud in expected.items() if is_fraud} == set(fraud)
    assert {tid for tid, is_fraud in expected.items() if not is_fraud} == set(legit)
    # The v1 detector writes v1 records: the v2-only field is dropped, as FULL compatibility allows.
    assert all("device_id" not in r for r in legit.values())


def test_fraud_alert_v3_with_a_score_is_registered_over_every_earlier_version_and_read_by_them(pipeline: Settings):
    """The score field as a real evolution: v1, v2, then the current FraudAlert under one FULL_TRANSITIVE
    subject; an alert the current detector writes is read by readers of every earlier version."""
    import io

    from fastavro import schemaless_reader

    registry = Registry(pipeline)
    subject = f"{pipeline.transactions_topic}.fraud-evolution-value"
    registry.set_compatibility(subject, "FULL_TRANSITIVE")
    earlier = history(pipeline.schemas_dir, "FraudAlert")
    for _, schema in earlier:
        registry.register(subject, json.dumps(schema))
    current = load_schemas(pipeline.schemas_dir)
    new_id = registry.register(subject, current.text("FraudAlert"))
    assert registry.versions(subject) == list(range(1, len(earlier) + 2))
    assert "score" in {f["name"] for f in registry.schema_by_id(new_id)["fields"]}

    encode = make_encoder(new_id, current.parsed["FraudAlert"])
    alert = {
        "transaction": transaction(95_000, account="acct-1").to_dict(),
        "rules": ["model"],
        "detected_at": 1_700_000_000_000,
        "fired": [{"id": "model", "version": 1}],
        "rule_set_version": "3",
        "score": 0.93,
    }
    value = encode(alert)
    assert decode(pipeline, value)["score"] == 0.93
    for version, schema in earlier:
        old = schemaless_reader(io.BytesIO(value[5:]), current.parsed["FraudAlert"], parse_schema(schema))
        assert old["rules"] == ["model"] and "score" not in old, version
