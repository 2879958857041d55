"""The rules topic's reader without a broker: which records come into force, which are refused (and
dead-lettered with their reason), and how the rule-set version follows the topic's offsets."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from datetime import UTC, datetime

from confluent_kafka import OFFSET_INVALID, TIMESTAMP_LOG_APPEND_TIME, TopicPartition

import numpy as np
import pytest

from fraudstream.consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_REASON
from fraudstream.consumer.features import TxColumns
from fraudstream.consumer.rules import (
    COMPROMISED_TERMINAL,
    DEFAULT_RULES_FILE,
    LARGE_AMOUNT,
    SCORE_BANDS,
    checked_parameters,
    load_rules,
)
from fraudstream.consumer.rules_topic import (
    INVALID_RULE,
    MAX_RULE_VERSION,
    MAX_RULES,
    STALE_VERSION,
    TOO_MANY_RULES,
    RulesTopic,
    seed_records,
)
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


def rule(
    version: int,
    threshold: int | None = 50_000,
    *,
    rule_id: str = LARGE_AMOUNT,
    kind: str = LARGE_AMOUNT,
    enabled: bool = True,
    **params,
) -> Rule:
    if threshold is not None:
        params["threshold_cents"] = threshold
    return Rule(
        id=rule_id,
        version=version,
        kind=kind,
        parameters=params,
        enabled=enabled,
        author="analyst",
        comment="",
        written_at=datetime(2026, 1, 2, tzinfo=UTC),
    )


class RuleMessage:
    def __init__(self, offset: int, key: str, value: bytes | None, headers=None) -> None:
        self._offset, self._key, self._value, self._headers = offset, key, value, headers

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
        return self._headers

    def timestamp(self):
        return TIMESTAMP_LOG_APPEND_TIME, 1_767_312_000_000  # 2026-01-02 00:00:00 UTC

    def error(self):
        return None


class FakeConsumer:
    """The reader's consumer: the records fetched so far, its position (after the last record returned), and
    the topic's end as the broker would give it (`end`). `per_consume`: at most that many records a consume,
    as when a fetch brings part of a transaction."""

    def __init__(self) -> None:
        self.pending: list[RuleMessage] = []
        self.at = OFFSET_INVALID  # nothing read yet: a logical position
        self.end = 0
        self.per_consume: int | None = None
        self.consumed: list[int] = []  # records returned by each consume call

    def consume(self, num_messages, timeout):
        num_messages = min(num_messages, self.per_consume or num_messages)
        out, self.pending = self.pending[:num_messages], self.pending[num_messages:]
        if out:
            self.at = out[-1].offset() + 1
        self.consumed.append(len(out))
        return out

    def position(self, partitions):
        return [TopicPartition(SETTINGS.rules_topic, 0, self.at)]

    def list_offsets(self, specs, isolation_level, request_timeout):  # the admin client asking the end
        [partition] = specs
        return {partition: SimpleNamespace(result=lambda timeout: SimpleNamespace(offset=self.end))}


@pytest.fixture
def reader() -> RulesTopic:
    topic = RulesTopic(SETTINGS, registry=FakeRegistry({RULE_ID: SCHEMAS.expanded["Rule"]}))
    topic.lines = []
    topic.on_log = topic.lines.append
    topic.consumer = topic._admin = FakeConsumer()
    return topic


def feed(reader: RulesTopic, *messages: tuple[str, bytes | None]) -> bool:
    start = len(getattr(reader, "_fed", []))
    reader._fed = getattr(reader, "_fed", []) + list(messages)
    reader.consumer.pending += [RuleMessage(start + i, key, value) for i, (key, value) in enumerate(messages)]
    reader.consumer.end = len(reader._fed)
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


@pytest.mark.parametrize(
    "bad, reason",
    [
        (rule(2, rule_id="x", kind="nope"), "unknown kind 'nope'"),
        (rule(2, None, min_session_small=2), "unknown parameter 'min_session_small' for kind large_amount"),
        (rule(2, None, exempt_below_cents="lots"), "must be a whole number, not 'lots'"),
    ],
)
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
    feed(
        reader,
        (LARGE_AMOUNT, encode(rule(1, 50_000).to_dict())),
        ("huge", encode(rule(4, 70_000, rule_id="huge").to_dict())),
    )
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
    good.write_text('[large_amount]\nthreshold_cents = 40000\n[far]\nkind = "far_from_home"\nwindow_s = 60\n')
    records = _records_from_file(good, SETTINGS, {LARGE_AMOUNT: rule(4)}, author="a", comment="")
    assert [(r.id, r.version, r.kind) for r in records] == [
        (LARGE_AMOUNT, 5, LARGE_AMOUNT),
        ("far", 1, "far_from_home"),
    ]
    assert records[1].parameters == {"window_s": 60.0}
    assert isinstance(records[1].parameters["window_s"], float)  # written as the checked type


def test_the_rules_in_force_are_compared_with_a_rules_file_by_content(reader, tmp_path):
    # The topic holds the defaults, as a detector seeding it from rules/default.toml writes them.
    feed(reader, *[(r.id, encode(r.to_dict())) for r in seed_records(SETTINGS, None, author="seed")])
    assert reader.differing_from(DEFAULT_RULES_FILE) == []
    lowered = tmp_path / "lowered.toml"
    lowered.write_text(
        "[large_amount]\nthreshold_cents = 50000\n[velocity]\nenabled = true\n[card_testing]\nenabled = false\n"
    )

    assert reader.differing_from(lowered) == ["card_testing", "large_amount", "velocity"]


# ----- hostile records: each refused once with its reason (a log line and a dead letter), never an exit


def refused_kinds(reader: RulesTopic) -> list[str]:
    return [dict(letter.headers)[DLQ_KIND].decode() for letter in reader.take_dead_letters()]


def test_a_version_at_the_top_of_the_range_or_any_jump_is_refused_and_later_changes_still_apply(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(1, 50_000).to_dict())))
    assert not feed(
        reader,
        (LARGE_AMOUNT, encode(rule(2**63 - 1, 10_000).to_dict())),
        (LARGE_AMOUNT, encode(rule(3, 10_000).to_dict())),
    )
    assert refused_kinds(reader) == [INVALID_RULE, STALE_VERSION]  # past MAX_RULE_VERSION; a jump
    assert feed(reader, (LARGE_AMOUNT, encode(rule(2, 60_000).to_dict())))  # the next version: not wedged
    assert reader.current.versions == {LARGE_AMOUNT: 2}
    # A rule first seen (its earlier versions compacted away) may start anywhere in the range, not beyond it.
    assert not feed(reader, ("top", encode(rule(MAX_RULE_VERSION + 1, rule_id="top").to_dict())))
    [letter] = reader.take_dead_letters()
    assert f"versions run from 1 to {MAX_RULE_VERSION}" in dict(letter.headers)[DLQ_REASON].decode()


def test_beyond_the_maximum_number_of_rules_a_new_one_is_refused_until_one_is_deleted(reader):
    feed(reader, *[(f"r{i}", encode(rule(1, rule_id=f"r{i}").to_dict())) for i in range(MAX_RULES)])
    assert len(reader.current.names) == MAX_RULES and reader.take_dead_letters() == []
    assert not feed(reader, ("one-more", encode(rule(1, rule_id="one-more").to_dict())))
    [letter] = reader.take_dead_letters()
    assert dict(letter.headers)[DLQ_KIND] == TOO_MANY_RULES.encode()
    assert f"at most {MAX_RULES}" in dict(letter.headers)[DLQ_REASON].decode()
    assert feed(reader, ("r0", encode(rule(2, 1_000, rule_id="r0").to_dict())))  # a change to one on the topic
    assert feed(reader, ("r1", None), ("one-more", encode(rule(1, rule_id="one-more").to_dict())))
    assert "one-more" in reader.current.names and "r1" not in reader.current.names


@pytest.mark.parametrize(
    "bad, says",
    [
        (rule(1, rule_id="evil\x1b[2J\nINFO fake line"), "rule id 'evil\\x1b[2J\\nINFO fake line' must be 1 to 64"),
        (rule(1, rule_id="x" * 65), "must be 1 to 64 letters"),
        (rule(0), "versions run from 1 to"),
        (dataclasses.replace(rule(1), comment="c" * 1_001), "comment has 1001 characters; at most 1000"),
        (rule(1, None, kind=COMPROMISED_TERMINAL, look_ahead_s=1e300), "look_ahead_s must be at most 3,600"),
        (rule(1, None, kind=COMPROMISED_TERMINAL, look_ahead_s=float("nan")), "must be a finite number, not nan"),
    ],
)
def test_ids_versions_texts_and_parameters_out_of_bounds_are_refused_in_one_printable_line(reader, bad, says):
    counted: list[str] = []
    reader.on_refused = counted.append  # the detector's metrics counter
    assert not feed(reader, (bad.id, encode(bad.to_dict())))
    assert counted == [INVALID_RULE]
    [letter] = reader.take_dead_letters()
    reason = dict(letter.headers)[DLQ_REASON].decode()
    [line] = reader.lines
    assert says in reason and says in line
    assert reason.isprintable() and line.isprintable()
    assert reader.current.names == () and reader.refused == 1


def test_control_characters_in_a_key_or_comment_never_reach_a_log_line(reader):
    evil = "\x1b]0;owned\x07\r\n2026-01-01 INFO all good\u202e"
    assert not feed(reader, (evil, encode(rule(1).to_dict())))  # a key that is not the id
    assert feed(reader, (LARGE_AMOUNT, encode(dataclasses.replace(rule(1), comment=evil, author=evil).to_dict())))
    assert feed(reader, (LARGE_AMOUNT, None))
    assert len(reader.lines) == 2 and all(line.isprintable() for line in reader.lines)
    assert "\\x1b]0;owned" in reader.lines[0]


def test_history_says_who_when_and_what_and_prints_no_control_character():
    from fraudstream.consumer.rules_topic import APPLIED, PRINCIPAL_HEADER, REFUSED, REMOVED, Change
    from fraudstream.rules_cli import history_line

    evil = dataclasses.replace(rule(2), author="\x1b[31mroot", comment="ok\n2026-01-01 fake")
    changed = history_line(
        Change(RuleMessage(4, LARGE_AMOUNT, b"x", [(PRINCIPAL_HEADER, b"SCRAM-SHA-512 rules-admin")]), evil, APPLIED)
    )
    assert changed.startswith(
        "@4      2026-01-02 00:00:00 (broker)  SCRAM-SHA-512 rules-admin (authenticated): "
        "large_amount v2 large_amount enabled"
    )
    assert changed.endswith("# ok\\n2026-01-01 fake") and changed.isprintable()
    declared = history_line(Change(RuleMessage(5, LARGE_AMOUNT, b"x"), evil, REFUSED, "too big"))
    assert "\\x1b[31mroot (self-declared)" in declared and declared.endswith("REFUSED: too big")
    deleted = history_line(
        Change(
            RuleMessage(6, LARGE_AMOUNT, None, [("fraudstream.author", b"ann"), ("fraudstream.comment", b"gone")]),
            None,
            REMOVED,
        )
    )
    assert deleted.endswith("ann (self-declared): large_amount deleted  # gone")


@pytest.mark.parametrize(
    "config, principal",
    [
        ({}, None),
        ({"security.protocol": "SSL", "ssl.ca.location": "ca.pem"}, None),
        (
            {
                "security.protocol": "SASL_SSL",
                "sasl.mechanisms": "SCRAM-SHA-512",
                "sasl.username": "rules-admin",
                "sasl.password": "s3cret",
            },
            "SCRAM-SHA-512 rules-admin",
        ),
        (
            {
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": "OAUTHBEARER",
                "sasl.oauthbearer.config": "principal=alice scope=rules",
            },
            "OAUTHBEARER alice",
        ),
        (
            {
                "security.protocol": "sasl_ssl",
                "sasl.mechanisms": "OAUTHBEARER",
                "sasl.oauthbearer.method": "oidc",
                "sasl.oauthbearer.client.id": "rules-cli",
            },
            "OAUTHBEARER client rules-cli",
        ),
    ],
)
def test_the_principal_comes_from_the_client_config_and_never_its_secret(config, principal):
    from fraudstream.consumer.rules_topic import client_principal

    found = client_principal(SETTINGS.replace(kafka_extra=config))
    assert found == principal and "s3cret" not in (found or "")


def test_author_is_the_authenticated_principal_and_a_different_author_is_refused_in_one_line():
    import argparse

    from fraudstream.rules_cli import _author

    secured = SETTINGS.replace(
        kafka_extra={"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN", "sasl.username": "rules-admin"}
    )
    assert _author(secured, argparse.Namespace(author=None)) == "PLAIN rules-admin"
    with pytest.raises(ConfigError, match="authenticated as PLAIN rules-admin.*leave --author out"):
        _author(secured, argparse.Namespace(author="mallory"))
    assert _author(SETTINGS, argparse.Namespace(author="ann")) == "ann"


def test_set_refuses_a_file_that_would_pass_the_maximum_number_of_rules(tmp_path):
    current = {f"r{i}": rule(1, rule_id=f"r{i}") for i in range(MAX_RULES - 1)}
    path = tmp_path / "two.toml"
    path.write_text('[a]\nkind = "large_amount"\n[b]\nkind = "large_amount"\n')
    with pytest.raises(
        ConfigError, match=f"{MAX_RULES + 1} rules with those on the topic; at most {MAX_RULES}.*nothing written"
    ):
        _records_from_file(path, SETTINGS, current, author="a", comment="")
    path.write_text('[r0]\nkind = "large_amount"\n[a]\nkind = "large_amount"\n')  # one new: room for it
    assert [r.id for r in _records_from_file(path, SETTINGS, current, author="a", comment="")] == ["r0", "a"]


def test_set_refuses_a_rule_at_the_last_version_and_says_how_to_start_it_again(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text("[large_amount]\nthreshold_cents = 1\n")
    with pytest.raises(ConfigError, match="versions run from 1 to .*fraudstream rules delete large_amount"):
        _records_from_file(path, SETTINGS, {LARGE_AMOUNT: rule(MAX_RULE_VERSION)}, author="a", comment="")


# ----- score_bands: the console's bands on the rules topic; a kind that never fires


def bands(version: int, **params) -> Rule:
    return rule(version, None, rule_id=SCORE_BANDS, kind=SCORE_BANDS, **params)


@pytest.mark.parametrize(
    "params, says",
    [
        ({"review": 0.95, "decline": 0.9}, "score_bands.review (0.95) must be at most score_bands.decline (0.9)"),
        ({"review": 0.95}, "score_bands.review (0.95) must be at most score_bands.decline (0.9)"),  # over the default
        ({"decline": 1.5}, "score_bands.decline must be at most 1 (a score is a probability), not 1.5"),
        ({"review": -0.1}, "score_bands.review must be at least 0, not -0.1"),
        ({"review": "high"}, "score_bands.review must be float, not 'high'"),
    ],
)
def test_score_bands_out_of_bounds_or_review_above_decline_are_one_line_errors(params, says):
    with pytest.raises(ConfigError) as refused:
        checked_parameters(SCORE_BANDS, params, where="rule score_bands v2")
    assert str(refused.value) == f"rule score_bands v2: {says}"


def test_score_bands_review_above_decline_in_a_rules_file_is_refused(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[score_bands]\nreview = 0.8\ndecline = 0.7\n")
    with pytest.raises(ConfigError, match=r"score_bands.review \(0.8\) must be at most score_bands.decline \(0.7\)"):
        load_rules(path, settings=SETTINGS)
    path.write_text("[score_bands]\nreview = 0.7\ndecline = 0.7\n")  # equal: no review band, still valid
    assert load_rules(path, settings=SETTINGS).thresholds[SCORE_BANDS] == {
        "enabled": True,
        "review": 0.7,
        "decline": 0.7,
    }


def test_a_score_bands_rule_is_versioned_and_a_bad_one_dead_lettered_like_any_rule(reader):
    assert feed(reader, (SCORE_BANDS, encode(bands(1, review=0.4, decline=0.8).to_dict())))
    assert reader.current.versions == {SCORE_BANDS: 1}
    assert not feed(reader, (SCORE_BANDS, encode(bands(2, review=0.9, decline=0.8).to_dict())))
    [letter] = reader.take_dead_letters()
    assert dict(letter.headers)[DLQ_KIND] == INVALID_RULE.encode()
    assert b"review (0.9) must be at most score_bands.decline (0.8)" in dict(letter.headers)[DLQ_REASON]
    assert reader.current.thresholds[SCORE_BANDS] == {"review": 0.4, "decline": 0.8}


def test_the_score_bands_rule_never_changes_a_decision(reader):
    """A batch judged with and without the band rule: the same rules fire, the same records are fraud, none
    held more (the detector's route is fraud when any rule fired)."""
    feed(reader, (LARGE_AMOUNT, encode(rule(1, 50_000).to_dict())))
    tx, features = columns([10_000, 60_000, 90_000, 50_000])
    without = reader.current
    fired_without = without.evaluate(tx, features)
    assert feed(reader, (SCORE_BANDS, encode(bands(1, review=0.0, decline=0.0).to_dict())))
    with_bands = reader.current
    assert SCORE_BANDS in with_bands.names
    fired_with = with_bands.evaluate(tx, features)
    assert (
        with_bands.fired_names(fired_with)
        == without.fired_names(fired_without)
        == [[], [LARGE_AMOUNT], [LARGE_AMOUNT], []]
    )
    assert fired_with.any(axis=0).tolist() == fired_without.any(axis=0).tolist()
    assert with_bands.look_ahead_ms == without.look_ahead_ms == 0


# ----- shadow rules (issue #23): keyed shadow/<id>, judged as live ones, kept apart


def shadow(record: Rule) -> tuple[str, bytes]:
    return f"shadow/{record.id}", encode(record.to_dict())


def test_a_shadow_rule_goes_to_the_shadow_set_and_leaves_the_live_set_as_it_was(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(3, 90_000).to_dict())))
    live = reader.current
    assert reader.shadow is None and reader.live_changed and not reader.shadow_changed
    assert feed(reader, shadow(rule(1, 50_000)), shadow(rule(1, 70_000, rule_id="la-2")))
    assert reader.shadow_changed and not reader.live_changed
    assert reader.current is live
    assert reader.shadow is not None
    assert reader.shadow.names == ("la-2", LARGE_AMOUNT)
    assert reader.shadow.versions == {LARGE_AMOUNT: 1, "la-2": 1}  # a chain of its own: the live rule is at v3
    assert reader.shadow.thresholds[LARGE_AMOUNT]["threshold_cents"] == 50_000
    assert reader.shadow.version == "3" and reader.current.version == "1"  # each named after its own last change
    tx, features = columns([60_000, 80_000])
    assert reader.shadow.fired_names(reader.shadow.evaluate(tx, features)) == [[LARGE_AMOUNT], ["la-2", LARGE_AMOUNT]]
    assert feed(reader, ("shadow/la-2", None), ("shadow/large_amount", None))
    assert reader.shadow is None and reader.current is live


