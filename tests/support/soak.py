"""The soak: a seeded random fault schedule under load, then an independent check of every topic.

    python -m tests.support.soak [--minutes 30] [--brokers 1|3] [--seed N] [--rate R] [--out DIR]

On a Kafka and a registry of its own (free ports, under --out), a producer writes transactions and their labels
at a steady rate while a schedule, drawn from the seed, does to the pipeline what production does to it:
a detector killed (kill -9) or frozen (SIGSTOP, at times past the group's session timeout), a broker killed or
frozen (past the transaction timeout at times), the registry killed, detectors joining and leaving (1 -> 3 -> 1),
the rules changed (every rule written again as its next version: the decisions stay the same, the rule-set
version they name changes), and malformed records in the input. Every kind of fault comes once in each round of
the schedule, in a random order.

Then the input is copied, record for record (keys, values, headers, timestamps, partitions), to a topic of its
own, and one detector routes that copy with no fault at all: the uninterrupted run. The checker
(tests/support/soak_checker.py, which imports nothing of fraudstream) reads every topic from the start,
read_committed, and reports lost, duplicated and unreadable outputs, held rows still live in the held changelog,
and every transaction whose decision (route and rules) differs from the uninterrupted run's.

A detector that exits by itself is restarted and counted (`restarted_from_outside`, target 0), with the end of
its log. On any finding the evidence stays under --out: the brokers' data, every process's log, the schedule
and the checker's report (report.json), whose examples name each transaction's input partition and offset.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from fraudstream.kafka import consumer_config, ensure_topics, producer_config
from fraudstream.producer.loop import produce
from fraudstream.registry import register_all
from fraudstream.settings import ENV, PROJECT_ROOT, Settings
from fraudstream.stack import pid_alive
from tests.support.detector_process import DetectorProcess
from tests.support.own_stack import own_registry, start_kafka

FAULTS = (
    "detector_kill",
    "detector_freeze",
    "broker_kill",
    "broker_freeze",
    "registry_kill",
    "scale",
    "rules_change",
    "bad_records",
)
SLOTS = (1, 2, 3)  # detector slots: transactional ids <group>-1 .. -3
SPEEDUP = 60.0  # event time runs a minute per second: cards pay, terminals fill and held records fall due
WAIT_S = 600.0  # the longest any step may take on a busy 2-core machine


@dataclass
class Event:
    at_s: float
    kind: str
    detail: str = ""


@dataclass
class SoakRun:
    out: Path
    minutes: float
    brokers: int
    seed: int
    rate: int
    partitions: int = 3
    events: list[Event] = field(default_factory=list)
    restarted_from_outside: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _frozen: set[int] = field(default_factory=set)  # detector slots stopped on purpose just now

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(self.seed)
        base = Settings.from_env()
        stack, kafka = start_kafka(base, self.out / "kafka", self.brokers)
        registry = None
        ok = False
        try:
            registry = own_registry(kafka, self.out / "registry")
            name = f"soak-{uuid.uuid4().hex[:8]}"
            self.settings = kafka.replace(
                schema_registry_url=registry.registry_url,
                transactions_topic=name,
                group_id=name,
                partitions=self.partitions,
            )
            ensure_topics(self.settings)
            register_all(self.settings)
            self.stack, self.registry = stack, registry
            report = self._load_and_faults(rng)
            report |= self._check()
            ok = report["ok"]
            return report
        finally:
            for detector in getattr(self, "detectors", {}).values():
                detector.ensure_ended()
            if registry is not None:
                registry.stop_registry()
            stack.down(wipe=ok)  # the brokers' data is evidence when something was found

    # ----- under load, with faults -----
    def _load_and_faults(self, rng: random.Random) -> dict:
        s = self.settings
        self.detectors: dict[int, DetectorProcess] = {}
        self._started_in: dict[int, int] = {}  # slot -> processes started in it so far
        self._start_detector(1)
        stop_producing = threading.Event()
        produced: list = []
        producer = threading.Thread(
            target=lambda: produced.append(
                produce(
                    s,
                    rate=self.rate,
                    stop=stop_producing,
                    seed=self.seed,
                    labels=True,
                    speedup=SPEEDUP,
                    delivery_timeout_s=WAIT_S,
                )
            ),
            daemon=True,
        )
        started = time.monotonic()
        producer.start()
        end = started + self.minutes * 60
        queue: list[str] = []
        time.sleep(5)  # a first stretch with no fault: the pipeline runs before anything is done to it
        rounds = 0
        while time.monotonic() < end or (queue and rounds == 1):  # the first round is always done whole
            if not queue:
                queue = rng.sample(FAULTS, len(FAULTS))
                rounds += 1
            kind = queue.pop()
            detail = getattr(self, f"_{kind}")(rng)
            self.events.append(Event(round(time.monotonic() - started, 1), kind, detail))
            self._log(f"{self.events[-1].at_s:7.1f}s {kind}: {detail}")
            self._keep_detectors_running()
            pause_until = time.monotonic() + rng.uniform(4, 12)
            while time.monotonic() < pause_until:
                self._keep_detectors_running()
                time.sleep(0.5)
        stop_producing.set()
        producer.join(WAIT_S)
        [report] = produced
        self._log(f"produced {report.delivered} transactions ({report.failed} failed)")
        self._wait_routed(s, expected=self._input_records(s), detectors=self._keep_detectors_running)
        for slot, detector in self.detectors.items():
            self._stop(slot, detector)
        self.detectors.clear()
        return {"produced": report.delivered, "produce_failed": report.failed}

    def _start_detector(self, slot: int) -> None:
        """A new process in `slot`, with a log of its own: detector-<slot>.<n>.log for its n-th process (a
        process killed and started again must not wipe the evidence of the one before)."""
        s = self.settings
        self._started_in[slot] = self._started_in.get(slot, 0) + 1
        self.detectors[slot] = DetectorProcess(
            s,
            self.out / f"detector-{slot}.{self._started_in[slot]}.log",
            transactional_id=f"{s.group_id}-{slot}",
            supervised=False,
        )

    def _keep_detectors_running(self) -> None:
        """A detector that ended by itself is restarted, and counted: the target is none."""
        for slot, detector in self.detectors.items():
            if detector.process.poll() is not None and slot not in self._frozen:
                self.restarted_from_outside.append(
                    f"slot {slot} exited ({detector.process.returncode}): {detector.tail(6)}"
                )
                self._log(f"detector {slot} exited by itself ({detector.process.returncode}): restarted")
                detector._start()

    def _stop(self, slot: int, detector: DetectorProcess) -> None:
        """SIGTERM, as an operator stops a detector: one still running a minute later is a finding, with its stacks."""
        detector.process.send_signal(signal.SIGTERM)
        try:
            detector.process.wait(60)
        except subprocess.TimeoutExpired:
            self.restarted_from_outside.append(f"slot {slot} still running 60 s after SIGTERM:\n{detector.stacks()}")
            self._log(f"detector {slot} did not stop within 60 s of SIGTERM: killed (its stacks are in its log)")
            detector.kill()

    def _live_slot(self, rng: random.Random) -> int:
        return rng.choice(sorted(self.detectors))

    def _detector_kill(self, rng: random.Random) -> str:
        slot = self._live_slot(rng)
        self.detectors[slot].kill()
        time.sleep(rng.uniform(0, 5))
        self.detectors[slot]._start()
        return f"slot {slot}"

    def _detector_freeze(self, rng: random.Random) -> str:
        slot, seconds = self._live_slot(rng), rng.uniform(2, 15)  # past the session timeout (10 s) at times
        process = self.detectors[slot].process
        self._frozen.add(slot)
        os.kill(process.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(process.pid, signal.SIGCONT)
        self._frozen.discard(slot)
        return f"slot {slot} for {seconds:.1f} s"

    def _broker_kill(self, rng: random.Random) -> str:
        node = rng.randint(1, self.brokers)
        pid = self.stack.broker_pid(node)
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        time.sleep(rng.uniform(1, 5))
        _again(lambda: self.stack.start_broker(node), what=f"restarting broker {node}")
        return f"node {node}"

    def _broker_freeze(self, rng: random.Random) -> str:
        # On three nodes, past the transaction timeout (10 s) at times: the frozen node's partitions move to the
        # others. One node is paused less than Kafka's broker session (9 s) less a heartbeat interval (2 s): past
        # that, it fences its own broker on waking, and a transaction ended in that instant loses its markers for
        # good (Kafka's; docs: exactly-once). The broker fault tests freeze one node past the transaction timeout.
        node, seconds = rng.randint(1, self.brokers), rng.uniform(3, 14 if self.brokers > 1 else 6.5)
        pid = self.stack.broker_pid(node)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)
        return f"node {node} for {seconds:.1f} s"

    def _registry_kill(self, rng: random.Random) -> str:
        pid = self.registry.status().registry_pid
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        time.sleep(rng.uniform(1, 5))
        _again(
            self.registry.start_registry,
            what="restarting the registry",
            # A registry that came up broken (Apicurio's storage failed to start while a broker was away: it
            # answers 500) is stopped and started again, as a supervisor's liveness probe would.
            on_failure=self.registry.stop_registry,
        )
        return f"pid {pid}"

    def _scale(self, rng: random.Random) -> str:
        if len(self.detectors) == 1:
            for slot in SLOTS[1:]:
                self._start_detector(slot)
            return "1 -> 3 detectors"
        for slot in SLOTS[1:]:
            self._stop(slot, self.detectors.pop(slot))
        return "3 -> 1 detector"

    def _rules_change(self, rng: random.Random) -> str:
        s = self.settings
        env = {
            **os.environ,
            ENV["bootstrap_servers"]: s.bootstrap_servers,
            ENV["schema_registry_url"]: s.schema_registry_url,
        }
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fraudstream.cli",
                "rules",
                "set",
                str(PROJECT_ROOT / "rules" / "default.toml"),
                "--topic",
                s.transactions_topic,
                "--author",
                "soak",
                "--comment",
                "the same rules, again",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:  # the registry or a broker may be down just then: the schedule goes on
            self.skipped.append(f"rules change: {done.stderr.strip()[-300:]}")
            return f"refused ({done.stderr.strip()[-120:]})"
        return "every rule written again as its next version"

    def _bad_records(self, rng: random.Random) -> str:
        s = self.settings
        producer = Producer(producer_config(s))
        for i in range(3):
            producer.produce(s.transactions_topic, b"{not avro %d}" % rng.randrange(10**9), f"bad-{i}".encode())
        remaining = producer.flush(60)
        return f"3 malformed values ({remaining} undelivered)"

    # ----- the end -----
    def _input_records(self, s: Settings) -> int:
        """Records in the input (its end offsets: the producer's writes are not transactional)."""
        consumer = Consumer(consumer_config(s, f"soak-count-{uuid.uuid4().hex[:6]}"))
        try:
            return sum(
                consumer.get_watermark_offsets(TopicPartition(s.transactions_topic, p), timeout=30)[1]
                - consumer.get_watermark_offsets(TopicPartition(s.transactions_topic, p), timeout=30)[0]
                for p in range(s.partitions)
            )
        finally:
            consumer.close()

    def _wait_routed(self, s: Settings, *, expected: int, detectors) -> None:
        """Until every input record was routed (held ones released included), read_committed; `detectors()` is
        called meanwhile (keeps them running, or checks they are)."""
        from tests.support.routed import RoutedReader

        reader = RoutedReader(s)
        deadline = time.monotonic() + WAIT_S
        try:
            while reader.total < expected:
                if time.monotonic() > deadline:
                    self._log(f"timed out: {reader.total} of {expected} routed; {reader.describe()}")
                    return
                detectors()
                reader.read(1.0)
        finally:
            reader.close()

    def _check(self) -> dict:
        """The uninterrupted run over a copy of the input, then the independent checker."""
        s = self.settings
        copy = s.replace(
            transactions_topic=f"{s.transactions_topic}-uninterrupted", group_id=f"{s.group_id}-uninterrupted"
        )
        ensure_topics(copy)
        register_all(copy)
        copied = _copy_topic(s, s.transactions_topic, copy.transactions_topic)
        self._log(f"copied {copied} input records for the uninterrupted run")
        baseline = DetectorProcess(copy, self.out / "detector-uninterrupted.log", transactional_id=f"{copy.group_id}-1")
        self._wait_routed(copy, expected=copied, detectors=baseline.assert_running)
        baseline.terminate()
        checker = [
            sys.executable,
            str(Path(__file__).with_name("soak_checker.py")),
            "--bootstrap",
            s.bootstrap_servers,
            "--registry",
            s.schema_registry_url,
            "--input",
            s.transactions_topic,
            "--group",
            s.group_id,
            "--baseline-input",
            copy.transactions_topic,
            "--baseline-group",
            copy.group_id,
            "--out",
            str(self.out / "checker.json"),
        ]
        subprocess.run(checker, capture_output=True, text=True, timeout=900)
        found = json.loads((self.out / "checker.json").read_text())
        return {
            **found,
            "ok": found["ok"] and not self.restarted_from_outside,
            "restarted_from_outside": len(self.restarted_from_outside),
            "restarts": self.restarted_from_outside,
            "events": [e.__dict__ for e in self.events],
            "skipped": self.skipped,
            "brokers": self.brokers,
            "minutes": self.minutes,
            "seed": self.seed,
            "rate": self.rate,
        }

    def _log(self, line: str) -> None:
        print(f"soak: {line}", flush=True)
        with open(self.out / "soak.log", "a") as log:
            log.write(line + "\n")


def _copy_topic(settings: Settings, source: str, target: str) -> int:
    """Every record of `source`, partition by partition and in order, to the same partition of `target`, with its
    key, value, headers and timestamp: the same input, for a run with no fault."""
    consumer = Consumer(consumer_config(settings, f"soak-copy-{uuid.uuid4().hex[:6]}"))
    producer = Producer(producer_config(settings))
    copied = 0
    try:
        for partition in range(settings.partitions):
            tp = TopicPartition(source, partition, 0)
            low, high = consumer.get_watermark_offsets(tp, timeout=30)
            consumer.assign([TopicPartition(source, partition, low)])
            position = low
            while position < high:
                for message in consumer.consume(5_000, 1.0):
                    if message.error() is not None:
                        continue
                    producer.produce(
                        target,
                        message.value(),
                        message.key(),
                        partition=partition,
                        headers=message.headers(),
                        timestamp=message.timestamp()[1],
                    )
                    producer.poll(0)
                    copied += 1
                    position = message.offset() + 1
        assert producer.flush(120) == 0, "the copy was not all delivered"
    finally:
        consumer.close()
    return copied


def _again(start, *, what: str, on_failure=lambda: None) -> None:
    """A restart the machine's load can make fail (a port still held, a start slower than its timeout): tried again
    until WAIT_S; the soak is about the pipeline, not about how fast a JVM starts on a busy machine."""
    from fraudstream.errors import StackError

    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            start()
            return
        except StackError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"soak: {what} failed ({exc}); trying again", flush=True)
            on_failure()
            time.sleep(2)


def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--brokers", type=int, choices=(1, 3), default=3)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--rate", type=int, default=400, help="transactions per second (default 400)")
    parser.add_argument("--out", type=Path, help="where the evidence goes (default .soak/<seed>-<brokers>)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped soak still stops what it started
    out = args.out or PROJECT_ROOT / ".soak" / f"{args.seed}-{args.brokers}b"
    report = SoakRun(out, args.minutes, args.brokers, args.seed, args.rate).run()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    keys = (
        "input_records",
        "routed",
        "lost",
        "duplicated",
        "unreadable",
        "held_live",
        "decisions_differ",
        "decisions_differ_released_early",
        "restarted_from_outside",
    )
    print(
        "soak: " + ", ".join(f"{key} {report.get(key)}" for key in keys) + f"; {len(report['events'])} faults; "
        f"evidence in {out}" + ("" if report["ok"] else " (FAILED)")
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
