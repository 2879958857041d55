"""The rules topic's reader without a broker: which records come into force, which are refused (and
dead-lettered with their reason), and how the rule-set version follows the topic's offsets."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from fraudstream.consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_REASON
from fraudstream.consumer.features import TxColumns
from fraudstream.consumer.rules import DEFAULT_RULES_FILE, LARGE_AMOUNT, checked_parameters, load_rules
from fraudstream.consumer.rules_topic import INVALID_RULE, STALE_VERSION, RulesTopic, seed_records
from fraudstream.records import Rule
from fraudstream.errors import ConfigError
from fraudstream.rules_cli import _records_from_file
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings
from tests.unit.test_serde import FakeRegistry

SETTINGS = Settings(transactions_topic="tx")
SCHEMAS = load_schemas(SETTINGS.schemas_dir)
RULE_ID = 7
encode = make_encoder(RULE_ID, SCHEMAS.parsed["Rule"])


def rule(version: int, threshold: int | None = 50_000, *, rule_id: str = LARGE_AMOUNT, kind: str = LARGE_AMOUNT,
         enabled: bool = True, **params) -> Rule:
    if threshold is not None:
        params["threshold_cents"] = threshold
    return Rule(id=rule_id, version=version, kind=kind, parameters=params, enabled=enabled, author="analyst",
                comment="", written_at=datetime(2026, 1, 2, tzinfo=UTC))


class RuleMessage:
    def __init__(self, offset: int, key: str, value: bytes | None) -> None:
        self._offset, self._key, self._value = offset, key, value

    def topic(self):
        return SETTINGS.rules_topic

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return self._key.encode()

    def value(self):
        return self._value

    def headers(self):
        return None

    def error(self):
        return None


class FakeConsumer:
    def __init__(self) -> None:
        self.pending: list[RuleMessage] = []

    def consume(self, num_messages, timeout):
        out, self.pending = self.pending[:num_messages], self.pending[num_messages:]
        return out


@pytest.fixture
def reader() -> RulesTopic:
    topic = RulesTopic(SETTINGS, registry=FakeRegistry({RULE_ID: SCHEMAS.expanded["Rule"]}), on_log=lambda line: None)
    topic.consumer = FakeConsumer()
    return topic


def feed(reader: RulesTopic, *messages: tuple[str, bytes | None]) -> bool:
    start = len(getattr(reader, "_fed", []))
    reader._fed = getattr(reader, "_fed", []) + list(messages)
    reader.consumer.pending += [RuleMessage(start + i, key, value) for i, (key, value) in enumerate(messages)]
    return reader.poll()


def columns(amounts: list[int]) -> tuple[TxColumns, dict]:
    from tests.support.kafka_io import transaction
    txs = [transaction(a, account=f"a{i}").to_dict() for i, a in enumerate(amounts)]
    return TxColumns.from_records(txs), {"known_terminal": np.zeros(len(amounts), dtype=bool)}


def test_a_valid_rule_comes_into_force_and_names_the_rule_set_by_the_offset_after_it(reader):
    assert feed(reader, (LARGE_AMOUNT, encode(rule(1, 50_000).to_dict())))
    assert reader.current.names == (LARGE_AMOUNT,)
    assert reader.current.versions == {LARGE_AMOUNT: 1}
    assert reader.current.version == "1"
    tx, features = columns([40_000, 60_000])
    assert reader.current.evaluate(tx, features).tolist() == [[False, True]]


def test_an_invalid_rule_is_dead_lettered_with_its_reason_and_the_previous_version_stays(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(1, 50_000).to_dict())))
    in_force = reader.current
    assert not feed(reader, (LARGE_AMOUNT, encode(rule(2, -5).to_dict())))
    assert reader.current is in_force
    [letter] = reader.take_dead_letters()
    headers = dict(letter.headers)
    assert headers[DLQ_KIND] == INVALID_RULE.encode()
    assert b"large_amount.threshold_cents must be at least 0, not -5" in headers[DLQ_REASON]
    assert headers[DLQ_OFFSET] == b"1"
    assert letter.value == encode(rule(2, -5).to_dict())  # the original bytes, untouched


@pytest.mark.parametrize("bad, reason", [
    (rule(2, rule_id="x", kind="nope"), "unknown kind 'nope'"),
    (rule(2, None, min_session_small=2), "unknown parameter 'min_session_small' for kind large_amount"),
    (rule(2, None, exempt_below_cents="lots"), "must be a whole number, not 'lots'"),
])
def test_unknown_kinds_parameters_and_types_are_refused(reader, bad, reason):
    assert not feed(reader, (bad.id, encode(bad.to_dict())))
    [letter] = reader.take_dead_letters()
    assert reason in dict(letter.headers)[DLQ_REASON].decode()


def test_an_older_version_is_refused_and_the_same_version_written_twice_is_ignored(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(3, 50_000).to_dict())))
    assert not feed(reader, (LARGE_AMOUNT, encode(rule(3, 50_000).to_dict())))
    assert reader.take_dead_letters() == []
    assert not feed(reader, (LARGE_AMOUNT, encode(rule(2, 10_000).to_dict())))
    [letter] = reader.take_dead_letters()
    assert dict(letter.headers)[DLQ_KIND] == STALE_VERSION.encode()
    assert reader.current.thresholds[LARGE_AMOUNT]["threshold_cents"] == 50_000


def test_undecodable_bytes_and_a_key_that_is_not_the_id_are_refused(reader):
    assert not feed(reader, (LARGE_AMOUNT, b"not avro"), ("other", encode(rule(1).to_dict())))
    kinds = [dict(letter.headers)[DLQ_KIND] for letter in reader.take_dead_letters()]
    assert kinds == [b"no_magic_byte", INVALID_RULE.encode()]
    assert reader.current.names == ()


def test_disabling_and_removing_a_rule_stop_it_firing(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(1).to_dict())), ("big", encode(rule(1, 80_000, rule_id="big").to_dict())))
    assert reader.current.names == ("big", LARGE_AMOUNT)  # by kind, then id
    assert feed(reader, (LARGE_AMOUNT, encode(rule(2, enabled=False).to_dict())))
    assert reader.current.names == ("big",)
    assert feed(reader, ("big", None))
    assert reader.current.names == ()
    assert reader.current.version == "4"


def test_two_rules_of_one_kind_fire_by_their_own_thresholds(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(1, 50_000).to_dict())), ("huge", encode(rule(4, 70_000, rule_id="huge").to_dict())))
    tx, features = columns([60_000, 80_000])
    fired = reader.current.evaluate(tx, features)
    assert reader.current.fired_names(fired) == [[LARGE_AMOUNT], ["huge", LARGE_AMOUNT]]
    assert reader.current.versions == {LARGE_AMOUNT: 1, "huge": 4}


def test_the_topic_and_the_rules_file_share_one_validation():
    with pytest.raises(ConfigError, match="min_session_small must be at least 1, not 0"):
        checked_parameters("card_testing", {"min_session_small": 0}, where="rule card_testing v2")
    assert checked_parameters("far_from_home", {"window_s": 10}, where="r")["window_s"] == 10.0


def test_the_seed_is_the_rules_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[card_testing]\nenabled = false\n[large_amount]\nthreshold_cents = 12345\n")
    seeded = {r.id: r for r in seed_records(SETTINGS, path, author="seed")}
    assert not seeded["card_testing"].enabled and seeded[LARGE_AMOUNT].parameters["threshold_cents"] == 12345
    assert all(r.version == 1 for r in seeded.values())
    assert {k for k, v in seeded.items() if v.enabled} == set(load_rules(path, settings=SETTINGS).names)
    for record in seeded.values():  # every seeded value fits the schema
        encode(record.to_dict())


def test_set_refuses_a_bad_file_with_one_line_and_numbers_the_next_version(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[large_amount]\nthreshold_cents = 40000\n[card_testing]\ntest_max_cents = 1.5\n")
    with pytest.raises(ConfigError) as refused:
        _records_from_file(bad, SETTINGS, {}, author="a", comment="")
    assert "card_testing.test_max_cents must be a whole number" in str(refused.value)
    assert "nothing written" in str(refused.value) and "\n" not in str(refused.value)
    good = tmp_path / "good.toml"
    good.write_text("[large_amount]\nthreshold_cents = 40000\n[far]\nkind = \"far_from_home\"\nwindow_s = 60\n")
    records = _records_from_file(good, SETTINGS, {LARGE_AMOUNT: rule(4)}, author="a", comment="")
    assert [(r.id, r.version, r.kind) for r in records] == [(LARGE_AMOUNT, 5, LARGE_AMOUNT), ("far", 1, "far_from_home")]
    assert records[1].parameters == {"window_s": 60.0}
    assert isinstance(records[1].parameters["window_s"], float)  # written as the checked type


def test_the_rules_in_force_are_compared_with_a_rules_file_by_content(reader, tmp_path):
    # The topic holds the defaults, as a detector seeding it from rules/default.toml writes them.
    feed(reader, *[(r.id, encode(r.to_dict())) for r in seed_records(SETTINGS, None, author="seed")])
    assert reader.differing_from(DEFAULT_RULES_FILE) == []
    lowered = tmp_path / "lowered.toml"
    lowered.write_text("[large_amount]\nthreshold_cents = 50000\n[velocity]\nenabled = true\n[card_testing]\nenabled = false\n")

    assert reader.differing_from(lowered) == ["card_testing", "large_amount", "velocity"]
