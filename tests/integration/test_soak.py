"""The soak's short version (the long one is `make soak`): a seeded fault schedule under load, every kind of fault
once, then the independent checker (tests/support/soak.py, tests/support/soak_checker.py). And the checker itself
must be able to fail: records lost, doubled, unreadable and a held row left live are each found."""

from __future__ import annotations

import json
import os

from confluent_kafka import Producer

from fraudstream.kafka import ensure_topics, producer_config
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from tests.support.kafka_io import transaction
from tests.support.soak import FAULTS, SoakRun
from tests.support.soak_checker import check

MINUTES = float(os.environ.get("SOAK_MINUTES", "3"))


def test_a_short_soak_loses_doubles_and_changes_nothing(stack_settings, tmp_path):
    report = SoakRun(tmp_path / "soak", MINUTES, brokers=1, seed=20261206, rate=300).run()
    shown = json.dumps({k: v for k, v in report.items() if k != "examples"}, default=str)[:3000]
    assert {event["kind"] for event in report["events"]} == set(FAULTS), shown  # every fault happened
    assert report["input_records"] > 10_000 and report["routes"].get("dlq", 0) >= 3, shown
    assert (report["lost"], report["duplicated"], report["unreadable"], report["held_live"]) == (0, 0, 0, 0), (
        json.dumps(report["examples"], default=str)[:3000]
    )
    assert report["decisions_differ"] == 0, json.dumps(report["examples"]["decisions_differ"], default=str)[:3000]
    assert report["restarted_from_outside"] == 0, report["restarts"]


def test_the_checker_finds_lost_doubled_unreadable_records_and_live_held_rows(pipeline):
    """Outputs written by hand: one transaction never routed, one routed twice, one unreadable output, one
    held row whose tombstone never came."""
    s = pipeline
    ids = current_ids(s, Registry(s))
    schemas = load_schemas(s.schemas_dir).parsed
    encode = make_encoder(ids[s.transactions_topic], schemas["Transaction"])
    txs = [transaction(1_000 * (i + 1)) for i in range(4)]
    changelog = f"{s.group_id}.{s.transactions_topic}.held.changelog"
    ensure_topics(s, (changelog,))
    producer = Producer(producer_config(s))
    for tx in txs:
        producer.produce(s.transactions_topic, encode(tx.to_dict()), b"k")
    for tx in (txs[1], txs[2], txs[2]):  # txs[0] lost, txs[2] twice
        producer.produce(s.legit_topic, encode(tx.to_dict()), b"k")
    producer.produce(s.legit_topic, b"\x00\x00\x00\x00\x01garbage", b"k")  # unreadable
    producer.produce(s.legit_topic, encode(txs[3].to_dict()), b"k")
    producer.produce(changelog, b"row", b"held-1")
    producer.produce(changelog, b"row", b"held-2")
    producer.produce(changelog, None, b"held-2")  # released
    assert producer.flush(30) == 0
    report = check(s.bootstrap_servers, s.schema_registry_url, s.transactions_topic, s.group_id)
    assert (report["lost"], report["duplicated"], report["unreadable"], report["held_live"]) == (1, 1, 1, 1), report
    assert report["examples"]["lost"][0]["id"] == txs[0].transaction_id
    assert report["examples"]["duplicated"][0]["id"] == txs[2].transaction_id
    assert report["examples"]["held_live"] == [b"held-1".hex()] and not report["ok"]


def test_the_checker_counts_a_difference_marked_released_early_apart_from_any_other(pipeline):
    """Two transactions the uninterrupted run never routed: the one whose output carries the released-early
    header (with the quiet partitions) is counted apart; the other is a failure."""
    s = pipeline
    ids = current_ids(s, Registry(s))
    encode = make_encoder(ids[s.transactions_topic], load_schemas(s.schemas_dir).parsed["Transaction"])
    txs = [transaction(1_000 * (i + 1)) for i in range(3)]
    baseline = f"{s.transactions_topic}-uninterrupted"
    ensure_topics(s, (f"{baseline}.legit",))
    producer = Producer(producer_config(s))
    for tx in txs:
        producer.produce(s.transactions_topic, encode(tx.to_dict()), b"k")
    producer.produce(s.legit_topic, encode(txs[0].to_dict()), b"k")
    producer.produce(s.legit_topic, encode(txs[1].to_dict()), b"k", headers=[("fraudstream.released_early", b"2")])
    producer.produce(s.legit_topic, encode(txs[2].to_dict()), b"k")
    producer.produce(f"{baseline}.legit", encode(txs[0].to_dict()), b"k")
    assert producer.flush(30) == 0
    report = check(
        s.bootstrap_servers,
        s.schema_registry_url,
        s.transactions_topic,
        s.group_id,
        baseline_input=baseline,
        baseline_group=s.group_id,
    )
    assert (report["decisions_differ"], report["decisions_differ_released_early"]) == (1, 1), report
    assert report["examples"]["decisions_differ"][0]["id"] == txs[2].transaction_id
    [early] = report["examples"]["decisions_differ_released_early"]
    assert early["id"] == txs[1].transaction_id and early["quiet_partitions"] == {"soak": "2", "uninterrupted": None}
    assert not report["ok"]
