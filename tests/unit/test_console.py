"""The analyst console without Kafka: its index and pages with Starlette's test client, its users file and
access rules, and bad input (a verdict on no alert, a rule edit that does not validate: a clear message,
nothing written). The real topics, detector and a browser: tests/integration/test_console_browser.py."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fraudstream import rules_cli
from fraudstream.console.app import ConsoleState, create_app, rules_as_toml
from fraudstream.console.auth import ANALYST, RULES_ADMIN, Authenticator, Users, check_password, hash_password
from fraudstream.console.index import Bands, Index, QueueFilter
from fraudstream.console.rules import RulesAccess, describe_change
from fraudstream.console.verdicts import verdict_label
from fraudstream.errors import ConfigError
from fraudstream.records import Rule
from fraudstream.settings import Settings

SETTINGS = Settings()
T0 = 1_780_000_000_000
LOOPBACK = ("127.0.0.1", 40000)
ELSEWHERE = ("10.1.2.3", 40000)


def alert(
    i: int,
    score: float | None,
    cents: int = 100_000,
    *,
    card: str | None = None,
    merchant: str = "m-1",
    rules=("large_amount",),
) -> dict:
    return {
        "transaction": {
            "transaction_id": f"t{i}",
            "account_id": f"a{i}",
            "card_id": card or f"c{i}",
            "merchant_id": merchant,
            "merchant_category": "5411",
            "terminal_id": f"term{i}",
            "amount_cents": cents,
            "currency": "USD",
            "event_time": T0 + i * 1000,
            "channel": "ONLINE",
            "country": "US",
            "city": "X",
            "latitude": 0.0,
            "longitude": 0.0,
            "device_id": None,
        },
        "rules": list(rules),
        "detected_at": T0 + i * 1000 + 5,
        "fired": [{"id": r, "version": 1} for r in rules],
        "rule_set_version": "3",
        "score": score,
    }


class SpyWriter:
    def __init__(self) -> None:
        self.labels = []

    def write(self, label) -> None:
        self.labels.append(label)


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(tmp_path / "index.sqlite")


def state_for(index: Index, *, users: Users | None = None, rules_writer=None) -> ConsoleState:
    return ConsoleState(
        settings=SETTINGS,
        index=index,
        authenticator=Authenticator(users, anonymous_name="me"),
        writer=SpyWriter(),
        rules_reader=lambda: ({}, []),
        rules_writer=rules_writer,
    )


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def users_file(tmp_path: Path) -> Users:
    path = tmp_path / "users.toml"
    path.write_text(
        f'[users.alice]\npassword = "{hash_password("pw-alice")}"\nroles = ["{ANALYST}"]\n'
        f'[users.rita]\npassword = "{hash_password("pw-rita")}"\nroles = ["{ANALYST}", "{RULES_ADMIN}"]\n'
    )
    return Users.load(path)


def queue_ids(client: TestClient, query: str = "") -> list[str]:
    response = client.get("/" + query)
    assert response.status_code == 200, response.text
    return [line.split('"')[1] for line in response.text.splitlines() if "data-transaction=" in line]


# ---------------------------------------------------------------- the queue
def test_the_queue_shows_the_review_band_first_riskiest_first_and_pages_on_the_server(index):
    scores = [0.95, 0.6, 0.2, 0.7, 1.0, None, 0.55, 0.89]
    index.add_alerts([(0, i, alert(i, s)) for i, s in enumerate(scores)])
    rows, counts = index.queue(Bands(0.5, 0.9), QueueFilter(), page=0, page_size=3)
    assert counts == {"review": 4, "decline": 3, "approve": 1}
    assert [r["transaction_id"] for r in rows] == ["t7", "t3", "t1"]  # 0.89, 0.7, 0.6
    rows, _ = index.queue(Bands(0.5, 0.9), QueueFilter(), page=1, page_size=3)
    assert [r["transaction_id"] for r in rows] == ["t6", "t5", "t4"]  # 0.55; then declines: 1.0 (None, newer), 1.0
    rows, _ = index.queue(Bands(0.5, 0.9), QueueFilter(), page=2, page_size=3)
    assert [r["transaction_id"] for r in rows] == ["t0", "t2"]


def test_the_queue_filters_by_rule_scenario_card_merchant_amount_and_time(index):
    index.add_alerts(
        [
            (0, 0, alert(0, 1.0, 95_000, card="c-x", rules=("large_amount",))),
            (0, 1, alert(1, 1.0, 250, card="c-y", merchant="m-9", rules=("card_testing", "geo_velocity"))),
            (0, 2, alert(2, 1.0, 400_000, card="c-x", rules=("geo_velocity",))),
        ]
    )
    index.add_labels(
        [(0, 0, {"transaction_id": "t1", "is_fraud": True, "scenario": "card_testing", "event_time": T0 + 1000})]
    )
    client = TestClient(create_app(state_for(index)), client=LOOPBACK)
    assert queue_ids(client, "?rule=geo_velocity") == ["t2", "t1"]
    assert queue_ids(client, "?scenario=card_testing") == ["t1"]
    assert queue_ids(client, "?card=c-x") == ["t2", "t0"]
    assert queue_ids(client, "?merchant=m-9") == ["t1"]
    assert queue_ids(client, "?min_amount=900&max_amount=1000") == ["t0"]
    since = datetime.fromtimestamp((T0 + 2000) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert queue_ids(client, f"?since={since}") == ["t2"]
    assert queue_ids(client, f"?until={since}") == ["t1", "t0"]
    for query, message in (
        ("?min_amount=lots", "&#39;lots&#39; is not an amount"),
        ("?max_amount=inf", "&#39;inf&#39; is not an amount"),
        ("?min_amount=1e300", "&#39;1e300&#39; is not an amount"),
        ("?page=-1", "page &#39;-1&#39; is not a page number"),
        ("?since=yesterday", "&#39;yesterday&#39; is not a date and time"),
    ):
        response = client.get("/" + query)
        assert response.status_code == 400 and message in response.text, query


def test_an_alert_with_a_verdict_leaves_the_queue_and_the_latest_verdict_wins_with_its_history(index):
    index.add_alerts([(0, 0, alert(0, 1.0)), (0, 1, alert(1, 1.0))])
    first = verdict_label(alert(0, 1.0), is_fraud=True, analyst="ann")
    second = verdict_label(alert(0, 1.0), is_fraud=False, analyst="bob")
    index.add_labels([(0, 5, first.to_dict() | {"labelled_at": 1}), (0, 6, second.to_dict() | {"labelled_at": 2})])
    client = TestClient(create_app(state_for(index)), client=LOOPBACK)
    assert queue_ids(client) == ["t1"]
    assert queue_ids(client, "?rule=large_amount") == ["t1"]  # the rule filter's own index closes it too
    row = index.alert("t0")
    assert (row["verdict"], row["verdict_by"]) == (0, "bob")
    assert [(v["is_fraud"], v["labelled_by"]) for v in index.verdicts("t0")] == [(1, "ann"), (0, "bob")]
    page = client.get("/alerts/t0").text
    assert "fraud by ann" in page and "not fraud by bob" in page


# ---------------------------------------------------------------- verdicts
def test_a_verdict_writes_a_label_naming_the_analyst_the_transaction_terminal_and_event_time(index):
    index.add_alerts([(0, 0, alert(0, 1.0))])
    state = state_for(index)
    client = TestClient(create_app(state), client=LOOPBACK, follow_redirects=False)
    response = client.post("/verdicts/t0", data={"verdict": "not_fraud", "analyst": "Ann"})
    assert response.status_code == 303
    [label] = state.writer.labels
    assert (label.transaction_id, label.is_fraud, label.source, label.labelled_by) == ("t0", False, "analyst", "Ann")
    assert label.terminal_id == "term0" and label.event_time == datetime.fromtimestamp(T0 / 1000, UTC)


def test_a_verdict_on_an_alert_that_does_not_exist_is_refused_and_nothing_is_written(index):
    state = state_for(index)
    client = TestClient(create_app(state), client=LOOPBACK)
    response = client.post("/verdicts/no-such-alert", data={"verdict": "fraud", "analyst": "Ann"})
    assert response.status_code == 404
    assert "no alert for transaction &#39;no-such-alert&#39;: no verdict written" in response.text
    assert state.writer.labels == []


def test_a_verdict_without_a_name_or_with_an_unknown_value_writes_nothing(index):
    index.add_alerts([(0, 0, alert(0, 1.0))])
    state = state_for(index)
    client = TestClient(create_app(state), client=LOOPBACK)
    assert client.post("/verdicts/t0", data={"verdict": "fraud", "analyst": " "}).status_code == 400
    assert client.post("/verdicts/t0", data={"verdict": "maybe", "analyst": "Ann"}).status_code == 400
    assert client.post("/verdicts/t0", data={"verdict": "fraud", "analyst": "A" * 101}).status_code == 400
    assert state.writer.labels == []


# ---------------------------------------------------------------- who may do what
def test_anonymous_access_is_refused_except_on_the_loopback_interface(index, tmp_path):
    users = users_file(tmp_path)
    app = create_app(state_for(index, users=users))
    elsewhere = TestClient(app, client=ELSEWHERE)
    assert elsewhere.get("/").status_code == 401
    assert elsewhere.get("/", headers=basic("alice", "wrong")).status_code == 401
    assert elsewhere.get("/", headers=basic("mallory", "pw-alice")).status_code == 401
    assert elsewhere.get("/", headers=basic("alice", "pw-alice")).status_code == 200
    assert TestClient(app, client=LOOPBACK).get("/").status_code == 200


def test_an_analyst_without_rule_rights_cannot_change_rules_and_an_admin_can(index, tmp_path):
    written = []
    state = state_for(
        index,
        users=users_file(tmp_path),
        rules_writer=lambda text, author, comment: written.append((text, author)) or [],
    )
    client = TestClient(create_app(state), client=ELSEWHERE, follow_redirects=False)
    response = client.post(
        "/rules", data={"rules": "[large_amount]\nthreshold_cents = 1\n"}, headers=basic("alice", "pw-alice")
    )
    assert response.status_code == 403 and "alice may not change rules" in response.text
    # Anonymous on the loopback with a users file: verdicts yes, rules no.
    loopback = TestClient(create_app(state), client=LOOPBACK, follow_redirects=False)
    assert loopback.post("/rules", data={"rules": "[large_amount]\n"}).status_code == 403
    assert written == []
    response = client.post(
        "/rules", data={"rules": "[large_amount]\nthreshold_cents = 1\n"}, headers=basic("rita", "pw-rita")
    )
    assert response.status_code == 303 and written == [("[large_amount]\nthreshold_cents = 1\n", "rita")]


def test_a_console_for_other_machines_needs_a_users_file():
    from fraudstream.console import build_state

    with pytest.raises(ConfigError, match="--host 0.0.0.0 serves other machines: give --users FILE"):
        build_state(SETTINGS, host="0.0.0.0", start_reader=False)


def test_a_users_file_holds_scrypt_hashes_and_known_roles_only(tmp_path):
    stored = hash_password("secret")
    assert stored.startswith("scrypt$") and "secret" not in stored
    assert check_password("secret", stored) and not check_password("Secret", stored)
    path = tmp_path / "users.toml"
    path.write_text('[users.bob]\npassword = "secret"\nroles = ["analyst"]\n')
    with pytest.raises(ConfigError, match="users.bob.password is not a scrypt hash"):
        Users.load(path)
    path.write_text(f'[users.bob]\npassword = "{stored}"\nroles = ["admin"]\n')
    with pytest.raises(ConfigError, match=r"users.bob.roles: unknown \['admin'\]"):
        Users.load(path)


# ---------------------------------------------------------------- rules
def test_a_rule_edit_that_does_not_validate_shows_why_and_writes_nothing(index, monkeypatch):
    """Through the rules CLI's own path (write_rules_text): its checks refuse it before anything is written."""
    writes = []
    monkeypatch.setattr(rules_cli, "latest", lambda settings, codec: {})
    monkeypatch.setattr(rules_cli, "write_rules", lambda settings, codec, records: writes.append(records))
    access = RulesAccess(SETTINGS)
    access._codec = object()  # no registry needed: latest and write_rules are replaced
    client = TestClient(create_app(state_for(index, rules_writer=access.write)), client=LOOPBACK)
    response = client.post("/rules", data={"rules": '[large_amount]\nthreshold_cents = "lots"\n'})
    assert response.status_code == 400
    assert "the rule editor: rule large_amount v1" in response.text and "nothing written" in response.text
    assert client.post("/rules", data={"rules": "[large_amount\n"}).status_code == 400
    assert writes == []
    response = client.post("/rules", data={"rules": "[large_amount]\nthreshold_cents = 50000\n"})
    assert response.status_code == 200 and [r.parameters for r in writes[0]] == [{"threshold_cents": 50000}]


