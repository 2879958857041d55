"""Registry settings calls that a retry can repeat: setting a subject's compatibility twice is not an error."""

from __future__ import annotations

import pytest
from confluent_kafka.schema_registry.error import SchemaRegistryError

from fraudstream.errors import RegistryError
from fraudstream.registry import Registry
from fraudstream.settings import Settings

RULE_EXISTS = SchemaRegistryError(409, 0, "A rule named 'COMPATIBILITY' already exists.")


class CompatibilityClient:
    """set_compatibility answers from `answers` in turn (an exception is raised); get_compatibility gives `level`."""

    def __init__(self, answers: list, level: str | None) -> None:
        self.answers, self.level, self.sets = list(answers), level, 0

    def set_compatibility(self, subject, level):
        self.sets += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.level = level
        return {"compatibility": level}

    def get_compatibility(self, subject):
        return self.level


def registry_with(client: CompatibilityClient) -> Registry:
    registry = Registry(Settings(schema_registry_url="http://127.0.0.1:1/apis/ccompat/v7"))
    registry.client = client
    return registry


def test_a_rule_that_already_exists_with_the_level_asked_for_is_done():
    # The client's retry of a request that timed out on our side: the first attempt had created the rule.
    client = CompatibilityClient([RULE_EXISTS], level="FULL_TRANSITIVE")
    registry_with(client).set_compatibility("tx-value", "FULL_TRANSITIVE")
    assert client.sets == 1


def test_a_rule_that_already_exists_with_another_level_is_updated():
    client = CompatibilityClient([RULE_EXISTS, None], level="BACKWARD")
    registry_with(client).set_compatibility("tx-value", "FULL_TRANSITIVE")
    assert (client.sets, client.level) == (2, "FULL_TRANSITIVE")


def test_a_refusal_that_persists_is_one_registry_error():
    client = CompatibilityClient([RULE_EXISTS, RULE_EXISTS], level="BACKWARD")
    with pytest.raises(RegistryError, match="setting compatibility of tx-value"):
        registry_with(client).set_compatibility("tx-value", "FULL_TRANSITIVE")