def test_a_bad_shadow_record_is_dead_lettered_like_a_live_one_and_touches_neither_set(reader):
    feed(reader, (LARGE_AMOUNT, encode(rule(1, 90_000).to_dict())), shadow(rule(1, 50_000)))
    live, candidate = reader.current, reader.shadow
    assert not feed(
        reader,
        shadow(rule(2, -5)),  # out of bounds
        shadow(rule(3, 40_000)),  # not the next shadow version (v1 is)
        ("shadow/other", encode(rule(1).to_dict())),  # the key names another rule than the record
        ("shadow/shadow/x", encode(rule(1, rule_id="shadow/x").to_dict())),
    )
    assert refused_kinds(reader) == [INVALID_RULE, STALE_VERSION, INVALID_RULE, INVALID_RULE]
    assert reader.current is live and reader.shadow is candidate
    assert feed(reader, shadow(rule(2, 45_000)))  # the next shadow version still applies
    assert reader.shadow.versions == {LARGE_AMOUNT: 2} and reader.current is live


def test_the_shadow_set_counts_towards_its_own_maximum(reader):
    feed(reader, *[(f"r{i}", encode(rule(1, rule_id=f"r{i}").to_dict())) for i in range(MAX_RULES)])
    feed(reader, *[shadow(rule(1, rule_id=f"r{i}")) for i in range(MAX_RULES)])
    assert reader.take_dead_letters() == [] and len(reader.shadow.names) == MAX_RULES
    assert not feed(reader, shadow(rule(1, rule_id="one-more")))
    [letter] = reader.take_dead_letters()
    assert dict(letter.headers)[DLQ_KIND] == TOO_MANY_RULES.encode()
    assert "rules shadow clear" in dict(letter.headers)[DLQ_REASON].decode()