def test_the_editor_writes_only_the_rules_it_changed(index, monkeypatch):
    now = datetime.now(UTC)
    current = {
        rule_id: Rule(
            id=rule_id,
            version=2,
            kind=rule_id,
            parameters=parameters,
            enabled=True,
            author="a",
            comment="",
            written_at=now,
        )
        for rule_id, parameters in (("large_amount", {"threshold_cents": 90000}), ("velocity", {"max_in_session": 3}))
    }
    writes = []
    monkeypatch.setattr(rules_cli, "latest", lambda settings, codec: current)
    monkeypatch.setattr(rules_cli, "write_rules", lambda settings, codec, records: writes.append(records))
    access = RulesAccess(SETTINGS)
    access._codec = object()
    text = rules_as_toml(current)
    with pytest.raises(ConfigError, match="no rule changed; nothing written"):
        access.write(text, "rita", "")
    written = access.write(text.replace("threshold_cents = 90000", "threshold_cents = 50000"), "rita", "")
    assert [(r.id, r.version, r.parameters["threshold_cents"]) for r in written] == [("large_amount", 3, 50000)]
    assert writes == [written]


def test_the_editor_text_reads_back_as_the_same_rules():
    rule = Rule(
        id="large_amount",
        version=3,
        kind="large_amount",
        enabled=False,
        author="a",
        comment="",
        written_at=datetime.now(UTC),
        parameters={"threshold_cents": 50000, "exempt_categories": ("5311",), "exempt_unless_known_terminal": True},
    )
    [again] = rules_cli.records_from_toml(
        rules_as_toml({rule.id: rule}), "editor", SETTINGS, {rule.id: rule}, author="b", comment=""
    )
    assert (again.version, again.enabled, again.parameters) == (4, False, rule.parameters)
    assert describe_change(rule, again) == "no change"
    changed = dataclasses.replace(again, enabled=True, parameters={"threshold_cents": 1})
    assert describe_change(again, changed) == (
        'enabled, exempt_categories ["5311"] → (default), '
        "exempt_unless_known_terminal true → (default), threshold_cents 50000 → 1"
    )


