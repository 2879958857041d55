"""Risk scores without Kafka: the FraudAlert score field and its evolution, the legit record's score
header, labels used only after their delay, and one feature function for training and serving."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from fraudstream.consumer import model as scoring
from fraudstream.consumer.decide import Route
from fraudstream.consumer.features import DAY_MS, PROFILE_DTYPE, TxColumns
from fraudstream.consumer.rules import load_rules
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import CARDS, MODEL_RULE, StatefulDecider, decode_batch
from fraudstream.errors import ConfigError
from fraudstream.evaluate import SCORE_HEADER
from fraudstream.records import FraudAlert
from fraudstream.schemas import history
from fraudstream import train
from tests.support.decoding import SCHEMAS, SETTINGS, decider_pair, encode, make_tx

DELAY_MS = 7 * DAY_MS
START = datetime(2018, 4, 1, tzinfo=UTC)


def _alert(score):
    return {
        "transaction": make_tx(95_000).to_dict(),
        "rules": ["large_amount"],
        "detected_at": START,
        "fired": [{"id": "large_amount", "version": 2}],
        "rule_set_version": "4",
        "score": score,
    }


def _write(schema, record) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(schema), record)
    return out.getvalue()


def _read(data: bytes, writer, reader=None) -> dict:
    return schemaless_reader(io.BytesIO(data), parse_schema(writer), parse_schema(reader) if reader else None)


# ----- the score field -----
def test_the_score_field_round_trips_and_every_older_fraud_alert_reader_still_reads_the_alert():
    current = SCHEMAS.expanded["FraudAlert"]
    data = _write(current, _alert(0.8125))
    assert _read(data, current)["score"] == 0.8125
    assert FraudAlert.from_dict(_read(data, current)).score == 0.8125
    assert FraudAlert.from_dict(FraudAlert.from_dict(_read(data, current)).to_dict()).score == 0.8125
    old_versions = history(SETTINGS.schemas_dir, "FraudAlert")
    assert len(old_versions) >= 2
    for version, old in old_versions:  # old readers read new alerts: the score is skipped
        alert = _read(data, current, old)
        assert "score" not in alert and alert["rules"] == ["large_amount"], version
        # ... and the new reader reads old alerts: no score
        assert (
            FraudAlert.from_dict(
                _read(_write(old, {k: v for k, v in _alert(None).items() if k != "score"}), old, current)
            ).score
            is None
        )


# ----- labels only after their delay -----
def _columns(terminal: str, times_ms: list[int], card: str = "card-1") -> TxColumns:
    return TxColumns.from_records(
        [
            make_tx(1_000, transaction_id=f"t{i}", card_id=card, terminal_id=terminal, event_time=t).to_dict()
            for i, t in enumerate(times_ms)
        ]
    )


def test_a_label_counts_only_once_its_event_time_plus_the_delay_has_passed():
    labels = scoring.LabelTable()
    fraud_at = int(START.timestamp() * 1000)
    labels.add(["term"], [fraud_at], [True])  # read at once: the reader may be early, the gate is event time
    labels.add(["term"], [fraud_at + DAY_MS], [False])
    just_before, due = fraud_at + DELAY_MS - 1, fraud_at + DELAY_MS
    f = scoring.terminal_window_features(labels, _columns("term", [fraud_at, just_before, due, due + DAY_MS]), DELAY_MS)
    assert f["terminal_n_1d"].tolist() == [0, 0, 1, 1]  # the 1-day window: only the one label it reaches
    assert f["terminal_risk_1d"].tolist() == [0, 0, 1.0, 0.0]  # a day later the fraud is out, the legit in
    assert f["terminal_n_7d"].tolist() == [0, 0, 1, 2]
    assert f["terminal_risk_7d"].tolist() == [0, 0, 1.0, 0.5]
    other = scoring.terminal_window_features(labels, _columns("elsewhere", [due]), DELAY_MS)
    assert other["terminal_n_30d"].tolist() == [0]  # another terminal's label never counts


def test_the_label_table_merges_and_expires_without_changing_counts():
    rng = np.random.default_rng(5)
    times = (rng.integers(0, 40 * DAY_MS, 20_000) + int(START.timestamp() * 1000)).tolist()
    terminals = [f"t{i}" for i in rng.integers(0, 30, 20_000)]
    frauds = (rng.random(20_000) < 0.1).tolist()
    table = scoring.LabelTable()
    for i in range(0, 20_000, 1_000):  # arrives in pieces: pending parts and merges
        table.add(terminals[i : i + 1_000], times[i : i + 1_000], frauds[i : i + 1_000])
    query = _columns("t7", [int(START.timestamp() * 1000) + 30 * DAY_MS])
    got = scoring.terminal_window_features(table, query, DELAY_MS)
    until = int(query.event_time_ms[0]) - DELAY_MS
    expected = [
        (t, f)
        for t, term, f in zip(times, terminals, frauds, strict=True)
        if term == "t7" and until - 7 * DAY_MS < t <= until
    ]
    assert got["terminal_n_7d"][0] == len(expected) > 0
    assert got["terminal_risk_7d"][0] == pytest.approx(sum(f for _, f in expected) / len(expected))
    table.expire(until - 31 * DAY_MS)
    assert scoring.terminal_window_features(table, query, DELAY_MS)["terminal_n_7d"][0] == len(expected)


def test_every_row_of_a_batch_gets_its_own_terminal_s_counts_in_each_window():
    """windows_counts searches in key order and puts each answer back on its row: checked against a plain count,
    row by row, for rows in no order, unknown terminals included."""
    rng = np.random.default_rng(11)
    start = int(START.timestamp() * 1000)
    times = (rng.integers(0, 40 * DAY_MS, 5_000) + start).tolist()
    terminals = [f"t{i}" for i in rng.integers(0, 12, 5_000)]
    frauds = (rng.random(5_000) < 0.2).tolist()
    table = scoring.LabelTable()
    table.add(terminals, times, frauds)
    asked = [f"t{i}" for i in rng.integers(0, 14, 300)]  # t12 and t13 have no label
    until = rng.integers(0, 40 * DAY_MS, 300) + start
    windows = [until - days * DAY_MS for days in (1, 7, 30)]
    got = table.windows_counts(np.array([t.encode() for t in asked], dtype=object), until, windows)
    for (count, fraud), after in zip(got, windows, strict=True):
        for row in range(300):
            inside = [
                f
                for t, term, f in zip(times, terminals, frauds, strict=True)
                if term == asked[row] and after[row] < t <= until[row]
            ]
            assert (count[row], fraud[row]) == (len(inside), sum(inside)), (row, asked[row])
    assert got[2][0].sum() > 0  # the counts are not all empty


# ----- the stateful decider's scores -----
class _State:
    def __init__(self):
        self.table = KeyedTable(PROFILE_DTYPE)

    def tables(self, partition):
        return {CARDS.name: self.table}

    def ready_tables(self, store):
        return {}  # nothing held


class _Labels:
    """What the decider needs of a LabelsReader: its table, the delay, and catch_up (recorded)."""

    def __init__(self, table):
        self.table, self.delay_ms, self.caught_up_to = table, DELAY_MS, []

    def catch_up(self, until_ms):
        self.caught_up_to.append(until_ms)
        return True


class _Booster:
    """A stand-in for LightGBM: the score is the amount in dollars over 1000, capped at 1."""

    def predict(self, matrix, num_threads=1):
        return np.minimum(matrix[:, scoring.MODEL_FEATURES.index("amount")] / 1000.0, 1.0)


def _decider(model=None, labels=None):
    record_wise, columnar = decider_pair()
    return StatefulDecider(
        lambda messages: decode_batch(columnar, columnar.record_wise, messages),
        load_rules(None, settings=SETTINGS).without("compromised_terminal"),
        _State(),
        encode_legit=record_wise.encode_legit,
        encode_fraud=record_wise.encode_fraud,
        model=model,
        labels=labels,
    )


class _Message:
    def __init__(self, value, offset, partition=0, created_ms=None):
        self._value, self._offset, self._partition, self._created_ms = value, offset, partition, created_ms

    def value(self):
        return self._value

    def key(self):
        return b"acc"

    def topic(self):
        return "transactions"

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def headers(self):
        return None

    def timestamp(self):
        return (TIMESTAMP_NOT_AVAILABLE, -1) if self._created_ms is None else (TIMESTAMP_CREATE_TIME, self._created_ms)


def test_the_terminal_gate_is_handed_the_batch_s_newest_kafka_timestamp():
    """What the gate's idle time counts from (consumer/terminal.py): the latest creation time among the
    partitions' last records, whatever the order the partitions come in."""
    asked = []

    def terminal_features(tx, partitions, offsets, created_ms):
        asked.append(created_ms)
        return {"terminal_cards": np.zeros(len(tx), np.int64)}

    decider = _decider()
    decider.terminal_features = terminal_features
    values = [
        encode(make_tx(1_500, transaction_id=f"t{i}", event_time=START + timedelta(minutes=i)).to_dict())
        for i in range(4)
    ]
    created = [(1, 5_000), (0, 7_000), (1, 9_000), (0, 8_000)]  # (partition, created): newest 9,000 on 1
    decider.decide([_Message(v, i, p, c) for i, (v, (p, c)) in enumerate(zip(values, created, strict=True))])
    decider.decide([_Message(values[0], 10)])  # no timestamp on the records
    assert asked == [9_000, None]


