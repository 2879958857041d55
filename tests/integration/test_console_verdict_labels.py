"""Verdicts through the real broker and registry into the detector's own labels reader: a generator label,
then an analyst's verdict and its change, all written to the labels topic; the detector's LabelsReader reads
them into its table, where the latest label of the transaction is the one that counts."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from fraudstream.console.verdicts import VerdictWriter, verdict_label
from fraudstream.consumer.labels_topic import LabelsReader
from fraudstream.consumer.model import LabelTable
from fraudstream.records import Label
from fraudstream.settings import Settings
from tests.integration.test_detector import encoder_for
from tests.support.kafka_io import produce_raw, transaction

DAY = 86_400_000


def test_a_changed_verdict_reaches_the_detectors_label_table_as_the_latest_label(pipeline: Settings):
    tx = transaction(95_000, account="acc-verdict")
    generator = Label(
        transaction_id=tx.transaction_id,
        is_fraud=False,
        scenario="legit",
        terminal_id=tx.terminal_id,
        event_time=tx.event_time,
    )
    produce_raw(
        pipeline,
        pipeline.labels_topic,
        [(tx.transaction_id.encode(), encoder_for(pipeline, pipeline.labels_topic, "Label")(generator.to_dict()))],
    )
    alert = {"transaction": {**tx.to_dict(), "event_time": int(tx.event_time.timestamp() * 1000)}}
    writer = VerdictWriter(pipeline)
    writer.write(verdict_label(alert, is_fraud=True, analyst="ann"))
    writer.write(verdict_label(alert, is_fraud=False, analyst="bob", at=datetime.now(UTC)))
    writer.close()

    table = LabelTable()
    reader = LabelsReader(pipeline, table)
    try:
        reader.start(timeout_s=60)
    finally:
        reader.close()
    t = int(tx.event_time.timestamp() * 1000)
    labels, frauds = table.window_counts(
        np.array([tx.terminal_id.encode()], dtype=object), np.array([t - DAY]), np.array([t + DAY])
    )
    assert (reader.read, table.revised) == (3, 2)
    assert (int(labels[0]), int(frauds[0])) == (1, 0)  # bob's "not fraud", not ann's "fraud"
