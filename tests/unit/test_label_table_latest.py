"""Analysts' verdicts in the detector's label table (and `train`'s): the latest label of a transaction wins,
behind the same event-time windows as every label; without transaction ids every label counts, as before."""

from __future__ import annotations

import numpy as np

from fraudstream.consumer.model import LabelTable

DAY = 86_400_000
T = 1_780_000_000_000


def counts(table: LabelTable, terminal: bytes = b"term-1") -> tuple[int, int]:
    labels, frauds = table.window_counts(np.array([terminal], dtype=object), np.array([T - DAY]), np.array([T + DAY]))
    return int(labels[0]), int(frauds[0])


def test_a_changed_verdict_replaces_the_earlier_label_of_its_transaction():
    table = LabelTable()
    table.add(["term-1", "term-1"], [T, T + 5], [False, True], ["tx-a", "tx-b"])  # the generator's labels
    assert counts(table) == (2, 1)
    table.add(["term-1"], [T], [True], ["tx-a"])  # an analyst: fraud after all
    assert counts(table) == (2, 2)
    table.add(["term-1"], [T], [False], ["tx-a"])  # changed again: the latest wins
    assert counts(table) == (2, 1)
    assert table.revised == 2


def test_revisions_survive_merges_and_expire_with_their_labels():
    table = LabelTable()
    n = 10_000  # several merges of the pending part
    ids = [f"tx-{i}" for i in range(n)]
    table.add(["term-1"] * n, [T + i for i in range(n)], [False] * n, ids)
    table.add(["term-1"] * 100, [T + i for i in range(100)], [True] * 100, ids[:100])
    assert counts(table) == (n, 100)
    assert table.expire(T + 50) > 0
    assert counts(table) == (n - 50, 50)
    assert "tx-10" not in table._latest and "tx-60" in table._latest


def test_without_transaction_ids_every_label_counts():
    table = LabelTable()
    table.add(["term-1", "term-1"], [T, T], [False, True])
    assert counts(table) == (2, 1)


def test_a_verdict_for_another_terminal_moves_the_label():
    table = LabelTable()
    table.add(["term-1"], [T], [True], ["tx-a"])
    table.add(["term-2"], [T], [True], ["tx-a"])
    assert counts(table, b"term-1") == (0, 0) and counts(table, b"term-2") == (1, 1)