def test_a_change_that_comes_in_several_fetches_is_applied_at_one_poll(reader, monkeypatch):
    """A transaction's records may come out of the consumer a few at a time: a poll reads on to the topic's
    end before rebuilding the sets, so no batch is judged with part of a change in force."""
    reader.consumer.per_consume = 3
    judged: list[int] = []
    judge = reader.judge
    monkeypatch.setattr(reader, "judge", lambda message: judged.append(message.offset()) or judge(message))
    assert feed(reader, *[shadow(rule(1, rule_id=f"r{i}")) for i in range(20)])
    assert len(judged) == 20 and len(reader.shadow.names) == 20
    assert len(reader.consumer.consumed) > 1  # the path under test: several consumes in that one poll


def test_a_poll_past_its_deadline_leaves_a_partial_change_out_of_force_until_the_rest_arrives(reader, monkeypatch):
    feed(reader, (LARGE_AMOUNT, encode(rule(1, 90_000).to_dict())))
    live = reader.current
    monkeypatch.setattr("fraudstream.consumer.rules_topic.CATCH_UP_S", 0.0)
    change = [shadow(rule(1, rule_id=f"r{i}")) for i in range(4)] + [(LARGE_AMOUNT, encode(rule(2).to_dict()))]
    reader.consumer.end = 1 + len(change)  # the broker has the whole change ...
    reader.consumer.pending += [RuleMessage(1 + i, key, value) for i, (key, value) in enumerate(change[:2])]
    assert not reader.poll()  # ... this reader only two of its records so far
    assert reader.current is live and reader.shadow is None
    reader.consumer.pending += [RuleMessage(3 + i, key, value) for i, (key, value) in enumerate(change[2:])]
    assert reader.poll() and reader.live_changed and reader.shadow_changed
    assert len(reader.shadow.names) == 4 and reader.current.versions == {LARGE_AMOUNT: 2}


