"""The benchmark keeps working: `python -m benchmarks --quick` on tiny counts, against the real stack.

No timed assertions: it checks that the run completes, that every contender (quixstreams in its own
environment and the passthrough limit included) routed or sent exactly what it was given, and that
the JSON, the markdown and the PNG charts have the expected shape. quixstreams' environment
(.venv-quix) is created on the first run and reused after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fraudstream.settings import PROJECT_ROOT, Settings

# Our transaction size (20,000 at most) and the larger one; at ours, also with produce_batch.
LIMITS = ("eos_passthrough_20000", "eos_passthrough_50000", "eos_passthrough_20000_produce_batch")
VELOCITY = ("ours_velocity", "quixstreams_velocity")  # the same stateful rule on both sides
DETECTORS = (
    "ours",
    *LIMITS,
    "quixstreams",
    "confluent_per_message",
    "seed_kafka_python_json",
    "ours_stateful",
    *VELOCITY,
)
PRODUCERS = ("ours", "confluent_per_message")
CHARTS = ("throughput", "cpu", "latency-cdf", "scale")
QUICK_VELOCITY_MAX = 1
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(stack_settings: Settings, tmp_path_factory) -> tuple[dict, str, Path]:
    output_dir = tmp_path_factory.mktemp("bench")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack_settings.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": stack_settings.schema_registry_url,
    }
    # A velocity limit that tiny counts reach, so that the stateful contender's rule visibly fires.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--velocity-max",
            str(QUICK_VELOCITY_MAX),
            "--output-dir",
            str(output_dir),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((output_dir / "latest.json").read_text()), (output_dir / "latest.md").read_text(), output_dir


def test_every_detector_routes_every_transaction_by_its_rule(quick_run):
    results, _, _ = quick_run
    count, fraud, velocity = (
        results["config"]["count"],
        results["prefill"]["fraud"],
        results["prefill"]["velocity_fraud"],
    )
    assert results["prefill"]["count"] == count
    assert 0 < fraud < velocity < count  # the generator makes some of each; velocity adds to the amount rule
    assert set(results["detectors"]) == set(DETECTORS)
    expected_fraud = {"large_amount": fraud, "velocity": velocity, None: 0}
    for key in DETECTORS:
        entry = results["detectors"][key]
        assert entry["error"] is None, key
        assert entry["limit"] == (key in LIMITS), key
        assert entry["runs"], key
        for run in entry["runs"]:
            assert run["routed"] == run["legit"] + run["fraud"] + run["dead_letter"] == count, key
            if entry["rule"] == "own":
                # Ours' stateful rule set: no count to hold it to, but its rules are not the amount
                # rule alone, which shows that the stateful path ran and not the stateless one.
                assert 0 < run["fraud"] < count and run["fraud"] != fraud, key
            else:
                assert run["fraud"] == expected_fraud[entry["rule"]], key
            assert run["exit_code"] == 0, key
            # A Python process with a Kafka client: tens of MiB, not bytes and not gigabytes.
            assert 10 < run["peak_rss_mib"] < 4096, key
            assert run["cpu_s"] > 0 and run["cpu_ms_per_1k"] > 0, key
        assert entry["throughput_tps"] > 0 and entry["cpu_ms_per_1k"] > 0, key
    assert [results["detectors"][key]["batch"] for key in LIMITS] == [20_000, 50_000, 20_000]
    assert [results["detectors"][key]["produce_batch"] for key in LIMITS] == [False, False, True]
    assert all(run["legit"] == count for key in LIMITS for run in results["detectors"][key]["runs"])


def test_ours_and_quixstreams_run_the_same_velocity_rule(quick_run):
    results, _, _ = quick_run
    # Each run's fraud count equals the pre-fill's own session count (checked above), so the two agree
    # with each other and with an independent count; ours ran its velocity rule in the stateful path.
    assert (
        results["detectors"]["ours_velocity"]["rule"]
        == results["detectors"]["quixstreams_velocity"]["rule"]
        == "velocity"
    )
    velocity_target = next(t for t in results["targets"] if "velocity" in t["name"])
    assert velocity_target["measured"] is not None and velocity_target["met"] is not None


def test_every_producer_delivers_what_it_sent(quick_run):
    results, _, _ = quick_run
    assert set(results["producers"]) == set(PRODUCERS)
    for key, entry in results["producers"].items():
        assert entry["error"] is None, key
        for run in entry["runs"]:
            assert run["sent"] == run["delivered"] == results["config"]["producer_count"], key
        assert entry["throughput_tps"] > 0, key


def test_latency_is_measured_at_each_rate(quick_run):
    results, _, _ = quick_run
    latency = results["latency"]
    assert latency["error"] is None
    rounds = results["config"]["latency_runs"]
    assert [run["rate_tps"] for run in latency["runs"]] == results["config"]["latency_rates"] * rounds
    for run in latency["runs"]:
        assert run["records"] > 0
        assert 0 <= run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert run["cdf_ms"] == sorted(run["cdf_ms"]) and run["cdf_ms"][-1] == run["max_ms"]


def test_scale_covers_every_configuration(quick_run):
    results, _, _ = quick_run
    config, scale = results["config"], results["scale"]
    assert scale["error"] is None
    assert [(row["processes"], row["partitions_per_process"]) for row in scale["rows"]] == [
        (n, p) for n in config["scale_processes"] for p in config["scale_partitions"]
    ]
    for row in scale["rows"]:
        assert row["partitions"] == row["processes"] * row["partitions_per_process"]
        assert row["run"]["routed"] == row["run"]["legit"] + row["run"]["fraud"] == config["scale_count"]
        assert row["throughput_tps"] > 0 and row["cpu_ms_per_1k"] > 0


def test_charts_are_png_files(quick_run):
    _, _, output_dir = quick_run
    for chart in CHARTS:
        path = output_dir / f"latest-{chart}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, chart


def test_ratios_targets_and_machine_are_reported(quick_run):
    results, markdown, _ = quick_run
    others = {key for key in DETECTORS if key != "ours"}
    assert set(results["ratios"]["detector_throughput"]) == {f"ours/{key}" for key in others}
    assert set(results["ratios"]["detector_cpu"]) == {f"{key}/ours" for key in others}
    assert set(results["ratios"]["throughput_vs_limit_at_our_batch"]) == set(DETECTORS)
    assert results["ratios"]["throughput_vs_limit_at_our_batch"]["eos_passthrough_20000"] == 1.0
    assert set(results["ratios"]["producer_throughput"]) == {"ours/confluent_per_message"}
    for name in ("detector_throughput", "detector_cpu", "throughput_vs_best_limit", "cpu_vs_limit_at_our_batch"):
        assert all(value > 0 for value in results["ratios"][name].values()), name
    # Every goal is measured, even on tiny counts.
    assert [t["met"] for t in results["targets"]].count(None) == 0
    machine = results["machine"]
    assert machine["cpu_count"] >= 1
    assert all(
        machine["versions"][name]
        for name in ("confluent_kafka", "librdkafka", "fastavro", "kafka_python", "quixstreams")
    )
    assert results["errors"] == []
    for heading in ("| Detector |", "| Producer |", "| Rate (tx/s) |", "| Processes |", "**Targets**"):
        assert heading in markdown
    for entry in (*results["detectors"].values(), *results["producers"].values()):
        assert entry["label"] in markdown


def test_engine_before_after_runs_the_default_detector_of_its_tree(stack_settings: Settings, tmp_path):
    """benchmarks/engine_before_after.py, the "after" side alone on tiny counts: "before" needs the old commit's
    own virtual environment (minutes to install once), which the suite does not build."""
    output = tmp_path / "engine.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.engine_before_after",
            *("--sides", "after", "--count", "200", "--startup-count", "100", "--rounds", "1"),
            *("--output", str(output)),
        ],
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": stack_settings.bootstrap_servers,
            "SCHEMA_REGISTRY_URL": stack_settings.schema_registry_url,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(output.read_text())
    assert (report["count"], report["startup_count"], report["rounds"]) == (200, 100, 1)
    assert set(report["sides"]) == {"after"} and "ratios_after_before" not in report
    after = report["sides"]["after"]
    # The detector that ran is this tree's, as a process of its own, stateful (its changelog topics exist).
    assert Path(after["detector"]).resolve().is_relative_to(PROJECT_ROOT.resolve())
    for run, count in ((after["runs"][0], 200), (after["startup_runs"][0], 100)):
        assert run["count"] == run["legit"] + run["fraud"] == count
        assert run["exit_code"] == 0 and run["cpu_s"] > 0 and run["changelog_topics"] > 0
    assert after["cpu_ms_per_1k"] > 0 and after["startup_cpu_s"] > 0
    assert report["machine"]["versions"]["librdkafka"]
