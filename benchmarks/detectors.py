"""Detector throughput: the same pre-filled transactions through each detector, one process each.

Throughput is steady-state: records routed between the moment the first output becomes readable
(by a read_committed consumer) and the moment all N are, divided by that time. Process start-up,
imports and the consumer-group join are excluded for every contender alike; the wall time from
spawn to done is recorded next to it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.data import VELOCITY_GAP_MS, VELOCITY_MAX
from benchmarks.harness import Contender, OutputCounter, RunFailed, count_until, python_module, unique
from fraudstream.consumer.rules import DEFAULT_RULES_FILE
from fraudstream.settings import Settings


@dataclass(frozen=True, slots=True)
class Topics:
    input: str
    legit: str
    fraud: str | None
    dlq: str | None

    @classmethod
    def derived(cls, settings: Settings) -> Topics:
        return cls(settings.transactions_topic, settings.legit_topic, settings.fraud_topic, settings.dlq_topic)

    @property
    def outputs(self) -> list[str]:
        return [t for t in (self.legit, self.fraud, self.dlq) if t]


# What a contender's fraud topic must hold, checked on every run against the pre-filled records.
LARGE_AMOUNT, VELOCITY, NO_RULE = "large_amount", "velocity", None
OWN_RULES = "own"  # ours' stateful rule set: no count to check against, only that every record was routed


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    key: str
    label: str
    delivery: str
    topics: Topics
    rule: str | None = LARGE_AMOUNT  # NO_RULE: the passthrough, which routes nothing to fraud
    batch: int | None = None  # the passthrough's records per transaction
    produce_batch: bool = False  # the passthrough: one produce_batch call per transaction
    python: str = sys.executable  # quixstreams runs in its own environment
    velocity_max: int = VELOCITY_MAX  # most transactions per card and session
    # Ours' stateful contenders: their rules. Both read the input's one rules topic, where a rules file only
    # seeds an empty topic: put_rules_in_force() writes them there before each run, as `fraudstream rules set`.
    rules_file: Path | None = None

    @property
    def is_limit(self) -> bool:
        return self.key.startswith(PASSTHROUGH)

    def argv(
        self,
        settings: Settings,
        group_id: str,
        *,
        batch_max_records: int | None,
        batch_max_ms: int | None,
        instance: int = 0,
        state_dir: Path | None = None,
    ) -> list[str]:
        t = self.topics
        connection = ["--bootstrap-servers", settings.bootstrap_servers]
        registry = ["--schema-registry-url", settings.schema_registry_url]
        if self.key in ("ours", OURS_STATEFUL, OURS_VELOCITY):
            argv = python_module(
                "fraudstream.cli",
                "detect",
                "--topic",
                t.input,
                "--group-id",
                group_id,
                # one per process: two detectors of a group on one host must not fence each other
                "--transactional-id",
                f"{group_id}-{instance}",
                *connection,
                *registry,
                "--fraud-threshold-cents",
                str(settings.fraud_threshold_cents),
                # the amount rule alone, as every stateless contender runs it
                *(["--stateless"] if self.key == "ours" else []),
                *(["--rules", str(self.rules_file)] if self.rules_file else []),
            )
            if batch_max_records:
                argv += ["--batch-max-records", str(batch_max_records)]
            if batch_max_ms:
                argv += ["--batch-max-ms", str(batch_max_ms)]
            return argv
        if self.is_limit:
            return python_module(
                "benchmarks.peers.eos_passthrough",
                *connection,
                "--input-topic",
                t.input,
                "--output-topic",
                t.legit,
                "--group-id",
                group_id,
                "--batch",
                str(self.batch),
                *(["--produce-batch"] if self.produce_batch else []),
            )
        if self.key in (QUIX, QUIX_VELOCITY):
            return [
                self.python,
                "-m",
                "benchmarks.peers.quix_detector",
                *connection,
                *registry,
                "--input-topic",
                t.input,
                "--legit-topic",
                t.legit,
                "--fraud-topic",
                t.fraud,
                "--group-id",
                group_id,
                "--threshold-cents",
                str(settings.fraud_threshold_cents),
                "--rule",
                "velocity" if self.key == QUIX_VELOCITY else "stateless",
                "--velocity-gap-s",
                str(VELOCITY_GAP_MS / 1000),
                "--velocity-max",
                str(self.velocity_max),
                "--state-dir",
                str(state_dir),
            ]
        if self.key == "confluent_per_message":
            return python_module(
                "benchmarks.peers.confluent_per_message",
                *connection,
                *registry,
                "--input-topic",
                t.input,
                "--legit-topic",
                t.legit,
                "--fraud-topic",
                t.fraud,
                "--dlq-topic",
                t.dlq,
                "--group-id",
                group_id,
                "--threshold-cents",
                str(settings.fraud_threshold_cents),
            )
        if self.key == "seed_kafka_python_json":
            return python_module(
                "benchmarks.peers.seed_kafka_python_json",
                *connection,
                "--input-topic",
                t.input,
                "--legit-topic",
                t.legit,
                "--fraud-topic",
                t.fraud,
                "--group-id",
                group_id,
                "--threshold-cents",
                str(settings.fraud_threshold_cents),
            )
        raise ValueError(f"unknown detector {self.key}")


QUIX, QUIX_VELOCITY, PASSTHROUGH = "quixstreams", "quixstreams_velocity", "eos_passthrough"
PASSTHROUGH_BEST_SIZES = (20_000, 50_000)  # besides ours: where the broker's per-transaction cost stops mattering
# Ours with its own stateful rule set (rules/default.toml: card testing, travel, the terminal window): state's
# cost on our side, but not the same rules as quixstreams' velocity window.
OURS_STATEFUL = "ours_stateful"
# Ours with quixstreams' velocity rule and nothing else: the amount rule (without its big-ticket exemption)
# and the velocity count per card session, in our per-card state with its changelog.
OURS_VELOCITY = "ours_velocity"


def velocity_rules(velocity_max: int) -> str:
    """The rules file of ours' velocity contender: the same two rules as quixstreams' velocity branch."""
    return (
        "# benchmarks: the amount rule and the velocity count, as the quixstreams velocity contender runs them\n"
        "[large_amount]\nexempt_categories = []\n"
        "[card_testing]\nenabled = false\n[impossible_travel]\nenabled = false\n"
        "[far_from_home]\nenabled = false\n[compromised_terminal]\nenabled = false\n"
        f"[velocity]\nenabled = true\nmax_in_session = {velocity_max}\n"
    )


def put_rules_in_force(spec: DetectorSpec, avro: Settings) -> None:
    """`fraudstream rules set` with the contender's rules file, on the input's rules topic (a no-op for others)."""
    if spec.rules_file is None:
        return
    done = subprocess.run(
        python_module(
            "fraudstream.cli",
            "rules",
            "set",
            str(spec.rules_file),
            "--topic",
            avro.transactions_topic,
            "--bootstrap-servers",
            avro.bootstrap_servers,
            "--schema-registry-url",
            avro.schema_registry_url,
            "--comment",
            f"benchmark: {spec.key}",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RunFailed(f"rules set {spec.rules_file} for {spec.key}: {(done.stderr or done.stdout).strip()[-500:]}")


def passthrough_key(batch: int, *, produce_batch: bool = False) -> str:
    return f"{PASSTHROUGH}_{batch}" + ("_produce_batch" if produce_batch else "")


def detector_specs(
    avro: Settings,
    outputs: dict[str, Settings],
    json_in: Settings,
    *,
    our_batch: int,
    quix_python: str | None,
    velocity_max: int = VELOCITY_MAX,
    velocity_rules_file: Path | None = None,
) -> list[DetectorSpec]:
    """Ours first, then the limit at our transaction size and at larger ones, then the peers.

    Ours, the limit, quixstreams and the confluent peer read the same Avro topic, each writing to
    topics of its own (outputs[key]); the seed reads the JSON copy. quix_python None: no quixstreams.
    velocity_rules_file: where velocity_rules() was written (None: no "ours with the velocity rule").
    """

    def out(key: str, *, fraud: bool = True, dlq: bool = True) -> Topics:
        o = outputs[key]
        return Topics(
            avro.transactions_topic, o.legit_topic, o.fraud_topic if fraud else None, o.dlq_topic if dlq else None
        )

    specs = [DetectorSpec("ours", "ours: fraudstream detect", "exactly-once", Topics.derived(avro))]
    for batch in dict.fromkeys((our_batch, *PASSTHROUGH_BEST_SIZES)):
        specs.append(
            DetectorSpec(
                passthrough_key(batch),
                f"limit: EOS passthrough, {batch:,} per transaction",
                "exactly-once",
                out(passthrough_key(batch), fraud=False, dlq=False),
                rule=NO_RULE,
                batch=batch,
            )
        )
    # What the per-record produce() calls cost: the same limit with one produce_batch call per transaction.
    key = passthrough_key(our_batch, produce_batch=True)
    specs.append(
        DetectorSpec(
            key,
            f"limit: EOS passthrough, {our_batch:,} per transaction, produce_batch",
            "exactly-once",
            out(key, fraud=False, dlq=False),
            rule=NO_RULE,
            batch=our_batch,
            produce_batch=True,
        )
    )
    if quix_python:
        specs.append(
            DetectorSpec(
                QUIX,
                "quixstreams 3: Application, Avro via the registry, two filtered branches",
                "exactly-once",
                out(QUIX, dlq=False),
                python=quix_python,
            )
        )
    specs += [
        DetectorSpec(
            "confluent_per_message",
            "confluent-kafka examples: AvroDeserializer/AvroSerializer per message",
            "at-least-once",
            out("confluent_per_message"),
        ),
        DetectorSpec(
            "seed_kafka_python_json",
            "seed: kafka-python, JSON, per message",
            "at-least-once (auto-commit)",
            Topics(json_in.transactions_topic, json_in.legit_topic, json_in.fraud_topic, None),
        ),
    ]
    specs.append(
        DetectorSpec(
            OURS_STATEFUL,
            "ours + its stateful rules (card testing, travel, terminal; not the velocity count)",
            "exactly-once",
            Topics.derived(avro),
            rule=OWN_RULES,
            rules_file=DEFAULT_RULES_FILE,
        )
    )
    if velocity_rules_file:
        specs.append(
            DetectorSpec(
                OURS_VELOCITY,
                "ours + velocity: per-card session count, changelog state",
                "exactly-once",
                Topics.derived(avro),
                rule=VELOCITY,
                velocity_max=velocity_max,
                rules_file=velocity_rules_file,
            )
        )
    if quix_python:
        specs.append(
            DetectorSpec(
                QUIX_VELOCITY,
                "quixstreams 3 + velocity: group_by card, session window count",
                "exactly-once",
                out(QUIX_VELOCITY, dlq=False),
                rule=VELOCITY,
                python=quix_python,
                velocity_max=velocity_max,
            )
        )
    return specs


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
    cpu_s: float  # the whole process life, start-up included
    window_cpu_s: float | None  # first output readable -> all readable (None: could not be read)
    cpu_ms_per_1k: float  # over the window when it is long enough to tell, else over the whole life
    exit_code: int

    def to_json(self) -> dict:
        return asdict(self)


STARTUP_WAIT_S = 60.0


def _wait_started(contenders: list, timeout_s: float) -> None:
    """Until each process has written its first log line (or exited): on a loaded machine one of a group could
    still be importing when the others had routed everything, and die of the SIGTERM before its handler was
    set (exit -15, an empty log; seen in a CI run beside a soak and a second benchmark)."""
    deadline = time.monotonic() + timeout_s
    for contender in contenders:
        while contender.poll() is None and not contender.log_tail(1).strip() and time.monotonic() < deadline:
            time.sleep(0.1)


def run_detector(
    spec: DetectorSpec,
    settings: Settings,
    *,
    run: int,
    expected: int,
    log_dir: Path,
    batch_max_records: int | None = None,
    batch_max_ms: int | None = None,
    processes: int = 1,
    stall_timeout_s: float = 60.0,
    profile_to: Path | None = None,
) -> DetectorRun:
    """A detector (`processes` of them in one consumer group) from the start of its fresh group until all
    `expected` records are routed, then SIGTERM. CPU is the sum over its processes, peak RSS the largest.

    The group id starts with the input topic's name, so that the benchmark's clean-up finds the
    topics a contender creates for itself (quixstreams' changelogs and repartition topics).
    profile_to: run it under pyinstrument (wall-clock sampling, so waits show) and write the text
    report there; such a run's figures are distorted by the profiler and are not results.
    """
    counter = OutputCounter(settings, spec.topics.outputs)
    group_id = unique(f"{spec.topics.input}-{spec.key}")
    name = f"{spec.key}-{'profile' if profile_to else f'run{run}'}" + (f"-x{processes}" if processes > 1 else "")
    contenders = []
    try:
        for instance in range(processes):
            argv = spec.argv(
                settings,
                group_id,
                batch_max_records=batch_max_records,
                batch_max_ms=batch_max_ms,
                instance=instance,
                state_dir=log_dir / f"{name}-{instance}-state",
            )
            if profile_to is not None:
                argv[1:1] = ["-m", "pyinstrument", "--renderer", "text", "--no-color", "--outfile", str(profile_to)]
            contenders.append(Contender(f"{name}-{instance}" if processes > 1 else name, argv, log_dir))
        routed = count_until(counter, contenders, expected, stall_timeout_s=stall_timeout_s)
    except BaseException:
        for contender in contenders:
            contender.stop()
        raise
    finally:
        counter.close()
    started = min(c.started for c in contenders)
    if processes > 1:
        _wait_started(contenders, STARTUP_WAIT_S)
    exits = [c.stop() for c in contenders]
    for contender, exited in zip(contenders, exits):
        if exited.exit_code != 0:
            raise RunFailed(f"{contender.name} exited with {exited.exit_code} on SIGTERM: {contender.log_tail(3)}")
    window = routed.done_s - routed.first_seen_s
    startup_included = routed.count_at_first >= routed.total or window < 0.001
    wall = routed.done_s - started
    throughput = routed.total / wall if startup_included else (routed.total - routed.count_at_first) / window
    by_topic = routed.by_topic
    cpu_s = sum(e.cpu_s for e in exits)
    window_cpu = routed.window_cpu_s
    # /proc counts CPU in clock ticks (10 ms): a window with less than 10 of them says nothing
    # (tiny --quick runs), so those fall back to the whole life.
    if startup_included or window_cpu is None or window_cpu < 0.1:
        cpu_per_1k = cpu_s / routed.total * 1e6
    else:
        cpu_per_1k = window_cpu / (routed.total - routed.count_at_first) * 1e6
    return DetectorRun(
        detector=spec.key,
        run=run,
        throughput_tps=round(throughput, 1),
        window_s=round(window, 3),
        startup_included=startup_included,
        wall_s=round(wall, 3),
        routed=routed.total,
        legit=by_topic[spec.topics.legit],
        fraud=by_topic[spec.topics.fraud] if spec.topics.fraud else 0,
        dead_letter=by_topic[spec.topics.dlq] if spec.topics.dlq else 0,
        peak_rss_mib=round(max(e.peak_rss_kib for e in exits) / 1024, 1),
        cpu_s=round(cpu_s, 2),
        window_cpu_s=None if window_cpu is None else round(window_cpu, 2),
        cpu_ms_per_1k=round(cpu_per_1k, 2),
        exit_code=max(e.exit_code for e in exits),
    )