def test_a_shadow_file_replaces_the_shadow_set_so_its_rules_alone_count(tmp_path):
    current = {f"r{i}": rule(1, rule_id=f"r{i}") for i in range(MAX_RULES)}
    from fraudstream.rules_cli import records_from_toml

    text = '[a]\nkind = "large_amount"\n[r0]\nkind = "large_amount"\n'
    with pytest.raises(ConfigError, match="with those on the topic"):
        records_from_toml(text, "f", SETTINGS, current, author="a", comment="")
    records = records_from_toml(text, "f", SETTINGS, current, author="a", comment="", replacing=True)
    assert [(r.id, r.version) for r in records] == [("a", 1), ("r0", 2)]


def test_history_marks_shadow_changes_and_the_records_of_one_change():
    from fraudstream.consumer.rules_topic import APPLIED, CHANGE_HEADER, REMOVED, Change
    from fraudstream.rules_cli import history_line

    written = history_line(
        Change(
            RuleMessage(7, "shadow/large_amount", b"x", [(CHANGE_HEADER, b"abc 2/3")]), rule(1), APPLIED, shadow=True
        )
    )
    assert "[change abc 2/3]  analyst (self-declared): [shadow] large_amount v1 large_amount enabled" in written
    removed = history_line(Change(RuleMessage(8, "shadow/la-2", None), None, REMOVED, shadow=True))
    assert removed.endswith("[shadow] la-2 deleted")


