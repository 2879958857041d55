"""The console's embedded index: SQLite tables rebuilt from the topics, so that pages are fast queries.

The log is the source of truth: the index starts empty (a new file each start) and the reader thread
(fraudstream.console.reader) fills it from the fraud, labels, legit and rules topics. One writer (that
thread, one SQLite transaction per consumed batch), many readers (request handlers, each thread with its
own connection; WAL mode, so reads never wait for the writer).

What is kept, and why:
- alerts: every FraudAlert, with its latest verdict (an analyst's Label) folded in, so that the queue is one
  indexed range scan (score order within a band, over the alerts without a verdict).
- labels: the latest label of each transaction (precision needs the alerts' labels, recall the fraud
  labels; a label may arrive before its alert is read, so none is left out).
- verdicts: every analyst label, oldest first (the audit trail: a changed verdict keeps its history).
- payments: every routed transaction (legit and fraud topics) of the last PAYMENT_HISTORY_MS of event time,
  by card: the card's recent payments as the detector decided them, in its order. The alert does not
  carry them (the detector's hot path stays as it is); the outputs hold exactly what it saw.
- rule_versions: every rule version read from the rules topic, so that an alert page shows the parameters
  of the version that fired.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraudstream.consumer.rules import DEFAULT_RULES, SCORE_BANDS, checked_parameters
from fraudstream.errors import ConfigError

PAYMENT_HISTORY_MS = 30 * 86_400_000
RECENT_PAYMENTS = 20
PAGE_SIZE = 50
HOUR_MS = 3_600_000

# Score bands, as fraud teams work: decline at or above the decline score, review from the review score up
# to it, approve below. The queue shows review first (the analysts' work), then decline, then approve.
BANDS = ("review", "decline", "approve")

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    transaction_id TEXT PRIMARY KEY,
    topic_partition INTEGER, topic_offset INTEGER,
    detected_at INTEGER NOT NULL, event_time INTEGER NOT NULL,
    card_id TEXT, account_id TEXT, merchant_id TEXT, terminal_id TEXT,
    amount_cents INTEGER, currency TEXT,
    rules TEXT NOT NULL,            -- ",rule_a,rule_b,"
    fired TEXT NOT NULL,            -- JSON [[id, version], ...]
    rule_set_version TEXT,
    score REAL NOT NULL,            -- a missing score (alerts before scores) counts as 1.0: a rule fired
    scenario TEXT,                  -- from the transaction's generator label, once it has arrived
    verdict INTEGER,                -- the latest analyst verdict: 1 fraud, 0 not fraud, NULL none yet
    verdict_by TEXT, verdict_at INTEGER,
    body TEXT NOT NULL              -- the alert as decoded (JSON)
);
CREATE INDEX IF NOT EXISTS alerts_open ON alerts (score DESC, detected_at DESC) WHERE verdict IS NULL;
CREATE INDEX IF NOT EXISTS alerts_event_time ON alerts (event_time);
CREATE INDEX IF NOT EXISTS alerts_card ON alerts (card_id);
CREATE INDEX IF NOT EXISTS alerts_merchant ON alerts (merchant_id);
-- Partial and covering (score last): a filtered queue counts its bands from the index alone.
CREATE INDEX IF NOT EXISTS alerts_open_amount ON alerts (amount_cents, score) WHERE verdict IS NULL;
CREATE INDEX IF NOT EXISTS alerts_open_detected ON alerts (detected_at, score) WHERE verdict IS NULL;
-- The rule filter: one row per (rule, alert) with the alert's score, so that the queue of one rule is a range
-- of an index in queue order, not a scan of every alert.
CREATE TABLE IF NOT EXISTS alert_rules (
    rule TEXT NOT NULL, transaction_id TEXT NOT NULL, score REAL NOT NULL, detected_at INTEGER NOT NULL,
    open INTEGER NOT NULL, PRIMARY KEY (rule, transaction_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alert_rules_open ON alert_rules (rule, score DESC, detected_at DESC) WHERE open = 1;
CREATE INDEX IF NOT EXISTS alert_rules_tx ON alert_rules (transaction_id);
CREATE TABLE IF NOT EXISTS scenario_names (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels (
    transaction_id TEXT PRIMARY KEY, is_fraud INTEGER NOT NULL, scenario TEXT, source TEXT,
    labelled_by TEXT, labelled_at INTEGER, event_time INTEGER
);
CREATE INDEX IF NOT EXISTS labels_fraud_time ON labels (event_time) WHERE is_fraud = 1;
CREATE TABLE IF NOT EXISTS verdicts (
    transaction_id TEXT NOT NULL, is_fraud INTEGER NOT NULL, labelled_by TEXT, labelled_at INTEGER,
    topic_partition INTEGER, topic_offset INTEGER
);
CREATE INDEX IF NOT EXISTS verdicts_tx ON verdicts (transaction_id);
CREATE TABLE IF NOT EXISTS payments (
    card_id TEXT NOT NULL, event_time INTEGER NOT NULL, transaction_id TEXT NOT NULL, amount_cents INTEGER,
    merchant_id TEXT, route TEXT
);
CREATE INDEX IF NOT EXISTS payments_card ON payments (card_id, event_time DESC);
CREATE TABLE IF NOT EXISTS rule_versions (
    id TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT, parameters TEXT, enabled INTEGER, author TEXT,
    comment TEXT, written_at INTEGER, topic_offset INTEGER, PRIMARY KEY (id, version)
);
"""


