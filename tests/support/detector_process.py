"""A detector in its own process, `python -m fraudstream.consumer`, as an operator runs it.

Its output goes to a file: a pipe nobody reads until the end could fill up and block it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fraudstream.settings import ENV, Settings


# librdkafka 2.x can abort the process when a coordinator request fails on a disconnect (an assertion in
# rd_kafka_enq_once_del_source_return, seen with librdkafka 2.16.0; upstream: confluentinc/librdkafka pull request 5397).
# A supervised detector (as systemd or Kubernetes run it) is restarted after that abort, and only that one.
LIBRDKAFKA_ABORT = "rd_kafka_enq_once_del_source_return"
# A Kafka call blocked long past its timeout (librdkafka again): the detector writes its stacks (faulthandler's
# "Timeout (...)!" header) and exits with status 1, for its supervisor (consumer/detector.py, exit_if_stuck).
STUCK_CALL_EXIT = "!\nThread 0x"


class DetectorProcess:
    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        transactional_id: str | None = None,
        log_interval_s: float = 2,
        stateless: bool = False,
        supervised: bool = False,
    ) -> None:
        """`transactional_id`: default <group id>-1, one detector slot of the group. `supervised`: restarted
        (same ids, same log) if librdkafka aborts it (LIBRDKAFKA_ABORT); `restarts` counts them."""
        self.env = {
            **os.environ,
            ENV["bootstrap_servers"]: settings.bootstrap_servers,
            ENV["schema_registry_url"]: settings.schema_registry_url,
        }
        self.argv = [
            sys.executable,
            "-m",
            "fraudstream.consumer",
            "--topic",
            settings.transactions_topic,
            "--group-id",
            settings.group_id,
            "--transactional-id",
            transactional_id or f"{settings.group_id}-1",
            "--log-interval",
            f"{log_interval_s:g}",
            *(["--stateless"] if stateless else []),
        ]
        self.log_path = log_path
        self.supervised = supervised
        self.restarts = 0
        log_path.write_text("")
        self._start()

    def _start(self) -> None:
        self._log_start = self.log_path.stat().st_size  # this run's output begins here
        with open(self.log_path, "a") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text()

    def tail(self, lines: int = 12) -> str:
        """The last lines of its own (librdkafka's connection failures left out)."""
        return "\n".join([ln for ln in self.output().splitlines() if " FAIL [" not in ln][-lines:])

    def stacks(self) -> str:
        """Where a running detector is waiting: `kill -USR1` makes it write every thread's stack to its log."""
        if self.process.poll() is not None:
            return "(not running)"
        before = self.log_path.stat().st_size
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while self.log_path.stat().st_size == before and time.monotonic() < deadline:
            time.sleep(0.1)  # the dump is written by the detector's signal handler: nothing else to wait on
        time.sleep(0.5)  # let it finish writing every thread
        with open(self.log_path) as log:
            log.seek(before)
            return "\n".join(line for line in log.read().splitlines() if " FAIL [" not in line)

    def assert_running(self) -> None:
        if self.process.poll() is None:
            return
        if self.supervised and self._ended_for_a_supervisor():
            self.restarts += 1
            self._start()
            return
        raise AssertionError(f"the detector exited ({self.process.returncode}):\n{self.tail()}")

    def _ended_for_a_supervisor(self) -> bool:
        """librdkafka's abort, or the detector's own exit on a call stuck for good; nothing else."""
        with open(self.log_path) as log:
            log.seek(self._log_start)
            output = log.read()
        code = self.process.returncode
        return (code == -signal.SIGABRT and LIBRDKAFKA_ABORT in output) or (
            code == 1 and "Timeout (" in output and STUCK_CALL_EXIT in output
        )

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> tuple[int, str]:
        """SIGTERM, as an operator stops it; killed if it has not ended within a minute. (status, output)"""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return self.process.returncode, self.output()

    def stop_cleanly(self) -> str:
        """terminate(), which must end with status 0; its output."""
        code, output = self.terminate()
        assert code == 0, f"the detector ended with status {code}:\n{self.tail()}"
        return output

    def ensure_ended(self) -> None:
        """For a test's `finally`: a detector still running is killed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
