"""Shadow rules on the real broker and registry: a candidate set written with `fraudstream rules shadow set`
decides beside the live rules; the legit and fraud topics are what they are without it, and the shadow topic
names exactly the transactions it decides otherwise, once each, even when the detector is killed with -9.

The live large_amount rule flags more than $900.00; the shadow set's flags more than $500.00: every payment in
between is a difference (live legit, shadow fraud), and nothing else is. The payments are in person, so many
are held for the terminal rule's look-ahead first: those are compared at their release."""

from __future__ import annotations

import json
import random
from pathlib import Path

from benchmarks.shadow import candidate_rules
from fraudstream.consumer.rules_topic import RULE_SET_HEADER
from fraudstream.consumer.stateful import SHADOW_HEADER
from fraudstream.cli import main as fraudstream
from fraudstream.kafka import ensure_topics
from fraudstream.records import Label
from fraudstream.registry import register_all
from fraudstream.settings import Settings
from tests.integration.test_detector import RunningDetector, decode, encoder_for
from tests.support.rules_cli import rules_command
from tests.support.detector_process import DetectorProcess
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

LIVE_CENTS, SHADOW_CENTS = 90_000, 50_000


def payments(settings: Settings, n: int, seed: int) -> list[tuple[bytes, bytes, str, int]]:
    """(key, value, transaction id, amount): one payment per account, amounts across both thresholds."""
    rng = random.Random(seed)
    encode = encoder_for(settings, settings.transactions_topic)
    out = []
    for i in range(n):
        tx = transaction(rng.choice([1_000, 45_000, 60_000, 85_000, 95_000]), account=f"acct-{seed}-{i}")
        out.append((tx.account_id.encode(), encode(tx.to_dict()), tx.transaction_id, tx.amount_cents))
    return out


def shadow_file(tmp_path: Path) -> Path:
    """The live rules with large_amount's threshold lowered: a shadow set of the same size, one rule different."""
    path = tmp_path / "candidate.toml"
    path.write_text(candidate_rules(SHADOW_CENTS))
    return path


def set_shadow(settings: Settings, tmp_path: Path) -> None:
    """The candidate on a rules topic with no live rule yet: the first detector seeds the live rules from its
    rules file all the same (the plain pipeline's seeding; the outputs compared below depend on it)."""
    assert rules_command(settings, "shadow", "set", str(shadow_file(tmp_path))) == 0


def in_between(sent) -> set[str]:
    return {tid for _, _, tid, cents in sent if SHADOW_CENTS < cents <= LIVE_CENTS}


def differences(settings: Settings) -> list[dict]:
    return [decode(settings, m.value()) | {"_key": m.key()} for m in read_topic(settings, settings.shadow_topic)]


def routed_ids(settings: Settings) -> set[str]:
    legit = {decode(settings, m.value())["transaction_id"] for m in read_topic(settings, settings.legit_topic)}
    fraud = {
        decode(settings, m.value())["transaction"]["transaction_id"] for m in read_topic(settings, settings.fraud_topic)
    }
    return legit | fraud


