"""Detector throughput: the same pre-filled transactions through each detector, one process each.

Throughput is steady-state: records routed between the moment the first output becomes readable
(by a read_committed consumer) and the moment all N are, divided by that time. Process start-up,
imports and the consumer-group join are excluded for every contender alike; the wall time from
spawn to done is recorded next to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import Contender, OutputCounter, RunFailed, count_until, python_module, unique
from fraudstream.settings import Settings


@dataclass(frozen=True, slots=True)
class Topics:
    input: str
    legit: str
    fraud: str
    dlq: str | None

    @classmethod
    def derived(cls, settings: Settings) -> Topics:
        return cls(settings.transactions_topic, settings.legit_topic, settings.fraud_topic, settings.dlq_topic)

    @property
    def outputs(self) -> list[str]:
        return [t for t in (self.legit, self.fraud, self.dlq) if t]


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    key: str
    label: str
    delivery: str
    topics: Topics

    def argv(self, settings: Settings, group_id: str, *, batch_max_records: int | None,
             batch_max_ms: int | None) -> list[str]:
        t = self.topics
        if self.key == "ours":
            argv = python_module("fraudstream.cli", "detect", "--topic", t.input, "--group-id", group_id,
                                 "--bootstrap-servers", settings.bootstrap_servers,
                                 "--schema-registry-url", settings.schema_registry_url,
                                 "--fraud-threshold-cents", str(settings.fraud_threshold_cents))
            if batch_max_records:
                argv += ["--batch-max-records", str(batch_max_records)]
            if batch_max_ms:
                argv += ["--batch-max-ms", str(batch_max_ms)]
            return argv
        if self.key == "confluent_per_message":
            return python_module("benchmarks.peers.confluent_per_message",
                                 "--bootstrap-servers", settings.bootstrap_servers,
                                 "--schema-registry-url", settings.schema_registry_url,
                                 "--input-topic", t.input, "--legit-topic", t.legit, "--fraud-topic", t.fraud,
                                 "--dlq-topic", t.dlq, "--group-id", group_id,
                                 "--threshold-cents", str(settings.fraud_threshold_cents))
        if self.key == "seed_kafka_python_json":
            return python_module("benchmarks.peers.seed_kafka_python_json",
                                 "--bootstrap-servers", settings.bootstrap_servers,
                                 "--input-topic", t.input, "--legit-topic", t.legit, "--fraud-topic", t.fraud,
                                 "--group-id", group_id, "--threshold-cents", str(settings.fraud_threshold_cents))
        raise ValueError(f"unknown detector {self.key}")


def detector_specs(avro: Settings, confluent_out: Settings, json_in: Settings) -> list[DetectorSpec]:
    """Ours first; it and the confluent peer read the same Avro topic, the seed reads its JSON copy."""
    return [
        DetectorSpec("ours", "ours: fraudstream detect", "exactly-once",
                     Topics.derived(avro)),
        DetectorSpec("confluent_per_message", "confluent-kafka examples: AvroDeserializer/AvroSerializer per message",
                     "at-least-once",
                     Topics(avro.transactions_topic, confluent_out.legit_topic, confluent_out.fraud_topic,
                            confluent_out.dlq_topic)),
        DetectorSpec("seed_kafka_python_json", "seed: kafka-python, JSON, per message", "at-least-once (auto-commit)",
                     Topics(json_in.transactions_topic, json_in.legit_topic, json_in.fraud_topic, None)),
    ]


@dataclass(frozen=True, slots=True)
class DetectorRun:
    detector: str
    run: int
    throughput_tps: float
    window_s: float  # first output readable -> all readable
    startup_included: bool  # true when everything became readable at once (tiny counts): wall time used
    wall_s: float  # process spawn -> all readable
    routed: int
    legit: int
    fraud: int
    dead_letter: int
    peak_rss_mib: float
    cpu_s: float
    exit_code: int

    def to_json(self) -> dict:
        return asdict(self)


def run_detector(spec: DetectorSpec, settings: Settings, *, run: int, expected: int, log_dir: Path,
                 batch_max_records: int | None = None, batch_max_ms: int | None = None,
                 stall_timeout_s: float = 60.0, profile_to: Path | None = None) -> DetectorRun:
    """One detector from the start of its (fresh) consumer group to all `expected` records routed, then SIGTERM.

    profile_to: run it under pyinstrument (wall-clock sampling, so waits show) and write the text
    report there; such a run's figures are distorted by the profiler and are not results.
    """
    counter = OutputCounter(settings, spec.topics.outputs)
    argv = spec.argv(settings, unique(f"bench-{spec.key}"), batch_max_records=batch_max_records,
                     batch_max_ms=batch_max_ms)
    if profile_to is not None:
        argv[1:1] = ["-m", "pyinstrument", "--renderer", "text", "--no-color", "--outfile", str(profile_to)]
    contender = Contender(f"{spec.key}-{'profile' if profile_to else f'run{run}'}", argv, log_dir)
    try:
        routed = count_until(counter, contender, expected, stall_timeout_s=stall_timeout_s)
    except BaseException:
        contender.stop()
        raise
    finally:
        counter.close()
    exited = contender.stop()
    if exited.exit_code != 0:
        raise RunFailed(f"{spec.key} exited with {exited.exit_code} on SIGTERM: {contender.log_tail(3)}")
    window = routed.done_s - routed.first_seen_s
    startup_included = routed.count_at_first >= routed.total or window < 0.001
    wall = routed.done_s - contender.started
    throughput = routed.total / wall if startup_included else (routed.total - routed.count_at_first) / window
    by_topic = routed.by_topic
    return DetectorRun(
        detector=spec.key, run=run, throughput_tps=round(throughput, 1), window_s=round(window, 3),
        startup_included=startup_included, wall_s=round(wall, 3), routed=routed.total,
        legit=by_topic[spec.topics.legit], fraud=by_topic[spec.topics.fraud],
        dead_letter=by_topic[spec.topics.dlq] if spec.topics.dlq else 0,
        peak_rss_mib=round(exited.peak_rss_kib / 1024, 1), cpu_s=round(exited.cpu_s, 2), exit_code=exited.exit_code,
    )