def test_a_detector_without_a_terminal_window_leaves_the_shadow_set_s_terminal_rule_out_too(reader):
    """A shadow terminal rule on a detector that runs no terminal window would need features it never computes:
    it is left out like a live one (it once raised inside decide and ended the detector)."""
    from fraudstream.consumer.rules import COMPROMISED_TERMINAL, TERMINAL_RULES

    terminal = rule(1, None, rule_id=COMPROMISED_TERMINAL, kind=COMPROMISED_TERMINAL)
    feed(reader, (LARGE_AMOUNT, encode(rule(1).to_dict())), shadow(rule(1)), shadow(terminal))
    assert reader.shadow is not None and COMPROMISED_TERMINAL in reader.shadow.names
    reader.skip(TERMINAL_RULES)
    assert reader.shadow.names == (LARGE_AMOUNT,) and reader.current.names == (LARGE_AMOUNT,)
    tx, features = columns([60_000, 100])
    assert reader.shadow.evaluate(tx, features).tolist() == [[True, False]]  # no terminal features needed


def test_only_live_rule_records_count_as_a_topic_holding_rules(reader):
    """`rules shadow set` before any detector ran leaves a topic with shadow records alone: the first detector
    must still seed the live rules (it once ran with none)."""
    feed(reader, shadow(rule(1)))
    assert reader.live_records_read == 0
    feed(reader, (LARGE_AMOUNT, None))  # a tombstone of a live rule: the topic has had live rules
    assert reader.live_records_read == 1


