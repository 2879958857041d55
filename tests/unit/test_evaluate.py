"""The evaluator's metrics against scikit-learn's, the Handbook's Card Precision@k, and the report on bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics

from fraudstream import evaluate as ev
from fraudstream.evaluate import Routed, average_precision, card_precision_at_k, precision_recall_curve, roc_auc

DAY = ev.DAY_MS


def fixed_vectors():
    """Fixed label/score vectors: random with ties, all tied, perfect, inverted, binary decisions."""
    rng = np.random.default_rng(2024)
    y = rng.random(3_000) < 0.02
    yield "rounded scores with ties", y, np.round(rng.random(3_000) * 0.6 + y * 0.35, 2)
    yield "all scores tied", y, np.full(3_000, 0.5)
    yield "perfect ranking", y, y.astype(float)
    yield "inverted ranking", y, 1.0 - y
    yield "binary decisions", y, (rng.random(3_000) < 0.05).astype(float)
    yield (
        "small hand-made",
        np.array([1, 0, 1, 1, 0, 0, 0, 1], bool),
        np.array([0.9, 0.9, 0.8, 0.3, 0.3, 0.3, 0.1, 0.05]),
    )


@pytest.mark.parametrize("name, y, score", list(fixed_vectors()), ids=[v[0] for v in fixed_vectors()])
def test_auc_and_average_precision_match_scikit_learn(name, y, score):
    assert roc_auc(y, score) == pytest.approx(metrics.roc_auc_score(y, score), abs=1e-12)
    assert average_precision(y, score) == pytest.approx(metrics.average_precision_score(y, score), abs=1e-12)
    precision, recall, thresholds = precision_recall_curve(y, score)
    sk_precision, sk_recall, sk_thresholds = metrics.precision_recall_curve(y, score)
    # scikit-learn lists thresholds upwards and appends the (recall 0, precision 1) end point.
    assert np.allclose(precision, sk_precision[:-1][::-1]) and np.allclose(recall, sk_recall[:-1][::-1])
    assert np.allclose(thresholds, sk_thresholds[::-1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_precision_recall_f1_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y, pred = rng.random(2_000) < 0.05, rng.random(2_000) < 0.08
    ours = ev.precision_recall_f1(y, pred)
    assert ours == pytest.approx(
        (metrics.precision_score(y, pred), metrics.recall_score(y, pred), metrics.f1_score(y, pred)), abs=1e-12
    )


def test_undefined_metrics_are_none_not_zero():
    y = np.zeros(5, bool)
    assert roc_auc(y, np.arange(5.0)) is None and average_precision(y, np.arange(5.0)) is None
    assert ev.precision_recall_f1(np.array([True, False]), np.array([False, False])) == (None, 0.0, None)


def test_card_precision_follows_the_handbook():
    # Day 0: cards 1..4; card 1 has its best score 0.9 on a legit transaction and a fraud at 0.1: the
    # card's score is its max and it counts as compromised. k = 2 -> top cards 1 (0.9) and 2 (0.8,
    # fraud) -> 2/2. Day 1: cards 1 and 2 were found on day 0, so they are left out, even with the top
    # scores; top 2 of {3 (0.7, legit), 4 (0.6, fraud)} -> 1/2. Day 2: only card 5 left: 0 of k=2.
    day = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    card = np.array([1, 1, 2, 3, 4, 1, 2, 3, 4, 5])
    score = np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.99, 0.98, 0.7, 0.6, 0.5])
    fraud = np.array([0, 1, 1, 0, 0, 1, 1, 0, 1, 0], bool)
    assert card_precision_at_k(day, card, score, fraud, 2) == [(0, 1.0, 2), (1, 0.5, 1), (2, 0.0, 0)]


def test_card_precision_breaks_ties_by_card():
    day = np.zeros(4, int)
    card = np.array([7, 3, 5, 9])
    fraud = np.array([True, False, False, False])
    assert card_precision_at_k(day, card, np.zeros(4), fraud, 1) == [(0, 0.0, 1)]  # card 3 comes first
    assert card_precision_at_k(day, np.array([1, 3, 5, 9]), np.zeros(4), fraud, 1) == [(0, 1.0, 1)]


def routed(rows) -> Routed:
    r = Routed()
    for tx, card, event_ms, flagged, score in rows:
        r.add(tx, card, event_ms, flagged, score)
    return r


def test_cards_known_compromised_are_left_out_once_their_label_has_arrived():
    # Card A's fraud on day 0 becomes known on day 2 with a 1-day delay (labels arrive by day 1 at 10:00,
    # after day 1 started), so A's day-2 transactions are left out but its day-1 ones are not.
    rows = [
        ("t1", "A", 10 * 3_600_000, True, math.nan),
        ("t2", "A", DAY + 1, False, math.nan),
        ("t3", "A", 2 * DAY + 1, True, math.nan),
        ("t4", "B", 2 * DAY + 5, False, math.nan),
    ]
    labels = {"t1": (True, "s"), "t2": (False, "legit"), "t3": (True, "s"), "t4": (False, "legit")}
    report, _ = ev.evaluate(routed(rows), labels, top_k=1, label_delay_days=1)
    assert report["evaluated"] == 3 and report["known_compromised_left_out"] == 1
    assert [d["day"] for d in report["days"]] == ["1970-01-01", "1970-01-02", "1970-01-03"]
    assert report["days"][2]["transactions"] == 1  # only B
    assert report["score_source"] == "decision" and "binary decision" in report["score_note"]
    assert report["overall"]["precision"] == 1.0 and report["overall"]["recall"] == 1.0


def test_scores_are_used_when_every_record_carries_one():
    rows = [(f"t{i}", f"c{i}", i, i % 3 == 0, i / 10) for i in range(10)]
    labels = {f"t{i}": (i >= 7, "s" if i >= 7 else "legit") for i in range(10)}
    report, curves = ev.evaluate(routed(rows), labels, top_k=3, label_delay_days=0)
    assert report["score_source"] == "score"
    assert report["overall"]["auc_roc"] == 1.0 and report["overall"]["average_precision"] == 1.0
    assert report["overall"]["card_precision"] == 1.0  # top 3 cards are the three frauds
    assert len(curves["recall"]) == 10
    # One record without a score: back to the binary decision, with a warning.
    rows[4] = ("t4", "c4", 4, False, math.nan)
    report, _ = ev.evaluate(routed(rows), labels, top_k=3, label_delay_days=0)
    assert report["score_source"] == "decision"
    assert any("only 9 of 10 routed records carry a score" in w for w in report["warnings"])


def test_per_scenario_precision_counts_legit_false_positives_against_each_scenario():
    rows = [
        ("a", "c1", 0, True, math.nan),
        ("b", "c2", 0, False, math.nan),
        ("c", "c3", 0, True, math.nan),
        ("d", "c4", 0, True, math.nan),
        ("e", "c5", 0, False, math.nan),
    ]
    labels = {"a": (True, "s1"), "b": (True, "s1"), "c": (True, "s2"), "d": (False, "legit"), "e": (False, "legit")}
    report, _ = ev.evaluate(routed(rows), labels, label_delay_days=0)
    s1, s2 = report["overall"]["scenarios"]["s1"], report["overall"]["scenarios"]["s2"]
    assert (s1["frauds"], s1["caught"], s1["precision"], s1["recall"]) == (2, 1, 0.5, 0.5)
    assert (s2["frauds"], s2["caught"], s2["precision"], s2["recall"]) == (1, 1, 0.5, 1.0)
    assert report["overall"]["precision"] == pytest.approx(2 / 3)


def test_bad_input_is_one_line_each_and_the_report_still_comes():
    rows = [("t1", "A", 0, True, math.nan), ("t2", "B", 0, False, math.nan)]
    report, _ = ev.evaluate(routed(rows), {"t1": (True, "s"), "zz": (False, "legit")}, label_delay_days=0)
    assert report["warnings"] == [
        "1 labels name transactions that are not in the outputs (not routed yet, dead-lettered, or from another run): "
        "left out",
        "1 routed transactions have no label yet (labels arrive after their delay): left out",
    ]
    assert report["evaluated"] == 1 and report["overall"]["recall"] == 1.0
    report, _ = ev.evaluate(routed(rows), {}, label_delay_days=0)
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith("no labels")
    assert report["routed"] == 2 and report["routed_flagged"] == 1
    text = ev.render(report)
    assert "routed 2 transactions (1 to fraud); 0 labels" in text


def test_the_table_puts_the_handbook_baselines_beside_ours_and_the_chart_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        (f"t{i}", f"c{i % 300}", (i % 5) * DAY + i, bool(rng.random() < 0.1), float(rng.random())) for i in range(2_000)
    ]
    labels = {f"t{i}": (bool(rng.random() < 0.05), "hb") for i in range(2_000)}
    report, curves = ev.evaluate(routed(rows), labels, label_delay_days=0)
    table = ev.render(report)
    assert "XGBoost, tuned (Handbook)           0.869    0.687    0.303" in table
    assert f"fraudstream (this run)              {report['overall']['auc_roc']:.3f}" in table
    assert len(report["days"]) == 5 and all(d["card_precision"] is not None for d in report["days"])
    path = tmp_path / "eval.png"
    assert ev.write_chart(report, curves, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_with_a_window_only_frauds_since_the_handbooks_training_week_make_a_card_known():
    # Window from day 20, delay 1 day: frauds count from day 20 - 1 - 7 = day 12 on, as the book's
    # training week does. A's fraud on day 5 is older, so A's day-20 transaction stays; B's on day 13 counts.
    rows = [
        ("a5", "A", 5 * DAY + 1, False, math.nan),
        ("b13", "B", 13 * DAY + 1, False, math.nan),
        ("a20", "A", 20 * DAY + 1, False, math.nan),
        ("b20", "B", 20 * DAY + 1, False, math.nan),
    ]
    labels = {"a5": (True, "s"), "b13": (True, "s"), "a20": (False, "legit"), "b20": (False, "legit")}
    first = ev.date(1970, 1, 21)
    report, _ = ev.evaluate(routed(rows), labels, label_delay_days=1, first_day=first, last_day=first)
    assert (report["evaluated"], report["known_compromised_left_out"]) == (1, 1)
    report, _ = ev.evaluate(routed(rows), labels, label_delay_days=1)  # no window: every fraud counts
    assert report["known_compromised_left_out"] == 2


def test_the_shadow_view_takes_the_live_verdicts_except_where_the_shadow_topic_names_another() -> None:
    from fraudstream.evaluate import Routed, as_shadow

    routed = Routed()
    routed.add("a", "c1", 0, False, 0.0)  # rules score (no model): it follows the verdict
    routed.add("b", "c2", 0, True, 1.0)
    routed.add("c", "c3", 0, False, 0.37)  # a model's score: the same for both sets
    shadow, changed, unrouted = as_shadow(routed, {"a": True, "c": True, "b": True, "zzz": False})
    assert shadow.flagged == [True, True, True] and shadow.score == [1.0, 1.0, 0.37]
    assert (changed, unrouted) == (2, 1)  # "b" agrees with live; "zzz" was not routed
    assert routed.flagged == [False, True, False]  # the live view is left as it was
