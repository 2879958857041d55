"""Shadow rules (issue #23) on the real broker and registry: `fraudstream rules shadow set FILE`, `shadow
clear` and `promote` through the CLI, read back by the detector's own reader (RulesTopic); each change is one
Kafka transaction, applied by a reader at one poll; a bad shadow record is dead-lettered by a running detector
like a live one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaException, Producer

from fraudstream.consumer.decide import DLQ_KIND, DLQ_REASON, DLQ_TOPIC
from fraudstream.consumer.rules import LARGE_AMOUNT, RULE_NAMES
from fraudstream.consumer.rules_topic import INVALID_RULE, RulesCodec, RulesTopic, read_rules
from fraudstream.kafka import transactional_producer_config
from fraudstream.records import Rule
from fraudstream.settings import Settings
from tests.integration.test_detector import RunningDetector
from tests.support.kafka_io import produce_raw, read_topic, wait_until
from tests.support.rules_cli import rules_command as rules_cli

SHADOW_FILE = '[large_amount]\nthreshold_cents = 50000\n[la-2]\nkind = "large_amount"\nthreshold_cents = 70000\n'


@pytest.fixture
def live(pipeline: Settings):
    """The default rules live on the topic (written by the CLI), and a started reader of the topic."""
    assert rules_cli(pipeline, "set", str(pipeline.rules_file), "--comment", "live") == 0
    reader = RulesTopic(pipeline, on_log=lambda line: None)
    reader.start()
    yield reader
    reader.close()


def poll_until(reader: RulesTopic, condition, what: str) -> None:
    wait_until(lambda: reader.poll() and condition(), timeout_s=30, what=what, interval_s=0.05)


def test_a_shadow_set_is_read_beside_the_live_set_and_clear_removes_it(pipeline: Settings, live, tmp_path, capsys):
    in_force = live.current
    assert live.shadow is None and set(in_force.names) == set(RULE_NAMES) - {"velocity"}
    path = tmp_path / "shadow.toml"
    path.write_text(SHADOW_FILE)

    assert rules_cli(pipeline, "shadow", "set", str(path), "--comment", "try lower") == 0
    poll_until(live, lambda: live.shadow is not None, "the shadow set applied")
    assert live.current is in_force and not live.live_changed  # the live set untouched
    assert live.shadow.names == ("la-2", LARGE_AMOUNT)
    assert {rule_id: t["threshold_cents"] for rule_id, t in live.shadow.thresholds.items()} == {
        LARGE_AMOUNT: 50_000,
        "la-2": 70_000,
    }
    assert live.shadow.versions == {LARGE_AMOUNT: 1, "la-2": 1}  # its own chain: the live large_amount is v1 too
    capsys.readouterr()
    assert rules_cli(pipeline, "list") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "shadow set: 2 rules (`fraudstream rules shadow list`)"

    # A second file replaces the set: next shadow version of the rule it keeps, a tombstone for the other.
    path.write_text("[large_amount]\nthreshold_cents = 40000\n")
    assert rules_cli(pipeline, "shadow", "set", str(path)) == 0
    poll_until(live, lambda: live.shadow.names == (LARGE_AMOUNT,), "the second shadow set applied")
    assert live.shadow.versions == {LARGE_AMOUNT: 2} and live.current is in_force

    assert rules_cli(pipeline, "shadow", "clear", "--comment", "not now") == 0
    poll_until(live, lambda: live.shadow is None, "the shadow set cleared")
    assert live.current is in_force
    assert read_rules(pipeline, RulesCodec(pipeline)).shadow == {}


def test_promote_makes_the_shadow_set_live_in_one_change(pipeline: Settings, live, tmp_path, capsys):
    path = tmp_path / "shadow.toml"
    path.write_text(SHADOW_FILE)
    assert rules_cli(pipeline, "shadow", "set", str(path)) == 0
    poll_until(live, lambda: live.shadow is not None, "the shadow set applied")
    candidate = live.shadow
    capsys.readouterr()

    assert rules_cli(pipeline, "promote", "--comment", "lower wins") == 0
    printed = capsys.readouterr().out.splitlines()
    assert "la-2 v1 written (shadow v1)" in printed and "large_amount v2 written (shadow v1)" in printed
    assert "card_testing deleted (not in the shadow set)" in printed
    poll_until(live, lambda: live.shadow is None, "the promotion applied")
    assert live.live_changed and live.shadow_changed  # both sets changed at that one poll
    assert live.current.names == candidate.names
    assert live.current.thresholds == candidate.thresholds
    assert live.current.kinds == candidate.kinds
    assert live.current.versions == {LARGE_AMOUNT: 2, "la-2": 1}

    assert rules_cli(pipeline, "history") == 0
    lines = capsys.readouterr().out.splitlines()
    promotion = [line for line in lines if "lower wins" in line or "promoted" in line]
    # 6 live rules retired (velocity too: disabled is still a rule), 2 promoted, 2 shadow keys cleared.
    changes = {line.split("[change ")[1].split()[0] for line in promotion}
    assert len(promotion) == 10 and len(changes) == 1, promotion
    assert [line.split("[change ")[1].split()[1].rstrip("]") for line in promotion] == [f"{i}/10" for i in range(1, 11)]
    assert sum("[shadow]" in line for line in promotion) == 2


def test_promote_without_a_shadow_set_is_refused_in_one_line(pipeline: Settings, live, capsys):
    capsys.readouterr()
    assert rules_cli(pipeline, "promote") != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert "no shadow rule set on" in line and "nothing to promote" in line


class OneAtATime:
    """The reader's consumer, handing out one record per consume: as when each fetch brings a part of a
    transaction (librdkafka returns what one fetch brought). Counts the consume calls."""

    def __init__(self, consumer) -> None:
        self.consumer, self.calls = consumer, 0

    def consume(self, num_messages, timeout):
        self.calls += 1
        return self.consumer.consume(1, timeout)

    def __getattr__(self, name):
        return getattr(self.consumer, name)


def test_a_shadow_set_of_twenty_rules_is_applied_at_one_poll(pipeline: Settings, live, tmp_path, monkeypatch):
    """Even when the consumer hands the change's records out one by one (here one fetch brings them all)."""
    path = tmp_path / "twenty.toml"
    path.write_text("".join(f'[r{i}]\nkind = "large_amount"\nthreshold_cents = {1000 + i}\n' for i in range(20)))
    live.consumer = consumer = OneAtATime(live.consumer)
    judged: list[int] = []  # judge calls of the current poll
    judge = live.judge
    monkeypatch.setattr(live, "judge", lambda message: judged.append(message.offset()) or judge(message))

    assert rules_cli(pipeline, "shadow", "set", str(path)) == 0
    per_poll: list[int] = []
    calls_before = consumer.calls
    while live.shadow is None:
        judged.clear()
        live.poll(timeout_s=0.05)
        per_poll.append(len(judged))
        assert len(per_poll) < 600, "the shadow set was never applied"
    assert [n for n in per_poll if n] == [20], per_poll  # one poll judged the whole change, none a part of it
    assert len(live.shadow.names) == 20 and live.current.names  # and the live set is still there
    assert consumer.calls - calls_before >= 20  # the path under test: that poll read on, record by record


