"""`fraudstream stack up --brokers N`: addresses, configuration and bookkeeping, without starting anything
(tests/integration/test_broker_faults.py starts real clusters)."""

from __future__ import annotations

from pathlib import Path

import javaproperties
import pytest

from fraudstream import cli
from fraudstream.errors import StackError
from fraudstream.settings import Settings
from fraudstream.stack import NODES_FILE, LocalStack, StackStatus


def stack(tmp_path: Path, brokers: int | None) -> LocalStack:
    settings = Settings(stack_dir=tmp_path, kafka_port=29092, controller_port=29093)
    return LocalStack(settings, log=lambda *_: None, brokers=brokers)


def test_nodes_take_consecutive_port_pairs_and_all_are_bootstrap_servers(tmp_path):
    cluster = stack(tmp_path, 3)
    assert [cluster.node_ports(n) for n in (1, 2, 3)] == [(29092, 29093), (29094, 29095), (29096, 29097)]
    assert cluster.bootstrap_servers == "127.0.0.1:29092,127.0.0.1:29094,127.0.0.1:29096"
    assert cluster.replication_factor == 3
    assert stack(tmp_path, 1).bootstrap_servers == "127.0.0.1:29092"  # the default stays one node


def test_the_cluster_config_asks_for_three_replicas_and_two_in_sync(tmp_path):
    text = stack(tmp_path, 3).node_config(2)
    props = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert not [value for value in props.values() if "${" in value]  # every placeholder filled
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29094,CONTROLLER://127.0.0.1:29095"
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
    ):
        assert props[key] == "3", key
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"


def test_status_and_down_find_the_nodes_a_stack_was_made_with(tmp_path):
    (tmp_path / NODES_FILE).write_text("3")
    found = stack(tmp_path, None)  # what `stack status` and `stack down` do
    assert found.brokers == 3
    status = found.status()
    assert status.extra_brokers == ((2, None), (3, None)) and not status.running
    assert "kafka-2   stopped" in status.describe() and "kafka-3   stopped" in status.describe()


def test_a_stack_made_with_one_node_refuses_to_start_as_three(tmp_path):
    (tmp_path / "kafka" / "data").mkdir(parents=True)
    (tmp_path / "kafka" / "data" / "meta.properties").write_text("node.id=1\n")  # a single node's data
    with pytest.raises(StackError, match="made with 1 Kafka broker.*stack down --wipe"):
        stack(tmp_path, 3).up_kafka()


def test_running_needs_every_node():
    status = StackStatus(
        kafka_pid=10, registry_pid=11, bootstrap_servers="b", registry_url="r", extra_brokers=((2, 12), (3, None))
    )
    assert not status.running


def test_brokers_flag_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["stack", "up", "--brokers", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch):
    """One random UUID in 64 encodes to an id starting with '-', which the storage tool reads as an option."""
    import uuid

    import fraudstream.stack as stack

    dash_first = uuid.UUID(bytes=bytes([0xF8]) + bytes(15))  # base64 "-A...": the first draw
    draws = iter([dash_first, uuid.UUID(int=1)])
    monkeypatch.setattr(stack.uuid, "uuid4", lambda: next(draws))
    cluster_id = stack.new_cluster_id()
    assert not cluster_id.startswith("-") and len(cluster_id) == 22


def test_a_stacks_own_broker_settings_replace_the_rendered_ones(tmp_path):
    settings = Settings(stack_dir=tmp_path, kafka_port=29092, controller_port=29093)
    own = {"broker.session.timeout.ms": "30000", "num.partitions": "2"}
    cluster = LocalStack(settings, log=lambda *_: None, brokers=3, broker_settings=own)
    rendered = javaproperties.loads(cluster.node_config(1))
    assert rendered["num.partitions"] == "6"  # the template's, replaced below
    assert {key: javaproperties.loads(cluster._with_broker_settings(cluster.node_config(1)))[key] for key in own} == own
