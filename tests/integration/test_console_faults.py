"""The console when Kafka is lost: the pages say so, and a verdict given meanwhile is refused with a clear
message and written nowhere (the labels topic, read back through the real broker, stays empty)."""

from __future__ import annotations

from starlette.testclient import TestClient

from fraudstream.console import build_state
from fraudstream.console.app import create_app
from fraudstream.console.verdicts import VerdictWriter
from fraudstream.settings import Settings
from tests.support.kafka_io import read_topic, transaction, wait_until

LOOPBACK = ("127.0.0.1", 40000)
NOTHING_LISTENS = "127.0.0.1:1"


def test_a_lost_connection_to_kafka_shows_on_the_page_and_a_verdict_is_not_written(pipeline: Settings, tmp_path):
    lost = pipeline.replace(bootstrap_servers=NOTHING_LISTENS)  # the registry stays: only Kafka is gone
    state = build_state(lost, index_file=tmp_path / "index.sqlite")
    try:
        state.writer = VerdictWriter(lost, timeout_s=2)
        tx = transaction(95_000)
        # An alert read before the connection was lost.
        state.index.add_alerts(
            [
                (
                    0,
                    0,
                    {
                        "transaction": {**tx.to_dict(), "event_time": 1_780_000_000_000},
                        "rules": ["large_amount"],
                        "detected_at": 1_780_000_000_500,
                        "fired": [],
                        "rule_set_version": "",
                        "score": None,
                    },
                )
            ]
        )
        client = TestClient(create_app(state), client=LOOPBACK)
        wait_until(lambda: state.reader.state.kafka_error, timeout_s=30, what="the reader to notice Kafka is gone")
        assert "lost connection to Kafka" in client.get("/").text

        response = client.post(f"/verdicts/{tx.transaction_id}", data={"verdict": "fraud", "analyst": "Ann"})
        assert response.status_code == 503
        assert "the verdict was not written: Kafka did not take it within 2 s" in response.text
        assert state.writer.written == 0
    finally:
        state.reader.stop()
    assert read_topic(pipeline, pipeline.labels_topic) == []


def test_a_console_started_before_its_topics_exist_reads_them_once_created(stack_settings: Settings, tmp_path):
    import uuid

    from fraudstream.kafka import ensure_topics
    from fraudstream.registry import register_all
    from tests.integration.test_detector import encoder_for
    from tests.support.kafka_io import produce_raw

    settings = stack_settings.replace(transactions_topic=f"test-console-{uuid.uuid4().hex[:10]}")
    state = build_state(settings, index_file=tmp_path / "index.sqlite")
    try:
        wait_until(lambda: state.reader.state.caught_up, timeout_s=30, what="the console's first read")
        assert settings.fraud_topic in state.reader.missing
        ensure_topics(settings)
        register_all(settings)
        tx = transaction(95_000)
        alert = {
            "transaction": tx.to_dict(),
            "rules": ["large_amount"],
            "detected_at": tx.event_time,
            "fired": [],
            "rule_set_version": "",
            "score": None,
        }
        produce_raw(
            settings,
            settings.fraud_topic,
            [(tx.account_id.encode(), encoder_for(settings, settings.fraud_topic, "FraudAlert")(alert))],
        )
        wait_until(lambda: state.index.alert(tx.transaction_id), timeout_s=30, what="the alert indexed")
    finally:
        state.reader.stop()
