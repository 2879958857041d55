"""`fraudstream detect` as an operator meets it: clear one-line failures, metrics, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import uuid

from fraudstream.settings import Settings
from tests.integration.test_detector import encoder_for, routed_total
from tests.support.kafka_io import produce_raw, transaction, wait_until


def run_cli(
    args: list[str], settings: Settings, timeout_s: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": settings.schema_registry_url,
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "fraudstream.cli", *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def test_unregistered_schemas_give_one_line_telling_what_to_run(stack_settings: Settings):
    done = run_cli(["detect", "--topic", f"unregistered-{uuid.uuid4().hex[:8]}"], stack_settings)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "fraudstream schemas register" in lines[0], done.stderr


def test_unreachable_broker_is_waited_for_its_outage_limit_then_one_line(stack_settings: Settings):
    # The detector may start before its cluster: it waits as for an outage, saying so, then gives up in one line.
    limit = {"FRAUDSTREAM_BROKER_OUTAGE_LIMIT_S": "12"}
    done = run_cli(["detect", "--bootstrap-servers", "127.0.0.1:1"], stack_settings, timeout_s=60, env=limit)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("fraudstream detect: error: Kafka at 127.0.0.1:1 did not answer within 12s"), lines
    assert "waiting for Kafka at 127.0.0.1:1: no broker has answered for 10 s" in done.stdout  # its log


def test_metrics_endpoint_and_clean_shutdown(pipeline: Settings):
    import socket

    with socket.socket() as probe:  # a free port for the metrics endpoint
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    encode = encoder_for(pipeline, pipeline.transactions_topic)
    produce_raw(
        pipeline,
        pipeline.transactions_topic,
        [(b"k", encode(transaction(a).to_dict())) for a in (10, 95_000, 20, 30)] + [(b"k", b"junk")],
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": pipeline.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": pipeline.schema_registry_url,
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fraudstream.cli",
            "detect",
            "--topic",
            pipeline.transactions_topic,
            "--group-id",
            pipeline.group_id,
            "--metrics-port",
            str(port),
            "--log-interval",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: routed_total(pipeline) >= 5, timeout_s=60, what="records routed")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()

        metrics = wait_until(
            lambda: "fraudstream_consumed_total 5.0" in (text := scrape()) and text,
            timeout_s=30,
            what="metrics to show the batch",
        )
        assert 'fraudstream_routed_total{route="fraud"} 1.0' in metrics
        assert 'fraudstream_routed_total{route="legit"} 3.0' in metrics
        assert 'fraudstream_dead_lettered_total{kind="no_magic_byte"} 1.0' in metrics
        assert "fraudstream_commit_seconds_bucket" in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "stopped: consumed=5 legit=3 fraud=1 dead_lettered=1" in output


def test_a_changelog_partitioned_unlike_the_input_is_refused_in_one_line(pipeline: Settings):
    from fraudstream.kafka import ensure_topics

    changelog = pipeline.changelog_topic("cards")
    ensure_topics(pipeline, (changelog,), partitions=1)  # the input has 3
    done = run_cli(["detect", "--topic", pipeline.transactions_topic, "--group-id", pipeline.group_id], pipeline)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"changelog {changelog} has 1 partitions but the input topic" in lines[0], done.stderr