@dataclass(frozen=True, slots=True)
class Bands:
    """Score thresholds: decline at or above `decline`, review from `review` up to it, approve below."""

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.review <= self.decline <= 1.0:
            raise ValueError(f"score bands need 0 <= review ({self.review:g}) <= decline ({self.decline:g}) <= 1")

    def band(self, score: float) -> str:
        return "decline" if score >= self.decline else "review" if score >= self.review else "approve"

    def where(self, band: str, column: str = "score") -> tuple[str, tuple[float, ...]]:
        return {
            "decline": (f"{column} >= ?", (self.decline,)),
            "review": (f"{column} >= ? AND {column} < ?", (self.review, self.decline)),
            "approve": (f"{column} < ?", (self.review,)),
        }[band]


@dataclass(frozen=True, slots=True)
class QueueFilter:
    rule: str = ""
    scenario: str = ""
    card: str = ""
    merchant: str = ""
    min_cents: int | None = None
    max_cents: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def source(self) -> tuple[str, list[str], list[Any], str]:
        """(FROM clause, WHERE conditions, their arguments, the score column): the open alerts, by rule when
        filtered by one (through alert_rules, in queue order)."""
        args: list[Any]
        if self.rule:
            source, where, args, score = (
                "alert_rules r JOIN alerts a ON a.transaction_id = r.transaction_id",
                ["r.rule = ?", "r.open = 1"],
                [self.rule],
                "r.score",
            )
        else:
            source, where, args, score = "alerts a", ["a.verdict IS NULL"], [], "a.score"
        for sql, value in (
            ("a.scenario = ?", self.scenario or None),
            ("a.card_id = ?", self.card or None),
            ("a.merchant_id = ?", self.merchant or None),
            ("a.amount_cents >= ?", self.min_cents),
            ("a.amount_cents <= ?", self.max_cents),
            ("a.detected_at >= ?", self.since_ms),
            ("a.detected_at < ?", self.until_ms),
        ):
            if value is not None:
                where.append(sql)
                args.append(value)
        return source, where, args, score


