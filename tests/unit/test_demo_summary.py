"""The demo's summary of detection quality: recall per scenario and which rule caught what."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fraudstream.demo.options import DEFAULT_SPEEDUP, add_arguments
from fraudstream.demo.pipeline import producer_command
from fraudstream.demo.scoring import DemoState
from fraudstream.demo.summary import summary_lines
from fraudstream.demo.view import Frame
from fraudstream.records import FraudAlert, Label, Transaction
from fraudstream.settings import Settings

SETTINGS = Settings(transactions_topic="payments")
WHEN = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)


def tx(transaction_id: str) -> Transaction:
    return Transaction(
        transaction_id=transaction_id,
        account_id="acct-1",
        card_id="card-1",
        merchant_id="m",
        merchant_category="5411",
        terminal_id="t",
        amount_cents=1_000,
        event_time=WHEN,
        channel="CARD_PRESENT",
        country="US",
        city="Austin",
        latitude=30.3,
        longitude=-97.7,
    )


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def scored_state() -> DemoState:
    """10 card tests (9 caught by card_testing, one also by large_amount), 4 terminal victims (1 caught),
    2 genuine payments (1 flagged by large_amount); labels before and after the decisions."""
    state = DemoState()
    for i in range(10):
        state.on_label(Label(transaction_id=f"ct{i}", is_fraud=True, scenario="card_testing"))
    for i in range(9):
        state.on_fraud(
            FraudAlert(
                transaction=tx(f"ct{i}"),
                rules=("card_testing", "large_amount") if i == 0 else ("card_testing",),
                detected_at=WHEN,
            )
        )
    state.on_legit(tx("ct9"))
    for i in range(4):  # decisions first, labels after
        if i == 0:
            state.on_fraud(FraudAlert(transaction=tx(f"v{i}"), rules=("compromised_terminal",), detected_at=WHEN))
        else:
            state.on_legit(tx(f"v{i}"))
        state.on_label(Label(transaction_id=f"v{i}", is_fraud=True, scenario="compromised_terminal"))
    state.on_fraud(FraudAlert(transaction=tx("g0"), rules=("large_amount",), detected_at=WHEN))
    state.on_label(Label(transaction_id="g0", is_fraud=False, scenario="legit"))
    state.on_legit(tx("g1"))
    state.on_label(Label(transaction_id="g1", is_fraud=False, scenario="legit"))
    return state


def test_score_counts_recall_per_scenario_and_what_each_rule_caught() -> None:
    score = scored_state().score

    assert score.recall_by_scenario() == {"card_testing": (9, 10), "compromised_terminal": (1, 4)}
    assert score.by_rule == {
        "card_testing": {"card_testing": 9},
        "large_amount": {"card_testing": 1, "legit": 1},
        "compromised_terminal": {"compromised_terminal": 1},
    }


def test_summary_shows_recall_per_scenario_and_which_rule_caught_what() -> None:
    state = scored_state()
    frame = Frame(
        topic="payments",
        detectors=1,
        rate=1000,
        duration_s=60,
        elapsed_s=61.0,
        phase="done",
        state=state,
        in_per_s=0.0,
        out_per_s=0.0,
    )
    lines = summary_lines(frame, SETTINGS, extra_flags=[], log_dir=Path("/tmp/x"), stack_left_running=False)
    text = "\n".join(lines)

    assert "card_testing" in text and "90.0%  (9 of 10 caught)" in text
    assert "25.0%  (1 of 4 caught)" in text
    rule_lines = {
        line.split()[0]: line
        for line in lines[lines.index("  which rule caught what (a transaction may fire several rules):") + 1 :]
        if line.startswith("    ")
    }
    assert rule_lines["large_amount"].endswith("card_testing 1; false positives 1")
    assert rule_lines["card_testing"].endswith("card_testing 9; false positives 0")
    fields = dict(item.split("=", 1) for item in lines[-1].removeprefix("summary: ").split())
    assert fields["recall_card_testing"] == "0.9000" and fields["recall_compromised_terminal"] == "0.2500"


def test_the_demo_runs_the_producer_on_the_simulated_clock() -> None:
    default = producer_command(SETTINGS, parse_args())
    chosen = producer_command(SETTINGS, parse_args("--speedup", "60"))

    assert default[default.index("--speedup") + 1] == f"{DEFAULT_SPEEDUP:g}" == "3600"
    assert chosen[chosen.index("--speedup") + 1] == "60"


@pytest.mark.parametrize("bad", ["0", "-1", "fast", "inf", "nan"])
def test_a_bad_speedup_is_a_usage_error(bad: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args("--speedup", bad)
    assert "--speedup" in capsys.readouterr().err
