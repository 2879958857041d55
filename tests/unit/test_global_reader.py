"""The global readers' one outage policy (consumer/global_reader.py), and that each reader goes through it."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from fraudstream.consumer.global_reader import GlobalReader, StopRequested
from fraudstream.consumer.labels_topic import LabelsReader
from fraudstream.consumer.rules_topic import RulesTopic
from fraudstream.consumer.state.recovery import Recovery
from fraudstream.consumer.terminal import TerminalReader
from fraudstream.errors import KafkaUnavailable
from fraudstream.settings import Settings

SETTINGS = Settings(broker_outage_limit_s=30)


class Client:
    """A client whose metadata is asked again between attempts (list_topics)."""

    def __init__(self) -> None:
        self.refreshed: list[str] = []

    def list_topics(self, topic, timeout):
        self.refreshed.append(topic)


def failing(*errors: int, answer="answer"):
    """A call that raises these errors in turn, then answers; `calls` counts the attempts."""
    pending = list(errors)

    def call():
        call.calls += 1
        if pending:
            raise KafkaException(KafkaError(pending.pop(0)))
        return answer

    call.calls = 0
    return call


def test_errors_that_pass_are_waited_out_with_the_topics_leaders_asked_again_between_attempts():
    reader, client = GlobalReader(SETTINGS), Client()
    call = failing(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._TRANSPORT)
    assert reader.call("reading an end", call, topic="t", client=client) == "answer"
    assert call.calls == 3 and reader.retries == 2 and client.refreshed == ["t", "t"]


def test_anything_else_ends_at_once_with_one_line_naming_the_reader_and_what_it_asked():
    reader = RulesTopic(SETTINGS)
    call = failing(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaUnavailable, match=r"^rules reader: reading an end failed: .*authorization"):
        reader.call("reading an end", call)
    assert call.calls == 1 and reader.retries == 0


def test_the_outage_limit_ends_the_wait(monkeypatch):
    import fraudstream.consumer.global_reader as module

    monkeypatch.setattr(module, "RETRY_INTERVAL_S", 0.01)
    reader = GlobalReader(Settings(broker_outage_limit_s=0.1))
    call = failing(*[KafkaError.LEADER_NOT_AVAILABLE] * 1000)
    with pytest.raises(KafkaUnavailable, match="Leader not available"):
        reader.call("reading", call)
    assert 2 <= call.calls < 1000


def test_a_stop_request_ends_the_wait():
    reader = TerminalReader(SETTINGS, decode=lambda messages: None, stop=lambda: True)
    with pytest.raises(StopRequested, match="reading the committed offsets"):
        reader.call("reading the committed offsets", failing(KafkaError.COORDINATOR_LOAD_IN_PROGRESS))


class Offsets:
    """The restore reader's end asker: no leader twice, then the changelog partition's offsets."""

    def __init__(self) -> None:
        self.asks, self.refreshed = 0, []

    def get_watermark_offsets(self, tp, timeout, cached):
        self.asks += 1
        if self.asks <= 2:
            raise KafkaException(KafkaError(KafkaError.LEADER_NOT_AVAILABLE))
        return 0, 7

    def list_topics(self, topic, timeout):
        self.refreshed.append(topic)

    def close(self):
        pass


def test_each_reader_is_a_global_reader_and_the_restore_readers_end_asks_go_through_the_policy():
    for reader in (
        RulesTopic,
        LabelsReader,
        TerminalReader,
        Recovery,
    ):
        assert issubclass(reader, GlobalReader) and reader.name != GlobalReader.name
    restore = Recovery(SETTINGS, {"cards": "tx.cards-changelog"})
    restore.offsets.close()
    restore.offsets = offsets = Offsets()
    assert restore._watermarks(TopicPartition("tx.cards-changelog", 3)) == (0, 7)
    assert restore.retries == 2 and offsets.refreshed == ["tx.cards-changelog"] * 2
    restore.close()
