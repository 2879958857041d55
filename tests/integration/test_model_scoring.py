"""A learned score through the real pipeline: a small handbook run (labels 7 days late) -> `fraudstream train`
on its topics -> `detect --model` exactly once -> every routed record carries the model's score."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from fastavro import schemaless_reader

from fraudstream import evaluate as ev
from fraudstream.consumer import model as scoring
from fraudstream.producer import handbook
from fraudstream.producer.loop import produce
from fraudstream.schemas import load_schemas
from fraudstream.settings import Settings
from tests.integration.test_detector import RunningDetector, decode, routed_total
from tests.support.kafka_io import read_topic, wait_until

LABEL_DELAY_DAYS = 7.0


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": settings.schema_registry_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "fraudstream.cli", *args, "--topic", settings.transactions_topic],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_trained_model_scores_every_routed_record(pipeline: Settings, tmp_path, monkeypatch):
    simulation = handbook.simulate(customers=300, terminals=300, days=28, seed=5)
    report = produce(pipeline, simulation=simulation, label_delay_days=LABEL_DELAY_DAYS)
    assert report.ok, report.errors

    model_file = tmp_path / "model.txt"
    done = cli(
        pipeline,
        "train",
        "--from",
        "2018-04-12",
        "--to",
        "2018-04-18",
        "--output",
        str(model_file),
        "--model-version",
        "4",
    )
    assert done.returncode == 0, done.stderr
    assert "trained on" in done.stdout and done.stderr == ""
    model = scoring.Model.load(model_file)
    assert (model.meta["model_version"], model.meta["train_from"], model.meta["train_to"]) == (
        4,
        "2018-04-12",
        "2018-04-18",
    )

    # The detector's scoring path really runs: count the batches the model scored.
    scored = []
    real_score = scoring.Model.score
    monkeypatch.setattr(
        scoring.Model, "score", lambda self, matrix: scored.append(len(matrix)) or real_score(self, matrix)
    )
    detector = RunningDetector(pipeline.replace(model_file=model_file, label_delay_days=LABEL_DELAY_DAYS))
    try:
        wait_until(lambda: routed_total(pipeline) >= len(simulation), timeout_s=180, what="every transaction routed")
    finally:
        detector.stop()
    assert detector.error is None
    assert sum(scored) == len(simulation)
    assert detector.detector.labels.table.count == len(simulation)  # every label read, each with terminal and time

    legit = read_topic(pipeline, pipeline.legit_topic)
    fraud = read_topic(pipeline, pipeline.fraud_topic)
    assert len(legit) + len(fraud) == len(simulation)
    sent = {
        decode(pipeline, m.value())["transaction_id"]: m.value()
        for m in read_topic(pipeline, pipeline.transactions_topic)
    }
    for message in legit:
        score = float(dict(message.headers())[ev.SCORE_HEADER].decode())
        assert 0.0 <= score < model.threshold
        assert message.value() == sent[decode(pipeline, message.value())["transaction_id"]]  # byte for byte
    alert_schema = load_schemas(pipeline.schemas_dir).parsed["FraudAlert"]
    alerts = [schemaless_reader(io.BytesIO(m.value()[5:]), alert_schema, None) for m in fraud]
    assert alerts and all(a["score"] is not None for a in alerts)
    assert any("model" in a["rules"] and a["score"] >= model.threshold for a in alerts)

    output = tmp_path / "eval.json"
    done = cli(pipeline, "evaluate", "--output", str(output), "--from", "2018-04-26")
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    assert result["score_source"] == "score" and result["overall"]["auc_roc"] > 0.5

    # The backtest with the model, two rule sets (a candidate that changes nothing here, and the live rules):
    # every transaction gets the decision and the score the detector wrote, and the model scored each batch
    # once for both rule sets.
    candidate = tmp_path / "candidate.toml"
    candidate.write_text("[large_amount]\nthreshold_cents = 95000\n")
    backtest = tmp_path / "backtest.json"
    done = cli(
        pipeline,
        "backtest",
        "--rules",
        str(candidate),
        "--model",
        str(model_file),
        "--label-delay",
        str(LABEL_DELAY_DAYS),
        "--fidelity",
        "--output",
        str(backtest),
    )
    assert done.returncode == 0, done.stderr
    replayed = json.loads(backtest.read_text())
    fidelity = replayed["fidelity"]
    assert fidelity["compared"] == len(simulation) and fidelity["same"] == len(simulation), fidelity["differences"][:5]
    assert fidelity["same_score"] == len(simulation)
    speed = replayed["speed"]
    assert speed["model_batches_scored"] >= 1 and speed["model_batches_shared"] == speed["model_batches_scored"]
    # The labels were read once, for the model and the report: every transaction's label is in the report's count.
    assert speed["labels_read_once"] and replayed["labels"] == len(simulation)
