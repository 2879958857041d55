"""`fraudstream demo` end to end: real producer and detector processes, real broker and registry."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from fraudstream.demo.options import DEFAULT_BAD_RECORDS
from fraudstream.settings import Settings
from tests.support.kafka_io import read_topic
from tests.support.output_lines import LineReader, stop_process

DEMO_TIMEOUT_S = 240
PROGRESS = re.compile(r"^\[\s*[\d.]+s\] producing: produced=(\d+)")
STARTED = re.compile(r"^started (\S+) \(pid (\d+)\)")


def demo_command(settings: Settings, topic: str, tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fraudstream.cli",
        "demo",
        "--topic",
        topic,
        "--group-id",
        f"demo-test-{topic}",
        "--partitions",
        "3",
        "--rate",
        "150",
        "--interval",
        "1",
        "--log-dir",
        str(tmp_path / "logs"),
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--schema-registry-url",
        settings.schema_registry_url,
        *args,
    ]


def summary(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1, f"no summary line in:\n{stdout}"
    return dict(item.split("=", 1) for item in lines[0].removeprefix("summary: ").split())


def counts(fields: dict[str, str]) -> dict[str, int]:
    return {
        name: int(fields[name])
        for name in (
            "produced",
            "backlog",
            "legit",
            "fraud",
            "dead_letter",
            "true_positives",
            "false_positives",
            "false_negatives",
            "true_negatives",
        )
    }


def new_topic() -> str:
    return f"test-demo-{uuid.uuid4().hex[:10]}"


def test_demo_for_a_short_duration_exits_0_with_counts_that_add_up(stack_settings: Settings, tmp_path: Path) -> None:
    topic = new_topic()

    done = subprocess.run(
        demo_command(stack_settings, topic, tmp_path, "--duration", "4"),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    n = counts(summary(done.stdout))
    assert n["produced"] > 0 and n["backlog"] == 0
    assert n["produced"] == n["legit"] + n["fraud"] + n["dead_letter"]
    assert n["dead_letter"] == DEFAULT_BAD_RECORDS  # the demo's malformed records, and nothing else
    # Every decision met its label: the join with the ground truth is complete.
    assert n["true_positives"] + n["false_positives"] == n["fraud"]
    assert n["false_negatives"] + n["true_negatives"] == n["legit"]
    # The summary tells the truth about the topics (and nothing was routed twice).
    settings = stack_settings.replace(transactions_topic=topic)
    assert len(read_topic(settings, topic)) == n["produced"]
    assert len(read_topic(settings, settings.legit_topic)) == n["legit"]
    assert len(read_topic(settings, settings.fraud_topic)) == n["fraud"]
    assert len(read_topic(settings, settings.dlq_topic)) == n["dead_letter"]
    # Not a terminal: plain periodic lines, no escape codes, then the inspect commands.
    assert "\x1b[" not in done.stdout
    assert len([line for line in done.stdout.splitlines() if PROGRESS.match(line)]) >= 2
    assert f"fraudstream inspect {settings.fraud_topic} --from-beginning" in done.stdout
    assert "Traceback" not in done.stderr

    # The dead letters the real detector wrote, through `inspect`: a reason for each, exit 0.
    dead_letters = subprocess.run(
        [
            sys.executable,
            "-m",
            "fraudstream.cli",
            "inspect",
            settings.dlq_topic,
            "--from-beginning",
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--schema-registry-url",
            settings.schema_registry_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead_letters.returncode == 0, dead_letters.stderr
    printed = [json.loads(line) for line in dead_letters.stdout.splitlines()]
    assert sorted(r["error"]["kind"] for r in printed) == ["corrupt_avro", "no_magic_byte", "unknown_schema_id"]
    assert all(r["error"]["reason"] and r["source"]["topic"] == topic for r in printed)


def test_ctrl_c_stops_the_producer_drains_the_detectors_and_exits_0(stack_settings: Settings, tmp_path: Path) -> None:
    topic = new_topic()
    demo = subprocess.Popen(
        demo_command(stack_settings, topic, tmp_path, "--duration", "120", "--detectors", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        output = LineReader(demo.stdout)
        before_interrupt = output.until(
            lambda line: (m := PROGRESS.match(line)) is not None and int(m.group(1)) > 0, timeout_s=120
        )
        children = {m.group(1): int(m.group(2)) for line in before_interrupt if (m := STARTED.match(line))}
        assert sorted(children) == ["detector-0", "detector-1", "producer"]

        demo.send_signal(signal.SIGINT)
        rest = output.rest(timeout_s=DEMO_TIMEOUT_S)
        demo.wait(timeout=30)
        errors = demo.stderr.read()
    finally:
        stop_process(demo)

    assert demo.returncode == 0, rest + errors
    n = counts(summary(rest))
    assert n["produced"] > 0 and n["produced"] == n["legit"] + n["fraud"] + n["dead_letter"]
    assert int(summary(rest)["elapsed_s"].split(".")[0]) < 120  # stopped by Ctrl-C, not by the duration
    for name, pid in children.items():
        assert not alive(pid), f"{name} (pid {pid}) still running after the demo exited"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_more_detectors_than_partitions_is_refused_before_anything_starts(
    stack_settings: Settings, tmp_path: Path
) -> None:
    command = demo_command(stack_settings, new_topic(), tmp_path, "--detectors", "4")
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "3 partitions" in done.stderr
    assert "started" not in done.stdout