def test_score_bands_are_checked_and_name_each_score():
    bands = Bands(review=0.5, decline=0.9)
    assert [bands.band(s) for s in (0.1, 0.5, 0.89, 0.9, 1.0)] == ["approve", "review", "review", "decline", "decline"]
    with pytest.raises(ValueError, match="review"):
        Bands(review=0.95, decline=0.9)


def band_rule(version: int, *, rule_id: str = "score_bands", enabled: bool = True, **params) -> Rule:
    return Rule(
        id=rule_id,
        version=version,
        kind="score_bands",
        parameters=params,
        enabled=enabled,
        author="rita",
        comment="",
        written_at=datetime(2026, 1, 2, tzinfo=UTC),
    )


def test_the_bands_are_those_of_the_score_bands_rule_in_force(index):
    assert index.bands() == Bands(review=0.5, decline=0.9)  # no band rule on the topic: the kind's defaults
    index.add_rule_versions([(0, band_rule(1, review=0.3, decline=0.6))])
    assert index.bands() == Bands(review=0.3, decline=0.6)
    index.add_rule_versions([(1, band_rule(2, review=0.7))])  # a missing parameter keeps its default (0.9)
    assert index.bands() == Bands(review=0.7, decline=0.9)
    index.add_rule_versions([(2, band_rule(3, review=0.8, decline=0.2))])  # refused by the detector: not in force
    assert index.bands() == Bands(review=0.7, decline=0.9)
    index.add_rule_versions([(3, band_rule(3, enabled=False, review=0.1, decline=0.2))])
    assert index.bands() == Bands(review=0.5, decline=0.9)


