"""`fraudstream train`: a model for `detect --model`, trained on the topics themselves.

It reads `<topic>` (the transactions, every partition from its beginning, read_committed) and
`<topic>.labels`, and computes each transaction's features with the detector's own code: the card
features (`card_features`, the Handbook's per-customer windows among them) over one card table fed in
each partition's offset order, and `model.model_features` with a LabelTable of the labels, which uses
a label only once its event time plus the label delay is at or before the transaction's (as online).
The rows of the training window, with their labels, train a LightGBM classifier; the model file (JSON
header with the format version, feature list, training window and threshold, then LightGBM's text
model) is what `detect --model` loads.

Training and evaluation must not overlap: train on a window that ends at least the label delay before
the first evaluated day (the Handbook: train 2018-07-25..31, test 2018-08-08..14).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
from fastavro import schemaless_reader

from fraudstream.consumer import model as scoring
from fraudstream.consumer.features import DAY_MS, PROFILE_DTYPE, TxColumns, card_features
from fraudstream.consumer.inspect import console_schemas
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.errors import ConfigError, FraudstreamError
from fraudstream.evaluate import average_precision, precision_recall_curve, read_to_end, roc_auc
from fraudstream.registry import Registry
from fraudstream.serde import DecodeError, split_frame
from fraudstream.settings import Settings

HANDBOOK_TRAIN_WEEK = (date(2018, 7, 25), date(2018, 7, 31))
CHUNK = 20_000  # transactions per feature batch
# LightGBM's parameters: shallow trees, a slow learning rate, deterministic on one machine. Chosen on a
# validation split before the Handbook's weeks (train 2018-07-11..17, validate 2018-07-25..31), never on its test week.
PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.02,
    "num_leaves": 15,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 2,
    "verbose": -1,
}
ROUNDS = 600


class NothingToTrain(FraudstreamError):
    """No labelled transaction (or no fraud) in the training window."""


@dataclass
class TrainingSet:
    features: np.ndarray  # (rows, len(MODEL_FEATURES)), float32
    target: np.ndarray  # bool
    transaction_ids: np.ndarray  # object
    seen: int  # transactions read (all days: the card state needs them)
    unlabelled: int  # in the window, without a label


class TrainingSetBuilder:
    """Feeds batches (in offset order per partition: a card's records in order) through the card features,
    and keeps the model's features of the labelled transactions with event time in [first_ms, end_ms)."""

    def __init__(
        self, labels: scoring.LabelTable, targets: dict[str, bool], *, first_ms: int, end_ms: int, label_delay_ms: int
    ) -> None:
        self.labels, self.targets = labels, targets
        self.first_ms, self.end_ms, self.label_delay_ms = first_ms, end_ms, label_delay_ms
        self.cards = KeyedTable(PROFILE_DTYPE, capacity=1 << 14)
        self.parts: list[np.ndarray] = []
        self.target: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.seen = self.unlabelled = 0

    def add(self, tx: TxColumns) -> None:
        self.seen += len(tx)
        features = card_features(self.cards, tx)  # every transaction: the card state needs them all
        rows = np.flatnonzero((tx.event_time_ms >= self.first_ms) & (tx.event_time_ms < self.end_ms))
        if not len(rows):
            return
        known = np.fromiter((t in self.targets for t in tx.transaction_id[rows]), bool, len(rows))
        self.unlabelled += int(len(rows) - known.sum())
        rows = rows[known]
        if not len(rows):
            return
        window = tx.take(rows)
        self.parts.append(
            scoring.model_features(window, {k: v[rows] for k, v in features.items()}, self.labels, self.label_delay_ms)
        )
        self.target.append(np.fromiter((self.targets[t] for t in window.transaction_id), bool, len(rows)))
        self.ids.append(window.transaction_id)

    def result(self) -> TrainingSet:
        width = len(scoring.MODEL_FEATURES)
        return TrainingSet(
            np.concatenate(self.parts) if self.parts else np.zeros((0, width), np.float32),
            np.concatenate(self.target) if self.target else np.zeros(0, bool),
            np.concatenate(self.ids) if self.ids else np.zeros(0, object),
            self.seen,
            self.unlabelled,
        )


def training_set(
    batches: Iterable[TxColumns],
    labels: scoring.LabelTable,
    targets: dict[str, bool],
    *,
    first_ms: int,
    end_ms: int,
    label_delay_ms: int,
) -> TrainingSet:
    """Features of the transactions with event time in [first_ms, end_ms) that have a label, computed as the
    detector computes them. `batches` come in offset order per partition (a card's records in order)."""
    builder = TrainingSetBuilder(labels, targets, first_ms=first_ms, end_ms=end_ms, label_delay_ms=label_delay_ms)
    for tx in batches:
        builder.add(tx)
    return builder.result()


def fit(data: TrainingSet, *, seed: int = 42, rounds: int = ROUNDS) -> tuple[Any, float]:
    """A LightGBM booster and its threshold: the score with the best F1 on the training rows."""
    import lightgbm

    dataset = lightgbm.Dataset(
        data.features, data.target.astype(np.float64), feature_name=list(scoring.MODEL_FEATURES), free_raw_data=False
    )
    booster = lightgbm.train({**PARAMS, "seed": seed}, dataset, num_boost_round=rounds)
    score = np.asarray(booster.predict(data.features, num_threads=1))
    precision, recall, thresholds = precision_recall_curve(data.target, score)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    return booster, float(thresholds[int(np.argmax(f1))])


# ---------------------------------------------------------------- reading the topics
def read_labels(settings: Settings, schemas, first_ms: int, end_ms: int) -> tuple[scoring.LabelTable, dict[str, bool]]:
    """Every label into a LabelTable, and the targets of those whose transaction is in the window."""
    table = scoring.LabelTable()
    targets: dict[str, bool] = {}
    pending: list[tuple[Any, Any, bool, str]] = []

    def on_label(message) -> None:
        try:
            label = _decode(schemas, message.value())
        except DecodeError:
            return
        event_ms = label.get("event_time")
        pending.append((label.get("terminal_id"), event_ms, bool(label["is_fraud"]), label["transaction_id"]))
        if event_ms is None or first_ms <= event_ms < end_ms:
            targets[label["transaction_id"]] = bool(label["is_fraud"])
        if len(pending) >= CHUNK:
            flush()

    def flush() -> None:
        if pending:
            terminals, times, frauds, transactions = zip(*pending, strict=True)
            table.add(terminals, times, frauds, transactions)  # the latest label of a transaction wins
            pending.clear()

    read_to_end(settings, settings.labels_topic, on_label)
    flush()
    return table, targets


def read_transactions(settings: Settings, schemas, sink: Callable[[TxColumns], None]) -> int:
    """The transactions topic to sink(TxColumns) in batches (read_to_end keeps each partition in offset
    order); returns how many records could not be decoded (the detector dead-letters those)."""
    records: list[dict] = []
    undecodable = 0

    def on_transaction(message) -> None:
        nonlocal undecodable
        try:
            records.append(_decode(schemas, message.value()))
        except DecodeError:
            undecodable += 1  # the detector dead-letters these: they have no features either
            return
        if len(records) >= CHUNK:
            sink(TxColumns.from_records(records))
            records.clear()

    read_to_end(settings, settings.transactions_topic, on_transaction)
    if records:
        sink(TxColumns.from_records(records))
    return undecodable


def _decode(schemas, value: bytes | None) -> dict:
    schema_id, payload = split_frame(value)
    try:
        # Records: a record schema reads to a dict.
        return cast(dict, schemaless_reader(io.BytesIO(payload), schemas.get(schema_id), None))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError("corrupt_avro", f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument(
        "--output",
        type=Path,
        default=Path("model.txt"),
        metavar="PATH",
        help="the model file, for detect --model [model.txt]",
    )
    parser.add_argument(
        "--from",
        dest="first_day",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="first day of the training window (UTC, event time)",
    )
    parser.add_argument(
        "--to",
        dest="last_day",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="last day of the training window, inclusive",
    )
    parser.add_argument(
        "--handbook-train-week",
        action="store_true",
        help=f"the Handbook's training week, {HANDBOOK_TRAIN_WEEK[0]} to {HANDBOOK_TRAIN_WEEK[1]}",
    )
    parser.add_argument(
        "--label-delay",
        dest="label_delay_days",
        type=float,
        metavar="DAYS",
        help="days until a label may be used, as the detector will use it [FRAUDSTREAM_LABEL_DELAY_DAYS, default 7]",
    )
    parser.add_argument("--model-version", type=int, default=1, help="the version the model file records [1]")
    parser.add_argument("--seed", type=int, default=42, help="LightGBM's seed [42]")
    add_connection_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("fraudstream.librdkafka").setLevel(logging.CRITICAL)
    first, last = HANDBOOK_TRAIN_WEEK if args.handbook_train_week else (args.first_day, args.last_day)
    if first is None or last is None:
        raise ConfigError("give the training window: --from and --to, or --handbook-train-week")
    if last < first:
        raise ConfigError(f"--to {last} is before --from {first}")
    try:
        import lightgbm
    except ImportError:
        raise ConfigError("training needs LightGBM: pip install 'fraudstream[model]'") from None
    first_ms = _day_ms(first)
    end_ms = _day_ms(last) + DAY_MS
    delay_ms = round(settings.label_delay_days * DAY_MS)
    schemas = console_schemas(Registry(settings).schema_by_id)
    labels, targets = read_labels(settings, schemas, first_ms, end_ms)
    builder = TrainingSetBuilder(labels, targets, first_ms=first_ms, end_ms=end_ms, label_delay_ms=delay_ms)
    undecodable = read_transactions(settings, schemas, builder.add)
    data = builder.result()
    frauds = int(data.target.sum())
    if not len(data.target) or not frauds:
        raise NothingToTrain(
            f"no labelled {'fraud' if len(data.target) else 'transaction'} from {first} to {last} on "
            f"{settings.transactions_topic} ({data.seen:,} transactions, {labels.count:,} labels read)"
        )
    booster, threshold = fit(data, seed=args.seed)
    meta = {
        "name": "fraudstream",
        "model_version": args.model_version,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_from": first.isoformat(),
        "train_to": last.isoformat(),
        "label_delay_days": settings.label_delay_days,
        "rows": int(len(data.target)),
        "frauds": frauds,
        "threshold": threshold,
        "lightgbm": lightgbm.__version__,
        "params": {**PARAMS, "rounds": ROUNDS},
    }
    scoring.Model(booster, meta).save(args.output)
    score = booster.predict(data.features, num_threads=1)
    print(
        f"trained on {len(data.target):,} transactions from {first} to {last} ({frauds:,} frauds; "
        f"{data.unlabelled:,} without a label left out; {data.seen:,} read for the card state): "
        f"training AUC {roc_auc(data.target, score):.3f}, AP {average_precision(data.target, score):.3f}, "
        f"threshold {threshold:.3f}",
        flush=True,
    )
    print(
        f"wrote {args.output} (model version {args.model_version}); use it with: fraudstream detect --model "
        f"{args.output}",
        flush=True,
    )
    if undecodable:
        print(
            f"fraudstream train: warning: {undecodable:,} transactions could not be decoded: left out", file=sys.stderr
        )
    if labels.unplaced:
        print(
            f"fraudstream train: warning: {labels.unplaced:,} labels without terminal or event time (written before "
            "labels carried them): no per-terminal feature counts them",
            file=sys.stderr,
        )
    return 0


def _day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp() * 1000)
