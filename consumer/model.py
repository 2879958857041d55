"""Risk scores: the model's features (one definition, online and for training), the label table that
feeds the per-terminal ones, and the model file.

- `LabelTable`: the ground-truth labels a detector has received (delayed, as chargebacks arrive), kept
  as per-terminal counts over event time. A label is used for a transaction only once its own event time
  plus the label delay is at or before the transaction's event time, so a label never counts before
  its delay, however early it was read.
- `model_features(tx, card, labels, label_delay_ms)`: the model's input matrix for a batch, from the
  batch's columns, the card features `card_features` computed (the Handbook's per-customer windows
  among them) and the label table (the Handbook's per-terminal count and fraud risk over 1/7/30 days,
  shifted by the delay). The detector calls it online and `fraudstream train` calls it offline: there
  is no second definition to drift.
- `Model`: a LightGBM booster in a versioned file (JSON header naming the format version and the
  feature list, then LightGBM's own text model); loading checks both, and scoring is one vectorized
  call per batch.
- `rules_score`: the score without a model, a function of the rules that fired.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.consumer.features import DAY_MS, SPEND_WINDOWS_DAYS, TxColumns
from fraudstream.errors import ConfigError

TERMINAL_WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)  # the Handbook's terminal windows, before the delay
NIGHT_LAST_HOUR = 6  # the Handbook's TX_DURING_NIGHT: hour of day (UTC) 0 to 6
_BASE_MS = 946_684_800_000  # 2000-01-01: label times are stored relative to it, in 40 bits (until 2034)
_TIME_BITS = 40
_TIME_MAX = (1 << _TIME_BITS) - 1

# The model's input columns, in order. The model file names them, so a file made for another list is refused.
MODEL_FEATURES: tuple[str, ...] = (
    "amount",
    "during_weekend",
    "during_night",
    *(f"card_n_{d}d" for d in SPEND_WINDOWS_DAYS),
    *(f"card_mean_{d}d" for d in SPEND_WINDOWS_DAYS),
    *(f"terminal_n_{d}d" for d in TERMINAL_WINDOWS_DAYS),
    *(f"terminal_risk_{d}d" for d in TERMINAL_WINDOWS_DAYS),
    "amount_ratio",
    "card_gap_s",
    "known_terminal",
    # Ratios and products a tree cannot form by itself: the amount against the card's recent mean (a
    # compromised card's multiplied payments), the terminal's labelled frauds (not only their share).
    "amount_over_card_mean_30d",
    "amount_over_card_mean_7d",
    *(f"terminal_frauds_{d}d" for d in reversed(TERMINAL_WINDOWS_DAYS)),
)
MODEL_FORMAT = "fraudstream-model"
MODEL_FORMAT_VERSION = 1


class LabelTable:
    """Labels received, as a sorted index of (terminal, event time) with cumulative label and fraud counts.

    New labels go to a small pending part, merged into the sorted main part when it grows (each merge
    is a sort of both, so the cost per label stays logarithmic); queries search both parts, vectorized.
    Labels without a terminal or an event time (written before labels carried them) cannot be placed
    and are only counted.

    The latest label of a transaction wins (an analyst's verdict, possibly changed): given transaction ids,
    a second label of a transaction adds a correction entry (-1 label and minus its previous fraud at the
    previous label's key) beside the new one, so counts read as if only the latest existed. That needs the
    previous label of every transaction still in the table (one dict entry each, expired with it).
    """

    def __init__(self) -> None:
        self._codes: dict[bytes, int] = {}
        self._keys = np.zeros(0, dtype=np.int64)  # sorted: terminal code << 40 | (event ms - base)
        self._labels = np.zeros(1, dtype=np.int64)  # cumulative label count before each key (len + 1)
        self._frauds = np.zeros(1, dtype=np.int64)  # cumulative fraud count before each key (len + 1)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (keys, labels, frauds)
        self._pending_size = 0
        self._latest: dict[str, int] = {}  # transaction id -> its label's key << 1 | is_fraud
        self.unplaced = 0  # labels without terminal or time
        self.count = 0
        self.revised = 0  # labels that replaced an earlier label of their transaction

    def __len__(self) -> int:
        return len(self._keys) + self._pending_size

    def add(
        self,
        terminal_ids: Sequence[bytes | str | None],
        event_ms: Sequence[int | None],
        is_fraud: Sequence[bool],
        transaction_ids: Sequence[str] | None = None,
    ) -> None:
        """Labels as they arrive, in any order across transactions, in order within one (the labels topic is
        keyed by transaction id). Without transaction ids every label counts."""
        codes, times, frauds = [], [], []
        for terminal, ms, fraud in zip(terminal_ids, event_ms, is_fraud, strict=True):
            if terminal is None or ms is None:
                codes.append(-1)
                times.append(0)
                frauds.append(False)
                continue
            key = terminal.encode() if isinstance(terminal, str) else terminal
            codes.append(self._codes.setdefault(key, len(self._codes)))
            times.append(ms)
            frauds.append(bool(fraud))
        placed = np.asarray(codes, dtype=np.int64) >= 0
        self.unplaced += int(len(codes) - placed.sum())
        self.count += int(placed.sum())
        if not placed.any():
            return
        keys = _key(np.asarray(codes, dtype=np.int64), np.asarray(times, dtype=np.int64))
        fraud_counts = np.asarray(frauds, dtype=np.int64)
        weights = np.ones(len(keys), dtype=np.int64)
        extra_keys, extra_frauds = [], []
        if transaction_ids is not None:
            latest, get = self._latest, self._latest.get
            for tid, key, code, fraud in zip(transaction_ids, keys.tolist(), codes, frauds, strict=True):
                if code < 0:
                    continue
                previous = get(tid)
                latest[tid] = key << 1 | fraud
                if previous is not None:  # the earlier label of this transaction stops counting
                    extra_keys.append(previous >> 1)
                    extra_frauds.append(-(previous & 1))
            self.revised += len(extra_keys)
        keys, weights, fraud_counts = keys[placed], weights[placed], fraud_counts[placed]
        if extra_keys:
            keys = np.concatenate([keys, np.asarray(extra_keys, dtype=np.int64)])
            weights = np.concatenate([weights, np.full(len(extra_keys), -1, dtype=np.int64)])
            fraud_counts = np.concatenate([fraud_counts, np.asarray(extra_frauds, dtype=np.int64)])
        self._pending.append((keys, weights, fraud_counts))
        self._pending_size += len(keys)
        if self._pending_size > max(4096, len(self._keys) // 8):
            self._merge()

    def _merge(self) -> None:
        if not self._pending_size:
            return
        keys = np.concatenate([self._keys, *(p[0] for p in self._pending)])
        labels = np.concatenate([np.diff(self._labels), *(p[1] for p in self._pending)])
        frauds = np.concatenate([np.diff(self._frauds), *(p[2] for p in self._pending)])
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._labels = np.r_[0, np.cumsum(labels[order])]
        self._frauds = np.r_[0, np.cumsum(frauds[order])]
        self._pending, self._pending_size = [], 0

    def expire(self, older_than_ms: int) -> int:
        """Drop labels with event time before older_than_ms (no window reaches them any more)."""
        self._merge()
        cutoff = max(older_than_ms - _BASE_MS, 0)
        keep = (self._keys & _TIME_MAX) >= cutoff
        dropped = int(len(keep) - keep.sum())
        if dropped:
            labels, frauds = np.diff(self._labels)[keep], np.diff(self._frauds)[keep]
            self._keys = self._keys[keep]
            self._labels = np.r_[0, np.cumsum(labels)]
            self._frauds = np.r_[0, np.cumsum(frauds)]
            if self._latest:
                self._latest = {
                    tid: packed for tid, packed in self._latest.items() if ((packed >> 1) & _TIME_MAX) >= cutoff
                }
        return dropped

    def window_counts(
        self, terminal_keys: np.ndarray, after_ms: np.ndarray, until_ms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row: (labels, frauds) of its terminal with event time in (after_ms, until_ms]."""
        return self.windows_counts(terminal_keys, until_ms, [after_ms])[0]

    def windows_counts(
        self, terminal_keys: np.ndarray, until_ms: np.ndarray, after_ms: Sequence[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """window_counts for several windows ending at the same times: each row's terminal looked up once, the
        windows' end searched once, and every search made with its keys in order (the sorted index is large,
        and ordered searches read it at cache speed: half the time of scattered ones)."""
        self._merge()
        n = len(terminal_keys)
        codes = np.fromiter((self._codes.get(k, -1) for k in terminal_keys), np.int64, n)
        known = codes >= 0
        codes = np.where(known, codes, 0)
        order = np.argsort(_key(codes, until_ms), kind="stable")

        def position(times: np.ndarray) -> np.ndarray:
            found = np.empty(n, dtype=np.int64)
            found[order] = np.searchsorted(self._keys, _key(codes, times)[order], side="right")
            return found

        hi = position(until_ms)
        out = []
        for after in after_ms:
            lo = position(after)
            out.append(
                (
                    np.where(known, self._labels[hi] - self._labels[lo], 0),
                    np.where(known, self._frauds[hi] - self._frauds[lo], 0),
                )
            )
        return out


def _key(codes: np.ndarray, event_ms: np.ndarray) -> np.ndarray:
    return (codes << _TIME_BITS) | np.clip(np.asarray(event_ms, dtype=np.int64) - _BASE_MS, 0, _TIME_MAX)


def terminal_window_features(labels: LabelTable, tx: TxColumns, label_delay_ms: int) -> dict[str, np.ndarray]:
    """The Handbook's per-terminal features: for each window w, the terminal's labelled transactions with
    event time in (t - delay - w, t - delay] and the share of them that were fraud (0 with none). Only
    labels whose event time plus the delay is at or before t count."""
    out = {}
    until = tx.event_time_ms - label_delay_ms
    windows = labels.windows_counts(tx.terminal_key, until, [until - days * DAY_MS for days in TERMINAL_WINDOWS_DAYS])
    for days, (count, frauds) in zip(TERMINAL_WINDOWS_DAYS, windows, strict=True):
        out[f"terminal_n_{days}d"] = count.astype(np.float64)
        out[f"terminal_risk_{days}d"] = np.where(count > 0, frauds / np.maximum(count, 1), 0.0)
        out[f"terminal_frauds_{days}d"] = frauds.astype(np.float64)
    return out


def model_features(
    tx: TxColumns, card: Mapping[str, np.ndarray], labels: LabelTable, label_delay_ms: int
) -> np.ndarray:
    """The model's input, one row per transaction, columns as MODEL_FEATURES (float32)."""
    t = tx.event_time_ms
    weekday = (t // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday: 0 is Monday
    hour = (t % DAY_MS) // 3_600_000
    amount = tx.amount_cents / 100.0
    columns: dict[str, np.ndarray] = {
        "amount": amount,
        "during_weekend": (weekday >= 5).astype(np.float64),
        "during_night": (hour <= NIGHT_LAST_HOUR).astype(np.float64),
        **{f"card_n_{d}d": card[f"spend_n_{d}d"] for d in SPEND_WINDOWS_DAYS},
        **{f"card_mean_{d}d": card[f"spend_mean_{d}d"] / 100.0 for d in SPEND_WINDOWS_DAYS},
        **terminal_window_features(labels, tx, label_delay_ms),
        "amount_ratio": card["amount_ratio"],
        "card_gap_s": card["gap_s"],
        "known_terminal": card["known_terminal"].astype(np.float64),
        # The mean includes this payment, so it is never 0 for a positive amount; the floor covers $0.
        "amount_over_card_mean_30d": amount / np.maximum(card["spend_mean_30d"] / 100.0, 0.01),
        "amount_over_card_mean_7d": amount / np.maximum(card["spend_mean_7d"] / 100.0, 0.01),
    }
    matrix = np.empty((len(tx), len(MODEL_FEATURES)), dtype=np.float32)
    for j, name in enumerate(MODEL_FEATURES):
        matrix[:, j] = columns[name]
    return matrix


def rules_score(fired: np.ndarray) -> np.ndarray:
    """The score without a model: the highest score of the rules that fired, each fired rule scoring 1.0
    (so 1.0 when any fired, 0.0 otherwise). `fired` is (rules, rows)."""
    if fired.shape[0] == 0:
        return np.zeros(fired.shape[1], dtype=np.float64)
    return fired.max(axis=0).astype(np.float64)


def score_header_values(scores: np.ndarray) -> list[bytes]:
    """A score as the legit record's header carries it: UTF-8 decimal text, 6 significant digits."""
    return [b"%.6g" % value for value in scores.tolist()]  # bytes formatting: ~7x faster than np.char.mod


class Model:
    """A trained model and what it was trained for; `score(matrix)` gives the fraud probability per row."""

    def __init__(self, booster: Any, meta: dict[str, Any]) -> None:
        self.booster = booster
        self.meta = meta
        self.threshold = float(meta.get("threshold", 0.5))
        self.name = f"{meta.get('name', 'model')} v{meta.get('model_version', '?')}"

    def score(self, matrix: np.ndarray, *, threads: int = 1) -> np.ndarray:
        """One thread by default: the detector's other core serves librdkafka. Each row is scored on its own, so
        the scores do not depend on `threads`."""
        if not len(matrix):
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self.booster.predict(matrix, num_threads=threads), dtype=np.float64)

    def save(self, path: Path) -> None:
        header = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            **self.meta,
            "features": list(MODEL_FEATURES),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header) + "\n" + self.booster.model_to_string())

    @classmethod
    def load(cls, path: Path) -> Model:
        """Read a model file; a missing, foreign or incompatible file is a ConfigError (one line)."""
        try:
            header_line, _, body = Path(path).read_text().partition("\n")
        except OSError as exc:
            raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from None
        try:
            meta = json.loads(header_line)
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{path} is not a fraudstream model file (made by fraudstream train)")
        if meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise ConfigError(
                f"model file {path} has format version {meta.get('format_version')}; this "
                f"fraudstream reads version {MODEL_FORMAT_VERSION}: train it again"
            )
        if tuple(meta.get("features", ())) != MODEL_FEATURES:
            raise ConfigError(
                f"model file {path} was trained on other features than this fraudstream computes: train it again"
            )
        try:
            import lightgbm
        except ImportError:
            raise ConfigError("a model needs LightGBM: pip install 'fraudstream[model]'") from None
        try:
            booster = lightgbm.Booster(model_str=body)
        except lightgbm.basic.LightGBMError as exc:
            raise ConfigError(f"model file {path}: LightGBM cannot read it ({exc})") from None
        return cls(booster, {k: v for k, v in meta.items() if k not in ("format", "format_version", "features")})
