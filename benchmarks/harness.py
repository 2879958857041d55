"""Measuring instruments: contender processes (with their peak RSS), and a read_committed counter.

Every contender runs as a process of its own, so its memory is its own. Its peak RSS is the
kernel's high-water mark of its address space (VmHWM in /proc/<pid>/status), read every time the
harness looks at it until it exits: not wait4's ru_maxrss, which Linux carries over from the
address space the child replaced at exec, i.e. this harness's own RSS at spawn time. Its CPU
seconds in all come from wait4; while it runs, from /proc/<pid>/stat (all its threads), so that
the CPU spent between two moments (first output readable, all readable) can be told apart from
start-up and shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from fraudstream.kafka import consumer_config
from fraudstream.settings import PROJECT_ROOT, Settings

STOP_TIMEOUT_S = 30.0
MAX_DRAIN = 10_000  # records taken from the consumer's queue at once


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class Exited:
    exit_code: int
    peak_rss_kib: int  # last VmHWM read while it ran (0: it never got that far)
    cpu_s: float  # user + system


def high_water_rss_kib(pid: int) -> int | None:
    """VmHWM of a live process, in KiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process (all threads), in seconds; None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


class Contender:
    """One process under measurement; output goes to a log file (a full pipe would stall it)."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, *, cwd: Path = PROJECT_ROOT, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.started = time.perf_counter()
        self.exited: Exited | None = None
        self.peak_rss_kib = 0
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
        )

    def poll(self) -> Exited | None:
        """The exit record if the process has ended (reaped with wait4, never Popen.poll, which would
        throw the resource usage away), else None."""
        if self.exited is None:
            # Read before reaping: a high-water mark only grows, so the last reading is the peak.
            self.peak_rss_kib = high_water_rss_kib(self.process.pid) or self.peak_rss_kib
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                cpu_s = usage.ru_utime + usage.ru_stime
                self.exited = Exited(os.waitstatus_to_exitcode(status), self.peak_rss_kib, cpu_s)
                self.process.returncode = self.exited.exit_code  # reaped: Popen must not wait again
                self._log.close()
        return self.exited

    def wait(self, timeout_s: float | None = None) -> Exited:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not exit within {timeout_s:.0f}s (see {self.log_path})")
            time.sleep(0.05)
        return self.exited

    def stop(self) -> Exited:
        """SIGTERM, as a deployment would stop it; SIGKILL if it does not exit in time."""
        if self.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                return self.wait(STOP_TIMEOUT_S)
            except TimeoutError:
                os.kill(self.process.pid, signal.SIGKILL)
        return self.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass(slots=True)
class Routed:
    """What a detector run produced, as a read_committed reader sees it."""

    by_topic: Counter = field(default_factory=Counter)
    first_seen_s: float | None = None  # perf_counter when the first output became readable
    count_at_first: int = 0  # how many were readable at that moment (one committed batch, or a few)
    cpu_at_first_s: float | None = None  # the contenders' CPU seconds at that moment
    done_s: float | None = None
    cpu_at_done_s: float | None = None  # and when all were readable

    @property
    def window_cpu_s(self) -> float | None:
        """CPU spent while the measured records were routed (start-up and shutdown left out)."""
        if self.cpu_at_first_s is None or self.cpu_at_done_s is None:
            return None
        return self.cpu_at_done_s - self.cpu_at_first_s

    @property
    def total(self) -> int:
        return sum(self.by_topic.values())


class OutputCounter:
    """Counts records readable on some topics by a read_committed consumer, from their current ends on."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.consumer = Consumer(
            consumer_config(
                settings,
                unique("bench-counter"),
                **{
                    "isolation.level": "read_committed",
                    "fetch.wait.max.ms": 10,  # the instrument must not add its own wait to what it measures
                },
            )
        )
        partitions = []
        for topic in topics:
            metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
            for number in metadata.partitions:
                tp = TopicPartition(topic, number)
                # No detector is writing yet, so the high watermark is the stable end.
                tp.offset = self.consumer.get_watermark_offsets(tp, timeout=10)[1]
                partitions.append(tp)
        self.consumer.assign(partitions)

    def poll(self, timeout_s: float = 0.1) -> list:
        """What is readable now: waits up to timeout_s for the first record only.

        consume(n, timeout) would wait out its timeout unless n records came, and the instrument
        would add that wait to every latency and to the end of every throughput run.
        """
        first = self.consumer.poll(timeout_s)
        if first is None:
            return []
        return [m for m in (first, *self.consumer.consume(MAX_DRAIN, 0)) if m.error() is None]

    def close(self) -> None:
        self.consumer.close()


class RunFailed(RuntimeError):
    pass


def count_until(
    counter: OutputCounter,
    contenders: Contender | list[Contender],
    expected: int,
    *,
    stall_timeout_s: float,
    deadline_s: float | None = None,
) -> Routed:
    """Read outputs until `expected` records are readable; fail if a contender dies, they all stall, or
    (when given) deadline_s passes in all."""
    if isinstance(contenders, Contender):
        contenders = [contenders]
    routed = Routed()
    last_progress = started = time.monotonic()
    while routed.total < expected:
        messages = counter.poll()
        now = time.perf_counter()
        for contender in contenders:
            contender.poll()  # also samples its memory
        dead = next((c for c in contenders if c.exited is not None), None)
        if messages:
            for message in messages:
                routed.by_topic[message.topic()] += 1
            if routed.first_seen_s is None:
                routed.first_seen_s, routed.count_at_first = now, routed.total
                routed.cpu_at_first_s = _total_cpu(contenders)
            last_progress = time.monotonic()
        elif dead is not None:
            raise RunFailed(
                f"{dead.name} exited with {dead.exited.exit_code} after routing "
                f"{routed.total}/{expected}: {dead.log_tail(3)}"
            )
        elif time.monotonic() - last_progress > stall_timeout_s:
            names = ", ".join(c.name for c in contenders)
            raise RunFailed(
                f"{names} routed {routed.total}/{expected}, then nothing for "
                f"{stall_timeout_s:.0f}s (see {contenders[0].log_path})"
            )
        if deadline_s is not None and time.monotonic() - started > deadline_s:
            raise RunFailed(
                f"{contenders[0].name} routed {routed.total}/{expected} in {deadline_s:.0f}s "
                f"(see {contenders[0].log_path})"
            )
    routed.done_s = time.perf_counter()
    routed.cpu_at_done_s = _total_cpu(contenders)
    return routed


def _total_cpu(contenders: list[Contender]) -> float | None:
    readings = [cpu_seconds(c.process.pid) for c in contenders]
    return None if None in readings else sum(readings)
