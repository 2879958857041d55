"""The backtest's report (fraudstream/backtest.py) from decisions made up here, and the replay's gate
(consumer/backtest.py): no broker."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np

from fraudstream.backtest import BASELINE, CANDIDATE, build_report, fidelity, render, window_mask
from fraudstream.consumer.backtest import ReadProgress, ReplayResult, ReplayTerminal, position_key
from fraudstream.consumer.rules import load_rules
from fraudstream.consumer.terminal import TERMINAL_TOLERANCE_MS, TerminalWindow

L, F, D = 0, 1, 2  # legit, fraud, dead letter


def _ms(day: int, hour: int = 12) -> int:
    return int(datetime(2026, 1, day, hour, tzinfo=UTC).timestamp() * 1000)


# (transaction, card, event time, candidate route, baseline route, label)
ROWS = [
    ("t0", "c0", _ms(4), L, F, (True, "large_amount")),  # before the window: builds state, left out
    ("t1", "c1", _ms(5), F, F, (True, "card_testing")),
    ("t2", "c2", _ms(5), L, F, (True, "large_amount")),  # a fraud the candidate misses
    ("t3", "c3", _ms(5), L, F, (False, "legit")),  # a false alert the candidate spares
    ("t4", "c4", _ms(6), F, L, (False, "legit")),  # a false alert only the candidate raises
    ("t5", "c5", _ms(6), L, L, (False, "legit")),
    ("t6", None, -1, D, D, None),  # dead-lettered: no transaction
    ("t7", "c7", _ms(6), L, L, None),  # no label yet
]


def _result(rows=ROWS) -> ReplayResult:
    n = len(rows)
    position = np.array([position_key(i % 2, i) for i in range(n)], dtype=np.uint64)
    fired = {CANDIDATE: {}, BASELINE: {}}
    for i, (_, _, _, cand, base, label) in enumerate(rows):
        for side, route in ((CANDIDATE, cand), (BASELINE, base)):
            if route == F:
                fired[side][int(position[i])] = (
                    ("card_testing",) if label and label[1] == "card_testing" else ("large_amount",)
                )
    rules = load_rules(None)
    return ReplayResult(
        topic="payments",
        position=position,
        transaction_id=np.array([r[0] if r[3] != D else None for r in rows], dtype=object),
        card_id=np.array([r[1] for r in rows], dtype=object),
        event_ms=np.array([r[2] for r in rows], dtype=np.int64),
        sides={
            CANDIDATE: {
                "route": np.array([r[3] for r in rows], np.int8),
                "score": np.array([float(r[3] == F) for r in rows]),
            },
            BASELINE: {
                "route": np.array([r[4] for r in rows], np.int8),
                "score": np.array([float(r[4] == F) for r in rows]),
            },
        },
        fired=fired,
        rule_sets={CANDIDATE: rules, BASELINE: rules},
        held={CANDIDATE: 0, BASELINE: 2},
        held_then_alerted={CANDIDATE: 0, BASELINE: 1},
        read=n,
        decide_s=0.5,
        read_s=1.0,
    )


LABELS = {r[0]: r[5] for r in ROWS if r[5] is not None}


def test_the_alerts_only_one_side_raises_are_counted_with_their_frauds_within_the_window() -> None:
    report, warnings = build_report(_result(), LABELS, first_day=date(2026, 1, 5), last_day=date(2026, 1, 6))
    assert warnings == []
    assert report["in_window"] == 6  # t1..t5 and t7; t0 before the window, t6 a dead letter
    only_baseline, only_candidate = report["differences"]["only_baseline"], report["differences"]["only_candidate"]
    assert only_baseline["alerts"] == 2 and only_baseline["frauds"] == 1  # t2 (fraud) and t3; not t0
    assert only_baseline["frauds_by_scenario"] == {"large_amount": 1}
    assert [(r["transaction_id"], r["label"], r["rules"]) for r in only_baseline["sample"]] == [
        ("t2", "large_amount", ["large_amount"]),
        ("t3", "legit", ["large_amount"]),
    ]
    assert only_candidate["alerts"] == 1 and only_candidate["frauds"] == 0
    assert report["differences"]["missed_frauds"] == 1
    assert report["workload"][BASELINE]["per_day"] == {"2026-01-05": 3, "2026-01-06": 0}
    assert report["workload"][CANDIDATE]["per_day"] == {"2026-01-05": 1, "2026-01-06": 1}
    assert report["sides"][BASELINE]["alerts"] == 3 and report["sides"][CANDIDATE]["alerts"] == 2
    baseline = report["sides"][BASELINE]["overall"]
    assert baseline["scenarios"]["large_amount"]["recall"] == 1.0
    assert report["sides"][CANDIDATE]["overall"]["scenarios"]["large_amount"]["recall"] == 0.0
    assert report["sides"][BASELINE]["held"] == 2
    assert "frauds the candidate misses that the baseline catches: 1" in render(report)


def test_no_labels_still_reports_alerts_and_workload() -> None:
    report, warnings = build_report(_result(), {}, first_day=None, last_day=None)
    assert len(warnings) == 1 and warnings[0].startswith("no labels")
    assert report["sides"][BASELINE]["overall"] is None and report["sides"][BASELINE]["alerts"] == 4
    assert sum(report["workload"][BASELINE]["per_day"].values()) == 4
    assert report["differences"]["only_baseline"]["unlabelled"] == 3
    render(report)  # a table with dashes where figures need labels


def test_a_window_with_no_transactions_says_what_the_topic_holds() -> None:
    report, warnings = build_report(_result(), LABELS, first_day=date(2027, 1, 1), last_day=date(2027, 1, 2))
    assert warnings == [
        "no transactions between 2027-01-01 and 2027-01-02 on payments (it holds 7 from 2026-01-04 to 2026-01-06)"
    ]
    assert report["in_window"] == 0 and report["sides"][CANDIDATE]["alerts"] == 0


def test_fidelity_names_each_difference_and_counts_what_it_could_not_compare() -> None:
    result = _result()
    version = result.rule_sets[BASELINE].version
    outputs = {
        "t1": (True, ("card_testing",), version, 1.0, ""),
        "t2": (True, ("large_amount",), version, 1.0, ""),
        "t3": (True, ("compromised_terminal",), version, 1.0, "0,2"),  # released early; the backtest: large_amount
        "t4": (False, (), version, 0.5, ""),  # the same decision, another score (the backtest's: 0)
        "t5": (True, ("large_amount",), version, 1.0, ""),  # the backtest says legit
        "t7": (False, (), "another", 0.0, ""),
    }  # t0 before the window; no output for none of the rest
    everything = window_mask(result.event_ms, date(2026, 1, 5), None)
    found = fidelity(result, outputs, side=BASELINE, in_window=everything)
    assert (found["compared"], found["same"], found["different"], found["same_score"]) == (5, 3, 2, 2)
    assert found["decided_live_under_another_rule_set"] == 1 and found["not_routed_live"] == 0
    assert {d["transaction_id"]: d["cause"].split(" ")[0] for d in found["differences"]} == {
        "t3": "released",
        "t5": "unexplained",
    }
    assert "partitions 0,2 " in found["differences"][0]["cause"]
    assert found["differences"][1]["live"] == {"fraud": True, "rules": ["large_amount"]}
    assert found["differences"][1]["backtest"] == {"fraud": False, "rules": []}
    assert found["agreement"] == 3 / 5


def test_the_replay_gate_waits_for_every_partition_unless_it_has_ended() -> None:
    progress = ReadProgress([0, 1, 2])
    progress.latest = {0: 10_000, 1: 5_000}
    assert progress.past_everywhere(np.array([4_000])).tolist() == [False]  # partition 2 not read yet
    progress.finished = {2}
    assert progress.past_everywhere(np.array([4_000, 5_000, 9_000])).tolist() == [True, False, False]
    assert progress.floor() == 5_000 - TERMINAL_TOLERANCE_MS  # the earliest a record still to read may be
    terminal = ReplayTerminal(TerminalWindow(), progress)
    # A held record is due once every partition is past its time, the look-ahead and the tolerance.
    ahead = 1_000
    due = terminal.releasable(
        np.array([5_000 - ahead - TERMINAL_TOLERANCE_MS - 1, 5_000 - ahead - TERMINAL_TOLERANCE_MS]),
        np.zeros(2, np.int64),
        ahead,
        2_000,
    )
    assert due.tolist() == [True, False]
    progress.finished = {0, 1, 2}
    assert terminal.releasable(np.array([10**12]), np.zeros(1, np.int64), ahead, 2_000).tolist() == [True]


class CountingBooster:
    """A booster whose score is the row's sum; counts predict calls and their threads."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, matrix, num_threads):
        self.calls.append(num_threads)
        return np.nansum(matrix, axis=1)


def test_the_model_scores_a_batch_once_for_every_rule_set_and_only_an_equal_matrix_is_served_again() -> None:
    from fraudstream.consumer.backtest import SharedScores
    from fraudstream.consumer.model import Model

    booster = CountingBooster()
    shared = SharedScores(Model(booster, {"threshold": 0.5}), threads=2)
    batch = np.array([[1.0, np.nan], [2.0, 3.0]])
    first = shared.score(batch)
    again = shared.score(batch.copy())  # the second rule set's decider: the same features, NaN included
    assert again is first and booster.calls == [2] and (shared.scored, shared.shared) == (1, 1)
    other = batch.copy()
    other[1, 1] = 4.0
    assert shared.score(other).tolist() == [1.0, 6.0] and len(booster.calls) == 2  # a different matrix: scored
    assert shared.threshold == 0.5 and (shared.scored, shared.shared) == (2, 1)
