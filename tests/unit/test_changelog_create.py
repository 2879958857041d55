"""A changelog is created like the input topic: its partition count and its replication (stand-in admin)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import fraudstream.consumer.state.changelog as changelog
from fraudstream.consumer.stateful import CARDS
from fraudstream.settings import Settings


class StandInAdmin:
    def __init__(self, input_topic: str, replicas: list[list[int]]):
        partitions = {p: SimpleNamespace(replicas=r) for p, r in enumerate(replicas)}
        self.topics = {input_topic: SimpleNamespace(partitions=partitions, error=None)}
        self.created = []

    def list_topics(self, timeout):
        return SimpleNamespace(topics=self.topics)

    def create_topics(self, new_topics, operation_timeout):
        self.created.extend(new_topics)
        done = Future()
        done.set_result(None)
        return {t.topic: done for t in new_topics}


def test_a_changelog_gets_the_input_s_partitions_and_replication_not_the_setting(monkeypatch):
    settings = Settings().replace(replication_factor=1)
    client = StandInAdmin(settings.transactions_topic, [[1, 2, 3], [2, 3, 1], [3, 1]])  # one partition under-replicated
    monkeypatch.setattr(changelog, "admin", lambda _settings: client)
    topics = changelog.ensure_changelogs(settings, [CARDS])
    [created] = client.created
    assert created.topic == topics[CARDS.name] == settings.changelog_topic(CARDS.name)
    assert (created.num_partitions, created.replication_factor) == (3, 2)
    assert created.config == {"cleanup.policy": "compact"}
