"""A small handbook simulation through the real pipeline: produce (labels delayed) -> detect -> evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np

from fraudstream import evaluate as ev
from fraudstream.settings import Settings
from fraudstream.producer import handbook
from fraudstream.producer.loop import produce
from tests.integration.test_detector import RunningDetector, decode, encoder_for, routed_total
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

LABEL_DELAY_DAYS = 7.0


def evaluate_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": settings.schema_registry_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "fraudstream.cli", "evaluate", "--topic", settings.transactions_topic, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_handbook_run_is_measured_end_to_end(pipeline: Settings, tmp_path):
    simulation = handbook.simulate(customers=300, terminals=600, days=21, seed=8)
    report = produce(pipeline, simulation=simulation, label_delay_days=LABEL_DELAY_DAYS)
    assert report.ok, report.errors
    assert report.sent == report.labels_sent == len(simulation)

    # On the broker: each label was written (its Kafka timestamp) no earlier than the first transaction
    # whose event time reached the label's due time, or after the last transaction when none did.
    transactions = [
        (m.timestamp()[1], decode(pipeline, m.value())) for m in read_topic(pipeline, pipeline.transactions_topic)
    ]
    transactions.sort(key=lambda pair: pair[0])
    event_ms = {tx["transaction_id"]: tx["event_time"].timestamp() * 1000 for _, tx in transactions}
    written_at = np.array([at for at, _ in transactions])
    running_clock = np.maximum.accumulate([tx["event_time"].timestamp() * 1000 for _, tx in transactions])
    labels = read_topic(pipeline, pipeline.labels_topic)
    assert len(labels) == len(simulation)
    held_to_the_end = 0
    for message in labels:
        due = event_ms[decode(pipeline, message.value())["transaction_id"]] + LABEL_DELAY_DAYS * handbook.DAY_MS
        first = int(np.searchsorted(running_clock, due))  # the first transaction that took the clock to `due`
        if first == len(transactions):
            held_to_the_end += 1
            first = len(transactions) - 1
        assert message.timestamp()[1] >= written_at[first]
    assert 0 < held_to_the_end < len(labels)

    detector = RunningDetector(pipeline)
    try:
        wait_until(lambda: routed_total(pipeline) >= len(simulation), timeout_s=180, what="every transaction routed")
    finally:
        detector.stop()
    assert detector.error is None

    output = tmp_path / "eval.json"
    done = evaluate_cli(pipeline, "--output", str(output))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "XGBoost, tuned (Handbook)" in done.stdout and "fraudstream (this run)" in done.stdout
    assert "risk scores" in done.stdout
    result = json.loads(output.read_text())
    assert (result["routed"], result["labels"], result["labelled"]) == (len(simulation),) * 3
    assert result["score_source"] == "score" and result["warnings"] == []
    # Without a model the detector has only its $900 rule here: what it flags is exactly what the rule says,
    # and its score is the rules' (1.0 when one fired, 0.0 otherwise).
    assert result["routed_flagged"] == int(np.count_nonzero(simulation.amount_cents > pipeline.fraud_threshold_cents))
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # The same evaluation computed straight from the simulation, without Kafka: the topics lost nothing.
    direct = ev.Routed()
    for tx, _ in simulation.to_pairs(0, len(simulation)):
        direct.add(
            tx.transaction_id,
            tx.card_id,
            int(tx.event_time.timestamp() * 1000),
            tx.amount_cents > pipeline.fraud_threshold_cents,
            float(tx.amount_cents > pipeline.fraud_threshold_cents),
        )
    truth = {
        label.transaction_id: (label.is_fraud, label.scenario) for _, label in simulation.to_pairs(0, len(simulation))
    }
    expected, _ = ev.evaluate(direct, truth, label_delay_days=LABEL_DELAY_DAYS)
    assert result["overall"] == json.loads(json.dumps(expected["overall"]))
    assert result["days"] == json.loads(json.dumps(expected["days"]))
    assert result["evaluated"] < len(simulation)  # cards known compromised were left out

    # Labels of transactions the outputs never saw: one line, and the report still comes.
    encode_label = encoder_for(pipeline, pipeline.labels_topic, "Label")
    strays = [str(uuid.uuid4()) for _ in range(3)]
    produce_raw(
        pipeline,
        pipeline.labels_topic,
        [(tx.encode(), encode_label({"transaction_id": tx, "is_fraud": True, "scenario": "x"})) for tx in strays],
    )
    done = evaluate_cli(pipeline, "--output", str(tmp_path / "again.json"), "--no-daily")
    assert done.returncode == 0
    assert done.stderr.splitlines() == [
        "fraudstream evaluate: warning: 3 labels name transactions that are not in the "
        "outputs (not routed yet, dead-lettered, or from another run): left out"
    ]
    assert json.loads((tmp_path / "again.json").read_text())["overall"] == result["overall"]


def test_outputs_without_labels_say_so_in_one_line_and_report_volumes(pipeline: Settings, tmp_path):
    encode = encoder_for(pipeline, pipeline.legit_topic)
    produce_raw(
        pipeline,
        pipeline.legit_topic,
        [(b"acc-1", encode(transaction(1_000 + i, account="acc-1").to_dict())) for i in range(20)],
    )
    done = evaluate_cli(pipeline, "--output", str(tmp_path / "eval.json"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "fraudstream evaluate: warning: no labels: precision, recall and the rest need "
        "the ground truth; only volumes reported"
    ]
    assert "routed 20 transactions (0 to fraud); 0 labels" in done.stdout


def test_no_routed_transactions_is_one_line(pipeline: Settings, tmp_path):
    done = evaluate_cli(pipeline, "--output", str(tmp_path / "eval.json"))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"fraudstream evaluate: error: no routed transactions on {pipeline.legit_topic} or "
        f"{pipeline.fraud_topic}: run fraudstream detect first"
    )
    assert not (tmp_path / "eval.json").exists()
