"""`python -m benchmarks.backtest` keeps working: a tiny topic against the real stack, every row measured.

No timed assertions (it measures nothing at this size): the run completes, which means every replay and the
bare read got every record of the topic and the replays decided each of them (the benchmark checks this and
fails otherwise), and its JSON holds each row with a rate and a CPU figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fraudstream.settings import PROJECT_ROOT, Settings

COUNT = 3_000
ROWS = ("live", "bare_read", "backtest_one_rule_set", "backtest_two_rule_sets")


def test_the_backtest_benchmark_measures_every_row_over_the_whole_topic(stack_settings: Settings, tmp_path):
    output = tmp_path / "backtest.json"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack_settings.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": stack_settings.schema_registry_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.backtest", "--count", str(COUNT), "--rounds", "1", "--json", str(output)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["count"] == COUNT and figures["rounds"] == 1
    for row in ROWS:
        assert figures[row]["records_per_s"] > 0 and figures[row]["cpu_ms_per_1k"] > 0, row
    assert "reading the topic alone" in done.stdout
