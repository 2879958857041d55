"""The benchmark keeps working: `python -m benchmarks --quick` on tiny counts, against the real stack.

No timed assertions: it checks that the run completes, that every contender routed or sent exactly
what it was given, and that the JSON and markdown have the expected shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fraudstream.settings import PROJECT_ROOT, Settings

DETECTORS = ("ours", "confluent_per_message", "seed_kafka_python_json")
PRODUCERS = ("ours", "confluent_per_message")


@pytest.fixture(scope="module")
def quick_run(stack_settings: Settings, tmp_path_factory) -> tuple[dict, str]:
    output_dir = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": stack_settings.bootstrap_servers,
           "SCHEMA_REGISTRY_URL": stack_settings.schema_registry_url}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--output-dir", str(output_dir)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((output_dir / "latest.json").read_text()), (output_dir / "latest.md").read_text()


def test_every_detector_routes_every_transaction_by_the_rule(quick_run):
    results, _ = quick_run
    count, fraud = results["config"]["count"], results["prefill"]["fraud"]
    assert results["prefill"]["count"] == count
    assert 0 < fraud < count  # the generator makes some of each
    assert set(results["detectors"]) == set(DETECTORS)
    for key, entry in results["detectors"].items():
        assert entry["error"] is None, key
        assert entry["runs"], key
        for run in entry["runs"]:
            assert run["routed"] == run["legit"] + run["fraud"] + run["dead_letter"] == count, key
            assert run["fraud"] == fraud, key
            assert run["exit_code"] == 0, key
            # A Python process with a Kafka client: tens of MiB, not bytes and not gigabytes.
            assert 10 < run["peak_rss_mib"] < 4096, key
            assert run["cpu_s"] > 0, key
        assert entry["throughput_tps"] > 0, key


def test_every_producer_delivers_what_it_sent(quick_run):
    results, _ = quick_run
    assert set(results["producers"]) == set(PRODUCERS)
    for key, entry in results["producers"].items():
        assert entry["error"] is None, key
        for run in entry["runs"]:
            assert run["sent"] == run["delivered"] == results["config"]["producer_count"], key
        assert entry["throughput_tps"] > 0, key


def test_latency_is_measured_at_each_rate(quick_run):
    results, _ = quick_run
    latency = results["latency"]
    assert latency["error"] is None
    assert [run["rate_tps"] for run in latency["runs"]] == results["config"]["latency_rates"]
    for run in latency["runs"]:
        assert run["records"] > 0
        assert 0 <= run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]


def test_ratios_targets_and_machine_are_reported(quick_run):
    results, markdown = quick_run
    assert set(results["ratios"]["detector_throughput"]) == {f"ours/{key}" for key in DETECTORS if key != "ours"}
    assert set(results["ratios"]["producer_throughput"]) == {"ours/confluent_per_message"}
    assert all(value > 0 for value in results["ratios"]["detector_throughput"].values())
    assert [t["met"] in (True, False) for t in results["targets"]] == [True, True]
    machine = results["machine"]
    assert machine["cpu_count"] >= 1
    assert all(machine["versions"][name] for name in ("confluent_kafka", "librdkafka", "fastavro", "kafka_python"))
    assert results["errors"] == []
    for heading in ("| Detector |", "| Producer |", "| Rate (tx/s) |", "**Targets**"):
        assert heading in markdown
    for entry in (*results["detectors"].values(), *results["producers"].values()):
        assert entry["label"] in markdown