def test_a_change_whose_writer_was_fenced_or_denied_says_so_in_one_line():
    from confluent_kafka import KafkaError

    from fraudstream.consumer.rules_topic import _write_failure
    from fraudstream.errors import Fenced, NotAuthorized

    fenced = _write_failure(SETTINGS, KafkaError(KafkaError._FENCED), unknown=False)
    assert isinstance(fenced, Fenced)
    assert "transactional id tx.rules.cli" in str(fenced) and "nothing of this change was written" in str(fenced)
    denied = _write_failure(SETTINGS, KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED), unknown=False)
    assert isinstance(denied, NotAuthorized) and "Write on transactional id tx.rules.cli" in str(denied)
    unknown = _write_failure(SETTINGS, KafkaError(KafkaError._TIMED_OUT), unknown=True)
    assert "whether it was written is unknown" in str(unknown) and "\n" not in str(unknown)


def test_the_seed_is_read_back_even_when_the_end_asked_after_writing_it_is_stale(reader):
    """The end offset asked right after the seed was written came back stale in a 3-broker soak: reading "to the
    end" then read nothing, and the detector ran with no rule at all. The seed is read back by count."""
    seeded = [rule(1), rule(1, None, rule_id="card_testing", kind="card_testing")]
    reader.consumer.pending += [RuleMessage(i, r.id, encode(r.to_dict())) for i, r in enumerate(seeded)]
    reader.consumer.end = 0  # stale: the broker's answer from before the write
    reader._read_to_end(timeout_s=1)
    assert reader.current.names == ()  # what start() had before
    reader.consumer.end = len(seeded)  # a later ask sees them (the poll publishes a change read to its end)
    reader._read_back(len(seeded), timeout_s=5)
    assert set(reader.current.names) == {LARGE_AMOUNT, "card_testing"}