def test_a_writer_started_meanwhile_fences_an_open_change_which_never_applies(pipeline: Settings, live, tmp_path):
    """One writer at a time: `fraudstream rules` takes the rules topic's transactional id, so a change still
    open under it (another writer, stuck or slow) is aborted and that writer fenced; readers never see it."""
    stale = Rule(
        id="stale",
        version=1,
        kind=LARGE_AMOUNT,
        parameters={"threshold_cents": 1},
        enabled=True,
        author="other",
        comment="",
        written_at=datetime.now(UTC),
    )
    other = Producer(transactional_producer_config(pipeline, pipeline.rules_transactional_id))
    other.init_transactions(30)
    other.begin_transaction()
    other.produce(pipeline.rules_topic, RulesCodec(pipeline).encode(stale), b"shadow/stale")
    assert other.flush(30) == 0  # on the broker, in a transaction still open
    path = tmp_path / "shadow.toml"
    path.write_text(SHADOW_FILE)

    assert rules_cli(pipeline, "shadow", "set", str(path)) == 0
    with pytest.raises(KafkaException) as fenced:
        other.commit_transaction(30)
    assert fenced.value.args[0].fatal()
    poll_until(live, lambda: live.shadow is not None, "the shadow set applied")
    assert live.shadow.names == ("la-2", LARGE_AMOUNT)
    assert "stale" not in read_rules(pipeline, RulesCodec(pipeline)).shadow


def test_a_bad_shadow_record_is_dead_lettered_by_a_detector_and_changes_no_rule(pipeline: Settings):
    detector = RunningDetector(pipeline)
    try:
        wait_until(lambda: detector.detector.tasks.partitions, timeout_s=90, what="the detector assigned")
        in_force = detector.detector.rules_topic.current
        bad = Rule(
            id=LARGE_AMOUNT,
            version=1,
            kind=LARGE_AMOUNT,
            parameters={"threshold_cents": -5},
            enabled=True,
            author="mallory",
            comment="",
            written_at=datetime.now(UTC),
        )
        # Straight to the topic, past the CLI's checks.
        produce_raw(pipeline, pipeline.rules_topic, [(b"shadow/large_amount", RulesCodec(pipeline).encode(bad))])
        wait_until(lambda: read_topic(pipeline, pipeline.dlq_topic), timeout_s=30, what="the shadow record refused")
        assert detector.detector.rules_topic.current == in_force and detector.detector.rules_topic.shadow is None
    finally:
        detector.stop()
    assert detector.error is None, detector.error
    [letter] = read_topic(pipeline, pipeline.dlq_topic)
    headers = dict(letter.headers())
    assert headers[DLQ_TOPIC] == pipeline.rules_topic.encode() and headers[DLQ_KIND] == INVALID_RULE.encode()
    assert "large_amount.threshold_cents must be at least 0, not -5" in headers[DLQ_REASON].decode()
    assert letter.key() == b"shadow/large_amount" and detector.detector.rules_dead_lettered == 1
