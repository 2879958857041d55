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
        state.index.add_alerts([(0, 0, {"transaction": {**tx.to_dict(), "event_time": 1_780_000_000_000},
                                        "rules": ["large_amount"], "detected_at": 1_780_000_000_500, "fired": [],
                                        "rule_set_version": "", "score": None})])
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