def test_the_queue_and_the_alert_page_band_by_the_rules_in_force(index):
    index.add_alerts([(0, i, alert(i, s)) for i, s in enumerate([0.95, 0.6, 0.2])])
    client = TestClient(create_app(state_for(index)), client=LOOPBACK)
    assert queue_ids(client) == ["t1", "t0", "t2"]  # review (0.6), decline (0.95), approve (0.2)
    assert 'class="band review"' in client.get("/alerts/t1").text
    index.add_rule_versions([(0, band_rule(1, review=0.1, decline=0.7))])
    assert queue_ids(client) == ["t1", "t2", "t0"]  # review now 0.6 and 0.2; 0.95 declined
    assert 'class="band decline"' in client.get("/alerts/t0").text
    assert "Decline at a score of <strong>0.7</strong>" in client.get("/rules").text


def test_the_dashboard_draws_alerts_per_hour_and_precision_and_recall(index):
    index.add_alerts([(0, i, alert(i, 1.0)) for i in range(4)])
    index.add_labels(
        [(0, i, {"transaction_id": f"t{i}", "is_fraud": i < 3, "scenario": "x", "event_time": T0}) for i in range(4)]
        + [(0, 9, {"transaction_id": "missed", "is_fraud": True, "scenario": "x", "event_time": T0})]
    )
    [day] = index.quality_by_day()
    assert (day["precision"], day["recall"]) == (0.75, 0.75)  # 3 of 4 alerts are fraud; 3 of 4 frauds alerted
    hours, per_rule = index.alerts_per_hour_by_rule()
    assert sum(per_rule["large_amount"]) == 4 and len(hours) == 24
    page = TestClient(create_app(state_for(index)), client=LOOPBACK).get("/dashboard").text
    assert page.count("<svg") == 4 and "large_amount: 4" in page


