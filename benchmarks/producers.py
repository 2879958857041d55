"""Producer throughput: unthrottled, the same seeded records, each producer in a process of its own.

Both report delivered / elapsed, timed inside the process from the first record generated to the
last acknowledged (flush), so interpreter start-up is excluded alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import Contender, RunFailed, python_module
from benchmarks.ours_producer import REPORT_PREFIX
from fraudstream.settings import Settings

PRODUCERS: dict[str, str] = {
    "ours": "ours: fraudstream produce (fraudstream.producer.loop)",
    "confluent_per_message": "confluent-kafka examples: AvroSerializer per message",
}
RUN_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class ProducerRun:
    producer: str
    run: int
    throughput_tps: float
    sent: int
    delivered: int
    elapsed_s: float
    peak_rss_mib: float
    cpu_s: float

    def to_json(self) -> dict:
        return asdict(self)


def producer_argv(
    key: str,
    settings: Settings,
    *,
    count: int | None = None,
    duration: float | None = None,
    rate: float = 0.0,
    seed: int,
) -> list[str]:
    common = ["--bootstrap-servers", settings.bootstrap_servers, "--schema-registry-url", settings.schema_registry_url]
    if key == "ours":
        argv = python_module(
            "benchmarks.ours_producer",
            *common,
            "--topic",
            settings.transactions_topic,
            "--rate",
            str(rate),
            "--seed",
            str(seed),
        )
        if count is not None:
            argv += ["--count", str(count)]
        if duration is not None:
            argv += ["--duration", str(duration)]
        return argv
    if key == "confluent_per_message":
        return python_module(
            "benchmarks.peers.confluent_per_message_producer",
            *common,
            "--topic",
            settings.transactions_topic,
            "--labels-topic",
            settings.labels_topic,
            "--count",
            str(count),
            "--seed",
            str(seed),
        )
    raise ValueError(f"unknown producer {key}")


def read_report(contender: Contender) -> dict:
    for line in reversed(contender.log_path.read_text(errors="replace").splitlines()):
        if line.startswith(REPORT_PREFIX):
            return json.loads(line[len(REPORT_PREFIX) :])
    raise RunFailed(f"{contender.name} printed no report: {contender.log_tail(3)}")


def run_producer(key: str, settings: Settings, *, run: int, count: int, seed: int, log_dir: Path) -> ProducerRun:
    contender = Contender(f"producer-{key}-run{run}", producer_argv(key, settings, count=count, seed=seed), log_dir)
    exited = contender.wait(RUN_TIMEOUT_S)
    if exited.exit_code != 0:
        raise RunFailed(f"{contender.name} exited with {exited.exit_code}: {contender.log_tail(3)}")
    report = read_report(contender)
    if report["delivered"] != count:
        raise RunFailed(f"{contender.name} delivered {report['delivered']} of {count}")
    return ProducerRun(
        producer=key,
        run=run,
        throughput_tps=round(report["delivered"] / report["elapsed_s"], 1),
        sent=report["sent"],
        delivered=report["delivered"],
        elapsed_s=round(report["elapsed_s"], 3),
        peak_rss_mib=round(exited.peak_rss_kib / 1024, 1),
        cpu_s=round(exited.cpu_s, 2),
    )
