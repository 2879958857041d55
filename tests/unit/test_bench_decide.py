"""The decide micro-benchmark keeps working (it measures nothing here: tiny batches, a blink each)."""

from __future__ import annotations

import sys
from pathlib import Path

import benchmarks.decide


def test_the_decide_benchmark_runs_side_by_side_with_a_baseline(monkeypatch, capsys):
    baseline = Path(benchmarks.decide.fraudstream.consumer.decide.__file__)  # this checkout against itself
    monkeypatch.setattr(sys, "argv", ["decide", "--batch", "60", "--seconds", "0.01", "--baseline", str(baseline)])
    benchmarks.decide.main()
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| this") or line.startswith("| baseline")
    ]
    assert len(rows) == 8  # 2 checkouts x 2 deciders x 2 batches
    assert all(float(row.split("|")[4].replace(",", "")) > 0 for row in rows)