def test_a_shadow_set_leaves_the_outputs_as_without_it_and_names_exactly_what_it_decides_otherwise(
    pipeline: Settings, tmp_path
):
    # The same input bytes on a second pipeline, with no shadow set: what the outputs must be.
    plain = pipeline.replace(
        transactions_topic=f"{pipeline.transactions_topic}-plain", group_id=f"{pipeline.group_id}-p"
    )
    ensure_topics(plain)
    register_all(plain)
    sent = payments(pipeline, 300, seed=1)
    for settings in (pipeline, plain):
        produce_raw(settings, settings.transactions_topic, [(key, value) for key, value, _, _ in sent])
    set_shadow(pipeline, tmp_path)

    detectors = [RunningDetector(pipeline), RunningDetector(plain)]
    try:
        every = {tid for _, _, tid, _ in sent}
        for settings in (pipeline, plain):
            wait_until(
                lambda s=settings: routed_ids(s) >= every, timeout_s=120, what=f"{settings.transactions_topic} routed"
            )
        wait_until(lambda: len(differences(pipeline)) >= len(in_between(sent)), timeout_s=60, what="differences")
    finally:
        for running in detectors:
            running.stop()
    assert all(running.error is None for running in detectors), [r.error for r in detectors]
    shadowed = detectors[0].detector

    def legit(settings: Settings) -> dict[bytes, tuple]:
        """value -> key and headers, but the shadow's and the rule-set version (a position on each rules topic)."""
        return {
            m.value(): (m.key(), [h for h in m.headers() or () if h[0] not in (SHADOW_HEADER, RULE_SET_HEADER)])
            for m in read_topic(settings, settings.legit_topic)
        }

    def fraud(settings: Settings) -> dict[str, tuple]:
        alerts = [decode(settings, m.value()) for m in read_topic(settings, settings.fraud_topic)]
        return {a["transaction"]["transaction_id"]: (a["rules"], a["transaction"]) for a in alerts}

    # Byte for byte: the legit topic holds the very input bytes, with the same keys and headers (the shadow's
    # header aside); the fraud topic the same alerts (detected_at aside, a moment).
    assert legit(pipeline) == legit(plain) and len(legit(pipeline)) == sum(c <= LIVE_CENTS for *_, c in sent)
    assert fraud(pipeline) == fraud(plain)
    assert read_topic(plain, plain.shadow_topic) == []

    found = differences(pipeline)
    assert sorted(d["transaction_id"] for d in found) == sorted(in_between(sent))  # exactly, once each
    assert all(d["_key"] == d["transaction_id"].encode() for d in found)
    # The live rules were seeded although the topic held the shadow set first; both versions are named.
    topic = shadowed.rules_topic
    assert {(d["live_rule_set_version"], d["shadow_rule_set_version"]) for d in found} == {
        (topic.version, topic.shadow_version)
    }
    assert len(topic.current.names) == len(topic.shadow.names) > 1
    assert all(
        (d["live_fraud"], d["shadow_fraud"], d["live_rules"], d["shadow_rules"]) == (False, True, [], ["large_amount"])
        for d in found
    )
    flagged = {
        decode(pipeline, m.value())["transaction_id"]
        for m in read_topic(pipeline, pipeline.legit_topic)
        if dict(m.headers() or ()).get(SHADOW_HEADER) == b"fraud"
    }
    assert flagged == in_between(sent)
    assert shadowed.metrics.shadow_differences == len(found)  # counted where they were written

    # `evaluate --shadow`: both sets against labels. Here every payment over $500.00 is a fraud, so the shadow
    # set catches exactly the differences more than the live one.
    encode_label = encoder_for(pipeline, pipeline.labels_topic, "Label")
    produce_raw(
        pipeline,
        pipeline.labels_topic,
        [
            (tid.encode(), encode_label(Label(transaction_id=tid, is_fraud=c > SHADOW_CENTS, scenario="big").to_dict()))
            for _, _, tid, c in sent
        ],
    )
    output = tmp_path / "evaluation.json"
    connection = [
        "--bootstrap-servers",
        pipeline.bootstrap_servers,
        "--schema-registry-url",
        pipeline.schema_registry_url,
    ]
    assert (
        fraudstream(
            ["evaluate", "--shadow", "--output", str(output), "--topic", pipeline.transactions_topic, *connection]
        )
        == 0
    )
    live, shadow = json.loads(output.read_text()), json.loads((tmp_path / "evaluation-shadow.json").read_text())
    assert shadow["shadow"]["differences"] == shadow["shadow"]["verdicts_changed"] == len(in_between(sent))
    assert shadow["overall"]["caught"] == live["overall"]["caught"] + len(in_between(sent))
    assert shadow["overall"]["recall"] == 1.0 > live["overall"]["recall"]


def test_the_shadow_topic_is_exactly_once_when_the_detector_is_killed(pipeline: Settings, tmp_path):
    set_shadow(pipeline, tmp_path)
    first = payments(pipeline, 2_000, seed=2)
    produce_raw(pipeline, pipeline.transactions_topic, [(key, value) for key, value, _, _ in first])
    slot = f"{pipeline.group_id}-killed"
    detector = DetectorProcess(pipeline, tmp_path / "detector-1.log", transactional_id=slot)
    try:
        wait_until(lambda: len(differences(pipeline)) > 50, timeout_s=120, what="some differences written")
        detector.kill()
        second = payments(pipeline, 1_000, seed=3)
        produce_raw(pipeline, pipeline.transactions_topic, [(key, value) for key, value, _, _ in second])
        detector = DetectorProcess(pipeline, tmp_path / "detector-2.log", transactional_id=slot)
        sent = first + second
        every = {tid for _, _, tid, _ in sent}
        wait_until(lambda: routed_ids(pipeline) >= every, timeout_s=180, what="every payment routed")
        wait_until(lambda: len(differences(pipeline)) >= len(in_between(sent)), timeout_s=60, what="every difference")
        detector.stop_cleanly()
    finally:
        detector.ensure_ended()  # a failed wait leaves no detector running after the test
    ids = [d["transaction_id"] for d in differences(pipeline)]
    assert sorted(ids) == sorted(in_between(sent))  # none lost, none twice (read_committed)
