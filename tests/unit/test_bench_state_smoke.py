"""`python -m benchmarks.state --quick` keeps working (no timed assertions: it measures nothing)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import state
from fraudstream.consumer.features import PROFILE_DTYPE


def test_the_quick_state_benchmark_runs_every_path_and_writes_its_report(tmp_path: Path, capsys) -> None:
    assert state.main(["--quick", "--output-dir", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "state.json").read_text())
    features, memory = results["features"], results["memory"]
    for name in (
        "ours_card_features_and_rules_tps",
        "per_record_card_features_tps",
        "ours_terminal_features_tps",
        "per_record_terminal_features_tps",
        "from_arrow_tps",
    ):
        assert features[name] > 0, name
    assert features["count"] == 4_000 and features["per_record_sample"] == 2_000
    assert memory["cards"] == 20_000 and memory["row_bytes"] == PROFILE_DTYPE.itemsize == 200
    assert memory["estimate_bytes_per_key"] > memory["row_bytes"]  # rows plus the key index
    assert "| ours: card_features + rules (batch rounds) |" in (tmp_path / "state.md").read_text()
    assert "KeyedTable, 20,000 cards" in capsys.readouterr().out