class Index:
    """The SQLite file and its queries. `writer()` is for the reader thread; the query methods are for any
    thread (a connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        with self._connect() as connection:
            connection.executescript(SCHEMA)
        self._writes = 0

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=OFF")  # rebuilt from the topics at every start: durability is theirs
        connection.row_factory = sqlite3.Row
        return connection

    @property
    def db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    # ------------------------------------------------------------ writes (the reader thread)
    def add_alerts(self, rows: Sequence[tuple[int, int, dict[str, Any]]]) -> None:
        """(partition, offset, decoded FraudAlert) rows; an alert seen again (a replay) replaces itself."""
        values = []
        for partition, offset, alert in rows:
            tx = alert["transaction"]
            score = alert.get("score")
            values.append(
                (
                    tx["transaction_id"],
                    partition,
                    offset,
                    alert["detected_at"],
                    tx["event_time"],
                    tx["card_id"],
                    tx["account_id"],
                    tx["merchant_id"],
                    tx["terminal_id"],
                    tx["amount_cents"],
                    tx.get("currency", "USD"),
                    "," + ",".join(alert["rules"]) + ",",
                    json.dumps([[f["id"], f["version"]] for f in alert.get("fired", ())]),
                    alert.get("rule_set_version", ""),
                    1.0 if score is None else float(score),
                    json.dumps(alert, default=str),
                )
            )
        with self.db as db:
            db.executemany(
                "INSERT INTO alerts (transaction_id, topic_partition, topic_offset, detected_at, event_time, card_id,"
                " account_id, merchant_id, terminal_id, amount_cents, currency, rules, fired, rule_set_version, score,"
                " body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (transaction_id) DO UPDATE SET"
                " detected_at=excluded.detected_at, rules=excluded.rules, fired=excluded.fired,"
                " rule_set_version=excluded.rule_set_version, score=excluded.score, body=excluded.body",
                values,
            )
            db.executemany(
                "INSERT OR REPLACE INTO alert_rules SELECT ?, transaction_id, score, detected_at,"
                " verdict IS NULL FROM alerts WHERE transaction_id = ?",
                [(rule, v[0]) for v in values for rule in v[11].strip(",").split(",")],
            )
            # A label read before its alert (both topics are read side by side at start) is folded in now.
            db.executemany(
                "UPDATE alerts SET scenario = (SELECT scenario FROM labels l WHERE l.transaction_id = alerts.transaction_id"
                " AND l.source != 'analyst') WHERE transaction_id = ?",
                [(v[0],) for v in values],
            )

    def add_labels(self, rows: Sequence[tuple[int, int, dict[str, Any]]]) -> None:
        """(partition, offset, decoded Label) rows, in each partition's order: the latest label wins."""
        with self.db as db:
            for partition, offset, label in rows:
                tid, fraud = label["transaction_id"], int(bool(label["is_fraud"]))
                source = label.get("source") or "generator"
                analyst = source == "analyst"
                if analyst:
                    db.execute(
                        "INSERT INTO verdicts VALUES (?,?,?,?,?,?)",
                        (tid, fraud, label.get("labelled_by"), label.get("labelled_at"), partition, offset),
                    )
                    db.execute(
                        "UPDATE alerts SET verdict = ?, verdict_by = ?, verdict_at = ? WHERE transaction_id = ?",
                        (fraud, label.get("labelled_by"), label.get("labelled_at"), tid),
                    )
                    db.execute("UPDATE alert_rules SET open = 0 WHERE transaction_id = ?", (tid,))
                else:
                    db.execute("UPDATE alerts SET scenario = ? WHERE transaction_id = ?", (label["scenario"], tid))
                    db.execute("INSERT OR IGNORE INTO scenario_names VALUES (?)", (label["scenario"],))
                db.execute(
                    "INSERT OR REPLACE INTO labels VALUES (?,?,?,?,?,?,?)",
                    (
                        tid,
                        fraud,
                        label["scenario"],
                        source,
                        label.get("labelled_by"),
                        label.get("labelled_at"),
                        label.get("event_time"),
                    ),
                )

    def add_payments(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """(route, decoded Transaction) rows; payments older than PAYMENT_HISTORY_MS of event time go."""
        values = [
            (tx["card_id"], tx["event_time"], tx["transaction_id"], tx["amount_cents"], tx["merchant_id"], route)
            for route, tx in rows
        ]
        if not values:
            return
        with self.db as db:
            db.executemany("INSERT INTO payments VALUES (?,?,?,?,?,?)", values)
            self._writes += len(values)
            if self._writes > 100_000:
                self._writes = 0
                newest = db.execute("SELECT max(event_time) FROM payments").fetchone()[0]
                db.execute("DELETE FROM payments WHERE event_time < ?", (newest - PAYMENT_HISTORY_MS,))

    def add_rule_versions(self, rows: Iterable[tuple[int, Any]]) -> None:
        """(offset, Rule) rows."""
        with self.db as db:
            db.executemany(
                "INSERT OR REPLACE INTO rule_versions VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.id,
                        r.version,
                        r.kind,
                        json.dumps(r.to_dict()["parameters"], sort_keys=True),
                        int(r.enabled),
                        r.author,
                        r.comment,
                        int(r.written_at.timestamp() * 1000),
                        offset,
                    )
                    for offset, r in rows
                ],
            )

    # ------------------------------------------------------------ queries (any thread)
    def queue(
        self, bands: Bands, filters: QueueFilter, page: int = 0, page_size: int = PAGE_SIZE
    ) -> tuple[list[sqlite3.Row], dict[str, int]]:
        """One page of the alerts without a verdict: review band first, then decline, then approve; riskiest
        first within a band, then newest. Returns the rows and the count of each band."""
        source, where, args, score = filters.source()
        condition = " AND ".join(where)
        newest = score.replace("score", "detected_at")
        # The rule filter alone needs no join to count: alert_rules holds the score.
        counted = "alert_rules r" if filters.rule and len(where) == 2 else source
        counts = {}
        for band in BANDS:  # a count per band: each a range of the score index (faster than one pass of sums)
            band_sql, in_band = bands.where(band, score)
            counts[band] = self.db.execute(
                f"SELECT count(*) FROM {counted} WHERE {condition} AND {band_sql}", (*args, *in_band)
            ).fetchone()[0]
        rows: list[sqlite3.Row] = []
        skip = page * page_size
        for band in BANDS:
            if len(rows) >= page_size:
                break
            if skip >= counts[band]:
                skip -= counts[band]
                continue
            band_sql, in_band = bands.where(band, score)
            rows += self.db.execute(
                f"SELECT a.transaction_id, a.detected_at, a.event_time, a.card_id, a.merchant_id, a.amount_cents,"
                f" a.currency, a.rules, a.score, a.scenario, a.rule_set_version FROM {source}"
                f" WHERE {condition} AND {band_sql} ORDER BY {score} DESC, {newest} DESC LIMIT ? OFFSET ?",
                (*args, *in_band, page_size - len(rows), skip),
            ).fetchall()
            skip = 0
        return rows, counts

    def alert(self, transaction_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM alerts WHERE transaction_id = ?", (transaction_id,)).fetchone()

    def verdicts(self, transaction_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM verdicts WHERE transaction_id = ? ORDER BY rowid", (transaction_id,)
        ).fetchall()

    def label(self, transaction_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM labels WHERE transaction_id = ?", (transaction_id,)).fetchone()

    def recent_payments(self, card_id: str, before_ms: int, limit: int = RECENT_PAYMENTS) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM payments WHERE card_id = ? AND event_time <= ? ORDER BY event_time DESC LIMIT ?",
            (card_id, before_ms, limit),
        ).fetchall()

    def rule_version(self, rule_id: str, version: int) -> sqlite3.Row | None:
        return self.db.execute(
            "SELECT * FROM rule_versions WHERE id = ? AND version = ?", (rule_id, version)
        ).fetchone()

    def bands(self) -> Bands:
        """The score bands of the rules in force: the newest score_bands version on the rules topic that the
        detector's checks accept (a refused one never came into force); the kind's defaults when there is
        none or it is disabled."""
        bands = Bands(review=DEFAULT_RULES[SCORE_BANDS]["review"], decline=DEFAULT_RULES[SCORE_BANDS]["decline"])
        rows = self.db.execute(
            "SELECT id, version, parameters, enabled FROM rule_versions WHERE kind = ? ORDER BY topic_offset DESC",
            (SCORE_BANDS,),
        )
        for rule_id, version, parameters, enabled in rows:
            try:
                params = checked_parameters(SCORE_BANDS, json.loads(parameters), where=f"rule {rule_id} v{version}")
            except ConfigError:
                continue
            return Bands(review=params["review"], decline=params["decline"]) if enabled else bands
        return bands

    def rule_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT id FROM rule_versions ORDER BY id")]

    def scenarios(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM scenario_names ORDER BY name")]

    def count_alerts(self) -> int:
        return self.db.execute("SELECT count(*) FROM alerts").fetchone()[0]

    def alerts_per_hour_by_rule(self, hours: int = 24) -> tuple[list[int], dict[str, list[int]]]:
        """Hour starts (ms of event time) of the last `hours` hours that had alerts, and per rule its counts.
        By event time: what happened when (a replay or a sped-up demo spreads as the payments did)."""
        newest = self.db.execute("SELECT max(event_time) FROM alerts").fetchone()[0]
        if newest is None:
            return [], {}
        first = (newest // HOUR_MS - hours + 1) * HOUR_MS
        hours_list = [first + i * HOUR_MS for i in range(hours)]
        per_rule: dict[str, list[int]] = {}
        for rules, hour, count in self.db.execute(
            "SELECT rules, event_time / ? AS hour, count(*) FROM alerts WHERE event_time >= ? GROUP BY rules, hour",
            (HOUR_MS, first),
        ):
            for rule in rules.strip(",").split(","):
                per_rule.setdefault(rule, [0] * hours)[hour - first // HOUR_MS] += count
        return hours_list, per_rule

    def quality_by_day(self) -> list[dict[str, Any]]:
        """Per day of event time: precision (of the alerts with a label, the share that are fraud) and recall
        (of the fraud labels, the share that were alerted), from generator labels and analysts' verdicts."""
        day = 86_400_000
        rows = self.db.execute(
            "SELECT l.event_time / ? AS d, sum(a.transaction_id IS NOT NULL AND l.is_fraud = 1),"
            " sum(a.transaction_id IS NOT NULL), sum(l.is_fraud = 1)"
            " FROM labels l LEFT JOIN alerts a ON a.transaction_id = l.transaction_id"
            " WHERE l.event_time IS NOT NULL GROUP BY d ORDER BY d",
            (day,),
        ).fetchall()
        out = []
        for d, caught, alerted_labelled, frauds in rows:
            out.append(
                {
                    "day_ms": d * day,
                    "precision": caught / alerted_labelled if alerted_labelled else None,
                    "recall": caught / frauds if frauds else None,
                    "alerts_labelled": alerted_labelled,
                    "frauds": frauds,
                }
            )
        return out