def _fraud_alert(decision) -> dict:
    return schemaless_reader(io.BytesIO(decision.value[5:]), SCHEMAS.parsed["FraudAlert"], None)


@pytest.mark.parametrize("with_model", [False, True])
def test_a_legit_record_keeps_its_bytes_and_carries_its_score_in_a_header(with_model):
    amounts = [1_500, 95_000, 30_000, 70_000]  # $15, $950 (the amount rule), $300, $700
    values = [
        encode(make_tx(a, transaction_id=f"t{i}", event_time=START + timedelta(minutes=i)).to_dict())
        for i, a in enumerate(amounts)
    ]
    model = scoring.Model(_Booster(), {"threshold": 0.6, "model_version": 3}) if with_model else None
    labels = _Labels(scoring.LabelTable()) if with_model else None
    decisions = _decider(model, labels).decide([_Message(v, i) for i, v in enumerate(values)])
    expected = [0.015, 0.95, 0.3, 0.7] if with_model else [0.0, 1.0, 0.0, 0.0]
    routes = [Route.LEGIT, Route.FRAUD, Route.LEGIT, Route.FRAUD if with_model else Route.LEGIT]
    assert [d.route for d in decisions] == routes
    for decision, value, score in zip(decisions, values, expected, strict=True):
        if decision.route is Route.LEGIT:
            assert decision.value == value  # byte for byte
            assert float(dict(decision.headers)[SCORE_HEADER].decode()) == pytest.approx(score)
        else:
            assert _fraud_alert(decision)["score"] == pytest.approx(score)
    if with_model:
        assert _fraud_alert(decisions[3])["rules"] == [MODEL_RULE]
        assert {"id": MODEL_RULE, "version": 3} in _fraud_alert(decisions[3])["fired"]
        assert labels.caught_up_to == [int((START + timedelta(minutes=3)).timestamp() * 1000)]


