"""The producer and detector processes the demo runs: started so that they die with it, stopped in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHILD_STOP_TIMEOUT_S = 30.0

# Runs a fraudstream subcommand in a child that dies with the demo: PR_SET_PDEATHSIG (Linux) sends it
# SIGTERM if the demo itself is killed without cleaning up, so no detector is ever left orphaned.
CHILD_LAUNCHER = """\
import ctypes, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
from fraudstream.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_sent_at: float | None = None

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        """SIGTERM once: the commands stop cleanly on it (flush, commit or abort the open batch)."""
        if self.stop_sent_at is None and self.exit_code is None:
            self.process.send_signal(signal.SIGTERM)
            self.stop_sent_at = time.monotonic()

    def kill_if_overdue(self, timeout_s: float) -> bool:
        if (
            self.exit_code is None
            and self.stop_sent_at is not None
            and time.monotonic() - self.stop_sent_at > timeout_s
        ):
            self.process.kill()
            self.process.wait()
            return True
        return False

    def stopped_cleanly(self) -> bool:
        """Exit 0, or killed by the SIGTERM we sent (a command without its own handler)."""
        return self.exit_code == 0 or (self.stop_sent_at is not None and self.exit_code == -signal.SIGTERM)

    def last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or lines or ["(empty log)"])[-1][:300]

    def failure(self) -> str:
        return f"{self.name} exited with status {self.exit_code}: {self.last_log_line()} (log: {self.log_path})"


def start_child(name: str, command: list[str], log_dir: Path) -> Child:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD_LAUNCHER, *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Own process group: the terminal's Ctrl-C reaches the demo only, which stops children in order.
            process_group=0,
        )
    return Child(name, process, log_path)