class StaleLeaderAdmin(FakeConsumer):
    """An admin client whose metadata names a leader that lost its partition: every end it asks fails with
    FENCED_LEADER_EPOCH until its metadata is asked again (list_topics), as librdkafka's admin does."""

    def __init__(self) -> None:
        super().__init__()
        self.stale, self.refreshes, self.asks = True, 0, 0

    def list_topics(self, topic, timeout):
        self.refreshes += 1
        self.stale = False

    def list_offsets(self, specs, isolation_level, request_timeout):
        self.asks += 1
        if self.stale:
            from confluent_kafka import KafkaError, KafkaException

            raise KafkaException(KafkaError(KafkaError.FENCED_LEADER_EPOCH))
        return super().list_offsets(specs, isolation_level, request_timeout)


def test_the_end_asked_of_a_leader_that_moved_is_asked_again_of_the_new_one(reader):
    """Soak 3016: a detector starting after a broker restart asked the rules topic's end for 20 s of the leader
    its admin's metadata named, got FENCED_LEADER_EPOCH each time, and gave up starting."""
    admin = reader._admin = StaleLeaderAdmin()
    admin.end = 0
    reader._read_to_end(timeout_s=5)
    assert admin.refreshes == 1 and admin.asks == 2  # the failed ask, a refresh, then the answer
