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


def test_a_detector_starting_while_the_brokers_do_not_answer_waits_for_the_changelog_s_configuration(monkeypatch):
    """The config request of an existing changelog timing out (a broker away at start) is waited out, not a
    TimeoutError that ends the detector (seen in a 3-broker soak)."""
    settings = Settings().replace(broker_outage_limit_s=30)
    client = StandInAdmin(settings.transactions_topic, [[1], [1], [1]])
    client.topics[settings.changelog_topic(CARDS.name)] = SimpleNamespace(partitions={0: 0, 1: 1, 2: 2}, error=None)
    asked = []

    def describe_configs(resources, request_timeout):
        asked.append(request_timeout)
        answer = Future()
        if len(asked) >= 3:  # the broker is back
            answer.set_result({"cleanup.policy": SimpleNamespace(value="compact")})
        else:
            monkeypatch.setattr(answer, "result", lambda timeout=None: (_ for _ in ()).throw(TimeoutError()))
        return {resource: answer for resource in resources}

    client.describe_configs = describe_configs
    monkeypatch.setattr(changelog, "admin", lambda _settings: client)
    assert changelog.ensure_changelogs(settings, [CARDS]) == {CARDS.name: settings.changelog_topic(CARDS.name)}
    assert len(asked) == 3 and client.created == []  # asked until it answered (0.2 s apart); nothing created