def test_rules_score_is_the_highest_fired_rule():
    fired = np.array([[True, False, False], [True, True, False]])
    assert scoring.rules_score(fired).tolist() == [1.0, 1.0, 0.0]
    assert scoring.rules_score(np.zeros((0, 2), bool)).tolist() == [0.0, 0.0]


# ----- one feature function for training and serving -----
def test_training_and_the_detector_compute_features_with_the_same_function(monkeypatch):
    """A spy on model_features: train's training_set and the detector's decide both call it, and for the
    same transactions (with the same labels) it returns the same rows."""
    calls = {"n": 0, "rows": {}}
    real = scoring.model_features

    def spy(tx, card, labels, delay_ms):
        matrix = real(tx, card, labels, delay_ms)
        calls["n"] += 1
        for tx_id, row in zip(tx.transaction_id.tolist(), matrix, strict=True):
            calls["rows"].setdefault(tx_id, []).append(row.copy())
        return matrix

    monkeypatch.setattr(scoring, "model_features", spy)
    rng = np.random.default_rng(11)
    start_ms = int(START.timestamp() * 1000)
    times = np.sort(rng.integers(start_ms, start_ms + 20 * DAY_MS, 600))
    txs = [
        make_tx(
            int(rng.integers(100, 40_000)),
            transaction_id=f"t{i}",
            card_id=f"c{rng.integers(0, 20)}",
            terminal_id=f"term{rng.integers(0, 15)}",
            event_time=int(t),
        )
        for i, t in enumerate(times)
    ]
    labels = scoring.LabelTable()
    labels.add([t.terminal_id for t in txs], [int(t) for t in times], (rng.random(600) < 0.2).tolist())
    # Training, as `fraudstream train` builds it: batches of columns, every transaction labelled.
    records = [t.to_dict() for t in txs]
    batches = [TxColumns.from_records(records[i : i + 100]) for i in range(0, 600, 100)]
    data = train.training_set(
        batches,
        labels,
        {t.transaction_id: False for t in txs},
        first_ms=start_ms,
        end_ms=start_ms + 30 * DAY_MS,
        label_delay_ms=DELAY_MS,
    )
    assert len(data.target) == 600 and calls["n"] == 6
    trained = {k: v[0] for k, v in calls["rows"].items()}
    # Serving: the detector's decide, on the same transactions as Kafka messages, in batches of 150.
    calls["rows"].clear()
    model = scoring.Model(_Booster(), {"threshold": 2.0})
    decider = _decider(model, _Labels(labels))
    for i in range(0, 600, 150):
        decider.decide([_Message(encode(r), i + j) for j, r in enumerate(records[i : i + 150])])
    assert calls["n"] == 10
    served = {k: v[0] for k, v in calls["rows"].items()}
    assert served.keys() == trained.keys()
    for tx_id in trained:
        np.testing.assert_array_equal(served[tx_id], trained[tx_id], err_msg=tx_id)
    terminal_risk = np.array([trained[t.transaction_id][scoring.MODEL_FEATURES.index("terminal_risk_7d")] for t in txs])
    assert terminal_risk.max() > 0  # the labels really reached some rows


