"""Read a child process's output line by line with a deadline (a thread, so no line waits in a buffer)."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO


class LineReader:
    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # end of output

    def next_line(self, timeout_s: float) -> str | None:
        """The next line, None at the end of the output; TimeoutError when none comes in time."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no output line within {timeout_s:.0f}s; so far:\n{''.join(self.seen)}") from None
        if line is not None:
            self.seen.append(line)
        return line

    def until(self, wanted: Callable[[str], bool], timeout_s: float) -> list[str]:
        """Lines up to and including the first that `wanted` accepts."""
        deadline = time.monotonic() + timeout_s
        start = len(self.seen)
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise EOFError(f"output ended before the line waited for:\n{''.join(self.seen)}")
            if wanted(line):
                return self.seen[start:]

    def rest(self, timeout_s: float) -> str:
        """Everything until the end of the output."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout_s
        while self.next_line(max(0.0, deadline - time.monotonic())) is not None:
            pass
        return "".join(self.seen[start:])


def stop_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
