"""`fraudstream backtest` on the real broker and registry: a seeded stream produced with the project's producer,
routed by a real detector; then the backtest replays the same topic.

- fidelity: the live rules, replayed, give every transaction the decision (route and fired rules) the detector
  wrote, held records of the terminal rule's look-ahead included;
- a candidate raising the large-amount threshold loses exactly the alerts a hand count over the detector's own
  alerts finds (large_amount alone, below the new threshold), and the frauds among them are the missed ones;
- bad input: a candidate file that does not parse, a window with no transactions, a topic with no labels.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from fraudstream.cli import main
from fraudstream.evaluate import read_labels
from fraudstream.kafka import ensure_topics
from fraudstream.producer.loop import produce
from fraudstream.registry import register_all
from tests.integration.test_detector import RunningDetector, decode, encoder_for, routed_total
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

COUNT = 20_000
SPEEDUP = 400_000.0  # event time runs about 4.6 days per second of producing
RATE = 20_000.0  # at most: one second of producing at least, so the stream spans several days on any machine
NEW_THRESHOLD_CENTS = 200_000
VICTIMS = 6
TOTAL = COUNT + VICTIMS


def _fresh(stack_settings):
    settings = stack_settings.replace(
        transactions_topic=f"test-bt-{uuid.uuid4().hex[:10]}", group_id=f"test-bt-{uuid.uuid4().hex[:8]}", partitions=3
    )
    ensure_topics(settings)
    register_all(settings)
    return settings


@pytest.fixture(scope="module")
def routed(stack_settings):
    """A seeded stream routed by a real detector, to the end; first, a skimmer taking cards of accounts in every
    partition (as in test_stateful_detector): its first victims are held, then released as fraud once the look-ahead
    has seen the cards that came after them."""
    settings = _fresh(stack_settings)
    start = datetime.now(UTC) - timedelta(hours=1)
    encode = encoder_for(settings, settings.transactions_topic)
    victims = [
        transaction(
            3_000,
            account=f"acct-victim-{i}",
            event_time=start + timedelta(seconds=30 * i),
            terminal_id="term-skimmer",
            transaction_id=f"victim-{i}",
        )
        for i in range(VICTIMS)
    ]
    produce_raw(settings, settings.transactions_topic, ((t.account_id.encode(), encode(t.to_dict())) for t in victims))
    produce(settings, count=COUNT, rate=RATE, seed=23, speedup=SPEEDUP)
    detector = RunningDetector(settings)
    wait_until(lambda: routed_total(settings) >= TOTAL, timeout_s=180, what=f"{TOTAL} transactions routed")
    detector.stop()
    assert detector.error is None, detector.error
    return settings


def backtest(settings, tmp_path, *args: str) -> tuple[int, dict | None]:
    output = tmp_path / f"bt-{uuid.uuid4().hex[:6]}.json"
    code = main(
        [
            "backtest",
            "--topic",
            settings.transactions_topic,
            "--output",
            str(output),
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--schema-registry-url",
            settings.schema_registry_url,
            *args,
        ]
    )
    if not output.exists():
        return code, None
    report = json.loads(output.read_text())
    chart = output.with_suffix(".png")  # alerts and precision per day, both rule sets (matplotlib: a test extra)
    assert chart.exists() == bool(report["in_window"])
    assert not chart.exists() or chart.read_bytes()[:4] == b"\x89PNG"
    return code, report


def _candidate(tmp_path, text: str):
    path = tmp_path / "candidate.toml"
    path.write_text(text)
    return path


def _day(alert):
    return alert["transaction"]["event_time"].astimezone(UTC).date()  # a UTC calendar day of event time


def test_a_backtest_of_the_live_rules_gives_every_transaction_the_detector_s_decision(routed, tmp_path):
    candidate = _candidate(tmp_path, "[velocity]\nenabled = false\n")  # the baseline (the live rules) is checked here
    code, report = backtest(routed, tmp_path, "--rules", str(candidate), "--fidelity")
    assert code == 0
    fidelity = report["fidelity"]
    assert fidelity["compared"] == TOTAL and fidelity["not_routed_live"] == 0, fidelity
    assert fidelity["decided_live_under_another_rule_set"] == 0
    assert fidelity["same"] == TOTAL and fidelity["agreement"] == 1.0, fidelity["differences"][:5]
    assert fidelity["same_score"] == TOTAL  # the risk score too: 1 on an alert, the legit header's 0
    # The paths that could differ did run: records held for the terminal rule's look-ahead and released as fraud,
    # as the detector released them (the skimmer's first victims).
    live = {
        (a := decode(routed, m.value()))["transaction"]["transaction_id"]: a["rules"]
        for m in read_topic(routed, routed.fraud_topic)
    }
    assert {f"victim-{i}" for i in range(VICTIMS)} <= live.keys()
    assert live["victim-0"] == ["compromised_terminal"]
    assert report["sides"]["baseline"]["held"] > 0 and report["sides"]["baseline"]["held_then_alerted"] >= 1
    assert report["speed"]["records"] == TOTAL


def test_a_candidate_raising_the_large_amount_threshold_loses_the_alerts_a_hand_count_finds(routed, tmp_path):
    alerts = [decode(routed, m.value()) for m in read_topic(routed, routed.fraud_topic)]
    days = sorted({_day(a) for a in alerts})
    first, last = days[1], days[-1]  # the first day builds the state and is left out
    labels, _ = read_labels(routed)

    def in_window(alert) -> bool:
        return first <= _day(alert) <= last

    lost = {
        a["transaction"]["transaction_id"]
        for a in alerts
        if in_window(a) and a["rules"] == ["large_amount"] and a["transaction"]["amount_cents"] < NEW_THRESHOLD_CENTS
    }
    missed = {tx for tx in lost if labels[tx][0]}
    assert lost and missed  # the count below is not of nothing

    candidate = _candidate(tmp_path, f"[large_amount]\nthreshold_cents = {NEW_THRESHOLD_CENTS}\n")
    code, report = backtest(
        routed,
        tmp_path,
        "--rules",
        str(candidate),
        "--from",
        first.isoformat(),
        "--to",
        last.isoformat(),
        "--sample",
        "1000",
    )
    assert code == 0
    differences = report["differences"]
    assert differences["only_candidate"]["alerts"] == 0
    assert differences["only_baseline"]["alerts"] == len(lost)
    assert {row["transaction_id"] for row in differences["only_baseline"]["sample"]} == lost
    assert all(row["rules"] == ["large_amount"] for row in differences["only_baseline"]["sample"])
    assert differences["missed_frauds"] == len(missed)
    assert report["sides"]["candidate"]["alerts"] == report["sides"]["baseline"]["alerts"] - len(lost)
    assert report["sides"]["baseline"]["alerts"] == sum(in_window(a) for a in alerts)
    baseline_recall = report["sides"]["baseline"]["overall"]["scenarios"]["large_amount"]["recall"]
    assert report["sides"]["candidate"]["overall"]["scenarios"]["large_amount"]["recall"] < baseline_recall
    assert set(report["workload"]["candidate"]["per_day"]) == {d.isoformat() for d in days if first <= d <= last}
    # Both rule sets decided every batch on one computation of the card and terminal features: the counts above
    # (every other rule agreeing) were made with the sharing on.
    speed = report["speed"]
    assert (
        speed["feature_batches_computed"] >= 1 and speed["feature_batches_shared"] == speed["feature_batches_computed"]
    )

    # The other way round, with --baseline: the raised threshold as the baseline, the live one as the candidate.
    live_threshold = tmp_path / "live-threshold.toml"
    live_threshold.write_text("[large_amount]\nthreshold_cents = 90000\n")  # the seeded rule's (the default)
    code, reverse = backtest(
        routed,
        tmp_path,
        "--rules",
        str(live_threshold),
        "--baseline",
        str(candidate),
        "--from",
        first.isoformat(),
        "--to",
        last.isoformat(),
    )
    assert code == 0
    assert reverse["differences"]["only_candidate"]["alerts"] == len(lost)
    assert reverse["differences"]["only_baseline"]["alerts"] == 0 and reverse["differences"]["missed_frauds"] == 0
    assert reverse["baseline_source"].endswith(f"with {candidate} applied")


def test_a_candidate_file_that_does_not_parse_is_one_line(routed, tmp_path, capsys):
    candidate = _candidate(tmp_path, "[large_amount\nthreshold_cents = 1\n")
    code, report = backtest(routed, tmp_path, "--rules", str(candidate))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and report is None
    assert len(err) == 1 and "not valid TOML" in err[0] and "Traceback" not in err[0], err


def test_a_window_with_no_transactions_is_one_line_and_a_report_of_zero(routed, tmp_path, capsys):
    candidate = _candidate(tmp_path, "[large_amount]\nthreshold_cents = 300000\n")
    code, report = backtest(routed, tmp_path, "--rules", str(candidate), "--from", "2031-01-01", "--to", "2031-01-07")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "no transactions between 2031-01-01 and 2031-01-07" in err[0], err
    assert report["in_window"] == 0 and report["read"] == TOTAL
    assert report["sides"]["candidate"]["alerts"] == report["sides"]["baseline"]["alerts"] == 0


def test_a_topic_with_no_labels_reports_alerts_and_workload_only(stack_settings, tmp_path, capsys):
    settings = _fresh(stack_settings)
    produce(settings, count=2_000, rate=0, seed=5, speedup=SPEEDUP, labels=False)
    candidate = _candidate(tmp_path, "[large_amount]\nthreshold_cents = 300000\n")
    code, report = backtest(settings, tmp_path, "--rules", str(candidate))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "no labels" in err[0], err
    assert report["in_window"] == 2_000 and report["labels"] == 0
    baseline = report["sides"]["baseline"]
    assert baseline["overall"] is None and baseline["alerts"] > report["sides"]["candidate"]["alerts"]
    assert sum(report["workload"]["baseline"]["per_day"].values()) == baseline["alerts"]
