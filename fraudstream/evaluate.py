"""`fraudstream evaluate`: detection quality as the field measures it, from the topics themselves.

Reads the detector's outputs (`<topic>.legit`, `<topic>.fraud`) and the ground truth
(`<topic>.labels`), read_committed, joins them by transaction id, and reports per day and overall:

- precision, recall and F1 of the detector's decision (routed to fraud or not), overall and per
  fraud scenario (for a scenario: its transactions are the positives, legit ones the negatives,
  other scenarios' frauds are left out);
- AUC ROC, Average Precision (as scikit-learn defines them), and Card Precision@k as the Fraud
  Detection Handbook (Le Borgne et al., chapter 4) defines it: each day, a card's score is its
  highest transaction score that day, the k cards with the highest scores are investigated, and
  CP@k is the share of them that are compromised (of k); a card found compromised in a previous
  day's top k is left out of later days. Ties are broken by card id.

Like the Handbook's test set, transactions of cards already known compromised are left out of every
metric: a card is known compromised on a day once the label of one of its frauds has arrived by
that day's start (its event time plus the label delay, 7 days by default). As in the book, the
frauds that count are those since its training week (7 days) and the delay before the window's
first day: for the book's test week, 2018-07-25 onwards. Without --from, every fraud counts.

Ranking metrics need a score. Records carry one when the detector writes it (a `score` field in
FraudAlert, a `fraudstream.score` header on legit records, UTF-8 decimal text); when the outputs
carry none, the binary decision is the score (fraud 1, legit 0), and the report says so.

Writes a JSON file (the figures, with the Handbook's baselines beside ours) and, when matplotlib is
installed (`pip install 'fraudstream[evaluate]'`), a PNG next to it: the precision-recall curve and
CP@k per day. Days are UTC calendar days of the transactions' event times.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
from confluent_kafka import Consumer, KafkaError, TopicPartition
from fastavro import schemaless_reader

from fraudstream.consumer.inspect import StartOffset, _raise_if_fatal, console_schemas, plan_read
from fraudstream.errors import ConfigError, FraudstreamError
from fraudstream.kafka import consumer_config
from fraudstream.registry import Registry
from fraudstream.serde import DecodeError, split_frame
from fraudstream.settings import Settings

SCORE_HEADER = "fraudstream.score"
DEFAULT_TOP_K = 100
DEFAULT_LABEL_DELAY_DAYS = 7.0
DAY_MS = 86_400_000
LEGIT = "legit"
# The Handbook's offline baselines on its simulated data (chapters 3 and 5: trained 2018-07-25..31,
# tested 2018-08-08..14 after a 7-day delay, known-compromised cards removed from the test set).
HANDBOOK_BASELINES: tuple[dict[str, Any], ...] = (
    {"model": "logistic regression (Handbook)", "auc_roc": 0.871, "average_precision": 0.606, "card_precision": 0.291},
    {"model": "random forest (Handbook)", "auc_roc": 0.867, "average_precision": 0.658, "card_precision": 0.287},
    {"model": "XGBoost, tuned (Handbook)", "auc_roc": 0.869, "average_precision": 0.687, "card_precision": 0.303},
)
HANDBOOK_TEST_WEEK = (date(2018, 8, 8), date(2018, 8, 14))
TRAINING_WEEK_DAYS = 7  # the Handbook's training period, before the delay and the test week
READ_BATCH = 5_000
POLL_S = 0.5
EVALUATE_GROUP_ID = "fraudstream-evaluate"  # never joined nor committed (assign() only)


class NothingToEvaluate(FraudstreamError):
    """No routed transaction or no label: nothing can be measured."""


# ---------------------------------------------------------------- metrics (numpy, pure)
def precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """Precision, recall and F1 of binary predictions; None where undefined (nothing predicted, no positive)."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp = int(np.count_nonzero(y_true & y_pred))
    predicted, positives = int(np.count_nonzero(y_pred)), int(np.count_nonzero(y_true))
    precision = tp / predicted if predicted else None
    recall = tp / positives if positives else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); None without both classes."""
    y_true = np.asarray(y_true, dtype=bool)
    positives = int(np.count_nonzero(y_true))
    negatives = len(y_true) - positives
    if not positives or not negatives:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[y_true].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def precision_recall_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at each distinct score, from the highest threshold down."""
    y_true = np.asarray(y_true, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    ordered, hits = score[order], y_true[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]  # where each distinct score ends
    true_positives = np.cumsum(hits)[last_of_each]
    predicted = last_of_each + 1
    positives = true_positives[-1] if len(true_positives) else 0
    recall = true_positives / positives if positives else np.zeros(len(true_positives))
    return true_positives / predicted, recall, ordered[last_of_each]


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Sum over thresholds of (recall gained) x precision, as scikit-learn's average_precision_score; None without positives."""
    if not np.any(np.asarray(y_true, dtype=bool)):
        return None
    precision, recall, _ = precision_recall_curve(y_true, score)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def card_precision_at_k(
    day: np.ndarray, card: np.ndarray, score: np.ndarray, y_true: np.ndarray, k: int
) -> list[tuple[int, float, int]]:
    """The Handbook's CP@k, per day in increasing order: (day, CP@k, compromised cards that day).

    Per day, each card's score is its highest transaction score and it is compromised if any of its
    transactions is fraud; the k best-scored cards are taken (ties: the lower card code first), and
    CP@k is the compromised among them divided by k. Cards found in a day's top k are left out of
    the following days.
    """
    day, card = np.asarray(day), np.asarray(card)
    score, y_true = np.asarray(score, dtype=np.float64), np.asarray(y_true, dtype=bool)
    detected = np.zeros(int(card.max()) + 1 if len(card) else 0, dtype=bool)
    results = []
    for d in np.unique(day):
        rows = np.flatnonzero((day == d) & ~detected[card])
        cards, inverse = np.unique(card[rows], return_inverse=True)
        best = np.full(len(cards), -np.inf)
        np.maximum.at(best, inverse, score[rows])
        compromised = np.zeros(len(cards), dtype=bool)
        np.logical_or.at(compromised, inverse, y_true[rows])
        top = np.lexsort((cards, -best))[:k]
        found = cards[top][compromised[top]]
        detected[found] = True
        results.append((int(d), len(found) / k, int(np.count_nonzero(compromised))))
    return results


# ---------------------------------------------------------------- the evaluation (pure)
@dataclass(slots=True)
class Routed:
    """What the detector routed, one entry per transaction."""

    transaction_id: list[str] = field(default_factory=list)
    card_id: list[str] = field(default_factory=list)
    event_ms: list[int] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    score: list[float] = field(default_factory=list)  # NaN where the record carries none

    def add(self, transaction_id: str, card_id: str, event_ms: int, flagged: bool, score: float) -> None:
        self.transaction_id.append(transaction_id)
        self.card_id.append(card_id)
        self.event_ms.append(event_ms)
        self.flagged.append(flagged)
        self.score.append(score)


def evaluate(
    routed: Routed,
    labels: dict[str, tuple[bool, str]],
    *,
    top_k: int = DEFAULT_TOP_K,
    label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS,
    first_day: date | None = None,
    last_day: date | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The report (JSON-ready) and the curves behind the chart: precision/recall over the evaluated set."""
    warnings: list[str] = []
    n = len(routed.transaction_id)
    index = {tx: i for i, tx in enumerate(routed.transaction_id)}
    labelled = np.zeros(n, dtype=bool)
    is_fraud = np.zeros(n, dtype=bool)
    scenario_of = np.full(n, LEGIT, dtype=object)
    unseen = 0
    for tx, (fraud, scenario) in labels.items():
        i = index.get(tx)
        if i is None:
            unseen += 1
            continue
        labelled[i], is_fraud[i], scenario_of[i] = True, fraud, scenario
    if unseen:
        warnings.append(
            f"{unseen:,} labels name transactions that are not in the outputs (not routed yet, "
            "dead-lettered, or from another run): left out"
        )
    if labels and not labelled.all():
        warnings.append(
            f"{n - int(labelled.sum()):,} routed transactions have no label yet (labels arrive after "
            "their delay): left out"
        )

    event_ms = np.asarray(routed.event_ms, dtype=np.int64)
    flagged = np.asarray(routed.flagged, dtype=bool)
    raw_score = np.asarray(routed.score, dtype=np.float64)
    scored = int(np.count_nonzero(~np.isnan(raw_score)))
    if n and scored == n:
        score, score_source = raw_score, "score"
    else:
        score, score_source = flagged.astype(np.float64), "decision"
        if scored:
            warnings.append(f"only {scored:,} of {n:,} routed records carry a score: ranking on the binary decision")
    cards, card = (
        np.unique(np.asarray(routed.card_id, dtype=object), return_inverse=True)
        if n
        else (np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64))
    )
    day = event_ms // DAY_MS

    # Known compromised: a fraud of the card whose label had arrived by the start of the day, among the
    # frauds since the Handbook's training week and delay before the window (all of them without a window).
    delay_ms = round(label_delay_days * DAY_MS)
    known_from = np.full(len(cards), np.iinfo(np.int64).max, dtype=np.int64)
    frauds = labelled & is_fraud
    in_window = np.ones(n, dtype=bool)
    if first_day is not None:
        in_window &= day >= _day_number(first_day)
        frauds &= event_ms >= _day_number(first_day) * DAY_MS - delay_ms - TRAINING_WEEK_DAYS * DAY_MS
    np.minimum.at(known_from, card[frauds], event_ms[frauds] + delay_ms)
    known = known_from[card] < day * DAY_MS
    if last_day is not None:
        in_window &= day <= _day_number(last_day)
    rows = labelled & ~known & in_window

    y, pred, s = is_fraud[rows], flagged[rows], score[rows]
    scenarios = sorted(set(scenario_of[rows & is_fraud]))
    cp_per_day = card_precision_at_k(day[rows], card[rows], s, y, top_k)
    cp_by_day = {d: (cp, compromised) for d, cp, compromised in cp_per_day}

    def block(mask: np.ndarray) -> dict[str, Any]:
        yy, pp, ss = y[mask], pred[mask], s[mask]
        precision, recall, f1 = precision_recall_f1(yy, pp)
        return {
            "transactions": int(mask.sum()),
            "frauds": int(yy.sum()),
            "flagged": int(pp.sum()),
            "caught": int((yy & pp).sum()),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "auc_roc": roc_auc(yy, ss),
            "average_precision": average_precision(yy, ss),
        }

    def per_scenario(mask: np.ndarray) -> dict[str, Any]:
        out = {}
        legit = mask & ~y
        for name in scenarios:
            these = mask & y & (scenario_of[rows] == name)
            precision, recall, f1 = precision_recall_f1(y[these | legit], pred[these | legit])
            out[name] = {
                "frauds": int(these.sum()),
                "caught": int((these & pred).sum()),
                "precision": precision,
                "recall": recall,
                "f1": f1,
            }
        return out

    everything = np.ones(len(y), dtype=bool)
    overall = block(everything)
    overall["card_precision"] = float(np.mean([cp for _, cp, _ in cp_per_day])) if cp_per_day else None
    overall["scenarios"] = per_scenario(everything)
    days = []
    day_rows = day[rows]
    for d in np.unique(day_rows):
        mask = day_rows == d
        entry = {"day": _day_text(int(d)), **block(mask)}
        cp, compromised = cp_by_day[int(d)]
        entry["card_precision"], entry["compromised_cards"] = cp, compromised
        entry["scenarios"] = per_scenario(mask)
        days.append(entry)
    if not labels:
        warnings.insert(0, "no labels: precision, recall and the rest need the ground truth; only volumes reported")

    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "score_source": score_source,
        "score_note": (
            "ranking metrics on the records' risk scores"
            if score_source == "score"
            else "the outputs carry no risk score: ranking metrics use the binary decision (fraud 1, legit 0)"
        ),
        "top_k": top_k,
        "label_delay_days": label_delay_days,
        "window": {
            "from": _day_text(int(day_rows.min())) if len(day_rows) else None,
            "to": _day_text(int(day_rows.max())) if len(day_rows) else None,
        },
        "routed": n,
        "routed_flagged": int(flagged.sum()),
        "labels": len(labels),
        "labelled": int(labelled.sum()),
        "known_compromised_left_out": int((labelled & known & in_window).sum()),
        "evaluated": int(rows.sum()),
        "overall": overall,
        "days": days,
        "baselines": [
            {
                "model": "fraudstream (this run)",
                "auc_roc": overall["auc_roc"],
                "average_precision": overall["average_precision"],
                "card_precision": overall["card_precision"],
            },
            *HANDBOOK_BASELINES,
        ],
        "warnings": warnings,
    }
    curve_precision, curve_recall, _ = precision_recall_curve(y, s) if y.any() else (np.zeros(0), np.zeros(0), None)
    return report, {"precision": curve_precision, "recall": curve_recall}


def _day_number(day: date) -> int:
    return (day - date(1970, 1, 1)).days


def _day_text(day_number: int) -> str:
    return date.fromordinal(date(1970, 1, 1).toordinal() + day_number).isoformat()


# ---------------------------------------------------------------- rendering
def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: dict[str, Any], *, daily: bool = True) -> str:
    """The terminal table: ours beside the Handbook's baselines, then per scenario, then per day."""
    o = report["overall"]
    k = report["top_k"]
    lines = [
        f"routed {report['routed']:,} transactions ({report['routed_flagged']:,} to fraud); "
        f"{report['labels']:,} labels",
        f"evaluated {report['evaluated']:,} labelled transactions from {report['window']['from'] or '-'} to "
        f"{report['window']['to'] or '-'} ({report['known_compromised_left_out']:,} of cards already known "
        f"compromised left out; label delay {report['label_delay_days']:g} days)",
        f"scores: {report['score_note']}",
        "",
    ]
    lines.append(f"{'model':<32} {'AUC ROC':>8} {'AP':>8} {f'CP@{k}':>8}")
    for row in report["baselines"]:
        lines.append(
            f"{row['model']:<32} {_f(row['auc_roc']):>8} {_f(row['average_precision']):>8} "
            f"{_f(row['card_precision']):>8}"
        )
    lines += ["", f"{'scenario':<26} {'frauds':>8} {'caught':>8} {'precision':>9} {'recall':>8} {'F1':>8}"]
    lines.append(
        f"{'all':<26} {o['frauds']:>8,} {o['caught']:>8,} {_f(o['precision']):>9} {_f(o['recall']):>8} {_f(o['f1']):>8}"
    )
    for name, row in o["scenarios"].items():
        lines.append(
            f"{name:<26} {row['frauds']:>8,} {row['caught']:>8,} {_f(row['precision']):>9} "
            f"{_f(row['recall']):>8} {_f(row['f1']):>8}"
        )
    if daily and report["days"]:
        lines += [
            "",
            f"{'day':<10} {'tx':>8} {'frauds':>7} {'flagged':>7} {'prec.':>6} {'recall':>6} {'F1':>6} "
            f"{'AUC':>6} {'AP':>6} {f'CP@{k}':>6}",
        ]
        for d in report["days"]:
            lines.append(
                f"{d['day']:<10} {d['transactions']:>8,} {d['frauds']:>7,} {d['flagged']:>7,} "
                f"{_f(d['precision']):>6} {_f(d['recall']):>6} {_f(d['f1']):>6} {_f(d['auc_roc']):>6} "
                f"{_f(d['average_precision']):>6} {_f(d['card_precision']):>6}"
            )
    return "\n".join(lines)


def write_chart(report: dict[str, Any], curves: dict[str, np.ndarray], path: Path) -> bool:
    """Precision-recall curve and CP@k per day as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(curves["recall"]):
        # "pre": each precision holds over the recall it adds, so the area under the steps is the AP.
        left.step(
            np.r_[0.0, curves["recall"]],
            np.r_[curves["precision"][0], curves["precision"]],
            where="pre",
            label=f"ours (AP {_f(report['overall']['average_precision'])})",
        )
    left.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"Precision-recall ({report['score_source']})",
    )
    left.legend(loc="upper right")
    k = report["top_k"]
    days = [datetime.fromisoformat(d["day"]) for d in report["days"]]
    right.plot(days, [d["card_precision"] for d in report["days"]], marker=".", label="ours")
    for colour, baseline in enumerate(HANDBOOK_BASELINES, start=1):
        right.axhline(
            baseline["card_precision"],
            color=f"C{colour}",
            linestyle="--",
            linewidth=0.8,
            label=f"{baseline['model']} {baseline['card_precision']:.3f}",
        )
    right.set(ylabel=f"Card Precision@{k}", ylim=(0, 1), title=f"Card Precision@{k} per day")
    right.legend(loc="upper right", fontsize="small")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# ---------------------------------------------------------------- reading the topics
class _Schemas:
    """Writer schemas by id, fetched once; logical types stripped so timestamps stay epoch-millis longs."""

    def __init__(self, registry: Registry) -> None:
        self._schemas = console_schemas(registry.schema_by_id)

    def decode(self, value: bytes | None) -> dict[str, Any]:
        schema_id, payload = split_frame(value)
        try:
            # Records: a record schema reads to a dict.
            return cast(dict[str, Any], schemaless_reader(io.BytesIO(payload), self._schemas.get(schema_id), None))
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError("corrupt_avro", f"{type(exc).__name__}: {exc}") from None


def read_to_end(settings: Settings, topic: str, handle: Callable[[Any], None]) -> int:
    """Hand every committed record of the topic, up to its end when the read began, to handle(message)."""
    consumer = Consumer(
        consumer_config(
            settings,
            EVALUATE_GROUP_ID,
            **{
                "isolation.level": "read_committed",
                "enable.partition.eof": True,  # how a read_committed reader knows it reached the last stable offset
                "partition.assignment.strategy": "range",
            },
        )
    )
    read = 0
    try:
        plan = plan_read(consumer, topic, partition=None, start=StartOffset("earliest"), settings=settings)
        remaining = plan.unfinished()
        if not remaining:
            return 0
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in plan.starts.items()])
        while remaining:
            for message in consumer.consume(num_messages=READ_BATCH, timeout=POLL_S):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(message.partition())
                    else:
                        _raise_if_fatal(error)
                    continue
                p, offset = message.partition(), message.offset()
                assert p is not None and offset is not None  # a record, not an error: both are set
                if offset >= plan.ends[p]:
                    remaining.discard(p)
                    continue
                if offset + 1 >= plan.ends[p]:
                    remaining.discard(p)
                handle(message)
                read += 1
    finally:
        consumer.close()
    return read


def parse_score(headers: Sequence[tuple[str, bytes | None]] | None) -> float:
    """The legit record's score header as a float; NaN when absent or unreadable."""
    for name, value in headers or ():
        if name == SCORE_HEADER and value is not None:
            try:
                return float(value.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return math.nan
    return math.nan


def read_labels(settings: Settings, schemas: _Schemas | None = None) -> tuple[dict[str, tuple[bool, str]], int]:
    """The labels topic: transaction id -> (is fraud, scenario); and how many records could not be decoded."""
    schemas = schemas or _Schemas(Registry(settings))
    labels: dict[str, tuple[bool, str]] = {}
    undecodable = 0

    def on_label(message) -> None:
        nonlocal undecodable
        try:
            label = schemas.decode(message.value())
        except DecodeError:
            undecodable += 1
            return
        labels[label["transaction_id"]] = (bool(label["is_fraud"]), label["scenario"])

    read_to_end(settings, settings.labels_topic, on_label)
    return labels, undecodable


def read_pipeline(settings: Settings) -> tuple[Routed, dict[str, tuple[bool, str]], list[str]]:
    """The routed transactions, the labels, and one-line warnings about what could not be read."""
    schemas = _Schemas(Registry(settings))
    routed = Routed()
    seen: set[str] = set()
    problems = {"undecodable": 0, "duplicate": 0}

    def add(transaction: dict[str, Any], flagged: bool, score: float) -> None:
        tx = transaction["transaction_id"]
        if tx in seen:
            problems["duplicate"] += 1
            return
        seen.add(tx)
        routed.add(tx, transaction["card_id"], int(transaction["event_time"]), flagged, score)

    def on_legit(message) -> None:
        try:
            add(schemas.decode(message.value()), False, parse_score(message.headers()))
        except DecodeError:
            problems["undecodable"] += 1

    def on_fraud(message) -> None:
        try:
            alert = schemas.decode(message.value())
        except DecodeError:
            problems["undecodable"] += 1
            return
        score = alert.get("score")
        add(alert["transaction"], True, math.nan if score is None else float(score))

    read_to_end(settings, settings.legit_topic, on_legit)
    read_to_end(settings, settings.fraud_topic, on_fraud)
    labels, undecodable_labels = read_labels(settings, schemas)
    problems["undecodable"] += undecodable_labels
    warnings = []
    if problems["undecodable"]:
        warnings.append(f"{problems['undecodable']:,} records could not be decoded: left out")
    if problems["duplicate"]:
        warnings.append(
            f"{problems['duplicate']:,} transactions appear more than once in the outputs: "
            "counted once (a reader outside read_committed, or a detector without exactly-once?)"
        )
    return routed, labels, warnings


def read_shadow(settings: Settings, schemas: _Schemas | None = None) -> tuple[dict[str, bool], int]:
    """The shadow topic: transaction id -> the shadow rule set's verdict where it differed from the live one; and
    how many records could not be decoded."""
    schemas = schemas or _Schemas(Registry(settings))
    verdicts: dict[str, bool] = {}
    undecodable = 0

    def on_difference(message) -> None:
        nonlocal undecodable
        try:
            difference = schemas.decode(message.value())
        except DecodeError:
            undecodable += 1
            return
        verdicts[difference["transaction_id"]] = bool(difference["shadow_fraud"])

    read_to_end(settings, settings.shadow_topic, on_difference)
    return verdicts, undecodable


def as_shadow(routed: Routed, verdicts: dict[str, bool]) -> tuple[Routed, int, int]:
    """The routed transactions as the shadow rule set decided them: the live verdict, except where the shadow topic
    names another. A score that is the live rules' own (1.0 flagged, 0.0 not: no model) follows the verdict; a
    model's score is the same for both sets. Also: how many verdicts differ, and how many differences name a
    transaction not routed."""
    shadow = Routed(list(routed.transaction_id), list(routed.card_id), list(routed.event_ms), [], [])
    known = changed = 0
    for tx, flagged, score in zip(routed.transaction_id, routed.flagged, routed.score, strict=True):
        verdict = verdicts.get(tx, flagged)
        known += tx in verdicts
        changed += verdict != flagged
        shadow.flagged.append(verdict)
        shadow.score.append(float(verdict) if score == float(flagged) else score)
    return shadow, changed, len(verdicts) - known


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument(
        "--output",
        type=Path,
        default=Path("evaluation.json"),
        metavar="PATH",
        help="JSON report; the PNG chart goes next to it (same name, .png) [evaluation.json]",
    )
    parser.add_argument(
        "--from",
        dest="first_day",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="first day evaluated (UTC, event time) [the first routed]",
    )
    parser.add_argument(
        "--to",
        dest="last_day",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="last day evaluated, inclusive [the last routed]",
    )
    parser.add_argument(
        "--handbook-test-week",
        action="store_true",
        help=f"evaluate the Handbook's test week, {HANDBOOK_TEST_WEEK[0]} to {HANDBOOK_TEST_WEEK[1]}",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"cards investigated per day for Card Precision@K [{DEFAULT_TOP_K}]",
    )
    parser.add_argument(
        "--label-delay",
        type=float,
        default=DEFAULT_LABEL_DELAY_DAYS,
        metavar="DAYS",
        help="days until a fraud's label arrives, which makes its card known compromised "
        f"[{DEFAULT_LABEL_DELAY_DAYS:g}]",
    )
    parser.add_argument(
        "--no-daily", dest="daily", action="store_false", help="leave the per-day rows out of the table"
    )
    parser.add_argument(
        "--shadow",
        action="store_true",
        help="also evaluate the shadow rule set (`fraudstream rules shadow set`) from the differences on the "
        "shadow topic, side by side with the live rules; its report goes to OUTPUT's name with -shadow",
    )
    add_connection_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("fraudstream.librdkafka").setLevel(logging.CRITICAL)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {args.top_k}")
    if args.label_delay < 0:
        raise ConfigError(f"--label-delay must not be negative, not {args.label_delay}")
    first, last = HANDBOOK_TEST_WEEK if args.handbook_test_week else (args.first_day, args.last_day)
    routed, labels, read_warnings = read_pipeline(settings)
    if not routed.transaction_id:
        raise NothingToEvaluate(
            f"no routed transactions on {settings.legit_topic} or {settings.fraud_topic}"
            + (f" ({len(labels):,} labels on {settings.labels_topic})" if labels else "")
            + ": run fraudstream detect first"
        )
    report, curves = evaluate(
        routed, labels, top_k=args.top_k, label_delay_days=args.label_delay, first_day=first, last_day=last
    )
    report["warnings"] = read_warnings + report["warnings"]
    report["topics"] = {"legit": settings.legit_topic, "fraud": settings.fraud_topic, "labels": settings.labels_topic}
    reports = [(report, curves, args.output)]
    if args.shadow:
        verdicts, undecodable = read_shadow(settings)
        shadow_routed, flips, unrouted = as_shadow(routed, verdicts)
        shadow_report, shadow_curves = evaluate(
            shadow_routed, labels, top_k=args.top_k, label_delay_days=args.label_delay, first_day=first, last_day=last
        )
        shadow_report["shadow"] = {
            "differences": len(verdicts),
            "verdicts_changed": flips,
            "topic": settings.shadow_topic,
        }
        shadow_report["warnings"] = [
            *([f"{undecodable:,} shadow records could not be decoded: left out"] if undecodable else []),
            *([f"{unrouted:,} shadow differences name a transaction not routed: left out"] if unrouted else []),
            *shadow_report["warnings"],
        ]
        report["shadow"] = shadow_report["shadow"]
        reports.append((shadow_report, shadow_curves, args.output.with_name(f"{args.output.stem}-shadow.json")))
    for i, (each, each_curves, output) in enumerate(reports):
        if args.shadow:
            print(
                "live rules"
                if i == 0
                else f"\nshadow rules ({len(verdicts):,} differences on {settings.shadow_topic})",
                flush=True,
            )
        print(render(each, daily=args.daily), flush=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(each, indent=2) + "\n")
        chart = output.with_suffix(".png")
        wrote_chart = bool(each["days"]) and write_chart(each, each_curves, chart)
        print(
            f"\nwrote {output}"
            + (
                f" and {chart}"
                if wrote_chart
                else " (no chart: install matplotlib, pip install 'fraudstream[evaluate]')"
                if each["days"]
                else ""
            ),
            flush=True,
        )
        for warning in each["warnings"]:
            print(f"fraudstream evaluate: warning: {warning}", file=sys.stderr)
    return 0 if labels else 1