def test_a_label_read_before_its_alert_still_counts_for_precision(index):
    """At start both topics are read side by side, and labels may be written before the detector routes."""
    index.add_labels(
        [
            (0, 0, {"transaction_id": "t0", "is_fraud": False, "scenario": "legit", "event_time": T0}),
            (0, 1, {"transaction_id": "t1", "is_fraud": True, "scenario": "card_testing", "event_time": T0}),
        ]
    )
    index.add_alerts([(0, 0, alert(0, 1.0)), (0, 1, alert(1, 1.0))])
    [day] = index.quality_by_day()
    assert (day["precision"], day["recall"]) == (0.5, 1.0)
    assert index.alert("t1")["scenario"] == "card_testing"


def test_a_form_posted_from_another_site_is_refused_and_nothing_is_written(index):
    index.add_alerts([(0, 0, alert(0, 1.0))])
    state = state_for(index)
    client = TestClient(create_app(state), client=LOOPBACK, follow_redirects=False)
    response = client.post(
        "/verdicts/t0", data={"verdict": "fraud", "analyst": "Ann"}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403 and "another site" in response.text
    assert state.writer.labels == []
    same = client.post(
        "/verdicts/t0", data={"verdict": "fraud", "analyst": "Ann"}, headers={"Origin": "http://testserver"}
    )
    assert same.status_code == 303 and len(state.writer.labels) == 1


class FakeRecord:
    def __init__(self, topic: str, value: bytes, offset: int) -> None:
        self._topic, self._value, self._offset = topic, value, offset

    def topic(self):
        return self._topic

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def value(self):
        return self._value

    def error(self):
        return None


def test_a_record_the_index_cannot_use_is_skipped_and_counted_and_the_reader_goes_on(index):
    """A Transaction on the fraud topic, bytes that are no Avro: both decode or fail in the data path."""
    from fraudstream.console.reader import TopicReader
    from fraudstream.schemas import load_schemas
    from fraudstream.consumer.inspect import console_schemas
    from fraudstream.serde import make_encoder

    schemas = load_schemas(SETTINGS.schemas_dir)
    reader = TopicReader(SETTINGS, index, on_alerts=lambda alerts: None)
    by_id = {1: schemas.expanded["Transaction"], 2: schemas.expanded["FraudAlert"]}
    reader._schemas = console_schemas(lambda schema_id: by_id[schema_id])  # as the reader's own
    good = alert(0, 1.0)
    good["transaction"]["event_time"] = datetime.fromtimestamp(T0 / 1000, UTC)
    good["detected_at"] = datetime.fromtimestamp(T0 / 1000, UTC)
    records = [
        FakeRecord(SETTINGS.fraud_topic, make_encoder(1, schemas.parsed["Transaction"])(good["transaction"]), 0),
        FakeRecord(SETTINGS.fraud_topic, b"\x00\x00\x00\x00\x02garbage", 1),
        FakeRecord(SETTINGS.fraud_topic, make_encoder(2, schemas.parsed["FraudAlert"])(good), 2),
    ]
    reader._index(None, records, {})
    assert reader.state.undecodable == 2
    assert index.count_alerts() == 1 and index.alert("t0")["topic_offset"] == 2


def test_the_demo_serves_the_console_and_its_summary_prints_the_address():
    import argparse

    from fraudstream.demo.options import add_arguments
    from fraudstream.demo.scoring import DemoState
    from fraudstream.demo.summary import summary_lines
    from fraudstream.demo.view import Frame

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).console and not parser.parse_args(["--no-console"]).console
    frame = Frame(
        topic="t",
        detectors=1,
        rate=1000,
        duration_s=60,
        elapsed_s=61.0,
        phase="done",
        state=DemoState(),
        in_per_s=0.0,
        out_per_s=0.0,
    )
    lines = summary_lines(
        frame,
        SETTINGS,
        extra_flags=[],
        log_dir=Path("/tmp/x"),
        stack_left_running=False,
        console_url="http://127.0.0.1:8088",
    )
    assert "analyst console (review queue, verdicts, rules, dashboard): http://127.0.0.1:8088" in lines


def test_a_transaction_id_with_url_characters_links_to_its_alert(index):
    odd = alert(0, 1.0)
    odd["transaction"]["transaction_id"] = "a b#c?d/e"
    index.add_alerts([(0, 0, odd)])
    client = TestClient(create_app(state_for(index)), client=LOOPBACK)
    page = client.get("/").text
    assert 'href="/alerts/a%20b%23c%3Fd/e"' in page
    assert "a b#c?d/e" in client.get("/alerts/a%20b%23c%3Fd/e").text
