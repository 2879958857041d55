"""A detector in its own process, `python -m fraudstream.consumer`, as an operator runs it.

Its output goes to a file: a pipe nobody reads until the end could fill up and block it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fraudstream.settings import ENV, Settings


class DetectorProcess:
    def __init__(self, settings: Settings, log_path: Path, *, transactional_id: str | None = None,
                 log_interval_s: float = 2, stateless: bool = False) -> None:
        """`transactional_id`: default <group id>-1, one detector slot of the group."""
        env = {**os.environ, ENV["bootstrap_servers"]: settings.bootstrap_servers,
               ENV["schema_registry_url"]: settings.schema_registry_url}
        self.log_path = log_path
        with open(log_path, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fraudstream.consumer", "--topic", settings.transactions_topic,
                 "--group-id", settings.group_id, "--transactional-id", transactional_id or f"{settings.group_id}-1",
                 "--log-interval", f"{log_interval_s:g}", *(["--stateless"] if stateless else [])],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text()

    def tail(self, lines: int = 12) -> str:
        """The last lines of its own (librdkafka's connection failures left out)."""
        return "\n".join([ln for ln in self.output().splitlines() if " FAIL [" not in ln][-lines:])

    def assert_running(self) -> None:
        assert self.process.poll() is None, f"the detector exited ({self.process.returncode}):\n{self.tail()}"

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
