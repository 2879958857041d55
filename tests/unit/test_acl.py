"""The role -> ACL table of `fraudstream acl` (applied for real in tests/integration/test_secure_stack.py)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException

from fraudstream import acl, cli, kafka
from fraudstream.errors import KafkaUnavailable
from fraudstream.settings import Settings

SETTINGS = Settings(transactions_topic="payments", group_id="fraud-detector", bootstrap_servers="kafka:9093")


def writers_of(topic: str) -> set[str]:
    return {
        g.role
        for g in acl.grants(SETTINGS)
        if "Write" in g.operations
        and g.resource_type == acl.TOPIC
        and (g.name == topic if g.pattern == acl.LITERAL else topic.startswith(g.name))
    }


def test_only_the_rules_administrator_writes_the_rules_topic_and_the_inspector_writes_nothing():
    assert writers_of("payments.rules") == {"rules-admin"}
    assert writers_of("payments") == {"producer"}
    assert writers_of("payments.labels") == {"producer", "analyst"}
    assert writers_of("payments.fraud") == writers_of("payments.legit") == writers_of("payments.dlq") == {"detector"}
    assert writers_of("fraud-detector.payments.velocity.changelog") == {"detector"}
    assert not [g for g in acl.grants(SETTINGS) if g.role == "inspector" and set(g.operations) - {"Read", "Describe"}]
    # No wildcard and no cluster-wide grant: every resource is named after the topic or the group.
    assert all(g.name.startswith(("payments", "fraud-detector")) for g in acl.grants(SETTINGS))


def test_the_acls_print_as_kafka_acls_commands_to_paste(capsys):
    assert (
        cli.main(["acl", "--topic", "payments", "--group-id", "fraud-detector", "--bootstrap-servers", "kafka:9093"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(acl.grants(SETTINGS))
    assert (
        "kafka-acls.sh --bootstrap-server kafka:9093 --command-config admin.properties --add "
        "--allow-principal User:detector --operation Write --operation Describe "
        "--transactional-id fraud-detector --resource-pattern-type prefixed"
    ) in lines
    assert (
        "kafka-acls.sh --bootstrap-server kafka:9093 --command-config admin.properties --add --allow-principal "
        "User:rules-admin --operation Read --operation Write --operation Describe --operation Create "
        "--operation DescribeConfigs --topic payments.rules"
    ) in lines
    bindings = acl.acl_bindings(SETTINGS)
    assert len(bindings) == sum(len(g.operations) for g in acl.grants(SETTINGS))


def test_apply_without_the_admins_properties_is_refused_in_one_line(capsys):
    assert cli.main(["acl", "--apply", "--topic", "payments"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the admin's client properties" in err[0]


def test_an_acl_the_cluster_refuses_is_named_in_one_line(monkeypatch):
    class Refusing:
        def create_acls(self, bindings, request_timeout):
            answers = {}
            for binding in bindings:
                answers[binding] = Future()
                answers[binding].set_exception(
                    KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, "not an admin"))
                )
            return answers

    monkeypatch.setattr(kafka, "admin", lambda settings: Refusing())
    with pytest.raises(KafkaUnavailable) as refused:
        acl.apply(SETTINGS)
    first = acl.acl_bindings(SETTINGS)[0]
    assert str(refused.value) == (
        f"could not create the ACL {first.operation.name} on {first.restype.name.lower()} {first.name} "
        f"for {first.principal}: not an admin"
    )
    assert first.operation.name in {"READ", "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS"}
