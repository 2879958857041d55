"""Running the pipeline: connect (or start the local stack), start the children, produce, drain, stop, report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fraudstream.demo.bad_records import BadRecordWriter
from fraudstream.demo.children import CHILD_STOP_TIMEOUT_S, Child, start_child
from fraudstream.demo.scoring import DemoState
from fraudstream.demo.summary import inspect_flags, summary_lines
from fraudstream.demo.view import Frame, LiveView, RateMeter
from fraudstream.demo.watcher import PipelineWatcher
from fraudstream.errors import ConfigError, FraudstreamError
from fraudstream.kafka import ensure_topics, wait_for_cluster
from fraudstream.registry import register_all
from fraudstream.settings import ENV, Settings
from fraudstream.signals import stop_requests

FINAL_READ_TIMEOUT_S = 20.0
POLL_S = 0.2
LIBRDKAFKA_LOGGER = "fraudstream.librdkafka"  # parent of the loggers fraudstream.kafka gives every client


class DemoFailed(FraudstreamError):
    """The demo ran but did not end the way it should (a child failed, or the counts do not add up)."""


@dataclass(frozen=True, slots=True)
class Cluster:
    settings: Settings
    started_stack: bool


def connect(settings: Settings, args: argparse.Namespace, log: Callable[[str], None]) -> Cluster:
    """The cluster the environment or flags name; else the local stack, started if needed."""
    defaults = Settings()
    given = (
        args.bootstrap_servers
        or args.schema_registry_url
        or os.environ.get(ENV["bootstrap_servers"])
        or os.environ.get(ENV["schema_registry_url"])
        # named by a client properties file or flag
        or settings.bootstrap_servers != defaults.bootstrap_servers
        or settings.schema_registry_url != defaults.schema_registry_url
    )
    if given:
        wait_for_cluster(settings)
        return Cluster(settings, started_stack=False)
    from fraudstream.stack import LocalStack

    stack = LocalStack(settings, log=log)
    was_running = stack.status().running
    status = stack.up()
    return Cluster(
        settings.replace(bootstrap_servers=status.bootstrap_servers, schema_registry_url=status.registry_url),
        started_stack=not was_running,
    )


def connection_flags(settings: Settings, private_dir: Path | None = None) -> list[str]:
    """`private_dir`: where secrets given as flags go for the children (a private file, never their argv)."""
    from fraudstream.cli import client_flags

    return [
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--schema-registry-url",
        settings.schema_registry_url,
        *client_flags(settings, private_dir),
    ]


def detector_command(settings: Settings, index: int, private_dir: Path | None = None) -> list[str]:
    # One transactional id per detector process: a shared one would fence the others (KIP-447 still
    # needs ids to be unique among live producers). Stable across runs, so a restart aborts what a
    # killed predecessor left open.
    return [
        "detect",
        "--topic",
        settings.transactions_topic,
        "--group-id",
        settings.group_id,
        "--transactional-id",
        f"{settings.group_id}.{settings.transactions_topic}.demo-{index}",
        *connection_flags(settings, private_dir),
    ]


def producer_command(settings: Settings, args: argparse.Namespace, private_dir: Path | None = None) -> list[str]:
    command = [
        "produce",
        "--topic",
        settings.transactions_topic,
        "--rate",
        str(args.rate),
        "--speedup",
        f"{args.speedup:g}",
        "--quiet",
        *connection_flags(settings, private_dir),
    ]
    if args.duration > 0:
        command += ["--duration", f"{args.duration:g}"]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    return command


class Demo:
    def __init__(self, settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
        self.settings = settings
        self.args = args
        self.out = out
        self.state = DemoState()
        interactive = not args.plain and LiveView.is_terminal(out)
        self.view = LiveView(out, interactive=interactive, interval_s=args.interval)
        self.in_rate = RateMeter()
        self.out_rate = RateMeter()
        self.began = time.monotonic()
        self.phase = "starting"
        self.problems: list[str] = []
        self.bad_records_written = 0

    def frame(self) -> Frame:
        now = time.monotonic()
        counts = self.state.counts
        self.in_rate.add(now, counts.produced)
        self.out_rate.add(now, counts.routed)
        return Frame(
            topic=self.settings.transactions_topic,
            detectors=self.args.detectors,
            rate=self.args.rate,
            duration_s=self.args.duration,
            elapsed_s=now - self.began,
            phase=self.phase,
            state=self.state,
            in_per_s=self.in_rate.per_second(),
            out_per_s=self.out_rate.per_second(),
        )

    def run(self, watcher: PipelineWatcher, log_dir: Path) -> None:
        private = log_dir / "client-properties"  # secrets given as flags: for the children, never on their argv
        detectors = [
            start_child(f"detector-{i}", detector_command(self.settings, i, private), log_dir)
            for i in range(self.args.detectors)
        ]
        producer = start_child("producer", producer_command(self.settings, self.args, private), log_dir)
        children = [producer, *detectors]
        for child in children:
            print(f"started {child.name} (pid {child.process.pid}), log {child.log_path}", file=self.out)
        self.out.flush()
        try:
            with stop_requests() as (stop, now):
                self._produce(watcher, producer, detectors, stop, now)
                if not self.problems:
                    self._drain(watcher, detectors, now)
                self._stop_all(watcher, detectors, now)
        finally:
            for child in children:  # whatever happened above, nothing we started outlives the demo
                if child.exit_code is None:
                    child.process.kill()
                    child.process.wait()
        self._final_read(watcher)
        for child in children:
            if not child.stopped_cleanly() and child.failure() not in self.problems:
                self.problems.append(child.failure())

    def _tick(self, watcher: PipelineWatcher) -> None:
        watcher.poll(POLL_S)
        self.view.update(self.frame())

    def _produce(
        self,
        watcher: PipelineWatcher,
        producer: Child,
        detectors: list[Child],
        stop: threading.Event,
        now: threading.Event,
    ) -> None:
        self.phase = "producing"
        saboteur = BadRecordWriter(self.settings, self.args.bad_records, self.args.duration)
        try:
            self._produce_until_done(watcher, producer, detectors, stop, now, saboteur)
            if not stop.is_set() and not self.problems:
                saboteur.write_due(float("inf"))  # the generator finished early: the rest go now
        finally:
            saboteur.close()
            self.bad_records_written = saboteur.written

    def _produce_until_done(
        self,
        watcher: PipelineWatcher,
        producer: Child,
        detectors: list[Child],
        stop: threading.Event,
        now: threading.Event,
        saboteur: BadRecordWriter,
    ) -> None:
        while producer.exit_code is None:
            self._tick(watcher)
            started = self.state.traffic_started_at
            if started is not None and not stop.is_set():  # spread over the traffic, once the generator is up
                saboteur.write_due(time.monotonic() - started)
            if stop.is_set():
                self.phase = "stopping the producer"
                producer.stop()
                if now.is_set():
                    producer.process.kill()
                producer.kill_if_overdue(CHILD_STOP_TIMEOUT_S)
            dead = [d for d in detectors if d.exit_code is not None]
            if dead:
                self.problems.append(dead[0].failure())
                producer.stop()
                return
        if not producer.stopped_cleanly():
            self.problems.append(producer.failure())

    def _drain(self, watcher: PipelineWatcher, detectors: list[Child], now: threading.Event) -> None:
        """Wait until every record produced is routed: then the counts add up when the detectors stop."""
        input_end = watcher.end_offsets([self.settings.transactions_topic])  # the producer is done: final
        deadline = time.monotonic() + self.args.drain_timeout
        counts = self.state.counts
        while True:
            self.phase = f"draining: {max(counts.in_flight, 0):,} records still in flight"
            self._tick(watcher)
            if watcher.caught_up(input_end) and counts.routed >= counts.expected:
                return
            if now.is_set():
                self.problems.append(f"stopped at once by a second Ctrl-C with {counts.in_flight:,} records in flight")
                return
            dead = [d for d in detectors if d.exit_code is not None]
            if dead:
                self.problems.append(dead[0].failure())
                return
            if time.monotonic() > deadline:
                self.problems.append(
                    f"the detectors did not route {counts.in_flight:,} records within "
                    f"{self.args.drain_timeout:.0f}s (see their logs)"
                )
                return

    def _stop_all(self, watcher: PipelineWatcher, detectors: list[Child], now: threading.Event) -> None:
        self.phase = "stopping the detectors"
        for detector in detectors:
            detector.stop()
        while any(d.exit_code is None for d in detectors):
            self._tick(watcher)
            for detector in detectors:
                if now.is_set():
                    detector.process.kill()
                elif detector.kill_if_overdue(CHILD_STOP_TIMEOUT_S):
                    self.problems.append(
                        f"{detector.name} did not stop within {CHILD_STOP_TIMEOUT_S:.0f}s of SIGTERM and was killed"
                    )

    def _final_read(self, watcher: PipelineWatcher) -> None:
        """Everything the children committed is in the counts before the summary."""
        self.phase = "done"
        ends = watcher.end_offsets()
        deadline = time.monotonic() + FINAL_READ_TIMEOUT_S
        while not watcher.caught_up(ends) and time.monotonic() < deadline:
            watcher.poll(POLL_S)
        self.view.update(self.frame(), force=True)
        self.view.close()


def _start_console(settings: Settings, args: argparse.Namespace, log: Callable[[str], None]):
    """The analyst console in this process (a thread), on 127.0.0.1; None (said once) if it cannot start."""
    try:
        from fraudstream.console import DEFAULT_PORT, start_in_thread

        console = start_in_thread(settings, port=DEFAULT_PORT if args.console_port is None else args.console_port)
    except ImportError as exc:
        log(f"analyst console not started: it needs its extra, pip install 'fraudstream[console]' ({exc.name})")
        return None
    except FraudstreamError as exc:
        log(f"analyst console not started: {exc}")
        return None
    log(f"analyst console: {console.url}")
    return console


def _serve_console_until_interrupted(console, out: TextIO) -> None:
    """On a terminal the console keeps serving after the summary, until Ctrl-C; otherwise it stops with the demo."""
    try:
        if out.isatty():
            print(f"the analyst console keeps serving at {console.url}: Ctrl-C stops it", file=out, flush=True)
            with stop_requests(exit_on_second="fraudstream demo") as (stop, _):
                stop.wait()
    finally:
        console.stop()


def run(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    # librdkafka logs every reconnect attempt; a lost broker shows as our own one-line error instead.
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL)

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    cluster = connect(settings, args, log)
    settings = cluster.settings
    ensure_topics(settings)
    for subject, schema_id in register_all(settings).items():
        log(f"schema {subject} registered (id {schema_id})")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fraudstream-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    demo = Demo(settings, args, out)
    console = _start_console(settings, args, log) if args.console else None
    watcher = PipelineWatcher(settings, demo.state)
    try:
        partitions = sum(1 for topic, _ in watcher.partitions if topic == settings.transactions_topic)
        if args.detectors > partitions:  # checked against the topic as it is: it may predate --partitions
            raise ConfigError(
                f"--detectors {args.detectors} is more than the {partitions} partitions of "
                f"{settings.transactions_topic}: the extra detectors would sit idle"
            )
        demo.state.counts.backlog = watcher.backlog(settings.group_id)
        demo.run(watcher, log_dir)
    finally:
        watcher.close()
    frame = demo.frame()
    stop_stack = args.stop_stack and cluster.started_stack
    for line in summary_lines(
        frame,
        settings,
        extra_flags=inspect_flags(settings),
        log_dir=log_dir,
        stack_left_running=cluster.started_stack and not stop_stack,
        bad_records=demo.bad_records_written,
        console_url=console.url if console else None,
    ):
        print(line, file=out)
    out.flush()
    if console is not None:
        _serve_console_until_interrupted(console, out)
    if stop_stack:
        from fraudstream.stack import LocalStack

        LocalStack(settings, log=log).down()
    counts = frame.state.counts
    if demo.problems:
        raise DemoFailed("; ".join(demo.problems))
    if not counts.add_up:
        raise DemoFailed(f"counts do not add up: {counts.expected:,} to route, {counts.routed:,} routed")
    return 0