# ----- the model file -----
def test_a_model_file_round_trips_and_a_foreign_or_stale_one_is_one_line(tmp_path):
    import lightgbm

    rng = np.random.default_rng(1)
    x = rng.random((400, len(scoring.MODEL_FEATURES))).astype(np.float32)
    y = x[:, 0] > 0.7
    booster = lightgbm.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1}, lightgbm.Dataset(x, y), num_boost_round=5
    )
    path = tmp_path / "model.txt"
    scoring.Model(booster, {"model_version": 2, "threshold": 0.4}).save(path)
    loaded = scoring.Model.load(path)
    assert loaded.threshold == 0.4 and loaded.meta["model_version"] == 2
    np.testing.assert_allclose(loaded.score(x), booster.predict(x))
    (tmp_path / "other.txt").write_text("tree\nversion=v4\n")
    with pytest.raises(ConfigError, match="not a fraudstream model file"):
        scoring.Model.load(tmp_path / "other.txt")
    header, _, body = path.read_text().partition("\n")
    (tmp_path / "stale.txt").write_text(header.replace('"amount"', '"amount_usd"') + "\n" + body)
    with pytest.raises(ConfigError, match="other features"):
        scoring.Model.load(tmp_path / "stale.txt")
    with pytest.raises(ConfigError, match="cannot read model file"):
        scoring.Model.load(tmp_path / "missing.txt")
